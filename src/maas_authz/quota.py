"""Quota: what the rate limits leave a caller, read from maas-ratelimit without consuming any.

A peek is a ShouldRateLimit call whose descriptors are all check-only (hits_addend 0), built as
Envoy's rate limit filter builds the admission descriptor from maas-authz's metadata (tier or
subscription + token_limits, user, model): maas-ratelimit answers it with every limit that
applies and what it has left, on the memory and the Redis store alike.

GET /v1/quota through the gateway is answered by maas-authz itself in Check (service.py): the
caller is authenticated and authorized as for a model request (`?model=` names one), then
peeked; the answer goes back as Envoy's local reply, so no rate limit is taken and no model
is called.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qs

import grpc
from envoy.extensions.common.ratelimit.v3.ratelimit_pb2 import RateLimitDescriptor
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf.json_format import MessageToDict

from maas_authz.check import CheckPipeline
from maas_authz.decision import Allow, Deny, QuotaReply
from maas_authz.model_path import BodyRoute, ModelRef, OpenPath, is_namespace_name
from maas_common.errors import BackendUnavailable
from maas_common.quota_headers import quota_header_triple
from maas_common.tls import ReloadingClientChannel

QUOTA_PATH = "/v1/quota"


def descriptor_for(allow: Allow) -> dict[str, str] | None:
    """The admission descriptor Envoy would send for `allow` (envoy/gateway.yaml's first
    rate_limits entry), or None when it sends none (no user: an unauthenticated open path)."""
    identity = allow.identity
    if identity is None:
        return None
    entries: dict[str, str] = {}
    if allow.tier is not None:
        entries["tier"] = allow.tier.name
    if allow.selection is not None:
        terms = dict(allow.selection.terms)
        entries["subscription"] = terms["subscription"]
        entries["token_limits"] = terms["token_limits"]
    entries["user"] = identity.username
    if allow.model is not None:
        entries["model"] = str(allow.model)
    return entries


@dataclass(frozen=True, slots=True)
class Peek:
    limits: tuple[dict[str, Any], ...]  # as maas-ratelimit reports them (responses.limit_report)
    refusal: str | None = None  # a request maas-ratelimit would refuse by no limit

    def enforced(self) -> list[dict[str, Any]]:
        return [limit for limit in self.limits if not limit.get("shadow")]


class Peeker(Protocol):
    """Raises BackendUnavailable when maas-ratelimit cannot answer."""

    async def peek(self, descriptors: Sequence[Mapping[str, str]]) -> Peek: ...

    async def close(self) -> None: ...


class RateLimitPeeker:
    """maas-ratelimit's limits for a descriptor, consuming nothing; every call has a timeout and
    waits for one of `max_concurrency` slots (inside the same timeout)."""

    def __init__(
        self,
        target: str,
        domain: str,
        *,
        timeout: float,
        max_concurrency: int,
        tls: ReloadingClientChannel | None = None,
    ) -> None:
        # with TLS, the channel follows renewed certificate files (a new one after a rotation)
        self._tls = tls
        self._channel = tls.current() if tls else grpc.aio.insecure_channel(target)
        self._stub = rls_pb2_grpc.RateLimitServiceStub(self._channel)
        self._domain = domain
        self._timeout = timeout
        self._slots = asyncio.Semaphore(max_concurrency)

    async def peek(self, descriptors: Sequence[Mapping[str, str]]) -> Peek:
        request = rls_pb2.RateLimitRequest(domain=self._domain)
        for entries in descriptors:
            descriptor = request.descriptors.add()
            descriptor.entries.extend(
                RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries.items()
            )
            descriptor.hits_addend.value = 0  # check only: a peek
        try:
            async with asyncio.timeout(self._timeout):
                async with self._slots:
                    response = await self._current_stub().ShouldRateLimit(request)
        except TimeoutError:
            raise BackendUnavailable(
                "ratelimit", "timeout", "maas-ratelimit did not answer"
            ) from None
        except grpc.aio.AioRpcError as exc:
            raise BackendUnavailable(
                "ratelimit", exc.code().name.lower(), exc.details() or "call failed"
            ) from None
        metadata = MessageToDict(response.dynamic_metadata)
        limits = tuple(_whole_numbers(limit) for limit in metadata.get("limits", ()))
        return Peek(limits, metadata.get("refusal"))

    def _current_stub(self) -> rls_pb2_grpc.RateLimitServiceStub:
        if self._tls is not None:
            channel = self._tls.current()
            if channel is not self._channel:
                self._channel = channel
                self._stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        return self._stub

    async def close(self) -> None:
        if self._tls is not None:
            await self._tls.close()
        else:
            await self._channel.close()


def _whole_numbers(limit: dict[str, Any]) -> dict[str, Any]:
    """A Struct's numbers are doubles: counts back to integers."""
    for key in ("limit", "remaining"):
        if isinstance(limit.get(key), float):
            limit[key] = int(limit[key])
    return limit


