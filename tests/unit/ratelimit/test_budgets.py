"""Budgets: spend limits over calendar periods and rolling windows, in tokens or money, enforced on
admission with reservations (RateLimiter.decide with the memory store and a manual clock; the
store contract holds the Redis store to the same bucket semantics)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import pytest

from maas_common.clock import ManualClock
from maas_common.errors import ConfigError
from maas_common.periods import calendar_period, zone
from maas_ratelimit import responses
from maas_ratelimit.descriptors import Descriptor, effective_hits
from maas_ratelimit.limiter import RateLimiter, Verdict
from maas_ratelimit.limits import parse_limits
from maas_ratelimit.memory_store import MemoryBucketStore

# 2026-12-15 12:00 UTC
NOON = dt.datetime(2026, 12, 15, 12, tzinfo=dt.UTC).timestamp()

BUDGETS = """\
limits:
  - {name: free-tokens, tier: free, kind: tokens, limit: 100000, window: 1m}
prices:
  - {model: llm/big, prompt_per_million: 2, completion_per_million: 8}
  - {model: "*", prompt_per_million: 1, completion_per_million: 1}
budgets:
  - {name: free-month, tier: free, kind: tokens, limit: 1000, period: month}
  - {name: premium-cost, tier: premium, kind: cost, limit: 0.01, period: month,
     timezone: Europe/Berlin}
  - {name: team-week, tier: team, per: tier, kind: tokens, limit: 500, window: 7d}
  - {name: every-subscription, subscription: "*", kind: cost, limit: 0.002, period: day}
