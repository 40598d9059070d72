"""RateLimiter.decide with the memory store and a manual clock: the rate limit decision.

Numbers used throughout: free requests are 5 per 2m (one request comes back every 24 s), free
tokens 100 per 1m (100 tokens per minute: one token per 600 ms, scaled refill 100 per ms).
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from maas_common.clock import ManualClock
from maas_ratelimit.bucket import DEBT_WINDOWS
from maas_ratelimit.descriptors import Descriptor, effective_hits
from maas_ratelimit.limiter import (
    ChargeReport,
    DescriptorVerdict,
    LimitState,
    RateLimiter,
    UnknownDomain,
    Verdict,
)
from maas_ratelimit.limits import LimitTable, parse_limits
from maas_ratelimit.memory_store import MemoryBucketStore
from maas_ratelimit.store import ChargeStatus

LIMITS = """\
domain: maas
limits:
  - {name: free-requests, tier: free, kind: requests, limit: 5, window: 2m}
  - {name: free-tokens, tier: free, kind: tokens, limit: 100, window: 1m}
  - {name: premium-requests, tier: premium, kind: requests, limit: 20, window: 2m}
  - {name: premium-tokens, tier: premium, kind: tokens, limit: 50000, window: 1m}
"""

REQUESTS_ONLY = """\
limits:
  - {name: free-requests, tier: free, kind: requests, limit: 5, window: 2m}
  - {name: premium-requests, tier: premium, kind: requests, limit: 20, window: 2m}
"""

PER_MODEL = """\
limits:
  - {name: free-requests, tier: free, kind: requests, limit: 5, window: 2m}
  - {name: tiny-requests, tier: free, kind: requests, limit: 2, window: 1m,
     per: [user, model], models: [llm/tiny]}
  - {name: per-model, tier: premium, kind: requests, limit: 2, window: 1m, per: [user, model]}
