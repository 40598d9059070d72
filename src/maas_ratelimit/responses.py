"""Verdict -> envoy.service.ratelimit.v3.RateLimitResponse. The one place that knows the format.

Besides the statuses Envoy reads, an answer carries:
- on admission, OpenAI-style `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` headers for
  the client, each from the enforced limit of that kind with the least room left (Envoy's own
  DRAFT_VERSION_03 headers show one status per descriptor, requests and tokens mixed);
- on a refusal, dynamic metadata naming the limit (for access logs: the decisions view);
- on a peek (every descriptor a check-only admission, hits_addend 0: nothing is consumed),
  dynamic metadata listing every limit that applies with what it has left (maas-authz's
  /v1/quota and explain).
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from envoy.config.core.v3.base_pb2 import HeaderValue
from envoy.service.ratelimit.v3.rls_pb2 import RateLimitResponse

from maas_common.quota_headers import quota_header_triple, reset_text
from maas_ratelimit.bucket import ceil_div
from maas_ratelimit.limiter import BudgetState, DescriptorVerdict, LimitState, Verdict, less_room
from maas_ratelimit.limits import Limit

OK = RateLimitResponse.OK
OVER_LIMIT = RateLimitResponse.OVER_LIMIT
LIMIT_HEADER = "x-maas-ratelimit-limit"


RateLimit = RateLimitResponse.RateLimit
# Limit name -> (that Limit, its RateLimit message, that message as a DescriptorStatus's encoded
# current_limit field): built once per limit (and again after a reload replaces it), copied into
# each status. The cached messages are never modified.
_RATE_LIMITS: dict[str, tuple[Limit, Any, bytes]] = {}
_MAX_RATE_LIMITS = 4096
_MAX_UINT32 = 2**32 - 1


def _rate_limit(limit: Limit) -> tuple[Limit, Any, bytes]:  # Any: a RateLimitResponse.RateLimit
    cached = _RATE_LIMITS.get(limit.name)
    if cached is not None and cached[0] is limit:
        return cached
    message = RateLimit(
        name=limit.description,
        requests_per_unit=min(limit.spec.limit, _MAX_UINT32),  # a budget's may be larger
        unit=RateLimit.Unit.Value(limit.unit),
    )
    if len(_RATE_LIMITS) >= _MAX_RATE_LIMITS:
        _RATE_LIMITS.clear()
    encoded = message.SerializeToString()
    cached = _RATE_LIMITS[limit.name] = (limit, message, b"\x12" + _varint(len(encoded)) + encoded)
    return cached


def _set_status(status: RateLimitResponse.DescriptorStatus, state: LimitState) -> None:
    status.current_limit.CopyFrom(_rate_limit(state.limit)[1])
    status.limit_remaining = state.remaining
    reset = status.duration_until_reset  # as Duration.FromMilliseconds, without its overhead
    seconds, millis = divmod(state.reset_ms, 1000)
    reset.seconds = seconds
    reset.nanos = millis * 1_000_000


def retry_after_seconds(state: LimitState) -> int:
    return max(1, ceil_div(state.retry_after_ms, 1000))


def error_body(state: LimitState) -> bytes:
    """The OpenAI 429 shape: `type` says which kind of limit, `code` is rate_limit_exceeded (or
    budget_exceeded, naming the budget and when it resets)."""
    limit = state.limit
    wait = retry_after_seconds(state)
    if limit.budget is not None:
        message = f"budget exceeded: {limit.description}; resets in {wait}s"
        error = {
            "message": message,
            "type": "budget",
            "code": "budget_exceeded",
            "budget": limit.name,
            "resets_in_seconds": wait,
        }
        return json.dumps({"error": error}).encode()
    message = f"rate limit exceeded: {limit.description}; retry in {wait}s"
    return json.dumps(
        {"error": {"message": message, "type": limit.kind, "code": "rate_limit_exceeded"}}
    ).encode()


def tightest(descriptors: tuple[DescriptorVerdict, ...]) -> tuple[LimitState | None, ...]:
    """(requests, tokens): the enforced limit of each kind with the least room left, as a
    fraction of its limit (a refusing one first), over every descriptor of the call."""
    requests: LimitState | None = None
    tokens: LimitState | None = None
    for descriptor in descriptors:
        for state in descriptor.limits:
            limit = state.limit
            if limit.shadow or limit.budget is not None:  # budgets: in /v1/quota, not here
                continue
            if limit.kind == "tokens":
                if tokens is None or _tighter(state, tokens):
                    tokens = state
            elif requests is None or _tighter(state, requests):
                requests = state
    return requests, tokens


def _tighter(state: LimitState, other: LimitState) -> bool:
    if state.sufficient != other.sufficient:
        return not state.sufficient
    return less_room(state, other)


def quota_headers(verdict: Verdict) -> list[tuple[str, str]]:
    """The x-ratelimit-*-requests / -tokens headers for an admission's verdict."""
    headers: list[tuple[str, str]] = []
    for suffix, state in zip(("requests", "tokens"), tightest(verdict.descriptors), strict=True):
        if state is not None:
            headers += quota_header_triple(
                suffix, state.limit.spec.limit, state.remaining, state.reset_ms
            )
    return headers


