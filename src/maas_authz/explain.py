"""Explain: the whole decision for a request that is never made, phase by phase, consuming nothing.

The same CheckPipeline that answers Envoy decides (with the caller's credentials, or for a
synthetic user and groups, which skips authentication), then maas-ratelimit is peeked with the
descriptor Envoy would send. The answer says whether the request would pass, why not, and what
each limit has left.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from maas_authz.check import CheckPipeline
from maas_authz.decision import Allow, Decision, Deny
from maas_authz.identity import Identity
from maas_authz.model_path import BadPath, BodyRoute, ModelRef, OpenPath
from maas_authz.quota import Peeker, descriptor_for, target_of
from maas_authz.responses import SUBSCRIPTION_HEADER
from maas_common.errors import BackendUnavailable

_MAX_GROUPS = 256


@dataclass(frozen=True, slots=True)
class ExplainRequest:
    token: str | None = None  # a credential to explain as; never echoed, never logged
    user: str | None = None  # or a synthetic user ...
    groups: tuple[str, ...] = ()  # ... with these groups (authentication is skipped)
    path: str | None = None  # the request path, as Envoy would see it
    model: str | None = None  # or the model: "namespace/name" or a name
    body: bytes = b""  # the body, for body routes (/v1/chat/completions)
    subscription: str | None = None  # the X-MaaS-Subscription the client would send
    tokens: int | None = None  # an estimate of the request's tokens

    @classmethod
    def from_json(cls, data: Any) -> ExplainRequest:
        """From the POST body; raises ValueError saying what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        known = {"token", "user", "groups", "path", "model", "body", "subscription", "tokens"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}; expected some of {sorted(known)}")
        token, user = data.get("token"), data.get("user")
        if (token is None) == (user is None):
            raise ValueError("give either token (a credential) or user (with groups)")
        for name in ("token", "user", "path", "model", "subscription"):
            if data.get(name) is not None and not isinstance(data[name], str):
                raise ValueError(f"{name} must be a string")
        groups = data.get("groups", [])
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise ValueError("groups must be a list of strings")
        if len(groups) > _MAX_GROUPS:
            raise ValueError(f"at most {_MAX_GROUPS} groups")
        if token is not None and groups:
            raise ValueError("groups go with user, not with token (the token says its groups)")
        path, model = data.get("path"), data.get("model")
        if (path is None) == (model is None):
            raise ValueError("give either path or model")
        body = data.get("body")
        if body is not None and not isinstance(body, dict):
            raise ValueError("body must be a JSON object (the request body)")
        tokens = data.get("tokens")
        if tokens is not None and (
            isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0
        ):
            raise ValueError("tokens must be a whole number >= 0")
        return cls(
            token=token,
            user=user,
            groups=tuple(groups),
            path=path,
            model=model,
            body=json.dumps(body).encode() if body is not None else b"",
            subscription=data.get("subscription"),
            tokens=tokens,
        )


def phase_of(deny: Deny) -> str:
    """Which phase of the Check refused."""
    if deny.status == 401:
        return "authenticate"
    if deny.status == 503:
        return "backend"
    if deny.code == "no_tier":
        return "tier"
    if deny.code == "model_access_denied":
        return "access"
    if deny.plain and deny.status == 403:  # the subscription flow: MaaSAuthPolicy, subscription
        return "subscription"
    return "route"