"""


def desc(
    tier: str | None = "free",
    user: str | None = "alice",
    model: str | None = None,
    *,
    hits: int | None = None,
    request_hits: int = 0,
    request_id: str | None = None,
    charge: bool = False,
    kind: str = "total_tokens",
    outcome: str | None = None,
    reserve: tuple[int, int] | None = None,
) -> Descriptor:
    """A Descriptor built the way service.to_descriptors builds it."""
    entries: dict[str, str] = {}
    for key, value in (("tier", tier), ("user", user), ("model", model)):
        if value is not None:
            entries[key] = value
    if request_id is not None:
        entries["request_id"] = request_id
    if charge:
        entries["charge"] = kind
    if outcome is not None:
        entries["outcome"] = outcome
    if reserve is not None:
        entries["reserve_prompt"], entries["reserve_completion"] = map(str, reserve)
    count, check_only = effective_hits(hits, request_hits)
    return Descriptor(entries, count, check_only)


def charge(
    tokens: int,
    *,
    user: str | None = "alice",
    model: str | None = None,
    request_id: str | None = None,
    kind: str = "total_tokens",
    tier: str = "free",
    reserve: tuple[int, int] | None = None,
) -> Descriptor:
    """The after-response call: `tokens` LLM tokens to charge, as a per-descriptor hits_addend."""
    return desc(
        tier, user, model, hits=tokens, request_id=request_id, charge=True, kind=kind,
        reserve=reserve,
    )  # fmt: skip


class Rig:
    """A limiter whose limits table can be swapped (as a hot reload does)."""

    def __init__(self, limits: str = LIMITS) -> None:
        self.clock = ManualClock()  # monotonic 1000.0 s -> now_ms 1_000_000
        self.store = MemoryBucketStore()
        self.table = parse_limits(limits, "limits.yaml")
        self.limiter = RateLimiter(limits=lambda: self.table, store=self.store, clock=self.clock)

    async def decide(self, *descriptors: Descriptor, domain: str = "maas") -> Verdict:
        return await self.limiter.decide(domain, descriptors)

    async def admitted(self, count: int, *descriptors: Descriptor) -> None:
        for _ in range(count):
            verdict = await self.decide(*descriptors)
            assert not verdict.over_limit

    async def remaining(self, tier: str = "free", user: str = "alice", model: str | None = None,
                        ) -> dict[str, int]:  # fmt: skip
        """Peek with a check-only descriptor: whole tokens left per limit, nothing consumed."""
        verdict = await self.decide(desc(tier, user, model, hits=0))
        return {state.limit.name: state.remaining for state in verdict.descriptors[0].limits}


def states(verdict: Verdict, index: int = 0) -> dict[str, LimitState]:
    return {state.limit.name: state for state in verdict.descriptors[index].limits}


def reported_name(verdict: DescriptorVerdict) -> str | None:
    return verdict.reported.limit.name if verdict.reported else None


# --- requests: exactly N per window, token bucket refill ----------------------------------------


@pytest.mark.asyncio
async def test_a_free_user_gets_exactly_five_requests() -> None:
    rig = Rig()
    for expected_remaining in (4, 3, 2, 1, 0):
        verdict = await rig.decide(desc())
        assert not verdict.over_limit
        assert verdict.binding is None
        state = states(verdict)["free-requests"]
        assert state.sufficient
        assert state.result == "allowed"
        assert state.remaining == expected_remaining
        assert state.retry_after_ms == 0
    refused = await rig.decide(desc())
    assert refused.over_limit
    assert refused.descriptors[0].over_limit
    state = states(refused)["free-requests"]
    assert (state.sufficient, state.result) == (False, "limited")
    assert state.remaining == 0
    assert state.retry_after_ms == 24_000  # one of 5 per 2 minutes comes back in 24 s
    assert state.reset_ms == 120_000  # empty: full again after one window
    assert refused.binding is state
    assert refused.descriptors[0].reported is state


@pytest.mark.asyncio
async def test_reset_ms_counts_down_from_the_used_amount() -> None:
    rig = Rig()
    verdict = await rig.decide(desc())
    assert states(verdict)["free-requests"].reset_ms == 24_000
    verdict = await rig.decide(desc(hits=2))
    assert states(verdict)["free-requests"].reset_ms == 72_000
    assert states(verdict)["free-tokens"].reset_ms == 0  # untouched: full


@pytest.mark.asyncio
async def test_one_request_refills_after_24_seconds() -> None:
    rig = Rig()
    await rig.admitted(5, desc())
    rig.clock.advance(23)
    refused = await rig.decide(desc())
    assert refused.over_limit
    assert states(refused)["free-requests"].retry_after_ms == 1_000
    rig.clock.advance(0.999)
    refused = await rig.decide(desc())
    assert refused.over_limit
    assert states(refused)["free-requests"].retry_after_ms == 1
    rig.clock.advance(0.001)
    allowed = await rig.decide(desc())
    assert not allowed.over_limit
    assert states(allowed)["free-requests"].remaining == 0
    again = await rig.decide(desc())
    assert again.over_limit
    assert states(again)["free-requests"].retry_after_ms == 24_000


@pytest.mark.asyncio
async def test_refused_requests_consume_nothing() -> None:
    rig = Rig()
    await rig.admitted(5, desc())
    for _ in range(10):
        assert (await rig.decide(desc())).over_limit
    rig.clock.advance(24)
    assert not (await rig.decide(desc())).over_limit  # the refusals did not push it back


@pytest.mark.asyncio
async def test_no_double_burst_at_the_window_edge() -> None:
    rig = Rig()
    await rig.admitted(5, desc())
    rig.clock.advance(120)  # exactly one window later: full again, but only full
    await rig.admitted(5, desc())
    refused = await rig.decide(desc())
    assert refused.over_limit
    assert states(refused)["free-requests"].retry_after_ms == 24_000


@pytest.mark.asyncio
async def test_a_burst_at_the_end_of_a_window_is_not_followed_by_another() -> None:
    # a fixed window would allow 5 at 1:59 and 5 more at 2:00
    rig = Rig()
    rig.clock.advance(119)
    await rig.admitted(5, desc())
    rig.clock.advance(1)
    refused = await rig.decide(desc())
    assert refused.over_limit
    assert states(refused)["free-requests"].retry_after_ms == 23_000


@pytest.mark.asyncio
async def test_spread_usage_never_exceeds_the_token_bucket_bound() -> None:
    rig = Rig(REQUESTS_ONLY)
    admitted_at: list[int] = []  # seconds
    for second in range(601):
        for _ in range(10):  # a greedy client: until refused (bounded, in case it never is)
            if (await rig.decide(desc())).over_limit:
                break
            admitted_at.append(second)
        rig.clock.advance(1)
    # 5 at once, then one every 24 s: 25 more in 600 s
    assert admitted_at[:5] == [0] * 5
    assert admitted_at[5:] == list(range(24, 601, 24))
    assert len(admitted_at) == 30
    # in any interval [a, b]: at most capacity + refill = 5 + (b - a) / 24
    for a in range(601):
        for b in range(a, min(a + 241, 601)):
            count = sum(1 for t in admitted_at if a <= t <= b)
            assert count * 24 <= 5 * 24 + (b - a), (a, b, count)


# --- separate counters --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_users_have_separate_counters() -> None:
    rig = Rig()
    await rig.admitted(5, desc(user="alice"))
    assert (await rig.decide(desc(user="alice"))).over_limit
    await rig.admitted(5, desc(user="bob"))
    assert (await rig.decide(desc(user="bob"))).over_limit


@pytest.mark.asyncio
async def test_tiers_have_separate_counters() -> None:
    rig = Rig()
    await rig.admitted(5, desc("free", "alice"))
    assert (await rig.decide(desc("free", "alice"))).over_limit
    # the same user in another tier (e.g. just upgraded) counts against that tier's limit
    verdict = await rig.decide(desc("premium", "alice"))
    assert not verdict.over_limit
    assert states(verdict)["premium-requests"].remaining == 19
    await rig.admitted(19, desc("premium", "alice"))
    refused = await rig.decide(desc("premium", "alice"))
    assert refused.over_limit
    assert states(refused)["premium-requests"].retry_after_ms == 6_000  # 20 per 2m


@pytest.mark.asyncio
async def test_per_user_limits_count_every_model_together() -> None:
    rig = Rig()
    await rig.admitted(2, desc(model="llm/a"))
    await rig.admitted(3, desc(model="llm/b"))
    assert (await rig.decide(desc(model="llm/c"))).over_limit


# --- per-model limits ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_model_filtered_limit_applies_to_its_model_only() -> None:
    rig = Rig(PER_MODEL)
    first = await rig.decide(desc(model="llm/tiny"))
    assert sorted(states(first)) == ["free-requests", "tiny-requests"]
    await rig.admitted(1, desc(model="llm/tiny"))
    refused = await rig.decide(desc(model="llm/tiny"))
    assert refused.over_limit
    assert refused.binding is not None
    assert refused.binding.limit.name == "tiny-requests"
    assert refused.binding.retry_after_ms == 30_000  # 2 per 1m
    # the per-user limit was not charged for the refused request: 3 left for other models
    assert await rig.remaining() == {"free-requests": 3}
    await rig.admitted(3, desc(model="llm/big"))
    assert (await rig.decide(desc(model="llm/big"))).over_limit


@pytest.mark.asyncio
async def test_when_the_per_user_limit_is_empty_the_per_model_one_is_not_consumed() -> None:
    rig = Rig(PER_MODEL)
    await rig.admitted(5, desc(model="llm/big"))
    assert await rig.remaining(model="llm/tiny") == {"free-requests": 0, "tiny-requests": 2}
    refused = await rig.decide(desc(model="llm/tiny"))
    assert refused.over_limit
    assert refused.binding is not None
    assert refused.binding.limit.name == "free-requests"
    assert await rig.remaining(model="llm/tiny") == {"free-requests": 0, "tiny-requests": 2}


@pytest.mark.asyncio
async def test_per_user_and_model_counters() -> None:
    rig = Rig(PER_MODEL)
    await rig.admitted(2, desc("premium", model="llm/a"))
    assert (await rig.decide(desc("premium", model="llm/a"))).over_limit
    await rig.admitted(2, desc("premium", model="llm/b"))
    await rig.admitted(2, desc("premium", user="bob", model="llm/a"))
    await rig.admitted(2, desc("premium"))  # no model: a counter of its own
    assert (await rig.decide(desc("premium"))).over_limit


# --- hits ---------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_per_descriptor_hits_take_that_many() -> None:
    rig = Rig()
    verdict = await rig.decide(desc(hits=3))
    assert states(verdict)["free-requests"].remaining == 2
    refused = await rig.decide(desc(hits=3))  # needs 3, has 2: refused, nothing taken
    assert refused.over_limit
    assert states(refused)["free-requests"].remaining == 2
    assert states(refused)["free-requests"].retry_after_ms == 24_000  # until 3 are there
    verdict = await rig.decide(desc(hits=2))
    assert not verdict.over_limit
    assert states(verdict)["free-requests"].remaining == 0


@pytest.mark.asyncio
async def test_per_descriptor_zero_is_check_only() -> None:
    rig = Rig()
    for _ in range(10):
        verdict = await rig.decide(desc(hits=0))
        assert not verdict.over_limit
        assert states(verdict)["free-requests"].remaining == 5
    await rig.admitted(5, desc())
    refused = await rig.decide(desc(hits=0))  # no room for one: over limit, though it takes 0
    assert refused.over_limit
    assert states(refused)["free-requests"].retry_after_ms == 24_000
    rig.clock.advance(24)
    verdict = await rig.decide(desc(hits=0))
    assert not verdict.over_limit
    assert states(verdict)["free-requests"].remaining == 1
    assert not (await rig.decide(desc())).over_limit  # the check left the one request there


@pytest.mark.asyncio
async def test_per_descriptor_zero_wins_over_the_request_level_hits() -> None:
    rig = Rig()
    verdict = await rig.decide(desc(hits=0, request_hits=4))
    assert states(verdict)["free-requests"].remaining == 5


@pytest.mark.asyncio
async def test_request_level_zero_means_one() -> None:
    rig = Rig()
    verdict = await rig.decide(desc(request_hits=0))
    assert states(verdict)["free-requests"].remaining == 4


@pytest.mark.asyncio
async def test_request_level_hits_apply_without_a_per_descriptor_value() -> None:
    rig = Rig()
    verdict = await rig.decide(desc(request_hits=4))
    assert states(verdict)["free-requests"].remaining == 1
    verdict = await rig.decide(desc(hits=1, request_hits=4))  # per-descriptor wins
    assert states(verdict)["free-requests"].remaining == 0


@pytest.mark.asyncio
async def test_all_descriptors_of_a_call_are_all_or_nothing() -> None:
    rig = Rig()
    await rig.admitted(5, desc(user="bob"))
    verdict = await rig.decide(desc(user="alice"), desc(user="bob"))
    assert verdict.over_limit
    assert [d.over_limit for d in verdict.descriptors] == [False, True]
    assert await rig.remaining(user="alice") == {"free-requests": 5, "free-tokens": 100}


# --- tokens limits ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_token_admission_needs_credit_and_takes_nothing() -> None:
    rig = Rig()
    for _ in range(5):
        verdict = await rig.decide(desc())
        tokens = states(verdict)["free-tokens"]
        assert tokens.sufficient
        assert tokens.remaining == 100


@pytest.mark.asyncio
async def test_a_charge_debits_tokens() -> None:
    rig = Rig()
    verdict = await rig.decide(charge(30, model="llm/tiny"))
    assert not verdict.over_limit
    assert verdict.charges == (
        ChargeReport("free", "llm/tiny", "total_tokens", 30, ChargeStatus.APPLIED),
    )
    assert verdict.descriptors == (DescriptorVerdict(False, None, ()),)  # charges admit nothing
    assert verdict.ignored == ()
    assert await rig.remaining() == {"free-requests": 5, "free-tokens": 70}
    rig.clock.advance(0.6)  # one token per 600 ms
    assert await rig.remaining() == {"free-requests": 5, "free-tokens": 71}


@pytest.mark.asyncio
async def test_a_charge_can_go_into_debt_and_the_user_waits_until_refill_pays_it() -> None:
    rig = Rig()
    verdict = await rig.decide(charge(150))
    assert not verdict.over_limit
    assert verdict.charges[0].status is ChargeStatus.APPLIED
    refused = await rig.decide(desc())
    assert refused.over_limit
    tokens = states(refused)["free-tokens"]
    assert (tokens.sufficient, tokens.remaining) == (False, 0)
    # 50 tokens owed = 3_000_000 scaled; credit > 0 needs 3_000_001 at 100 per ms
    assert tokens.retry_after_ms == 30_001
    assert tokens.reset_ms == 90_000
    assert states(refused)["free-requests"].remaining == 5  # nothing taken elsewhere either
    rig.clock.advance(30)
    refused = await rig.decide(desc())
    assert refused.over_limit
    assert states(refused)["free-tokens"].retry_after_ms == 1
    rig.clock.advance(0.001)
    allowed = await rig.decide(desc())
    assert not allowed.over_limit
    assert states(allowed)["free-tokens"].remaining == 0  # some credit, not a whole token
    assert states(allowed)["free-requests"].remaining == 4


@pytest.mark.asyncio
async def test_charges_are_never_refused_even_in_debt() -> None:
    rig = Rig()
    for _ in range(3):
        verdict = await rig.decide(charge(100))
        assert not verdict.over_limit
        assert verdict.binding is None
        assert verdict.charges[0].status is ChargeStatus.APPLIED
    refused = await rig.decide(desc())
    assert states(refused)["free-tokens"].retry_after_ms == 120_001  # 200 owed


@pytest.mark.asyncio
async def test_a_charge_exactly_to_zero_refuses_until_one_millisecond_of_refill() -> None:
    rig = Rig()
    await rig.decide(charge(100))
    refused = await rig.decide(desc())
    assert refused.over_limit
    assert states(refused)["free-tokens"].retry_after_ms == 1
    rig.clock.advance(0.001)
    assert not (await rig.decide(desc())).over_limit


@pytest.mark.asyncio
async def test_a_charge_for_a_request_refused_at_admission_is_skipped() -> None:
    rig = Rig()
    await rig.admitted(5, desc())
    refused = await rig.decide(desc(request_id="r6"))
    assert refused.over_limit
    verdict = await rig.decide(charge(40, request_id="r6"))
    assert not verdict.over_limit
    assert verdict.charges == (
        ChargeReport("free", "", "total_tokens", 40, ChargeStatus.DENIED_REQUEST),
    )
    assert (await rig.remaining())["free-tokens"] == 100


@pytest.mark.asyncio
async def test_a_repeated_charge_is_a_duplicate() -> None:
    rig = Rig()
    assert not (await rig.decide(desc(request_id="r1"))).over_limit
    first = await rig.decide(charge(40, request_id="r1"))
    assert first.charges[0].status is ChargeStatus.APPLIED
    second = await rig.decide(charge(40, request_id="r1"))
    assert second.charges == (ChargeReport("free", "", "total_tokens", 40, ChargeStatus.DUPLICATE),)
    assert not second.over_limit
    assert (await rig.remaining())["free-tokens"] == 60
    other = await rig.decide(charge(10, request_id="r2"))
    assert other.charges[0].status is ChargeStatus.APPLIED
    assert (await rig.remaining())["free-tokens"] == 50


@pytest.mark.asyncio
async def test_charges_without_a_request_id_always_apply() -> None:
    rig = Rig()
    for _ in range(3):
        verdict = await rig.decide(charge(20))
        assert verdict.charges[0].status is ChargeStatus.APPLIED
    assert (await rig.remaining())["free-tokens"] == 40


@pytest.mark.asyncio
async def test_charges_go_to_the_users_own_bucket() -> None:
    rig = Rig()
    await rig.decide(charge(150, user="bob"))
    assert (await rig.remaining(user="bob"))["free-tokens"] == 0
    assert (await rig.remaining(user="alice"))["free-tokens"] == 100
    assert (await rig.decide(desc(user="bob"))).over_limit
    assert not (await rig.decide(desc(user="alice"))).over_limit


@pytest.mark.asyncio
async def test_a_charge_without_tokens_limits_is_ignored() -> None:
    rig = Rig(REQUESTS_ONLY)
    verdict = await rig.decide(charge(40))
    assert verdict.charges == ()
    assert verdict.ignored == ("no_tokens_limit",)
    assert not verdict.over_limit
    assert await rig.remaining() == {"free-requests": 5}  # a charge never takes requests


@pytest.mark.asyncio
async def test_a_charge_reports_the_tokens_of_the_request_level_hits() -> None:
    rig = Rig()
    descriptor = desc(charge=True, request_hits=25)
    verdict = await rig.decide(descriptor)
    assert verdict.charges == (ChargeReport("free", "", "total_tokens", 25, ChargeStatus.APPLIED),)
    assert (await rig.remaining())["free-tokens"] == 75


# --- prompt and completion tokens, weighted by each limit's cost -------------------------------

WEIGHTED = """\
limits:
  - {name: free-requests, tier: free, kind: requests, limit: 5, window: 2m}
  - {name: free-tokens, tier: free, kind: tokens, limit: 1000, window: 1m,
     cost: {prompt_tokens: 1, completion_tokens: 4}}
  - {name: premium-tokens, tier: premium, kind: tokens, limit: 1000, window: 1m,
     cost: {prompt_tokens: 0.5, completion_tokens: 1.5}}
  - {name: premium-plain, tier: premium, kind: tokens, limit: 1000, window: 1m}