def limit_report(state: LimitState) -> dict[str, Any]:
    """One limit as /v1/quota lists it."""
    limit = state.limit
    report: dict[str, Any] = {
        "name": limit.name,
        "unit": limit.kind,
        "limit": limit.spec.limit,
        "remaining": state.remaining,
        "reset_seconds": state.reset_ms / 1000,
        "window_seconds": limit.spec.window_ms / 1000,
        "description": limit.description,
        "subscription" if limit.subscription else "tier": limit.tier,
        "shadow": limit.shadow,
        "would_allow": state.sufficient,
    }
    budget = limit.budget
    if budget is not None:
        report.update(
            {
                "budget": True,
                "unit": "cost" if budget.money else "tokens",
                "per": budget.per,
            }
        )
        if budget.money:  # currency, as decimal text (exact)
            report["limit"] = limit.amount_text(limit.spec.limit)
            report["remaining"] = limit.amount_text(state.remaining)
        report.update(_budget_span(state))
    return report


def _budget_span(state: LimitState) -> dict[str, Any]:
    """A budget's window: a calendar period (with its bounds) or a rolling window."""
    budget = state.limit.budget
    assert budget is not None
    if budget.period is None:
        return {"window_seconds": budget.window_ms / 1000}
    now_ms = state.now_ms if isinstance(state, BudgetState) else 0
    name, start, end = budget.current(now_ms)
    return {
        "period": budget.period,
        "period_id": name,
        "timezone": budget.timezone,
        "window_seconds": (end - start) / 1000,
        "resets_at": _iso(end),
    }


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat().replace("+00:00", "Z")


def peek_metadata(verdict: Verdict) -> dict[str, Any]:
    limits = [limit_report(s) for d in verdict.descriptors for s in d.limits]
    out: dict[str, Any] = {"limits": limits}
    if verdict.refusal is not None:
        out["refusal"] = verdict.refusal
    return out


def build(verdict: Verdict, *, peek: bool = False) -> RateLimitResponse:
    response = RateLimitResponse(overall_code=OVER_LIMIT if verdict.over_limit else OK)
    for descriptor in verdict.descriptors:
        status = response.statuses.add()
        status.code = OVER_LIMIT if descriptor.over_limit else OK
        if descriptor.reported is not None:
            _set_status(status, descriptor.reported)
    if peek:
        response.dynamic_metadata.update(peek_metadata(verdict))
    binding = verdict.binding if verdict.over_limit else None
    if verdict.refusal is not None:
        if not peek:
            response.dynamic_metadata.update({"refusal": verdict.refusal})
        response.response_headers_to_add.append(
            HeaderValue(key="content-type", value="application/json")
        )
        response.raw_body = json.dumps(
            {
                "error": {
                    "message": "no subscription entitles this request to the model",
                    "type": "tokens",
                    "code": verdict.refusal,
                }
            }
        ).encode()
    elif binding is not None:
        response.response_headers_to_add.extend(
            [
                HeaderValue(key="retry-after", value=str(retry_after_seconds(binding))),
                HeaderValue(key=LIMIT_HEADER, value=binding.limit.name),
                HeaderValue(key="content-type", value="application/json"),
            ]
        )
        response.raw_body = error_body(binding)
        if not peek:  # what refused, for the access log (the decisions view)
            response.dynamic_metadata.update(
                {
                    "limit": binding.limit.name,
                    "unit": "budget" if binding.limit.budget else binding.limit.kind,
                    "retry_after_seconds": retry_after_seconds(binding),
                }
            )
    response.response_headers_to_add.extend(
        HeaderValue(key=key, value=value) for key, value in quota_headers(verdict)
    )
    return response


