"""Verdict -> RateLimitResponse (responses.py)."""

from __future__ import annotations

import json

import pytest
from envoy.service.ratelimit.v3.rls_pb2 import RateLimitResponse
from google.protobuf.internal.encoder import _VarintBytes  # protobuf's own, to check ours
from google.protobuf.json_format import MessageToDict

from maas_common.quota_headers import reset_text
from maas_ratelimit import responses
from maas_ratelimit.limiter import DescriptorVerdict, LimitState, Verdict
from maas_ratelimit.limits import Limit, parse_limits
from tests.support.refusals import free_requests_refusal_body, free_requests_refusal_headers

TABLE = parse_limits(
    """\
limits:
  - {name: free-requests, tier: free, kind: requests, limit: 5, window: 2m}
  - {name: free-tokens, tier: free, kind: tokens, limit: 100, window: 1m}
  - {name: free-shadow, tier: free, kind: requests, limit: 2, window: 1h, shadow: true}
  - {name: odd, tier: free, kind: requests, limit: 3, window: 1500ms}
""",
    "limits.yaml",
)
REQUESTS, TOKENS, SHADOW, ODD = TABLE.limits
OK = RateLimitResponse.OK
OVER_LIMIT = RateLimitResponse.OVER_LIMIT
Unit = RateLimitResponse.RateLimit.Unit


def _need(limit: Limit) -> int:
    """What an admission of one request needs of the limit's bucket (scaled)."""
    return limit.spec.window_ms if limit.kind == "requests" else 1


def state(limit: Limit, *, reset_ms: int = 0) -> LimitState:
    """An admitted limit whose bucket is full again in `reset_ms`."""
    spec = limit.spec
    return LimitState(limit, True, spec.capacity - reset_ms * spec.limit, _need(limit))


def refused(limit: Limit = REQUESTS, retry_after_ms: int = 24_000) -> LimitState:
    """A refusing limit whose bucket has what one request needs in `retry_after_ms`."""
    need = _need(limit)
    return LimitState(limit, False, need - retry_after_ms * limit.spec.limit, need)


def one(descriptor_state: LimitState, *others: LimitState) -> DescriptorVerdict:
    states = (descriptor_state, *others)
    over = any(not s.sufficient and not s.limit.shadow for s in states)
    return DescriptorVerdict(over, descriptor_state, states)


def headers(response: RateLimitResponse) -> list[tuple[str, str]]:
    return [(h.key, h.value) for h in response.response_headers_to_add]


# --- OK -----------------------------------------------------------------------------------------


def test_ok_with_limit_information() -> None:
    s = state(REQUESTS, reset_ms=24_000)
    response = responses.build(Verdict(False, (one(s),)))
    assert response.overall_code == OK
    assert len(response.statuses) == 1
    status = response.statuses[0]
    assert status.code == OK
    assert status.current_limit.name == "free tier: 5 requests per 2m"
    assert status.current_limit.requests_per_unit == 5
    assert status.current_limit.unit == Unit.UNKNOWN  # 2m is not one unit
    assert status.limit_remaining == 4
    assert status.duration_until_reset.ToMilliseconds() == 24_000
    assert status.duration_until_reset.seconds == 24
    # OpenAI-style headers for the client, exact for the one limit of the kind
    assert headers(response) == [
        ("x-ratelimit-limit-requests", "5"),
        ("x-ratelimit-remaining-requests", "4"),
        ("x-ratelimit-reset-requests", "24s"),
    ]
    assert response.raw_body == b""
    assert len(response.request_headers_to_add) == 0


def test_a_one_minute_tokens_limit_has_unit_minute() -> None:
    s = state(TOKENS, reset_ms=18_000)
    status = responses.build(Verdict(False, (one(s),))).statuses[0]
    assert status.current_limit.name == "free tier: 100 tokens per 1m"
    assert status.current_limit.requests_per_unit == 100
    assert status.current_limit.unit == Unit.MINUTE
    assert status.limit_remaining == 70


def test_reset_with_milliseconds() -> None:
    s = state(ODD, reset_ms=1_499)
    status = responses.build(Verdict(False, (one(s),))).statuses[0]
    assert (status.duration_until_reset.seconds, status.duration_until_reset.nanos) == (
        1,
        499_000_000,
    )
    assert status.limit_remaining == 0
    assert status.current_limit.name == "free tier: 3 requests per 1500ms"


def test_a_descriptor_without_limits_is_ok_without_information() -> None:
    response = responses.build(Verdict(False, (DescriptorVerdict(False, None, ()),)))
    assert response.overall_code == OK
    status = response.statuses[0]
    assert status.code == OK
    assert not status.HasField("current_limit")
    assert not status.HasField("duration_until_reset")
    assert status.limit_remaining == 0