"""


def prompt(tokens: int, tier: str = "free", **kwargs: str) -> Descriptor:
    return charge(tokens, tier=tier, kind="prompt_tokens", **kwargs)


def completion(tokens: int, tier: str = "free", **kwargs: str) -> Descriptor:
    return charge(tokens, tier=tier, kind="completion_tokens", **kwargs)


@pytest.mark.asyncio
@pytest.mark.parametrize(("prompt_tokens", "completion_tokens"), [(15, 8), (16, 3), (0, 7), (9, 0)])
async def test_weights_charge_prompt_once_and_completion_four_times(
    prompt_tokens: int, completion_tokens: int
) -> None:
    rig = Rig(WEIGHTED)
    verdict = await rig.decide(
        prompt(prompt_tokens, model="llm/tiny"), completion(completion_tokens, model="llm/tiny")
    )
    assert not verdict.over_limit
    assert verdict.ignored == ()
    # reported as sent, before any weight
    assert verdict.charges == (
        ChargeReport("free", "llm/tiny", "prompt_tokens", prompt_tokens, ChargeStatus.APPLIED),
        ChargeReport(
            "free", "llm/tiny", "completion_tokens", completion_tokens, ChargeStatus.APPLIED
        ),
    )
    charged = prompt_tokens * 1 + completion_tokens * 4
    assert await rig.remaining() == {"free-requests": 5, "free-tokens": 1000 - charged}


@pytest.mark.asyncio
async def test_weights_apply_per_charge_and_total_tokens_weigh_one() -> None:
    rig = Rig(WEIGHTED)
    await rig.decide(prompt(15))
    assert (await rig.remaining())["free-tokens"] == 985
    await rig.decide(completion(8))
    assert (await rig.remaining())["free-tokens"] == 953  # 8 x 4
    await rig.decide(charge(10))  # total only: no split known, weight 1
    assert (await rig.remaining())["free-tokens"] == 943


@pytest.mark.asyncio
async def test_fractional_weights_round_up_per_charge() -> None:
    rig = Rig(WEIGHTED)
    await rig.decide(prompt(15, tier="premium"), completion(7, tier="premium"))
    # ceil(15 x 0.5) = 8, ceil(7 x 1.5) = 11; the unweighted limit takes 15 + 7
    assert await rig.remaining("premium") == {"premium-tokens": 981, "premium-plain": 978}
    await rig.decide(prompt(1, tier="premium"))  # 0.5 -> 1: never under-charged
    assert await rig.remaining("premium") == {"premium-tokens": 980, "premium-plain": 977}
    await rig.decide(completion(10, tier="premium"))  # exactly 15: no rounding
    assert await rig.remaining("premium") == {"premium-tokens": 965, "premium-plain": 967}


@pytest.mark.parametrize(
    ("cost", "kind", "count", "expected"),
    [
        ("{prompt_tokens: 1, completion_tokens: 4}", "prompt_tokens", 15, 15),
        ("{prompt_tokens: 1, completion_tokens: 4}", "completion_tokens", 8, 32),
        ("{prompt_tokens: 1, completion_tokens: 4}", "total_tokens", 23, 23),
        ("{prompt_tokens: 0.5}", "prompt_tokens", 15, 8),
        ("{prompt_tokens: 0.5}", "prompt_tokens", 1, 1),
        ("{prompt_tokens: 0.5}", "prompt_tokens", 0, 0),
        ("{completion_tokens: 1.5}", "completion_tokens", 7, 11),
        ("{completion_tokens: 0.001}", "completion_tokens", 1, 1),
        ("{prompt_tokens: 0}", "prompt_tokens", 500, 0),
        # exact products stay exact although the weights are not exact binary fractions
        ("{completion_tokens: 1.1}", "completion_tokens", 100, 110),
        ("{prompt_tokens: 0.7}", "prompt_tokens", 10, 7),
        ("{prompt_tokens: 0.1}", "prompt_tokens", 30, 3),
        ("{prompt_tokens: 0.1}", "prompt_tokens", 31, 4),
        ("{completion_tokens: 2.3}", "completion_tokens", 1000, 2300),
        ("{completion_tokens: 1000}", "completion_tokens", 3, 3000),
    ],
)
def test_tokens_to_charge(cost: str, kind: str, count: int, expected: int) -> None:
    text = (
        f"limits:\n  - {{name: t, tier: free, kind: tokens, limit: 9, window: 1m, cost: {cost}}}\n"
    )
    (limit,) = parse_limits(text, "limits.yaml").limits
    assert limit.tokens_to_charge(kind, count) == expected


@pytest.mark.asyncio
async def test_a_weighted_charge_is_capped_at_the_debt_floor() -> None:
    rig = Rig(WEIGHTED)
    verdict = await rig.decide(completion(10**9))  # 4e9 weighted: capped, still exact
    assert verdict.charges[0].status is ChargeStatus.APPLIED
    assert verdict.charges[0].tokens == 10**9
    refused = await rig.decide(desc())
    tokens = states(refused)["free-tokens"]
    assert not tokens.sufficient
    # at the floor: DEBT_WINDOWS windows owed, 64 minutes until any credit
    assert tokens.retry_after_ms == DEBT_WINDOWS * 60_000 + 1


@pytest.mark.asyncio
async def test_prompt_and_completion_of_one_request_are_charged_once() -> None:
    rig = Rig(WEIGHTED)
    assert not (await rig.decide(desc(request_id="r1"))).over_limit
    first = await rig.decide(prompt(15, request_id="r1"), completion(8, request_id="r1"))
    assert [c.status for c in first.charges] == [ChargeStatus.APPLIED] * 2
    assert (await rig.remaining())["free-tokens"] == 953
    second = await rig.decide(prompt(15, request_id="r1"), completion(8, request_id="r1"))
    assert second.charges == (
        ChargeReport("free", "", "prompt_tokens", 15, ChargeStatus.DUPLICATE),
        ChargeReport("free", "", "completion_tokens", 8, ChargeStatus.DUPLICATE),
    )
    assert not second.over_limit
    # a request id is charged once, whatever kinds a later call carries
    third = await rig.decide(completion(8, request_id="r1"))
    assert third.charges[0].status is ChargeStatus.DUPLICATE
    assert (await rig.remaining())["free-tokens"] == 953


@pytest.mark.asyncio
async def test_prompt_and_completion_of_a_refused_request_are_not_charged() -> None:
    rig = Rig(WEIGHTED)
    await rig.admitted(5, desc())
    assert (await rig.decide(desc(request_id="r6"))).over_limit
    verdict = await rig.decide(prompt(15, request_id="r6"), completion(8, request_id="r6"))
    assert [c.status for c in verdict.charges] == [ChargeStatus.DENIED_REQUEST] * 2
    assert (await rig.remaining())["free-tokens"] == 1000


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["tokens", "", "PROMPT_TOKENS", "prompt", "hits"])
async def test_an_unknown_charge_kind_is_ignored(kind: str) -> None:
    rig = Rig(WEIGHTED)
    verdict = await rig.decide(charge(40, kind=kind))
    assert not verdict.over_limit
    assert verdict.charges == ()
    assert verdict.ignored == ("unknown_charge",)
    assert verdict.descriptors == (DescriptorVerdict(False, None, ()),)
    assert len(rig.store) == 0  # no bucket was touched


@pytest.mark.asyncio
async def test_an_unknown_charge_kind_does_not_hide_the_known_ones() -> None:
    rig = Rig(WEIGHTED)
    verdict = await rig.decide(charge(40, kind="tokens"), completion(5))
    assert verdict.ignored == ("unknown_charge",)
    assert verdict.charges == (
        ChargeReport("free", "", "completion_tokens", 5, ChargeStatus.APPLIED),
    )
    assert (await rig.remaining())["free-tokens"] == 980


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "outcome", ["charged", "no_usage", "upstream_error", "client_error", "rate_limited"]
)
async def test_an_outcome_is_reported_and_touches_no_bucket(outcome: str) -> None:
    rig = Rig(WEIGHTED)
    verdict = await rig.decide(desc(hits=50, model="llm/tiny", outcome=outcome))
    assert verdict == Verdict(
        False, (DescriptorVerdict(False, None, ()),), (), (), (("free", outcome),)
    )
    assert len(rig.store) == 0


@pytest.mark.asyncio
async def test_an_outcome_next_to_charges_and_in_debt() -> None:
    rig = Rig(WEIGHTED)
    await rig.admitted(5, desc())
    await rig.decide(completion(300))  # 1200 weighted: in debt
    assert (await rig.decide(desc())).over_limit
    before = await rig.remaining()
    verdict = await rig.decide(
        prompt(15),
        desc(outcome="charged"),
        # an outcome entry wins over a charge entry: counted, never charged
        desc(hits=40, charge=True, outcome="charged"),
        desc("premium", outcome="no_usage"),
        desc("gold", outcome="charged"),  # a tier without limits is still reported
        desc(user=None, outcome="charged"),  # no user: ignored like any descriptor
    )
    assert not verdict.over_limit
    assert verdict.outcomes == (
        ("free", "charged"),
        ("free", "charged"),
        ("premium", "no_usage"),
        ("gold", "charged"),
    )
    assert verdict.ignored == ("no_user",)
    assert verdict.charges == (ChargeReport("free", "", "prompt_tokens", 15, ChargeStatus.APPLIED),)
    assert all(d == DescriptorVerdict(False, None, ()) for d in verdict.descriptors)
    assert await rig.remaining() == before  # 0 left either way: check the exact levels
    assert await rig.remaining("premium") == {"premium-tokens": 1000, "premium-plain": 1000}


# --- reservations: the usage reader's estimate, taken on admission, settled afterwards ---------

RESERVE = (10, 40)  # the estimate of one request: 10 prompt + 40 completion tokens
TOKENS_ONLY = """\
limits:
  - {name: free-tokens, tier: free, kind: tokens, limit: 100, window: 1m}