# Protobuf wire format, for encode(): a field's key byte is (number << 3) | wire type.
_SMALL_VARINTS = [bytes((value,)) for value in range(0x80)]
_OVERALL_OK = b"\x08" + _SMALL_VARINTS[OK]  # RateLimitResponse.overall_code (1, varint)
_STATUS = b"\x12"  # RateLimitResponse.statuses (2, length-delimited)
_CODES = (b"\x08" + _SMALL_VARINTS[OK], b"\x08" + _SMALL_VARINTS[OVER_LIMIT])  # status code (1)
_REMAINING = b"\x18"  # DescriptorStatus.limit_remaining (3, varint)
_RESET = b'"'  # DescriptorStatus.duration_until_reset (4, length-delimited)
_SECONDS = b"\x08"  # Duration.seconds (1, varint)


def _varint(value: int) -> bytes:
    """A non-negative integer as a protobuf varint: 7 bits a byte, least significant first."""
    if value < 0x80:
        return _SMALL_VARINTS[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# Duration.nanos (2, varint) for each whole millisecond: a reset's nanos take only 1000 values
_NANOS_OF_MILLIS = [b""] + [b"\x10" + _varint(millis * 1_000_000) for millis in range(1, 1000)]


_HEADER = b"\x1a"  # RateLimitResponse.response_headers_to_add (3, length-delimited)


def _string_field(tag: bytes, text: str) -> bytes:
    data = text.encode()
    return tag + _varint(len(data)) + data


def _header_bytes(key: str, value: str) -> bytes:
    return _value_header(_string_field(b"\n", key), value.encode())  # HeaderValue key 1


def encode(verdict: Verdict, *, peek: bool = False) -> bytes:
    """The response's wire bytes, as build(verdict, peek=peek).SerializeToString() gives them
    (tests hold the two to it). Calls that are not refused, nearly all of them, are encoded
    directly from each limit's cached bytes: no message is built only to be serialized."""
    if verdict.over_limit or peek:  # a body or metadata: rare, through the message
        return bytes(build(verdict, peek=peek).SerializeToString())
    parts = [_OVERALL_OK]
    for descriptor in verdict.descriptors:
        code = _CODES[descriptor.over_limit]
        state = descriptor.reported
        if state is None:
            parts += (_STATUS, _varint(len(code)), code)
            continue
        # proto3 leaves out zeros, except that the duration is always set (possibly empty)
        remaining = state.remaining
        seconds, millis = divmod(state.reset_ms, 1000)
        reset = _NANOS_OF_MILLIS[millis]
        if seconds:
            reset = _SECONDS + _varint(seconds) + reset
        status = b"".join(
            (
                code,
                _rate_limit(state.limit)[2],
                _REMAINING + _varint(remaining) if remaining else b"",
                _RESET,
                _varint(len(reset)),
                reset,
            )
        )
        parts += (_STATUS, _varint(len(status)), status)
    parts += _quota_header_bytes(verdict.descriptors)
    return b"".join(parts)


# The quota headers on the hot path: per limit, the whole `x-ratelimit-limit-<unit>` header and
# the key fields of the other two, built once (and again after a reload replaces the limit).
# quota_headers() is the same, readable (tests hold the two to it).
_QUOTA_PARTS: dict[str, tuple[Limit, bytes, bytes, bytes]] = {}
# (limit name, remaining, reset seconds) -> the limit's three headers: the same values recur
# (every user's first request leaves the same remaining and reset), and a probe is ~10x cheaper
_QUOTA_HEADERS: dict[tuple[str, int, int], tuple[Limit, bytes]] = {}
_MAX_QUOTA_HEADERS = 16_384


def _quota_parts(limit: Limit) -> tuple[Limit, bytes, bytes, bytes]:
    cached = _QUOTA_PARTS.get(limit.name)
    if cached is not None and cached[0] is limit:
        return cached
    (limit_header, _), (remaining_key, _), (reset_key, _) = quota_header_triple(
        limit.kind, limit.spec.limit, 0, 0
    )
    cached = (
        limit,
        _header_bytes(limit_header, str(limit.spec.limit)),
        _string_field(b"\n", remaining_key),
        _string_field(b"\n", reset_key),
    )
    if len(_QUOTA_PARTS) >= _MAX_RATE_LIMITS:
        _QUOTA_PARTS.clear()
    _QUOTA_PARTS[limit.name] = cached
    return cached


def _quota_header_bytes(descriptors: tuple[DescriptorVerdict, ...]) -> list[bytes]:
    out: list[bytes] = []
    for state in tightest(descriptors):
        if state is None:
            continue
        limit = state.limit
        remaining, seconds = state.remaining, -(-state.reset_ms // 1000)
        key = (limit.name, remaining, seconds)
        cached = _QUOTA_HEADERS.get(key)
        if cached is None or cached[0] is not limit:
            cached = (limit, _quota_headers_of(limit, remaining, seconds))
            if len(_QUOTA_HEADERS) >= _MAX_QUOTA_HEADERS:
                _QUOTA_HEADERS.clear()
            _QUOTA_HEADERS[key] = cached
        out.append(cached[1])
    return out


def _quota_headers_of(limit: Limit, remaining_count: int, seconds: int) -> bytes:
    """One limit's three headers, encoded (the value of _QUOTA_HEADERS)."""
    _, whole, remaining_key, reset_key = _quota_parts(limit)
    return b"".join(
        (
            whole,
            _value_header(remaining_key, str(remaining_count).encode()),
            _value_header(reset_key, reset_text(seconds * 1000).encode()),
        )
    )


def _value_header(key_field: bytes, value: bytes) -> bytes:
    """A HeaderValue (its encoded key field, then value, field 2) in response_headers_to_add."""
    message = key_field + b"\x12" + _varint(len(value)) + value
    return _HEADER + _varint(len(message)) + message


def allow_all(descriptor_count: int) -> RateLimitResponse:
    """What failing open answers: OK for everything, no limit information."""
    response = RateLimitResponse(overall_code=OK)
    for _ in range(descriptor_count):
        response.statuses.add().code = OK
    return response


_WINDOW_SECONDS = {
    RateLimit.Unit.SECOND: 1,
    RateLimit.Unit.MINUTE: 60,
    RateLimit.Unit.HOUR: 3600,
    RateLimit.Unit.DAY: 86400,
}


def envoy_draft03_headers(response: RateLimitResponse) -> list[tuple[str, str]]:
    """The x-ratelimit-{limit,remaining,reset} headers Envoy's rate limit filter derives from a
    response's statuses (enable_x_ratelimit_headers: DRAFT_VERSION_03): the status with the
    least remaining, and a quota policy per status. The one-hop topology has no such filter,
    so maas-authz adds them itself and clients see the same headers in both topologies."""
    least = None
    policy = ""
    for status in response.statuses:
        if not status.HasField("current_limit"):
            continue
        if least is None or status.limit_remaining < least.limit_remaining:
            least = status
        limit = status.current_limit
        window = _WINDOW_SECONDS.get(limit.unit, 0)
        if window:
            policy += f", {limit.requests_per_unit};w={window}"
            if limit.name:
                policy += f';name="{limit.name}"'
    if least is None:
        return []
    return [
        ("x-ratelimit-limit", f"{least.current_limit.requests_per_unit}{policy}"),
        ("x-ratelimit-remaining", str(least.limit_remaining)),
        ("x-ratelimit-reset", str(least.duration_until_reset.seconds)),
    ]