"""


def desc(
    tier: str | None = "free",
    user: str = "alice",
    model: str | None = "llm/tiny",
    *,
    request_id: str | None = None,
    reserve: tuple[int, int] | None = None,
    charge: str | None = None,
    hits: int | None = None,
    outcome: str | None = None,
    subscription: str | None = None,
    token_limits: str | None = None,
    billing_rate: str | None = None,
) -> Descriptor:
    entries = {"user": user}
    for key, value in (
        ("tier", tier),
        ("model", model),
        ("request_id", request_id),
        ("charge", charge),
        ("outcome", outcome),
        ("subscription", subscription),
        ("token_limits", token_limits),
        ("billing_rate", billing_rate),
    ):
        if value is not None:
            entries[key] = value
    if reserve is not None:
        entries["reserve_prompt"], entries["reserve_completion"] = map(str, reserve)
    count, check_only = effective_hits(hits, 0)
    return Descriptor(entries, count, check_only)


def limiter(clock: ManualClock, text: str = BUDGETS) -> RateLimiter:
    table = parse_limits(text, "limits.yaml")
    return RateLimiter(limits=lambda: table, store=MemoryBucketStore(), clock=clock)


def budget_state(verdict: Verdict, name: str):  # type: ignore[no-untyped-def]
    return next(s for d in verdict.descriptors for s in d.limits if s.limit.name == name)


async def request(
    rl: RateLimiter, request_id: str, used: tuple[int, int], reserve: tuple[int, int], **kw: str
) -> bool:
    """One request: admitted with its reservation, then settled with its usage."""
    admitted = await rl.decide("maas", [desc(request_id=request_id, reserve=reserve, **kw)])
    if admitted.over_limit:
        return False
    await rl.decide(
        "maas",
        [
            desc(
                request_id=request_id, reserve=reserve, charge="prompt_tokens", hits=used[0], **kw
            ),
            desc(
                request_id=request_id,
                reserve=reserve,
                charge="completion_tokens",
                hits=used[1],
                **kw,
            ),
        ],
    )
    return True


@pytest.mark.asyncio
async def test_a_monthly_tokens_budget_refuses_once_spent_and_resets_with_the_month() -> None:
    clock = ManualClock(wall=NOON)
    rl = limiter(clock)
    admitted = 0
    for i in range(20):
        admitted += await request(rl, f"r{i}", used=(60, 40), reserve=(60, 50))
    assert admitted == 10  # 10 x 100 tokens = the budget; the 11th finds nothing left
    refused = await rl.decide("maas", [desc(request_id="x", reserve=(1, 1))])
    assert refused.over_limit
    binding = refused.binding
    assert binding is not None and binding.limit.name == "free-month"
    end = calendar_period("month", dt.UTC, round(NOON * 1000))[2]
    assert binding.retry_after_ms == end - round(NOON * 1000)  # the month's end, 2027-01-01
    body = json.loads(responses.error_body(binding))["error"]
    assert body["code"] == "budget_exceeded" and body["budget"] == "free-month"
    assert body["type"] == "budget"
    assert body["resets_in_seconds"] == (end - round(NOON * 1000)) // 1000
    response = responses.build(refused)
    headers = {h.key: h.value for h in response.response_headers_to_add}
    assert headers["retry-after"] == str(body["resets_in_seconds"])
    assert headers["x-maas-ratelimit-limit"] == "free-month"
    # time passes within the month: no refill
    clock.advance(10 * 86400)
    assert (await rl.decide("maas", [desc(request_id="y")])).over_limit
    # a new month: a new budget
    clock.advance(30 * 86400)
    assert not (await rl.decide("maas", [desc(request_id="z")])).over_limit


@pytest.mark.asyncio
async def test_concurrent_requests_overshoot_by_at_most_one_reservation() -> None:
    clock = ManualClock(wall=NOON)
    rl = limiter(clock)
    # 50 requests at once, each reserving 100 and using 100: the budget is 1000
    results = await asyncio.gather(
        *(rl.decide("maas", [desc(request_id=f"c{i}", reserve=(50, 50))]) for i in range(50))
    )
    admitted = [i for i, verdict in enumerate(results) if not verdict.over_limit]
    assert len(admitted) == 10  # credit > 0 before each reservation: 1000 / 100
    for i in admitted:
        await rl.decide(
            "maas",
            [desc(request_id=f"c{i}", reserve=(50, 50), charge="total_tokens", hits=150)],
        )
    state = budget_state(await rl.decide("maas", [desc(hits=0)]), "free-month")
    assert state.remaining == 0
    assert state.level == 1000 - 10 * 150  # usage beyond the reservation is charged: debt 500


@pytest.mark.asyncio
async def test_a_cost_budget_counts_money_at_the_models_price_and_the_billing_rate_wins() -> None:
    clock = ManualClock(wall=NOON)
    rl = limiter(clock)
    # llm/big: 2 per million prompt, 8 per million completion tokens: 1000 + 1000 cost 0.01
    assert await request(
        rl, "a", used=(500, 500), reserve=(500, 500), tier="premium", model="llm/big"
    )
    state = budget_state(
        await rl.decide("maas", [desc("premium", model="llm/big", hits=0)]), "premium-cost"
    )
    assert state.remaining == 10_000 - (500 * 2 + 500 * 8)  # micro-units: 0.005 left
    report = responses.limit_report(state)
    assert report["unit"] == "cost" and report["limit"] == "0.01"
    assert report["remaining"] == "0.005" and report["budget"] is True
    assert report["period"] == "month" and report["timezone"] == "Europe/Berlin"
    # Berlin's December ends at 23:00 UTC on the 31st
    assert report["resets_at"] == "2026-12-31T23:00:00Z"
    # with a billing rate the subscription's price applies to every token (cost 0.000001 each)
    sub = {"subscription": "ns/gold", "token_limits": "100000/60", "billing_rate": "0.000001"}
    assert await request(rl, "s1", used=(600, 600), reserve=(600, 600), tier=None, **sub)
    state = budget_state(await rl.decide("maas", [desc(None, hits=0, **sub)]), "every-subscription")
    assert state.remaining == 2000 - 1200
    # admitted while credit is left (0.0008), into debt by its usage, and then refused
    assert await request(rl, "s2", used=(600, 600), reserve=(1, 1), tier=None, **sub)
    assert not await request(rl, "s3", used=(1, 1), reserve=(1, 1), tier=None, **sub)


@pytest.mark.asyncio
async def test_a_budget_per_tier_is_shared_and_a_rolling_window_refills() -> None:
    clock = ManualClock(wall=NOON)
    rl = limiter(clock)
    assert await request(rl, "t1", used=(200, 100), reserve=(200, 100), tier="team", user="ann")
    assert await request(rl, "t2", used=(150, 100), reserve=(150, 50), tier="team", user="bob")
    assert not await request(rl, "t3", used=(1, 1), reserve=(1, 1), tier="team", user="cat")
    refused = await rl.decide("maas", [desc("team", user="cat", request_id="t4")])
    binding = refused.binding
    assert binding is not None and binding.limit.name == "team-week"
    # 550 used of 500 per 7 d: 50 in debt, paid back at 500 per 604800 s
    assert binding.retry_after_ms == 50 * 604_800_000 // 500 + 1
    clock.advance(86400)  # a day: 500 / 7 ~ 71.4 tokens back
    state = budget_state(await rl.decide("maas", [desc("team", user="cat", hits=0)]), "team-week")
    assert state.remaining == 21


def test_budget_config_errors_name_the_key() -> None:
    bad = [
        ("{name: b, kind: tokens, limit: 5, period: month}", "exactly one of tier or subscription"),
        ("{name: b, tier: t, kind: tokens, limit: 5}", "exactly one of period"),
        ("{name: b, tier: t, kind: tokens, limit: 5.5, period: day}", "whole number"),
        ("{name: b, tier: t, kind: cost, limit: 5, period: year}", "period"),
        (
            "{name: b, tier: t, kind: cost, limit: 5, period: day, timezone: Mars/Base}",
            "unknown time zone",
        ),
        (
            "{name: b, tier: t, per: subscription, kind: cost, limit: 5, period: day}",
            "per: subscription needs subscription",
        ),
        ("{name: free-tokens, tier: t, kind: cost, limit: 5, period: day}", "already a limit"),
        (
            "{name: b, tier: t, kind: tokens, limit: 100000000000000000, window: 30d}",
            "too large",
        ),
    ]
    for item, expected in bad:
        text = (
            "limits:\n  - {name: free-tokens, tier: free, kind: tokens, limit: 5, window: 1m}\n"
            f"budgets:\n  - {item}\n"
        )
        with pytest.raises(ConfigError) as caught:
            parse_limits(text, "limits.yaml")
        assert expected in str(caught.value), item
        assert str(caught.value).startswith("limits.yaml: budgets")


def test_calendar_periods_follow_the_time_zone() -> None:
    berlin = zone("Europe/Berlin")
    # 2026-11-30 23:30 UTC is already December in Berlin
    now = round(dt.datetime(2026, 11, 30, 23, 30, tzinfo=dt.UTC).timestamp() * 1000)
    name, start, end = calendar_period("month", berlin, now)
    assert name == "2026-12"
    assert start == round(dt.datetime(2026, 11, 30, 23, tzinfo=dt.UTC).timestamp() * 1000)
    assert end == round(dt.datetime(2026, 12, 31, 23, tzinfo=dt.UTC).timestamp() * 1000)
    assert calendar_period("month", dt.UTC, now)[0] == "2026-11"
    # a DST day in Berlin is 23 hours long
    spring = round(dt.datetime(2026, 3, 29, 12, tzinfo=dt.UTC).timestamp() * 1000)
    _, start, end = calendar_period("day", berlin, spring)
    assert end - start == 23 * 3_600_000
    assert calendar_period("week", dt.UTC, now)[0] == "2026-W49"


@pytest.mark.asyncio
async def test_with_a_ledger_usage_is_settled_once_even_where_no_tokens_limit_applies() -> None:
    table = parse_limits(
        "limits:\n  - {name: r, tier: plain, kind: requests, limit: 100, window: 1m}\n", "x"
    )
    store = MemoryBucketStore()
    clock = ManualClock(wall=NOON)
    plain = RateLimiter(limits=lambda: table, store=store, clock=clock)
    ledgered = RateLimiter(limits=lambda: table, store=store, clock=clock, settle_all=True)
    report = [desc("plain", request_id="p1", charge="prompt_tokens", hits=7)]
    without = await plain.decide("maas", report)
    assert without.charges == () and without.ignored == ("no_tokens_limit",)
    first = await ledgered.decide("maas", report)
    assert [(c.kind, c.tokens, c.status.value) for c in first.charges] == [
        ("prompt_tokens", 7, "applied")
    ]
    again = await ledgered.decide("maas", report)  # a retry: the ledger gets nothing twice
    assert [c.status.value for c in again.charges] == ["duplicate"]
