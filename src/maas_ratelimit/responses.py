"""Verdict -> envoy.service.ratelimit.v3.RateLimitResponse. The one place that knows the format."""

from __future__ import annotations

import json

from envoy.config.core.v3.base_pb2 import HeaderValue
from envoy.service.ratelimit.v3.rls_pb2 import RateLimitResponse

from maas_ratelimit.bucket import ceil_div
from maas_ratelimit.limiter import LimitState, Verdict

OK = RateLimitResponse.OK
OVER_LIMIT = RateLimitResponse.OVER_LIMIT
LIMIT_HEADER = "x-maas-ratelimit-limit"


def _set_status(status: RateLimitResponse.DescriptorStatus, state: LimitState) -> None:
    limit = state.limit
    status.current_limit.name = limit.description
    status.current_limit.requests_per_unit = limit.spec.limit
    status.current_limit.unit = RateLimitResponse.RateLimit.Unit.Value(limit.unit)
    status.limit_remaining = state.remaining
    status.duration_until_reset.FromMilliseconds(state.reset_ms)


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
    binding = verdict.binding
    if verdict.over_limit and binding is not None:
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