class Explainer:
    def __init__(self, pipeline: CheckPipeline, peeker: Peeker | None) -> None:
        self._pipeline = pipeline
        self._peeker = peeker

    async def explain(self, request: ExplainRequest) -> dict[str, Any]:
        phases: list[dict[str, Any]] = []
        routed = self._routed(request, phases)
        if isinstance(routed, Deny):
            return _answer(routed, phases)
        target, body = routed
        if isinstance(target, OpenPath) and not target.authenticate:
            phases.append({"phase": "authenticate", "result": "skipped", "detail": "open path"})
            return {"allowed": True, "status": 200, "reason": "ok", "phases": phases}
        headers: Mapping[str, str] = (
            {SUBSCRIPTION_HEADER: request.subscription} if request.subscription else {}
        )
        decision: Decision
        if request.token is not None:
            decision = await self._pipeline.decide_routed(
                target, f"Bearer {request.token}", headers=headers, body=body
            )
        else:
            assert request.user is not None
            phases.append(
                {"phase": "authenticate", "result": "skipped", "detail": "synthetic user"}
            )
            identity = Identity(request.user, "", request.groups)
            decision = await self._pipeline.decide_for(identity, target, headers=headers, body=body)
        if isinstance(decision, Deny):
            return _answer(decision, phases)
        return await self._allowed(decision, request, phases)

    def _routed(
        self, request: ExplainRequest, phases: list[dict[str, Any]]
    ) -> tuple[ModelRef | OpenPath | BodyRoute, bytes] | Deny:
        if request.path is not None:
            routed = self._pipeline.route(request.path)
            if isinstance(routed, BadPath):
                return Deny(routed.status, routed.code, routed.message)
            phases.append({"phase": "route", "result": "ok", "detail": _describe(routed)})
            return routed, request.body
        found = target_of(request.model)
        if isinstance(found, Deny):
            return found
        phases.append({"phase": "route", "result": "ok", "detail": _describe(found[0])})
        return found

    async def _allowed(
        self, allow: Allow, request: ExplainRequest, phases: list[dict[str, Any]]
    ) -> dict[str, Any]:
        identity = allow.identity
        if request.token is not None and identity is not None:
            phases.append(
                {
                    "phase": "authenticate",
                    "result": "ok",
                    "detail": f"user {identity.username}",
                    "groups": list(identity.groups),
                    **({"key_id": allow.key_id} if allow.key_id else {}),
                }
            )
        if allow.tier is not None:
            phases.append({"phase": "tier", "result": "ok", "detail": allow.tier.name})
        if allow.selection is not None:
            phases.append(
                {
                    "phase": "subscription",
                    "result": "ok",
                    "detail": allow.selection.subscription.qualified_name,
                }
            )
        if allow.model is not None:
            phases.append({"phase": "access", "result": "ok", "detail": str(allow.model)})
        answer: dict[str, Any] = {
            "user": identity.username if identity else "",
            "tier": allow.tier.name if allow.tier else "",
            "subscription": allow.selection.subscription.qualified_name if allow.selection else "",
            "model": str(allow.model) if allow.model else "",
        }
        descriptor = descriptor_for(allow)
        if descriptor is None or self._peeker is None:
            phases.append(
                {
                    "phase": "rate_limit",
                    "result": "skipped",
                    "detail": "no rate limit applies"
                    if descriptor is None
                    else "ratelimit.target is not set: limits unknown",
                }
            )
            return {"allowed": True, "status": 200, "reason": "ok", "phases": phases, **answer}
        try:
            peek = await self._peeker.peek([descriptor])
        except BackendUnavailable as exc:
            phases.append({"phase": "rate_limit", "result": "unknown", "detail": str(exc)})
            return {
                "allowed": None,
                "status": None,
                "reason": "ratelimit_unavailable",
                "phases": phases,
                **answer,
            }
        limits = [dict(limit) for limit in peek.limits]
        if request.tokens is not None:
            for limit in limits:
                if limit["unit"] == "tokens":
                    # unweighted: a limit's cost weights apply to the usage the model reports
                    limit["remaining_after_estimate"] = limit["remaining"] - request.tokens
        refusing = [x for x in limits if not x.get("would_allow") and not x.get("shadow")]
        if peek.refusal is not None:
            phases.append({"phase": "rate_limit", "result": "denied", "detail": peek.refusal})
            return {
                "allowed": False,
                "status": 403,
                "reason": peek.refusal,
                "phases": phases,
                "limits": limits,
                **answer,
            }
        if refusing:
            binding = max(refusing, key=lambda x: x["reset_seconds"])
            phases.append(
                {
                    "phase": "rate_limit",
                    "result": "denied",
                    "detail": f"{binding['name']}: {binding['description']}, "
                    f"{binding['remaining']} left",
                }
            )
            return {
                "allowed": False,
                "status": 429,
                "reason": "rate_limited",
                "limit": binding["name"],
                "phases": phases,
                "limits": limits,
                **answer,
            }
        phases.append({"phase": "rate_limit", "result": "ok", "detail": f"{len(limits)} limit(s)"})
        return {
            "allowed": True,
            "status": 200,
            "reason": "ok",
            "phases": phases,
            "limits": limits,
            **answer,
        }


def _answer(deny: Deny, phases: list[dict[str, Any]]) -> dict[str, Any]:
    phase = phase_of(deny)
    phases.append({"phase": phase, "result": "denied", "detail": deny.message})
    return {
        "allowed": False,
        "status": deny.status,
        "reason": deny.code,
        "message": deny.message,
        "phases": phases,
        "user": deny.user,
        "tier": deny.tier,
    }


def _describe(routed: ModelRef | OpenPath | BodyRoute) -> str:
    if isinstance(routed, ModelRef):
        return f"model {routed}"
    if isinstance(routed, BodyRoute):
        return f"{routed.path}: the model the body names"
    return f"open path {routed.path}" + ("" if routed.authenticate else " (no authentication)")