def caller_view(limit: Mapping[str, Any]) -> dict[str, Any]:
    """One limit as /v1/quota shows it to the caller (a budget: with its period)."""
    view = {
        "name": limit["name"],
        "unit": limit["unit"],
        "limit": limit["limit"],
        "remaining": limit["remaining"],
        "reset_seconds": limit["reset_seconds"],
        "window_seconds": limit["window_seconds"],
        "description": limit["description"],
    }
    if limit.get("budget"):
        view["budget"] = True
        for name in ("per", "period", "period_id", "timezone", "resets_at"):
            if name in limit:
                view[name] = limit[name]
    return view


def quota_headers(limits: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """x-ratelimit-{limit,remaining,reset}-{requests,tokens} from the enforced limit of each
    unit with the least room left (as maas-ratelimit sets them on model responses)."""
    headers: list[tuple[str, str]] = []
    for unit in ("requests", "tokens"):
        candidates = [
            x for x in limits if x["unit"] == unit and not x.get("shadow") and not x.get("budget")
        ]
        if not candidates:
            continue
        tightest = min(candidates, key=lambda x: (x["remaining"] / x["limit"], x["name"]))
        reset_ms = round(tightest["reset_seconds"] * 1000)
        headers += quota_header_triple(unit, tightest["limit"], tightest["remaining"], reset_ms)
    return headers


def target_of(model: str | None) -> tuple[ModelRef | OpenPath | BodyRoute, bytes] | Deny:
    """What a quota (or explain) request is about: `namespace/name`, a bare model name (as an
    OpenAI body names it: the default namespace or the subscription catalog resolves it), or
    no model at all (every limit that is not per model)."""
    if not model:
        return OpenPath(QUOTA_PATH), b""
    if "/" in model:
        namespace, _, name = model.partition("/")
        if not (is_namespace_name(namespace) and name and "/" not in name):
            return Deny(
                400, "invalid_model", f"model must be 'namespace/name' or a name, got {model!r}"
            )
        return ModelRef(namespace, name), b""
    return BodyRoute(QUOTA_PATH), json.dumps({"model": model}).encode()


class QuotaEndpoint:
    """GET /v1/quota with the caller's own credentials."""

    def __init__(self, pipeline: CheckPipeline, peeker: Peeker, path: str = QUOTA_PATH):
        self._pipeline = pipeline
        self._peeker = peeker
        self.path = path

    def handles(self, path: str) -> bool:
        # on every Check: the prefix test first, nearly every path fails it
        return path.startswith(self.path) and path.partition("?")[0].rstrip("/") == self.path

    async def answer(
        self, method: str, path: str, authorization: str | None, headers: Mapping[str, str]
    ) -> QuotaReply | Deny:
        if method not in ("GET", "HEAD"):
            return Deny(405, "method_not_allowed", f"{self.path} answers GET only")
        query = parse_qs(path.partition("?")[2])
        target = target_of((query.get("model") or [""])[0])
        if isinstance(target, Deny):
            return target
        routed, request_body = target
        decision = await self._pipeline.decide_routed(
            routed, authorization, headers=headers, body=request_body
        )
        if isinstance(decision, Deny):
            return decision
        descriptor = descriptor_for(decision)
        if descriptor is None:  # pragma: no cover - decide_routed always authenticates
            return Deny(401, "missing_credentials", "quota needs credentials")
        try:
            peek = await self._peeker.peek([descriptor])
        except BackendUnavailable:
            return Deny(
                503,
                "ratelimit_unavailable",
                "the rate limiter cannot be asked right now; retry later",
                retry_after=5,
            )
        limits = [caller_view(limit) for limit in peek.enforced()]
        body: dict[str, Any] = {"limits": limits}
        # under log_* names: a local reply's metadata must never look like a request to count
        metadata = {"answer": "quota", "log_user": descriptor["user"]}
        if decision.tier is not None:
            body["tier"] = metadata["log_tier"] = decision.tier.name
        if decision.selection is not None:
            body["subscription"] = metadata["log_subscription"] = descriptor["subscription"]
        if decision.model is not None:
            body["model"] = metadata["log_model"] = str(decision.model)
        elif decision.selection is None and decision.subscription_flow:
            body["note"] = "a subscription's token limits are per model: add ?model="
        return QuotaReply(body, quota_headers(peek.enforced()), metadata)