"""
SHADOW_TOKENS = """\
limits:
  - {name: free-tokens, tier: free, kind: tokens, limit: 100, window: 1m}
  - {name: free-shadow, tier: free, kind: tokens, limit: 100, window: 1m, shadow: true}
"""


def admit(request_id: str | None, reserve: tuple[int, int] | None = RESERVE) -> Descriptor:
    """The admission descriptor of a request whose body the usage reader estimated."""
    return desc(model="llm/tiny", request_id=request_id, reserve=reserve)


def usage(
    prompt_tokens: int,
    completion_tokens: int,
    request_id: str | None,
    reserve: tuple[int, int] | None = RESERVE,
) -> tuple[Descriptor, Descriptor, Descriptor]:
    """The after-response call of a charged answer: two charges and the outcome, each with the
    request's reservation (as envoy/gateway.yaml sends them)."""
    model = "llm/tiny"
    return (
        charge(prompt_tokens, model=model, request_id=request_id, kind="prompt_tokens",
               reserve=reserve),
        charge(completion_tokens, model=model, request_id=request_id, kind="completion_tokens",
               reserve=reserve),
        desc(model=model, request_id=request_id, outcome="charged", reserve=reserve),
    )  # fmt: skip


def failed(outcome: str, request_id: str | None, reserve: tuple[int, int] = RESERVE) -> Descriptor:
    """The after-response call of an answer that charged nothing: the outcome alone."""
    return desc(model="llm/tiny", request_id=request_id, outcome=outcome, reserve=reserve)


