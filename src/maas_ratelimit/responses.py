"""Verdict -> envoy.service.ratelimit.v3.RateLimitResponse. The one place that knows the format."""

from __future__ import annotations

import json
from typing import Any

from envoy.config.core.v3.base_pb2 import HeaderValue
from envoy.service.ratelimit.v3.rls_pb2 import RateLimitResponse

from maas_ratelimit.bucket import ceil_div
from maas_ratelimit.limiter import LimitState, Verdict
from maas_ratelimit.limits import Limit

OK = RateLimitResponse.OK
OVER_LIMIT = RateLimitResponse.OVER_LIMIT
LIMIT_HEADER = "x-maas-ratelimit-limit"


RateLimit = RateLimitResponse.RateLimit
# Limit name -> (that Limit, its RateLimit message): built once per limit (and again after a
# reload replaces it), copied into each status. The cached messages are never modified.
_RATE_LIMITS: dict[str, tuple[Limit, Any]] = {}
_MAX_RATE_LIMITS = 4096


def _rate_limit(limit: Limit) -> Any:  # a RateLimitResponse.RateLimit
    cached = _RATE_LIMITS.get(limit.name)
    if cached is not None and cached[0] is limit:
        return cached[1]
    message = RateLimit(
        name=limit.description,
        requests_per_unit=limit.spec.limit,
        unit=RateLimit.Unit.Value(limit.unit),
    )
    if len(_RATE_LIMITS) >= _MAX_RATE_LIMITS:
        _RATE_LIMITS.clear()
    _RATE_LIMITS[limit.name] = (limit, message)
    return message


def _set_status(status: RateLimitResponse.DescriptorStatus, state: LimitState) -> None:
    status.current_limit.CopyFrom(_rate_limit(state.limit))
    status.limit_remaining = state.remaining
    reset = status.duration_until_reset  # as Duration.FromMilliseconds, without its overhead
    seconds, millis = divmod(state.reset_ms, 1000)
    reset.seconds = seconds
    reset.nanos = millis * 1_000_000


def retry_after_seconds(state: LimitState) -> int:
    return max(1, ceil_div(state.retry_after_ms, 1000))


def error_body(state: LimitState) -> bytes:
    """The OpenAI 429 shape: `type` says which kind of limit, `code` is rate_limit_exceeded."""
    limit = state.limit
    message = f"rate limit exceeded: {limit.description}; retry in {retry_after_seconds(state)}s"
    return json.dumps(
        {"error": {"message": message, "type": limit.kind, "code": "rate_limit_exceeded"}}
    ).encode()


def build(verdict: Verdict) -> RateLimitResponse:
    response = RateLimitResponse(overall_code=OVER_LIMIT if verdict.over_limit else OK)
    for descriptor in verdict.descriptors:
        status = response.statuses.add()
        status.code = OVER_LIMIT if descriptor.over_limit else OK
        if descriptor.reported is not None:
            _set_status(status, descriptor.reported)
    binding = verdict.binding if verdict.over_limit else None
    if binding is not None:
        response.response_headers_to_add.extend(
            [
                HeaderValue(key="retry-after", value=str(retry_after_seconds(binding))),
                HeaderValue(key=LIMIT_HEADER, value=binding.limit.name),
                HeaderValue(key="content-type", value="application/json"),
            ]
        )
        response.raw_body = error_body(binding)
    return response


def allow_all(descriptor_count: int) -> RateLimitResponse:
    """What failing open answers: OK for everything, no limit information."""
    response = RateLimitResponse(overall_code=OK)
    for _ in range(descriptor_count):
        response.statuses.add().code = OK
    return response
