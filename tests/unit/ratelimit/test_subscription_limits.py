"""Token limits that come with a MaaSSubscription (the `subscription` + `token_limits` entries
maas-authz sets): every limit enforced, counted per user and model, settled after the response
like a tier's; the default deny for a model request that nothing entitles; the price carried."""

from __future__ import annotations

import json

import pytest

from maas_common.clock import ManualClock
from maas_ratelimit import responses
from maas_ratelimit.descriptors import Descriptor
from maas_ratelimit.limiter import RateLimiter, Verdict
from maas_ratelimit.limits import DEFAULT_LIMITS, parse_limits, subscription_limits
from maas_ratelimit.memory_store import MemoryBucketStore

SUB = "models-as-a-service/demo-small"


def sub_desc(
    user: str = "alice",
    model: str | None = "llm/tiny",
    *,
    limits: str | None = "10/60,15/3600",
    subscription: str | None = SUB,
    charge: int | None = None,
    kind: str = "total_tokens",
    request_id: str | None = None,
    reserve: tuple[int, int] | None = None,
    billing_rate: str | None = None,
) -> Descriptor:
    entries = {"user": user}
    for key, value in (
        ("model", model),
        ("subscription", subscription),
        ("token_limits", limits),
        ("request_id", request_id),
        ("billing_rate", billing_rate),
    ):
        if value is not None:
            entries[key] = value
    if reserve is not None:
        entries["reserve_prompt"], entries["reserve_completion"] = map(str, reserve)
    if charge is not None:
        entries["charge"] = kind
        return Descriptor(entries, charge, False)
    return Descriptor(entries, 1, False)


class Rig:
    def __init__(self) -> None:
        self.clock = ManualClock()
        self.table = parse_limits(DEFAULT_LIMITS, "limits")
        self.limiter = RateLimiter(
            limits=lambda: self.table, store=MemoryBucketStore(), clock=self.clock
        )

    async def decide(self, *descriptors: Descriptor) -> Verdict:
        return await self.limiter.decide("maas", descriptors)


@pytest.mark.asyncio
async def test_every_limit_of_the_subscription_is_enforced_per_user_and_model() -> None:
    rig = Rig()
    assert not (await rig.decide(sub_desc())).over_limit
    await rig.decide(sub_desc(charge=12))  # the minute's 10 are gone, 3 of the hour's 15 left
    refused = await rig.decide(sub_desc())
    assert refused.over_limit
    binding = refused.binding
    assert binding is not None and binding.limit.name == f"{SUB}/tokens-0"
    assert binding.limit.description == f"subscription {SUB}: 10 tokens per 1m"
    # another user, or the same user on another model, has buckets of its own
    assert not (await rig.decide(sub_desc(user="bob"))).over_limit
    assert not (await rig.decide(sub_desc(model="llm/big"))).over_limit
    # after a minute the first limit has refilled; the hour's is short now (15 - 12 - 10 < 0)
    rig.clock.advance(60)
    assert not (await rig.decide(sub_desc())).over_limit
    await rig.decide(sub_desc(charge=10))
    rig.clock.advance(60)
    refused = await rig.decide(sub_desc())
    assert refused.over_limit
    assert refused.binding is not None and refused.binding.limit.name == f"{SUB}/tokens-1"


@pytest.mark.asyncio
async def test_a_reservation_is_taken_on_admission_and_settled_after_the_response() -> None:
    rig = Rig()
    admitted = await rig.decide(sub_desc(request_id="r1", reserve=(4, 4)))
    assert not admitted.over_limit and admitted.reserved == ((SUB, "llm/tiny", 8),)
    settled = await rig.decide(sub_desc(request_id="r1", reserve=(4, 4), charge=3))
    assert settled.refunded == ((SUB, "llm/tiny", 5),)
    states = (await rig.decide(sub_desc(request_id="r2"))).descriptors[0].limits
    assert [s.remaining for s in states] == [7, 12]


@pytest.mark.asyncio
async def test_the_billing_rate_travels_with_the_charge() -> None:
    rig = Rig()
    verdict = await rig.decide(
        sub_desc(charge=7, kind="prompt_tokens", billing_rate="0.000002", request_id="r")
    )
    (report,) = verdict.charges
    assert (report.tier, report.model, report.kind, report.tokens) == (
        SUB, "llm/tiny", "prompt_tokens", 7,
    )  # fmt: skip
    assert report.billing_rate == "0.000002"


@pytest.mark.asyncio
async def test_a_model_request_that_nothing_entitles_is_refused() -> None:
    rig = Rig()
    verdict = await rig.decide(sub_desc(subscription=None, limits=None))
    assert verdict.over_limit and verdict.refusal == "no_subscription"
    body = json.loads(responses.build(verdict).raw_body)
    assert body["error"]["code"] == "no_subscription"
    # a subscription whose limits cannot be read is never taken for "no limit"
    for broken in ("", "ten/60", "10/0", "0/60", "10/60,", "10/60/1", "1000000000/36000000"):
        verdict = await rig.decide(sub_desc(limits=broken))
        assert verdict.over_limit and verdict.refusal == "no_subscription", broken
        assert "bad_token_limits" in verdict.ignored
    # no model (e.g. /v1/models): nothing to limit, nothing refused
    assert not (await rig.decide(sub_desc(model=None, subscription=None, limits=None))).over_limit


@pytest.mark.asyncio
async def test_the_tier_flow_is_untouched_beside_it() -> None:
    rig = Rig()
    tier = Descriptor({"tier": "free", "user": "alice", "model": "llm/tiny"}, 1, False)
    for _ in range(5):
        assert not (await rig.decide(tier)).over_limit
    assert (await rig.decide(tier)).over_limit  # free: 5 requests per 2m
    assert not (await rig.decide(sub_desc())).over_limit  # the subscription's own buckets


def test_token_limits_parse_strictly() -> None:
    limits = subscription_limits(SUB, "100/60,5000/3600")
    assert limits is not None
    assert [(lim.spec.limit, lim.spec.window_ms, lim.per_model) for lim in limits] == [
        (100, 60_000, True),
        (5000, 3_600_000, True),
    ]
    assert subscription_limits(SUB, "+5/60") is None
    assert subscription_limits(SUB, ",".join(["1/60"] * 17)) is None