@pytest.mark.asyncio
async def test_a_reservation_is_taken_on_admission() -> None:
    rig = Rig()
    verdict = await rig.decide(admit("r1"))
    assert not verdict.over_limit
    assert states(verdict)["free-tokens"].remaining == 50
    assert states(verdict)["free-requests"].remaining == 4
    assert verdict.reserved == (("free", "llm/tiny", 50),)  # as estimated, before weights
    assert await rig.remaining() == {"free-requests": 4, "free-tokens": 50}


@pytest.mark.asyncio
async def test_concurrent_requests_see_the_reservations_in_flight() -> None:
    # ten requests arrive before any answer: without reservations all ten would be admitted on
    # 100 tokens of credit (need 1, take 0); with them, the bucket runs dry after two
    rig = Rig(TOKENS_ONLY)
    results = [await rig.decide(admit(f"r{i}")) for i in range(10)]
    admitted = [not r.over_limit for r in results]
    assert admitted == [True, True] + [False] * 8
    refused = states(results[2])["free-tokens"]
    assert (refused.sufficient, refused.remaining) == (False, 0)
    assert refused.retry_after_ms == 1  # exactly 0 left: one more millisecond of refill
    assert all(r.reserved == () for r in results[2:])  # refused: nothing reserved
    # the same ten without an estimate: all admitted, as before reservations
    plain = Rig(TOKENS_ONLY)
    for i in range(10):
        assert not (await plain.decide(admit(f"p{i}", None))).over_limit


@pytest.mark.asyncio
async def test_a_big_reservation_may_go_into_debt_and_refuses_the_next_request() -> None:
    rig = Rig()
    assert not (await rig.decide(admit("r1", (30, 40)))).over_limit  # 30 left
    assert not (await rig.decide(admit("r2", (30, 40)))).over_limit  # credit > 0: 40 owed
    refused = await rig.decide(admit("r3", (1, 1)))
    assert refused.over_limit
    assert states(refused)["free-tokens"].retry_after_ms == 40 * 600 + 1
    assert states(refused)["free-requests"].remaining == 3  # nothing taken anywhere


@pytest.mark.asyncio
async def test_a_check_only_descriptor_reserves_nothing() -> None:
    rig = Rig()
    verdict = await rig.decide(desc(hits=0, reserve=RESERVE))
    assert states(verdict)["free-tokens"].remaining == 100
    assert verdict.reserved == ()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "entries",
    [
        {"reserve_prompt": "ten", "reserve_completion": "40"},
        {"reserve_prompt": "10", "reserve_completion": "-40"},
        {"reserve_prompt": "1e3", "reserve_completion": "0"},
        {"reserve_prompt": "", "reserve_completion": "40"},
        {"reserve_prompt": "\u0661\u0662", "reserve_completion": "40"},  # Arabic-Indic digits
        {"reserve_prompt": "9" * 19},
    ],
)
async def test_a_malformed_reservation_is_no_reservation(entries: dict[str, str]) -> None:
    rig = Rig()
    descriptor = Descriptor({"tier": "free", "user": "alice", **entries}, 1, False)
    verdict = await rig.decide(descriptor)
    assert not verdict.over_limit
    assert states(verdict)["free-tokens"].remaining == 100
    assert verdict.reserved == ()