def test_no_descriptors() -> None:
    response = responses.build(Verdict(False, ()))
    assert response.overall_code == OK
    assert len(response.statuses) == 0


def test_a_shadow_refusal_is_ok() -> None:
    shadow = refused(SHADOW, 5_000)
    reported = state(REQUESTS, reset_ms=48_000)
    verdict = Verdict(False, (DescriptorVerdict(False, reported, (shadow,)),))
    response = responses.build(verdict)
    assert response.overall_code == OK
    assert response.statuses[0].code == OK
    assert headers(response) == []
    assert response.raw_body == b""


# --- OVER_LIMIT ---------------------------------------------------------------------------------


def test_over_limit_response() -> None:
    response = responses.build(Verdict(True, (one(refused()),)))
    assert response.overall_code == OVER_LIMIT
    status = response.statuses[0]
    assert status.code == OVER_LIMIT
    assert status.current_limit.name == "free tier: 5 requests per 2m"
    assert status.current_limit.requests_per_unit == 5
    assert status.limit_remaining == 0
    assert status.duration_until_reset.ToMilliseconds() == 120_000
    assert headers(response) == [
        *free_requests_refusal_headers(24),
        ("x-ratelimit-limit-requests", "5"),
        ("x-ratelimit-remaining-requests", "0"),
        ("x-ratelimit-reset-requests", "2m0s"),
    ]
    assert json.loads(response.raw_body) == free_requests_refusal_body(24)
    # what refused, as dynamic metadata for the access log (the decisions view)
    assert MessageToDict(response.dynamic_metadata) == {
        "limit": "free-requests",
        "unit": "requests",
        "retry_after_seconds": 24,
    }


def test_over_limit_for_tokens() -> None:
    response = responses.build(Verdict(True, (one(refused(TOKENS, 30_001)),)))
    assert headers(response)[:2] == [
        ("retry-after", "31"),
        ("x-maas-ratelimit-limit", "free-tokens"),
    ]
    assert json.loads(response.raw_body) == {
        "error": {
            "message": "rate limit exceeded: free tier: 100 tokens per 1m; retry in 31s",
            "type": "tokens",
            "code": "rate_limit_exceeded",
        }
    }


@pytest.mark.parametrize(
    ("retry_after_ms", "seconds"),
    [(0, 1), (1, 1), (999, 1), (1_000, 1), (1_001, 2), (23_999, 24), (24_000, 24), (24_001, 25)],
)
def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one(
    retry_after_ms: int, seconds: int
) -> None:
    s = refused(retry_after_ms=retry_after_ms)
    assert responses.retry_after_seconds(s) == seconds
    response = responses.build(Verdict(True, (one(s),)))
    assert dict(headers(response))["retry-after"] == str(seconds)
    message = json.loads(response.raw_body)["error"]["message"]
    assert message.endswith(f"; retry in {seconds}s")


def test_per_descriptor_codes_and_the_binding_limit_across_descriptors() -> None:
    ok = one(state(REQUESTS, reset_ms=72_000))
    short = one(refused(REQUESTS, 24_000))
    long = one(refused(TOKENS, 30_001))
    response = responses.build(Verdict(True, (ok, short, long)))
    assert response.overall_code == OVER_LIMIT
    assert [s.code for s in response.statuses] == [OK, OVER_LIMIT, OVER_LIMIT]
    assert [s.limit_remaining for s in response.statuses] == [2, 0, 0]
    # the longest wait is what the client is told
    assert dict(headers(response))["x-maas-ratelimit-limit"] == "free-tokens"
    assert dict(headers(response))["retry-after"] == "31"


def test_the_reported_limit_of_a_descriptor_is_its_own() -> None:
    # a descriptor refused by one limit reports that limit, even if another one applied too
    s_requests = refused(REQUESTS)
    s_tokens = state(TOKENS)
    verdict = Verdict(True, (DescriptorVerdict(True, s_requests, (s_requests, s_tokens)),))
    status = responses.build(verdict).statuses[0]
    assert status.current_limit.name == "free tier: 5 requests per 2m"


def test_over_limit_without_a_binding_limit_has_no_body() -> None:
    response = responses.build(Verdict(True, (DescriptorVerdict(False, None, ()),)))
    assert response.overall_code == OVER_LIMIT
    assert headers(response) == []
    assert response.raw_body == b""


def test_error_body_bytes() -> None:
    body = responses.error_body(refused())
    assert isinstance(body, bytes)
    assert body == (
        b'{"error": {"message": "rate limit exceeded: free tier: 5 requests per 2m; '
        b'retry in 24s", "type": "requests", "code": "rate_limit_exceeded"}}'
    )


# --- encode: the same bytes as the message -------------------------------------------------------

