"""The gRPC adapter (service.py), called directly: descriptors in, a response or an abort out."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3.ratelimit_pb2 import RateLimitDescriptor
from envoy.service.ratelimit.v3.rls_pb2 import RateLimitRequest, RateLimitResponse
from google.protobuf.json_format import MessageToDict
from prometheus_client import CollectorRegistry, generate_latest

from maas_common.clock import ManualClock
from maas_common.errors import BackendUnavailable
from maas_ratelimit.accounting import FailureMode, LimitAccounting
from maas_ratelimit.descriptors import Descriptor
from maas_ratelimit.instrumented import InstrumentedStore
from maas_ratelimit.limiter import RateLimiter
from maas_ratelimit.limits import parse_limits
from maas_ratelimit.memory_store import MemoryBucketStore
from maas_ratelimit.metrics import RateLimitMetrics
from maas_ratelimit.service import RateLimitService, to_descriptors
from maas_ratelimit.store import Admission, AdmitResult, BucketStore, Charge, ChargeResult
from tests.support.refusals import free_requests_refusal_body, free_requests_refusal_headers

OK = RateLimitResponse.OK
OVER_LIMIT = RateLimitResponse.OVER_LIMIT
LIMITS = """\
limits:
  - {name: free-requests, tier: free, kind: requests, limit: 5, window: 2m}
  - {name: free-tokens, tier: free, kind: tokens, limit: 100, window: 1m}
  - {name: premium-requests, tier: premium, kind: requests, limit: 20, window: 2m}
"""
USER = "zz-alice-5f3c9e"  # unusual enough to be found in any output it leaks into
REQUEST_ID = "rq-8d1e44aa"


class Aborted(Exception):
    """What grpc.aio's context.abort raises."""


class FakeContext:
    def __init__(self) -> None:
        self.aborts: list[tuple[grpc.StatusCode, str]] = []

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self.aborts.append((code, details))
        raise Aborted(code, details)


class FailingStore:
    name = "failing"

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.calls = 0

    async def admit(
        self, admissions: Sequence[Admission], now_ms: int, request_id: str | None
    ) -> AdmitResult:
        self.calls += 1
        raise self.error

    async def charge(
        self, charges: Sequence[Charge], now_ms: int, request_id: str | None
    ) -> ChargeResult:
        self.calls += 1
        raise self.error

    async def close(self) -> None:
        pass


def descriptor(hits: int | None = None, **entries: str) -> RateLimitDescriptor:
    d = RateLimitDescriptor(
        entries=[RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries.items()]
    )
    if hits is not None:
        d.hits_addend.value = hits
    return d


def request(
    *descriptors: RateLimitDescriptor, domain: str = "maas", hits_addend: int = 0
) -> RateLimitRequest:
    return RateLimitRequest(domain=domain, descriptors=descriptors, hits_addend=hits_addend)


def user_descriptor(hits: int | None = None, **extra: str) -> RateLimitDescriptor:
    return descriptor(hits, tier="free", user=USER, **extra)


def charge_descriptor(tokens: int, kind: str = "total_tokens", **extra: str) -> RateLimitDescriptor:
    return descriptor(tokens, tier="free", user=USER, charge=kind, **extra)


def outcome_descriptor(outcome: str, tier: str = "free", **extra: str) -> RateLimitDescriptor:
    return descriptor(tier=tier, user=USER, outcome=outcome, **extra)