@pytest.mark.asyncio
async def test_either_reserve_entry_alone_is_a_reservation() -> None:
    rig = Rig()
    await rig.decide(
        Descriptor({"tier": "free", "user": "alice", "reserve_prompt": "30"}, 1, False)
    )
    assert (await rig.remaining())["free-tokens"] == 70
    entries = {"tier": "free", "user": "alice", "reserve_completion": "20"}
    await rig.decide(Descriptor(entries, 1, False))
    assert (await rig.remaining())["free-tokens"] == 50


@pytest.mark.asyncio
async def test_a_reservation_is_weighted_like_a_charge() -> None:
    rig = Rig(WEIGHTED)  # free-tokens: 1000 per minute, completion tokens cost 4
    verdict = await rig.decide(admit("r1"))
    assert states(verdict)["free-tokens"].remaining == 1000 - (10 + 4 * 40)
    assert verdict.reserved == (("free", "llm/tiny", 50),)  # the metric is before weights


@pytest.mark.asyncio
async def test_a_huge_reservation_is_capped_and_settled_by_the_same_cap() -> None:
    rig = Rig()
    huge = (10**12, 10**12)
    assert not (await rig.decide(admit("r1", huge))).over_limit
    refused = await rig.decide(admit("r2"))
    # the take stops at DEBT_WINDOWS windows' worth, from a level of 100: above the debt floor
    owed = DEBT_WINDOWS * 100 - 100
    assert states(refused)["free-tokens"].retry_after_ms == owed * 600 + 1
    # settled: the same capped reservation comes back, the usage is charged
    await rig.decide(*usage(5, 5, "r1", huge))
    assert (await rig.remaining())["free-tokens"] == 90


@pytest.mark.asyncio
async def test_usage_below_the_reservation_is_refunded() -> None:
    rig = Rig()
    await rig.decide(admit("r1"))
    assert (await rig.remaining())["free-tokens"] == 50
    verdict = await rig.decide(*usage(7, 20, "r1"))
    assert not verdict.over_limit
    # reported as before: the usage, as the model reported it
    assert verdict.charges == (
        ChargeReport("free", "llm/tiny", "prompt_tokens", 7, ChargeStatus.APPLIED),
        ChargeReport("free", "llm/tiny", "completion_tokens", 20, ChargeStatus.APPLIED),
    )
    assert verdict.outcomes == (("free", "charged"),)
    # the reservation is subtracted once for the call, not once per descriptor carrying it
    assert (await rig.remaining())["free-tokens"] == 100 - 27
    assert verdict.refunded == (("free", "llm/tiny", 50 - 27),)


@pytest.mark.asyncio
async def test_usage_above_the_reservation_is_charged_on_top() -> None:
    rig = Rig()
    await rig.decide(admit("r1", (5, 10)))
    assert (await rig.remaining())["free-tokens"] == 85
    verdict = await rig.decide(*usage(8, 40, "r1", (5, 10)))
    assert (await rig.remaining())["free-tokens"] == 100 - 48
    assert verdict.refunded == ()


@pytest.mark.asyncio
async def test_usage_far_above_the_reservation_goes_into_debt_as_before() -> None:
    rig = Rig()
    await rig.decide(admit("r1", (5, 10)))
    await rig.decide(*usage(10, 140, "r1", (5, 10)))  # 150 used: 50 owed
    refused = await rig.decide(admit("r2"))
    assert refused.over_limit
    assert states(refused)["free-tokens"].retry_after_ms == 30_001


@pytest.mark.asyncio
async def test_settlement_is_weighted() -> None:
    rig = Rig(WEIGHTED)
    await rig.decide(admit("r1"))  # 10 + 4 x 40 = 170 reserved
    verdict = await rig.decide(*usage(8, 20, "r1"))  # 8 + 4 x 20 = 88 used
    assert (await rig.remaining())["free-tokens"] == 1000 - 88
    assert verdict.refunded == (("free", "llm/tiny", 50 - 28),)  # before weights


@pytest.mark.asyncio
async def test_a_settled_request_equals_a_post_paid_one() -> None:
    # whatever the estimate, once settled the bucket holds exactly what the usage left
    for reserve in [(0, 0), (1, 1), (10, 40), (200, 300)]:
        rig = Rig(WEIGHTED)
        await rig.decide(admit("r1", reserve))
        await rig.decide(*usage(15, 8, "r1", reserve))
        assert (await rig.remaining())["free-tokens"] == 1000 - (15 + 4 * 8), reserve


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "outcome", ["no_usage", "upstream_error", "client_error", "rate_limited", "incomplete"]
)
async def test_an_answer_charged_nothing_refunds_the_whole_reservation(outcome: str) -> None:
    rig = Rig()
    await rig.decide(admit("r1"))
    verdict = await rig.decide(failed(outcome, "r1"))
    assert not verdict.over_limit
    assert verdict.outcomes == (("free", outcome),)
    assert verdict.charges == ()  # nothing was charged
    assert verdict.refunded == (("free", "llm/tiny", 50),)
    assert await rig.remaining() == {"free-requests": 4, "free-tokens": 100}


@pytest.mark.asyncio
async def test_a_refund_is_applied_once() -> None:
    rig = Rig()
    await rig.decide(admit("r1"))
    await rig.decide(admit("r2"))
    assert (await rig.remaining())["free-tokens"] == 0
    assert (await rig.decide(failed("upstream_error", "r1"))).refunded != ()
    again = await rig.decide(failed("upstream_error", "r1"))
    assert again.refunded == ()
    assert (await rig.remaining())["free-tokens"] == 50
    # nor after a settlement of the same request id
    await rig.decide(*usage(5, 5, "r2"))
    assert (await rig.remaining())["free-tokens"] == 90
    late = await rig.decide(failed("incomplete", "r2"))
    assert late.refunded == ()
    assert (await rig.remaining())["free-tokens"] == 90
    repeated = await rig.decide(*usage(5, 5, "r2"))
    assert [c.status for c in repeated.charges] == [ChargeStatus.DUPLICATE] * 2
    assert repeated.refunded == ()
    assert (await rig.remaining())["free-tokens"] == 90


@pytest.mark.asyncio
async def test_a_request_refused_at_admission_reserved_nothing_and_gets_no_refund() -> None:
    rig = Rig()
    await rig.admitted(5, desc())  # the requests limit is now empty
    refused = await rig.decide(admit("r6"))
    assert refused.over_limit
    assert refused.reserved == ()
    assert (await rig.remaining())["free-tokens"] == 100  # all or nothing: no reservation
    # Envoy's after-response call for the 429: the outcome with the reservation entries
    verdict = await rig.decide(failed("rate_limited", "r6"))
    assert verdict.refunded == ()
    assert (await rig.remaining())["free-tokens"] == 100
    # spend some tokens: a refund would now show
    await rig.decide(charge(60))
    for call in (failed("rate_limited", "r6"), *usage(7, 20, "r6")):
        verdict = await rig.decide(call)
        assert verdict.refunded == ()
        assert all(c.status is ChargeStatus.DENIED_REQUEST for c in verdict.charges)
    assert (await rig.remaining())["free-tokens"] == 40