LONG = parse_limits(  # a description over 127 bytes: a two-byte length
    "limits:\n  - {name: long, tier: "
    + "t" * 120
    + ", kind: tokens, limit: 4294967295, window: 1s}\n",
    "limits.yaml",
).limits[0]


@pytest.mark.parametrize(
    "verdict",
    [
        Verdict(False, ()),
        Verdict(False, (DescriptorVerdict(False, None, ()),)),
        Verdict(False, (one(state(REQUESTS, reset_ms=24_000)),)),  # whole seconds
        Verdict(False, (one(state(REQUESTS)),)),  # full: an empty reset
        Verdict(False, (one(state(ODD, reset_ms=1_499)),)),  # s and ms; no remaining (left out)
        Verdict(False, (one(state(ODD, reset_ms=499)),)),  # milliseconds only
        Verdict(False, (one(state(TOKENS, reset_ms=59_999)),)),
        Verdict(False, (one(state(LONG)),)),  # a large remaining, a long name
        Verdict(False, (one(state(LONG, reset_ms=1)),)),
        Verdict(False, (one(state(REQUESTS, reset_ms=48_000), refused(SHADOW, 5_000)),)),
        Verdict(
            False,
            (
                one(state(REQUESTS, reset_ms=72_000)),
                DescriptorVerdict(False, None, ()),
                one(state(TOKENS, reset_ms=18_000)),
            ),
        ),
        Verdict(True, (one(refused()),)),  # refused: headers and a body
        Verdict(True, (one(state(REQUESTS)), one(refused(TOKENS, 30_001)))),
        Verdict(True, (DescriptorVerdict(False, None, ()),)),
    ],
)
def test_encode_gives_the_bytes_of_the_built_message(verdict: Verdict) -> None:
    encoded = responses.encode(verdict)
    assert encoded == responses.build(verdict).SerializeToString()
    assert RateLimitResponse.FromString(encoded) == responses.build(verdict)


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 16_383, 16_384, 2**32 - 1, 2**63 - 1])
def test_varints(value: int) -> None:
    assert responses._varint(value) == _VarintBytes(value)


# --- allow_all ----------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [0, 1, 3])
def test_allow_all(count: int) -> None:
    response = responses.allow_all(count)
    assert response.overall_code == OK
    assert len(response.statuses) == count
    for status in response.statuses:
        assert status.code == OK
        assert not status.HasField("current_limit")
    assert headers(response) == []
    assert response.raw_body == b""


# --- x-ratelimit-* headers, peeks -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("milliseconds", "text"),
    [(0, "0s"), (1, "1s"), (59_000, "59s"), (59_001, "1m0s"), (120_000, "2m0s"),
     (3_599_000, "59m59s"), (3_600_000, "1h0m0s"), (90_061_000, "25h1m1s")],
)  # fmt: skip
def test_reset_text(milliseconds: int, text: str) -> None:
    assert reset_text(milliseconds) == text


def test_headers_per_kind_from_the_tightest_enforced_limit_of_every_descriptor() -> None:
    verdict = Verdict(
        False,
        (
            one(state(REQUESTS, reset_ms=48_000), refused(SHADOW, 5_000)),  # shadow: never shown
            one(state(TOKENS, reset_ms=18_000), state(ODD, reset_ms=1_000)),
        ),
    )
    # REQUESTS has 3 of 5 left (60 %), ODD 1 of 3 (33 %): ODD is the tighter
    assert dict(responses.quota_headers(verdict)) == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": str(state(ODD, reset_ms=1_000).remaining),
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "70",
        "x-ratelimit-reset-tokens": "18s",
    }


def test_no_headers_for_a_call_without_limits() -> None:
    assert responses.quota_headers(Verdict(False, (DescriptorVerdict(False, None, ()),))) == []


def test_a_peek_lists_every_limit_in_the_metadata() -> None:
    verdict = Verdict(False, (one(state(REQUESTS, reset_ms=48_000), state(TOKENS)),))
    response = responses.build(verdict, peek=True)
    limits = MessageToDict(response.dynamic_metadata)["limits"]
    assert [(x["name"], x["unit"], x["limit"], x["remaining"]) for x in limits] == [
        ("free-requests", "requests", 5, 3),
        ("free-tokens", "tokens", 100, 100),
    ]
    assert limits[0]["reset_seconds"] == 48.0
    assert limits[0]["window_seconds"] == 120.0
    assert limits[0]["tier"] == "free"
    assert limits[0]["would_allow"] is True
    assert responses.encode(verdict, peek=True) == response.SerializeToString()


def test_a_refused_peek_carries_no_refusal_metadata_of_its_own() -> None:
    verdict = Verdict(True, (one(refused()),))
    metadata = MessageToDict(responses.build(verdict, peek=True).dynamic_metadata)
    assert set(metadata) == {"limits"}
    assert metadata["limits"][0]["would_allow"] is False