class Rig:
    def __init__(
        self,
        store: BucketStore | None = None,
        failure_mode: FailureMode = "open",
        *,
        instrumented: bool = False,
        limits: str = LIMITS,
    ) -> None:
        self.registry = CollectorRegistry()
        self.metrics = RateLimitMetrics(self.registry)
        self.clock = ManualClock()
        self.memory = MemoryBucketStore()
        self.store = store or self.memory
        if instrumented:
            self.store = InstrumentedStore(self.store, self.metrics)
        table = parse_limits(limits, "limits.yaml")
        limiter = RateLimiter(limits=lambda: table, store=self.store, clock=self.clock)
        self.service = RateLimitService(
            LimitAccounting(limiter, self.metrics, failure_mode=failure_mode, clock=self.clock)
        )
        self.context = FakeContext()

    async def call(self, req: RateLimitRequest) -> RateLimitResponse:
        response = await self.service.ShouldRateLimit(req, self.context)
        assert isinstance(response, RateLimitResponse)
        return response

    async def aborted(self, req: RateLimitRequest) -> tuple[grpc.StatusCode, str]:
        before = len(self.context.aborts)
        with pytest.raises(Aborted):
            await self.service.ShouldRateLimit(req, self.context)
        assert len(self.context.aborts) == before + 1
        return self.context.aborts[-1]

    def sample(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def calls(self, answer: str) -> float:
        return self.sample("maas_ratelimit_calls_total", answer=answer)

    def charged(self, model: str, kind: str = "total_tokens", tier: str = "free") -> float:
        return self.sample("maas_ratelimit_tokens_charged_total", tier=tier, model=model, kind=kind)

    def decisions(self, result: str, limit: str, tier: str = "free") -> float:
        return self.sample("maas_ratelimit_decisions_total", result=result, tier=tier, limit=limit)


# --- to_descriptors -----------------------------------------------------------------------------


def test_to_descriptors_entries_and_default_hits() -> None:
    out = to_descriptors(request(descriptor(tier="free", user="a", model="llm/tiny")))
    assert out == [Descriptor({"tier": "free", "user": "a", "model": "llm/tiny"}, 1, False)]


def test_to_descriptors_presence_of_the_per_descriptor_hits() -> None:
    unset = descriptor(tier="free")
    zero = descriptor(0, tier="free")
    seven = descriptor(7, tier="free")
    assert not unset.HasField("hits_addend")
    assert zero.HasField("hits_addend")  # a wrapper: 0 is present, not unset
    out = to_descriptors(request(unset, zero, seven))
    assert [(d.hits, d.check_only) for d in out] == [(1, False), (0, True), (7, False)]


def test_to_descriptors_request_level_hits() -> None:
    req = request(descriptor(tier="free"), descriptor(0, tier="free"), descriptor(2, tier="f"),
                  hits_addend=4)  # fmt: skip
    out = to_descriptors(req)
    # the request's value applies where the descriptor has none; a descriptor's own value wins
    assert [(d.hits, d.check_only) for d in out] == [(4, False), (0, True), (2, False)]


def test_to_descriptors_request_level_zero_means_one() -> None:
    out = to_descriptors(request(descriptor(tier="free"), hits_addend=0))
    assert [(d.hits, d.check_only) for d in out] == [(1, False)]


def test_to_descriptors_a_repeated_key_keeps_the_last_value() -> None:
    d = RateLimitDescriptor(
        entries=[
            RateLimitDescriptor.Entry(key="user", value="first"),
            RateLimitDescriptor.Entry(key="user", value="second"),
        ]
    )
    assert to_descriptors(request(d))[0].entries == {"user": "second"}


def test_to_descriptors_of_an_empty_request() -> None:
    assert to_descriptors(request()) == []


# --- decisions through the service --------------------------------------------------------------


@pytest.mark.asyncio
async def test_five_ok_then_over_limit_with_the_429_body() -> None:
    rig = Rig()
    for remaining in (4, 3, 2, 1, 0):
        response = await rig.call(request(user_descriptor()))
        assert response.overall_code == OK
        assert response.statuses[0].code == OK
        assert response.statuses[0].limit_remaining == remaining
    response = await rig.call(request(user_descriptor()))
    assert response.overall_code == OVER_LIMIT
    assert response.statuses[0].code == OVER_LIMIT
    assert response.statuses[0].current_limit.name == "free tier: 5 requests per 2m"
    assert [(h.key, h.value) for h in response.response_headers_to_add] == [
        *free_requests_refusal_headers(24),
        ("x-ratelimit-limit-requests", "5"),
        ("x-ratelimit-remaining-requests", "0"),
        ("x-ratelimit-reset-requests", "2m0s"),
        ("x-ratelimit-limit-tokens", "100"),
        ("x-ratelimit-remaining-tokens", "100"),
        ("x-ratelimit-reset-tokens", "0s"),
    ]
    assert json.loads(response.raw_body) == free_requests_refusal_body(24)
    assert rig.context.aborts == []
    assert rig.calls("ok") == 5
    assert rig.calls("over_limit") == 1
    assert rig.decisions("allowed", "free-requests") == 5
    assert rig.decisions("limited", "free-requests") == 1
    assert rig.decisions("allowed", "free-tokens") == 6  # tokens had credit every time
    assert rig.decisions("limited", "free-tokens") == 0
    assert rig.sample("maas_ratelimit_call_duration_seconds_count") == 6


@pytest.mark.asyncio
async def test_per_descriptor_hits_addend_is_honoured() -> None:
    rig = Rig()
    response = await rig.call(request(user_descriptor(3)))
    assert response.statuses[0].limit_remaining == 2
    response = await rig.call(request(user_descriptor(0)))  # check only
    assert response.overall_code == OK
    assert response.statuses[0].limit_remaining == 2
    response = await rig.call(request(user_descriptor(3)))
    assert response.overall_code == OVER_LIMIT


@pytest.mark.asyncio
async def test_request_level_hits_addend_is_honoured() -> None:
    rig = Rig()
    response = await rig.call(request(user_descriptor(), hits_addend=4))
    assert response.statuses[0].limit_remaining == 1


@pytest.mark.asyncio
async def test_tokens_charged_by_tier_and_model() -> None:
    rig = Rig()
    await rig.call(request(user_descriptor(model="llm/tiny", request_id=REQUEST_ID)))
    response = await rig.call(
        request(charge_descriptor(42, model="llm/tiny", request_id=REQUEST_ID))
    )
    assert response.overall_code == OK
    assert rig.charged("llm/tiny") == 42
    await rig.call(request(charge_descriptor(8, model="llm/big")))
    assert rig.charged("llm/big") == 8
    assert rig.charged("llm/tiny") == 42
    # a charge is not an admission: no decisions were counted for it
    assert rig.decisions("allowed", "free-tokens") == 1
    # the tokens are gone: 50 of 100 left
    peek = await rig.call(request(user_descriptor(0, model="llm/tiny")))
    assert peek.statuses[0].current_limit.name == "free tier: 100 tokens per 1m"
    assert peek.statuses[0].limit_remaining == 50


WEIGHTED = """\
limits:
  - {name: free-requests, tier: free, kind: requests, limit: 5, window: 2m}
  - {name: free-tokens, tier: free, kind: tokens, limit: 100, window: 1m,
     cost: {prompt_tokens: 1, completion_tokens: 4}}
"""


@pytest.mark.asyncio
async def test_tokens_charged_by_kind_as_reported_before_weights() -> None:
    rig = Rig(limits=WEIGHTED)
    await rig.call(request(user_descriptor(model="llm/tiny", request_id=REQUEST_ID)))
    response = await rig.call(
        request(
            charge_descriptor(15, "prompt_tokens", model="llm/tiny", request_id=REQUEST_ID),
            charge_descriptor(8, "completion_tokens", model="llm/tiny", request_id=REQUEST_ID),
        )
    )
    assert response.overall_code == OK
    assert [s.code for s in response.statuses] == [OK, OK]
    assert rig.charged("llm/tiny", "prompt_tokens") == 15
    assert rig.charged("llm/tiny", "completion_tokens") == 8  # not 32: before the weight
    assert rig.charged("llm/tiny", "total_tokens") == 0
    await rig.call(request(charge_descriptor(5, model="llm/tiny")))
    assert rig.charged("llm/tiny", "total_tokens") == 5
    # the bucket took the weighted amounts: 15 + 8 x 4 + 5 = 52 of 100
    peek = await rig.call(request(user_descriptor(0, model="llm/tiny")))
    assert peek.statuses[0].current_limit.name == "free tier: 100 tokens per 1m"
    assert peek.statuses[0].limit_remaining == 48
    # a repeated call for the same request id counts nothing more, for either kind
    await rig.call(
        request(
            charge_descriptor(15, "prompt_tokens", model="llm/tiny", request_id=REQUEST_ID),
            charge_descriptor(8, "completion_tokens", model="llm/tiny", request_id=REQUEST_ID),
        )
    )
    assert rig.charged("llm/tiny", "prompt_tokens") == 15
    assert rig.charged("llm/tiny", "completion_tokens") == 8
    assert rig.sample("maas_ratelimit_charges_skipped_total", reason="duplicate") == 2


@pytest.mark.asyncio
async def test_an_unknown_charge_kind_is_counted_as_ignored() -> None:
    rig = Rig()
    response = await rig.call(request(charge_descriptor(40, "tokens")))
    assert response.overall_code == OK
    assert rig.sample("maas_ratelimit_descriptors_ignored_total", reason="unknown_charge") == 1
    for kind in ("tokens", "prompt_tokens", "completion_tokens", "total_tokens"):
        assert rig.charged("", kind) == 0
    assert len(rig.memory) == 0


@pytest.mark.asyncio
async def test_usage_responses_by_outcome() -> None:
    rig = Rig()
    for _ in range(2):
        response = await rig.call(request(outcome_descriptor("charged", model="llm/tiny")))
        assert response.overall_code == OK
        assert [s.code for s in response.statuses] == [OK]
    await rig.call(request(outcome_descriptor("no_usage"), outcome_descriptor("upstream_error")))
    await rig.call(request(outcome_descriptor("rate_limited", tier="premium")))
    # next to a charge (the after-response call): the outcome is counted, the charge applied
    await rig.call(request(charge_descriptor(30), outcome_descriptor("charged")))

    def responses(outcome: str, tier: str = "free") -> float:
        return rig.sample("maas_ratelimit_usage_responses_total", tier=tier, outcome=outcome)

    assert responses("charged") == 3
    assert responses("no_usage") == 1
    assert responses("upstream_error") == 1
    assert responses("rate_limited", "premium") == 1
    assert responses("rate_limited") == 0
    assert rig.charged("") == 30
    # outcomes are not admissions: no decision counted, no bucket but the charged one
    assert rig.decisions("allowed", "free-requests") == 0
    assert rig.decisions("allowed", "free-tokens") == 0
    assert len(rig.memory) == 1


@pytest.mark.asyncio
async def test_tokens_reserved_and_refunded_by_tier_and_model_before_weights() -> None:
    rig = Rig(limits=WEIGHTED)  # completion tokens cost 4
    reserve = {"reserve_prompt": "10", "reserve_completion": "40", "model": "llm/tiny"}

    def reserved() -> float:
        return rig.sample("maas_ratelimit_tokens_reserved_total", tier="free", model="llm/tiny")

    def refunded() -> float:
        return rig.sample("maas_ratelimit_tokens_refunded_total", tier="free", model="llm/tiny")

    response = await rig.call(request(user_descriptor(request_id=REQUEST_ID, **reserve)))
    assert response.overall_code == OK
    # 10 + 4 x 40 = 170 weighted taken from 100: admitted (credit > 0), now in debt
    assert response.statuses[0].current_limit.name == "free tier: 100 tokens per 1m"
    assert response.statuses[0].limit_remaining == 0
    assert reserved() == 50
    # settled below the estimate: 7 + 20 used of 50 reserved
    await rig.call(
        request(
            charge_descriptor(7, "prompt_tokens", request_id=REQUEST_ID, **reserve),
            charge_descriptor(20, "completion_tokens", request_id=REQUEST_ID, **reserve),
            outcome_descriptor("charged", request_id=REQUEST_ID, **reserve),
        )
    )
    assert refunded() == 23
    # the bucket holds what the usage left: 100 - (7 + 4 x 20)
    peek = await rig.call(request(user_descriptor(0)))
    assert peek.statuses[0].limit_remaining == 13
    assert rig.charged("llm/tiny", "prompt_tokens") == 7
    assert rig.charged("llm/tiny", "completion_tokens") == 20
    # an answer charged nothing: all of its reservation, once
    await rig.call(request(user_descriptor(request_id="r2", **reserve)))
    assert reserved() == 100
    for _ in range(2):
        await rig.call(request(outcome_descriptor("upstream_error", request_id="r2", **reserve)))
    assert refunded() == 23 + 50
    # a refused request reserves nothing and gets nothing back
    for _ in range(3):
        await rig.call(request(user_descriptor()))
    refused = await rig.call(request(user_descriptor(request_id="r6", **reserve)))
    assert refused.overall_code == OVER_LIMIT
    await rig.call(request(outcome_descriptor("rate_limited", request_id="r6", **reserve)))
    assert (reserved(), refunded()) == (100, 73)
    text = generate_latest(rig.registry).decode()
    assert USER not in text
    assert REQUEST_ID not in text


@pytest.mark.asyncio
async def test_an_outcome_is_answered_ok_even_over_the_limit() -> None:
    rig = Rig()
    for _ in range(5):
        await rig.call(request(user_descriptor()))
    assert (await rig.call(request(user_descriptor()))).overall_code == OVER_LIMIT
    response = await rig.call(request(descriptor(7, tier="free", user=USER, outcome="charged")))
    assert response.overall_code == OK
    assert rig.calls("over_limit") == 1


@pytest.mark.asyncio
async def test_skipped_charges_are_counted_by_reason() -> None:
    rig = Rig()
    await rig.call(request(charge_descriptor(10, request_id=REQUEST_ID)))
    response = await rig.call(request(charge_descriptor(10, request_id=REQUEST_ID)))
    assert response.overall_code == OK
    assert rig.sample("maas_ratelimit_charges_skipped_total", reason="duplicate") == 1
    for _ in range(5):
        await rig.call(request(user_descriptor()))
    refused = await rig.call(request(user_descriptor(request_id="rq-denied")))
    assert refused.overall_code == OVER_LIMIT
    response = await rig.call(request(charge_descriptor(30, request_id="rq-denied")))
    assert response.overall_code == OK
    assert rig.sample("maas_ratelimit_charges_skipped_total", reason="denied_request") == 1
    assert rig.charged("") == 10


@pytest.mark.asyncio
async def test_ignored_descriptors_are_counted() -> None:
    rig = Rig()
    response = await rig.call(request(descriptor(tier="free"), descriptor(user=USER)))
    assert response.overall_code == OK
    assert [s.code for s in response.statuses] == [OK, OK]
    assert rig.sample("maas_ratelimit_descriptors_ignored_total", reason="no_user") == 1
    assert rig.sample("maas_ratelimit_descriptors_ignored_total", reason="no_tier") == 1
    await rig.call(request(descriptor(5, tier="premium", user=USER, charge="total_tokens")))
    assert rig.sample("maas_ratelimit_descriptors_ignored_total", reason="no_tokens_limit") == 1


# --- failures -----------------------------------------------------------------------------------

UNAVAILABLE = BackendUnavailable("redis", "timeout", "no answer in 50ms")


@pytest.mark.asyncio
async def test_store_unavailable_failing_open_allows_every_descriptor() -> None:
    store = FailingStore(UNAVAILABLE)
    rig = Rig(store, "open")
    response = await rig.call(request(user_descriptor(), user_descriptor(model="llm/tiny")))
    assert store.calls == 1
    assert response.overall_code == OK
    assert [s.code for s in response.statuses] == [OK, OK]
    assert not response.statuses[0].HasField("current_limit")
    assert list(response.response_headers_to_add) == []
    assert rig.context.aborts == []
    assert rig.calls("failure_open") == 1
    assert rig.calls("ok") == 0
    assert rig.sample("maas_ratelimit_charges_skipped_total", reason="store_unavailable") == 0


@pytest.mark.asyncio
async def test_store_failures_log_one_line_per_five_seconds_of_the_clock(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig(FailingStore(UNAVAILABLE), "open")
    with caplog.at_level(logging.WARNING, logger="maas_ratelimit.accounting"):
        for _ in range(3):
            await rig.call(request(user_descriptor()))
        rig.clock.advance(5.0)
        await rig.call(request(user_descriptor()))
    lines = [r for r in caplog.records if r.name == "maas_ratelimit.accounting"]
    assert [r.getMessage() for r in lines] == [
        "rate limit store failed, failing open: redis unavailable (timeout): no answer in 50ms"
    ] * 2
    assert [getattr(r, "suppressed", None) for r in lines] == [0, 2]
    assert rig.calls("failure_open") == 4


@pytest.mark.asyncio
async def test_store_unavailable_counts_a_lost_charge() -> None:
    rig = Rig(FailingStore(UNAVAILABLE), "open")
    response = await rig.call(request(charge_descriptor(40, request_id=REQUEST_ID)))
    assert response.overall_code == OK
    assert rig.sample("maas_ratelimit_charges_skipped_total", reason="store_unavailable") == 1
    assert rig.charged("") == 0


@pytest.mark.asyncio
async def test_store_unavailable_failing_closed_aborts_unavailable() -> None:
    rig = Rig(FailingStore(UNAVAILABLE), "closed")
    code, details = await rig.aborted(request(user_descriptor()))
    assert code is grpc.StatusCode.UNAVAILABLE
    assert details == (
        "rate limit store unavailable: redis unavailable (timeout): no answer in 50ms"
    )
    assert rig.calls("unavailable") == 1
    assert rig.calls("failure_open") == 0


@pytest.mark.asyncio
async def test_failing_closed_also_counts_a_lost_charge() -> None:
    rig = Rig(FailingStore(UNAVAILABLE), "closed")
    code, _ = await rig.aborted(request(charge_descriptor(40)))
    assert code is grpc.StatusCode.UNAVAILABLE
    assert rig.sample("maas_ratelimit_charges_skipped_total", reason="store_unavailable") == 1


@pytest.mark.asyncio
async def test_store_errors_are_counted_by_the_instrumented_store() -> None:
    rig = Rig(FailingStore(UNAVAILABLE), "open", instrumented=True)
    response = await rig.call(request(user_descriptor()))
    assert response.overall_code == OK
    assert rig.sample("maas_ratelimit_store_errors_total", store="failing", kind="timeout") == 1
    assert rig.sample("maas_ratelimit_store_duration_seconds_count", store="failing",
                      op="admit") == 1  # fmt: skip
    assert rig.calls("failure_open") == 1


@pytest.mark.asyncio
async def test_an_unknown_domain_is_invalid_argument() -> None:
    rig = Rig()
    code, details = await rig.aborted(request(user_descriptor(), domain="other"))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert details == "unknown domain 'other'; this server serves 'maas'"
    assert rig.calls("error") == 1
    assert len(rig.memory) == 0  # nothing was counted


@pytest.mark.asyncio
async def test_an_unknown_domain_is_invalid_argument_even_when_failing_open() -> None:
    rig = Rig(FailingStore(UNAVAILABLE), "open")
    code, _ = await rig.aborted(request(user_descriptor(), domain=""))
    assert code is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.asyncio
async def test_an_unexpected_error_is_internal(caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig(FailingStore(RuntimeError("boom")), "open")
    with caplog.at_level(logging.ERROR, logger="maas_ratelimit.service"):
        code, details = await rig.aborted(request(user_descriptor()))
    assert code is grpc.StatusCode.INTERNAL
    assert details == "rate limit decision failed"  # no internals to the caller
    assert rig.calls("error") == 1
    assert rig.calls("failure_open") == 0
    assert any(
        r.message == "ShouldRateLimit failed unexpectedly" and r.exc_info for r in caplog.records
    )


@pytest.mark.asyncio
async def test_the_service_keeps_answering_after_failures() -> None:
    rig = Rig()
    await rig.aborted(request(user_descriptor(), domain="other"))
    response = await rig.call(request(user_descriptor()))
    assert response.overall_code == OK
    assert response.statuses[0].limit_remaining == 4


# --- privacy ------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_no_user_or_request_id_in_any_metric() -> None:
    rig = Rig()
    await rig.call(request(user_descriptor(model="llm/tiny", request_id=REQUEST_ID)))
    for _ in range(5):
        await rig.call(request(user_descriptor(model="llm/tiny")))
    await rig.call(request(charge_descriptor(10, model="llm/tiny", request_id=REQUEST_ID)))
    await rig.call(request(charge_descriptor(10, model="llm/tiny", request_id=REQUEST_ID)))
    await rig.call(request(descriptor(user=USER), descriptor(tier="free")))
    await rig.aborted(request(user_descriptor(), domain="other"))
    failing = Rig(FailingStore(UNAVAILABLE), "open", instrumented=True)
    await failing.call(request(user_descriptor(), charge_descriptor(5, request_id=REQUEST_ID)))
    assert failing.calls("failure_open") == 1

    for registry in (rig.registry, failing.registry):
        text = generate_latest(registry).decode()
        assert USER not in text
        assert REQUEST_ID not in text
    text = generate_latest(rig.registry).decode()
    # the scan covers real samples: labels of tiers, limits and models are there
    assert (
        'maas_ratelimit_decisions_total{limit="free-requests",result="limited",tier="free"} 1.0'
        in text
    )
    assert (
        'maas_ratelimit_tokens_charged_total{kind="total_tokens",model="llm/tiny",tier="free"} 10.0'
        in text
    )


# --- peeks and bounded labels ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_peek_consumes_nothing_and_lists_every_limit() -> None:
    rig = Rig()
    await rig.call(request(user_descriptor()))  # one request taken
    for _ in range(3):
        response = await rig.call(request(user_descriptor(0)))
        assert response.overall_code == OK
        limits = MessageToDict(response.dynamic_metadata)["limits"]
        assert {x["name"]: x["remaining"] for x in limits} == {
            "free-requests": 4,
            "free-tokens": 100,
        }
    assert rig.calls("peek") == 3
    assert rig.calls("ok") == 1
    assert rig.decisions("allowed", "free-requests") == 1  # the peeks are not decisions


@pytest.mark.asyncio
async def test_label_values_from_descriptors_are_bounded_to_configured_names() -> None:
    rig = Rig()
    for n in range(300):  # what a fuzzer sends: tiers, models and outcomes no one configured
        await rig.call(
            request(outcome_descriptor(f"outcome-{n}", tier=f"tier-{n}", model=f"Model {n}"))
        )
        await rig.call(request(descriptor(5, tier=f"tier-{n}", user=USER, charge="total_tokens")))
    text = generate_latest(rig.registry).decode()
    assert "tier-1" not in text
    assert "outcome-1" not in text
    assert "Model" not in text
    series = [line for line in text.splitlines() if line.startswith("maas_ratelimit_usage")]
    assert series == ['maas_ratelimit_usage_responses_total{outcome="other",tier="other"} 300.0']


@pytest.mark.asyncio
async def test_subscriptions_and_models_keep_their_own_label_values_up_to_a_bound() -> None:
    rig = Rig()
    for n in range(3):
        await rig.call(
            request(
                descriptor(
                    subscription=f"team-a/sub-{n}",
                    token_limits="100/60",
                    user=USER,
                    model=f"llm/model-{n}",
                    outcome="no_usage",
                )
            )
        )
    text = generate_latest(rig.registry).decode()
    for n in range(3):
        assert f'tier="team-a/sub-{n}"' in text
    assert USER not in text  # never a user


@pytest.mark.asyncio
async def test_an_outcome_report_with_no_hits_is_a_report_not_a_peek() -> None:
    rig = Rig()
    # what Envoy sends after a 429: the outcome descriptor, hits_addend 0
    response = await rig.call(
        request(descriptor(0, tier="free", user=USER, outcome="rate_limited"))
    )
    assert not response.HasField("dynamic_metadata")
    assert rig.calls("peek") == 0
    assert (
        rig.sample("maas_ratelimit_usage_responses_total", tier="free", outcome="rate_limited") == 1
    )