@pytest.mark.asyncio
async def test_a_request_refused_by_its_own_tokens_bucket_gets_no_refund() -> None:
    rig = Rig()
    await rig.decide(admit("r1"))
    await rig.decide(admit("r2"))  # 0 left
    assert (await rig.decide(admit("r3"))).over_limit
    await rig.decide(failed("rate_limited", "r3"))
    assert (await rig.remaining())["free-tokens"] == 0


@pytest.mark.asyncio
async def test_without_a_request_id_an_answer_charged_nothing_is_not_refunded() -> None:
    # nothing tells an admitted request from a refused one then: the reservation stays charged
    rig = Rig()
    await rig.decide(admit(None))
    verdict = await rig.decide(failed("upstream_error", None))
    assert verdict.refunded == ()
    assert (await rig.remaining())["free-tokens"] == 50
    # a charged answer is settled all the same (only admitted requests get an answer)
    await rig.decide(*usage(7, 20, None))
    assert (await rig.remaining())["free-tokens"] == 100 - 27


@pytest.mark.asyncio
async def test_a_charged_outcome_alone_refunds_nothing() -> None:
    rig = Rig()
    await rig.decide(admit("r1"))
    verdict = await rig.decide(desc(model="llm/tiny", request_id="r1", outcome="charged",
                                    reserve=RESERVE))  # fmt: skip
    assert verdict.refunded == ()
    assert (await rig.remaining())["free-tokens"] == 50


@pytest.mark.asyncio
async def test_a_refund_never_raises_a_bucket_above_its_capacity() -> None:
    rig = Rig()
    await rig.decide(admit("r1"))
    assert (await rig.remaining())["free-tokens"] == 50
    rig.clock.advance(60)  # refilled meanwhile: full again
    await rig.decide(failed("upstream_error", "r1"))
    assert (await rig.remaining())["free-tokens"] == 100
    # exactly full, not 150: one charge of 100 leaves nothing
    await rig.decide(charge(100))
    assert (await rig.decide(desc())).over_limit
    # the same for a settlement below the reservation
    rig = Rig()
    await rig.decide(admit("r2"))
    rig.clock.advance(30)  # 50 refilled: full
    await rig.decide(*usage(1, 1, "r2"))
    assert (await rig.remaining())["free-tokens"] == 100


@pytest.mark.asyncio
async def test_shadow_limits_reserve_nothing_and_are_charged_the_usage() -> None:
    rig = Rig(SHADOW_TOKENS)
    verdict = await rig.decide(admit("r1"))
    assert {n: s.remaining for n, s in states(verdict).items()} == {
        "free-tokens": 50,
        "free-shadow": 100,
    }
    verdict = await rig.decide(*usage(7, 20, "r1"))
    assert await rig.remaining() == {"free-tokens": 73, "free-shadow": 73}
    assert verdict.refunded == (("free", "llm/tiny", 23),)
    await rig.decide(admit("r2"))
    await rig.decide(failed("no_usage", "r2"))
    assert await rig.remaining() == {"free-tokens": 73, "free-shadow": 73}


@pytest.mark.asyncio
async def test_only_shadow_tokens_limits_reserve_and_refund_nothing() -> None:
    only_shadow = """\
limits:
  - {name: free-shadow, tier: free, kind: tokens, limit: 100, window: 1m, shadow: true}
"""
    rig = Rig(only_shadow)
    verdict = await rig.decide(admit("r1"))
    assert verdict.reserved == ()
    verdict = await rig.decide(failed("upstream_error", "r1"))
    assert verdict.refunded == ()
    assert len(rig.store) == 0  # no bucket touched by the refund call


@pytest.mark.asyncio
async def test_a_reservation_without_tokens_limits_is_nothing() -> None:
    rig = Rig(REQUESTS_ONLY)
    verdict = await rig.decide(admit("r1"))
    assert not verdict.over_limit
    assert verdict.reserved == ()
    verdict = await rig.decide(failed("upstream_error", "r1"))
    assert verdict.refunded == ()
    assert await rig.remaining() == {"free-requests": 4}


@pytest.mark.asyncio
async def test_reservations_bound_the_overshoot_of_concurrent_requests() -> None:
    # The bound the docs state: with every request reserving at least what it uses, the bucket's
    # usage admitted while it had credit never exceeds its credit plus one request's usage.
    rig = Rig()
    waves = 0
    total_used = 0
    while True:
        batch = [f"w{waves}-{i}" for i in range(10)]
        admitted = [rid for rid in batch if not (await rig.decide(admit(rid))).over_limit]
        if not admitted:
            break
        for rid in admitted:
            await rig.decide(*usage(7, 40, rid))  # 47 used of 50 reserved
            total_used += 47
        waves += 1
    assert total_used <= 100 + 47
    assert total_used == 3 * 47  # 2 admitted (100 -> 0), refunds leave 6, 1 more admitted


# --- several matching limits --------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("tokens_charged", "binding", "retry_after_ms"),
    [
        (150, "free-tokens", 30_001),  # tokens wait longer than the 24 s of requests
        (110, "free-requests", 24_000),  # 10 tokens owed: 6_001 ms, requests wait longer
    ],
)
async def test_the_refusing_limit_with_the_longest_wait_is_reported(
    tokens_charged: int, binding: str, retry_after_ms: int
) -> None:
    rig = Rig()
    await rig.admitted(5, desc())
    await rig.decide(charge(tokens_charged))
    refused = await rig.decide(desc())
    both = states(refused)
    assert not both["free-requests"].sufficient
    assert not both["free-tokens"].sufficient
    assert refused.binding is not None
    assert refused.binding.limit.name == binding
    assert refused.binding.retry_after_ms == retry_after_ms
    assert reported_name(refused.descriptors[0]) == binding


@pytest.mark.asyncio
async def test_without_refusal_the_enforced_limit_with_least_room_is_reported() -> None:
    rig = Rig()
    verdict = await rig.decide(desc())  # requests 4/5 left, tokens 100/100
    assert reported_name(verdict.descriptors[0]) == "free-requests"
    await rig.decide(charge(90))  # tokens 10/100 left, requests 4/5
    verdict = await rig.decide(desc())  # requests 3/5
    assert verdict.binding is None
    assert reported_name(verdict.descriptors[0]) == "free-tokens"
    assert verdict.descriptors[0].reported is not None
    assert verdict.descriptors[0].reported.remaining == 10


@pytest.mark.asyncio
async def test_the_binding_limit_spans_descriptors() -> None:
    rig = Rig()
    await rig.admitted(5, desc(user="alice"))
    await rig.decide(charge(150, user="bob"))
    refused = await rig.decide(desc(user="alice"), desc(user="bob"))
    assert [reported_name(d) for d in refused.descriptors] == ["free-requests", "free-tokens"]
    assert refused.binding is not None
    assert refused.binding.limit.name == "free-tokens"  # 30_001 ms beats 24_000 ms


# --- shadow limits ------------------------------------------------------------------------------

