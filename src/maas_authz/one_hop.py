"""The one-hop topology: the whole policy plane in one call on the request path.

Envoy asks maas-authz once per request (ext_authz Check) and streams every finished request back
over its access log (one long-lived stream, many entries per message): no rate limit filter, no
maas-ratelimit (envoy/gateway-one-hop.yaml). In Check, once the request is authorized, its
request limits are admitted and its token reservation taken with the limiter library
maas-ratelimit runs, on the same stores (maas_ratelimit.app.build_limiting); from the access log
entry, the usage the Lua filter read is charged and the reservation settled or refunded.

Both build the descriptors Envoy's rate limit filter sends in the two-server topology, from the
same metadata and by the same rules: the ACTIONS below mirror envoy/gateway.yaml's rate_limits
(a test holds the two together), so the limiter decides exactly as it does there — the same
limits, reservations, refunds and de-duplication by request id — and counts the same metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.json_format import MessageToDict

from maas_authz import responses
from maas_authz.decision import Deny
from maas_authz.decisions import AUTHZ_NAMESPACE
from maas_authz.quota import Peek
from maas_common.errors import BackendUnavailable
from maas_ratelimit import responses as limit_responses
from maas_ratelimit.accounting import LimitAccounting
from maas_ratelimit.descriptors import Descriptor
from maas_ratelimit.limiter import Verdict

log = logging.getLogger(__name__)

AUTHZ = AUTHZ_NAMESPACE  # maas-authz's own metadata (Check's dynamic_metadata)
USAGE = "maas.usage"  # the Lua usage reader's (envoy/lua/usage.lua)
RATELIMITED_HEADER = ("x-envoy-ratelimited", "true")  # what Envoy's filter adds to its 429


@dataclass(frozen=True, slots=True)
class Action:
    """One `metadata` action of a rate_limits entry: descriptor_key from namespace:key."""

    descriptor_key: str
    namespace: str
    key: str
    skip_if_absent: bool  # absent and not skippable: Envoy sends no descriptor at all


def _authz(key: str, *, required: bool = False) -> Action:
    return Action(key, AUTHZ, key, not required)


def _usage(descriptor_key: str, key: str | None = None, *, required: bool = False) -> Action:
    return Action(descriptor_key, USAGE, key or descriptor_key, not required)


_SCOPE = (
    _authz("tier"),
    _authz("subscription"),
    _authz("token_limits"),
    _authz("user", required=True),
    _authz("model"),
    _authz("request_id"),
)
_RESERVATION = (_usage("reserve_prompt"), _usage("reserve_completion"))
# envoy/gateway.yaml's rate_limits, in order: admission, then after the response the prompt
# charge, the completion charge and the usage reader's outcome
ADMISSION = (*_SCOPE, _authz("billing_rate"), *_RESERVATION)
PROMPT_CHARGE = (
    *_SCOPE,
    _usage("charge", "charge_prompt", required=True),
    _authz("key_id"),
    _authz("organization_id"),
    _authz("cost_center"),
    _usage("status"),
    _usage("streamed"),
    _authz("billing_rate"),
    *_RESERVATION,
)
COMPLETION_CHARGE = (
    *_SCOPE,
    _usage("charge", "charge_completion", required=True),
    _authz("billing_rate"),
    *_RESERVATION,
)
OUTCOME = (*_SCOPE, _usage("outcome", required=True), *_RESERVATION)
# each after-response entry with its hits_addend: the usage metadata's count, or 0 (a report)
AFTER_RESPONSE: tuple[tuple[tuple[Action, ...], str | None], ...] = (
    (PROMPT_CHARGE, "prompt_tokens"),
    (COMPLETION_CHARGE, "completion_tokens"),
    (OUTCOME, None),
)


def descriptor_of(
    actions: Sequence[Action],
    metadata: Mapping[str, Mapping[str, Any]],
    *,
    hits: int = 1,
    check_only: bool = False,
) -> Descriptor | None:
    """The descriptor Envoy builds from `metadata` (namespace -> flat values), or None where it
    would send none (a required value absent)."""
    entries: dict[str, str] = {}
    for action in actions:
        value = metadata.get(action.namespace, {}).get(action.key)
        if value is None or isinstance(value, bool):
            if action.skip_if_absent:
                continue
            return None
        entries[action.descriptor_key] = str(value)
    return Descriptor(entries, hits, check_only)


def after_response_descriptors(metadata: Mapping[str, Mapping[str, Any]]) -> list[Descriptor]:
    """What Envoy's apply_on_stream_done entries send for a finished request, from its access
    log entry's metadata: the charges (hits = the tokens the usage reader read) and the outcome
    (hits 0). Nothing for a request maas-authz did not admit (no `user`)."""
    usage = metadata.get(USAGE, {})
    out = []
    for actions, count_key in AFTER_RESPONSE:
        if count_key is None:
            descriptor = descriptor_of(actions, metadata, hits=0, check_only=True)
        else:
            count = usage.get(count_key)
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                continue  # Envoy's hits_addend format yields no number: no charge
            descriptor = descriptor_of(actions, metadata, hits=count, check_only=count == 0)
        if descriptor is not None:
            out.append(descriptor)
    return out


@dataclass(frozen=True, slots=True)
class Admitted:
    """Let through; `headers` go to the client's response (as Envoy's filter adds them)."""

    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Refused:
    """A 429 (or, failing closed, a 503) as a serialized CheckResponse."""

    response: bytes


class InlineLimits:
    """Admission in Check, settlement from the access log, peeks for /v1/quota and explain: the
    rate limit filter's and maas-ratelimit's work, in maas-authz."""

    def __init__(self, accounting: LimitAccounting, *, retry_after: int) -> None:
        self._accounting = accounting
        self._retry_after = retry_after  # seconds, on a 503 when failing closed

    async def admit(self, authz: Mapping[str, str], usage: Mapping[str, Any]) -> Admitted | Refused:
        """The admission of a request Check allowed, with `authz` the metadata it sets (with
        the request id) and `usage` what the Lua filter put under maas.usage before it."""
        descriptor = descriptor_of(ADMISSION, {AUTHZ: authz, USAGE: usage})
        if descriptor is None:  # no user: Envoy's filter would have sent nothing
            return Admitted(())
        accounting = self._accounting
        try:
            verdict = await accounting.decide(accounting.table().domain, [descriptor])
        except BackendUnavailable as exc:
            if accounting.store_failed(exc, charges=False) == "open":
                return Admitted(())
            return Refused(responses.denied_serialized(self._unavailable(authz)))
        response = limit_responses.build(verdict)
        headers = [(h.key, h.value) for h in response.response_headers_to_add]
        if not verdict.over_limit:
            return Admitted((*headers, *limit_responses.envoy_draft03_headers(response)))
        tier = descriptor.tier or ""
        accounting.count_outcome(tier, "rate_limited")  # what the usage reader reports on a 429
        headers.append(RATELIMITED_HEADER)
        headers += limit_responses.envoy_draft03_headers(response)
        return Refused(
            responses.limited_serialized(
                headers, response.raw_body, _refusal_metadata(authz, verdict, response)
            )
        )

    def _unavailable(self, authz: Mapping[str, str]) -> Deny:
        return Deny(
            503,
            "ratelimit_unavailable",
            "the rate limiter cannot be asked right now; retry later",
            tier=authz.get("tier") or authz.get("subscription") or "",
            user=authz.get("user", ""),
            retry_after=self._retry_after,
        )

    async def settle(self, metadata: Mapping[str, Mapping[str, Any]]) -> None:
        """A finished request's charges, outcome and reservation, from its access log entry.
        Never raises: a store that fails costs the charge (counted, as Envoy's failing open)."""
        descriptors = after_response_descriptors(metadata)
        if not descriptors:
            return
        accounting = self._accounting
        try:
            await accounting.decide(accounting.table().domain, descriptors)
        except BackendUnavailable as exc:
            charges = any(d.charge_kind is not None for d in descriptors)
            accounting.store_failed(exc, charges=charges)
        except Exception:  # one odd entry must not end Envoy's stream
            log.exception("a charge from the access log failed")

    async def peek(self, descriptors: Sequence[Mapping[str, str]]) -> Peek:
        """quota.Peeker: every limit that applies, consuming nothing."""
        accounting = self._accounting
        verdict = await accounting.peek(
            accounting.table().domain, [Descriptor(dict(d), 0, True) for d in descriptors]
        )
        found = limit_responses.peek_metadata(verdict)
        return Peek(tuple(found["limits"]), found.get("refusal"))

    async def close(self) -> None:
        """Nothing to close (the limiter's parts close with the server)."""


def _refusal_metadata(authz: Mapping[str, str], verdict: Verdict, response: Any) -> dict[str, Any]:
    """What the access log (the decisions view) records of a refusal: the refusing limit, and
    the caller under log_* names (a refused request must never look like one to charge)."""
    metadata: dict[str, Any] = {
        "phase": "rate_limit",
        "reason": verdict.refusal or "rate_limited",
        "log_user": authz.get("user", ""),
    }
    for name in ("tier", "subscription", "model"):
        if authz.get(name):
            metadata[f"log_{name}"] = authz[name]
    metadata.update(MessageToDict(response.dynamic_metadata))  # limit, unit, retry_after_seconds
    return metadata