SHADOW = """\
limits:
  - {name: free-requests, tier: free, kind: requests, limit: 5, window: 2m}
  - {name: free-shadow, tier: free, kind: requests, limit: 2, window: 1m, shadow: true}
  - {name: premium-shadow, tier: premium, kind: requests, limit: 1, window: 1m, shadow: true}
"""


@pytest.mark.asyncio
async def test_shadow_limits_never_refuse_but_report_shadow_limited() -> None:
    rig = Rig(SHADOW)
    await rig.admitted(2, desc())
    verdict = await rig.decide(desc())
    assert not verdict.over_limit
    assert not verdict.descriptors[0].over_limit
    assert verdict.binding is None
    shadow = states(verdict)["free-shadow"]
    assert (shadow.sufficient, shadow.result) == (False, "shadow_limited")
    assert shadow.retry_after_ms == 30_000
    assert states(verdict)["free-requests"].result == "allowed"
    assert states(verdict)["free-requests"].remaining == 2  # the enforced limit still counts
    assert reported_name(verdict.descriptors[0]) == "free-requests"  # not the shadow


@pytest.mark.asyncio
async def test_the_enforced_limit_still_refuses_next_to_a_shadow() -> None:
    rig = Rig(SHADOW)
    await rig.admitted(5, desc())
    refused = await rig.decide(desc())
    assert refused.over_limit
    assert refused.binding is not None
    assert refused.binding.limit.name == "free-requests"
    assert states(refused)["free-shadow"].result == "shadow_limited"


@pytest.mark.asyncio
async def test_only_shadow_limits_are_reported_when_nothing_else_applies() -> None:
    rig = Rig(SHADOW)
    await rig.admitted(3, desc("premium"))
    verdict = await rig.decide(desc("premium"))
    assert not verdict.over_limit
    assert verdict.binding is None
    assert reported_name(verdict.descriptors[0]) == "premium-shadow"
    assert states(verdict)["premium-shadow"].result == "shadow_limited"


@pytest.mark.asyncio
async def test_among_shadow_limits_the_one_with_least_room_is_reported() -> None:
    rig = Rig(
        "limits:\n"
        "  - {name: wide, tier: trial, kind: requests, limit: 10, window: 1m, shadow: true}\n"
        "  - {name: narrow, tier: trial, kind: requests, limit: 4, window: 1m, shadow: true}\n"
    )
    await rig.admitted(1, desc("trial"))
    verdict = await rig.decide(desc("trial"))  # wide 8 of 10 left, narrow 2 of 4
    assert reported_name(verdict.descriptors[0]) == "narrow"
    assert verdict.descriptors[0].reported is not None
    assert verdict.descriptors[0].reported.remaining == 2


# --- descriptors that match nothing, domains ----------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("descriptor", "reason"),
    [
        (desc(tier=None), "no_tier"),
        (desc(user=None), "no_user"),
        (desc(tier=None, user=None), "no_tier"),
        (desc(tier=""), "no_tier"),
        (desc(user=""), "no_user"),
        (charge(10, user=None), "no_user"),
    ],
)
async def test_a_descriptor_without_tier_or_user_matches_nothing(
    descriptor: Descriptor, reason: str
) -> None:
    rig = Rig()
    for _ in range(10):
        verdict = await rig.decide(descriptor)
        assert not verdict.over_limit
        assert verdict.ignored == (reason,)
        assert verdict.descriptors == (DescriptorVerdict(False, None, ()),)
        assert verdict.charges == ()
    assert len(rig.store) == 0  # no bucket was touched


@pytest.mark.asyncio
async def test_ignored_descriptors_do_not_hide_the_others() -> None:
    rig = Rig()
    await rig.admitted(5, desc())
    verdict = await rig.decide(desc(user=None), desc())
    assert verdict.over_limit
    assert verdict.ignored == ("no_user",)
    assert [d.over_limit for d in verdict.descriptors] == [False, True]


@pytest.mark.asyncio
async def test_a_tier_without_limits_is_allowed() -> None:
    rig = Rig()
    verdict = await rig.decide(desc("gold"))
    assert not verdict.over_limit
    assert verdict.descriptors == (DescriptorVerdict(False, None, ()),)
    assert verdict.ignored == ()


@pytest.mark.asyncio
async def test_no_descriptors() -> None:
    verdict = await Rig().decide()
    assert verdict == Verdict(False, (), (), ())


@pytest.mark.asyncio
async def test_an_unknown_domain_raises() -> None:
    rig = Rig()
    with pytest.raises(UnknownDomain) as caught:
        await rig.decide(desc(), domain="other")
    assert str(caught.value) == "unknown domain 'other'; this server serves 'maas'"
    assert len(rig.store) == 0


# --- reloads ------------------------------------------------------------------------------------


def reloaded(limit: int, window: str) -> LimitTable:
    return parse_limits(
        "limits:\n"
        f"  - {{name: free-requests, tier: free, kind: requests, limit: {limit}, "
        f"window: {window}}}\n",
        "limits.yaml",
    )


@pytest.mark.asyncio
async def test_a_reloaded_table_keeps_the_counters() -> None:
    rig = Rig(REQUESTS_ONLY)
    await rig.admitted(3, desc())
    rig.table = reloaded(10, "2m")  # same name, a higher limit: the 2 tokens left stay 2
    verdict = await rig.decide(desc())
    state = states(verdict)["free-requests"]
    assert state.limit.spec.limit == 10
    assert state.remaining == 1
    await rig.admitted(1, desc())
    refused = await rig.decide(desc())
    assert refused.over_limit
    assert states(refused)["free-requests"].retry_after_ms == 12_000  # 10 per 2m now


@pytest.mark.asyncio
async def test_a_reloaded_window_rescales_the_counter() -> None:
    rig = Rig(REQUESTS_ONLY)
    await rig.admitted(3, desc())
    rig.table = reloaded(5, "1m")
    assert await rig.remaining() == {"free-requests": 2}
    await rig.admitted(2, desc())
    refused = await rig.decide(desc())
    assert states(refused)["free-requests"].retry_after_ms == 12_000  # 5 per 1m now


@pytest.mark.asyncio
async def test_a_reloaded_domain_applies_to_the_next_call() -> None:
    rig = Rig()
    rig.table = parse_limits("domain: other\n" + REQUESTS_ONLY, "limits.yaml")
    with pytest.raises(UnknownDomain):
        await rig.decide(desc())
    assert not (await rig.decide(desc(), domain="other")).over_limit


def test_result_of_limit_states() -> None:
    table = parse_limits(SHADOW, "limits.yaml")
    enforced, shadow = table.limits[0], table.limits[1]
    assert LimitState(enforced, True, 1, 1).result == "allowed"
    assert LimitState(enforced, False, 0, 1).result == "limited"
    assert LimitState(shadow, True, 1, 1).result == "allowed"
    assert LimitState(shadow, False, 0, 1).result == "shadow_limited"


def test_effective_hits() -> None:
    cases: Sequence[tuple[int | None, int, tuple[int, bool]]] = [
        (None, 0, (1, False)),
        (None, 1, (1, False)),
        (None, 7, (7, False)),
        (0, 0, (0, True)),
        (0, 7, (0, True)),
        (3, 0, (3, False)),
        (3, 7, (3, False)),
    ]
    for own, request, expected in cases:
        assert effective_hits(own, request) == expected
