"""The BucketStore contract: one set of tests, run against every store, with the same expectations.

Times are explicit `now_ms` values (no sleeping). Levels are scaled (bucket.py): for the default
spec, 5 per 120_000 ms, one token is 120_000, the capacity is 600_000 and refill is 5 per ms,
so a token takes 24_000 ms to come back.

The Redis store runs against a real redis-server (started once for this module, flushed before
each test); its keys expire in real time, which is harmless here because a bucket only expires
once full, and a full bucket is the same as no bucket.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from maas_ratelimit.bucket import DEBT_WINDOWS, BucketSpec
from maas_ratelimit.memory_store import MemoryBucketStore
from maas_ratelimit.redis_store import RedisBucketStore
from maas_ratelimit.store import (
    Admission,
    AdmitResult,
    BucketStore,
    Charge,
    ChargeResult,
    ChargeStatus,
    Outcome,
)
from tests.support.redis_server import RedisServer, find_redis_server

SPEC = BucketSpec(limit=5, window_ms=120_000)
TOKEN = SPEC.window_ms
FULL = SPEC.capacity
T0 = 1_700_000_000_000


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if find_redis_server() is None:
        pytest.fail("redis-server not found: apt-get install redis-server", pytrace=False)
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


async def _redis_store(
    server: RedisServer, *, request_id_ttl_ms: int = 600_000, pipelined: bool = True
) -> RedisBucketStore:
    store = RedisBucketStore.from_url(
        server.url,
        timeout=5.0,
        connect_timeout=5.0,
        max_connections=8,
        request_id_ttl_ms=request_id_ttl_ms,
        pipelined=pipelined,
    )
    assert store.pipelined == pipelined
    await store.client.flushdb()
    return store


# "redis": the scripts over the store's pipelined connection; "redis-pool": through redis-py's
# pooled client, as for the connections the pipeline does not speak (TLS)
@pytest_asyncio.fixture(params=["memory", "redis", "redis-pool"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[BucketStore]:
    s: BucketStore
    if request.param == "memory":
        s = MemoryBucketStore()
    else:
        server = request.getfixturevalue("redis_server")
        s = await _redis_store(server, pipelined=request.param == "redis")
    yield s
    await s.close()


def req(key: str, spec: BucketSpec = SPEC, hits: int = 1, *, shadow: bool = False) -> Admission:
    """A requests-style admission: needs and takes `hits` tokens."""
    return Admission(
        key, spec, need=hits * spec.window_ms, take=hits * spec.window_ms, shadow=shadow
    )


def tok(key: str, spec: BucketSpec = SPEC) -> Admission:
    """A tokens-style admission: needs a level above zero, takes nothing (charged afterwards)."""
    return Admission(key, spec, need=1, take=0)


async def level(store: BucketStore, key: str, now_ms: int, spec: BucketSpec = SPEC) -> int:
    """The current level, read through a check that takes nothing (refused when in debt)."""
    result = await store.admit([Admission(key, spec, need=0, take=0)], now_ms, None)
    assert result.admitted == (result.outcomes[0].level >= 0)
    return result.outcomes[0].level


def charge(key: str, amount: int, spec: BucketSpec = SPEC) -> Charge:
    return Charge(key, spec, amount)


@pytest.mark.asyncio
async def test_fresh_bucket_admits_up_to_limit_then_refuses(store: BucketStore) -> None:
    for i in range(1, 6):
        result = await store.admit([req("k")], T0, None)
        assert result == AdmitResult(True, (Outcome(True, FULL - i * TOKEN),))
    assert await store.admit([req("k")], T0, None) == AdmitResult(False, (Outcome(False, 0),))
    # two at once need two tokens
    other = await store.admit([req("k2", hits=2)], T0, None)
    assert other == AdmitResult(True, (Outcome(True, FULL - 2 * TOKEN),))


@pytest.mark.asyncio
async def test_refill_is_continuous_and_exact(store: BucketStore) -> None:
    for _ in range(5):
        assert (await store.admit([req("k")], T0, None)).admitted
    refused = await store.admit([req("k")], T0 + 23_999, None)
    assert refused == AdmitResult(False, (Outcome(False, 23_999 * 5),))
    admitted = await store.admit([req("k")], T0 + 24_000, None)
    assert admitted == AdmitResult(True, (Outcome(True, 0),))
    # half a window later: 2.5 tokens, two of them whole
    assert await level(store, "k", T0 + 84_000) == 300_000
    assert (await store.admit([req("k", hits=2)], T0 + 84_000, None)).admitted
    assert not (await store.admit([req("k")], T0 + 84_000, None)).admitted


@pytest.mark.asyncio
async def test_no_double_burst_at_window_edge(store: BucketStore) -> None:
    for _ in range(5):
        assert (await store.admit([req("k")], T0 + 119_999, None)).admitted
    # a full window after the burst: exactly 5 again, not 10
    results = [(await store.admit([req("k")], T0 + 239_999, None)).admitted for _ in range(10)]
    assert results == [True] * 5 + [False] * 5
    # nor after a long idle time
    later = T0 + 100 * TOKEN
    results = [(await store.admit([req("k")], later, None)).admitted for _ in range(10)]
    assert results == [True] * 5 + [False] * 5


@pytest.mark.asyncio
async def test_tokens_admission_passes_while_positive_and_fails_in_debt(
    store: BucketStore,
) -> None:
    # full, and nothing is taken up front
    for _ in range(3):
        assert await store.admit([tok("k")], T0, None) == AdmitResult(True, (Outcome(True, FULL),))
    # the last scaled unit still admits
    assert await store.charge([charge("k", FULL - 1)], T0, None) == ChargeResult(
        ChargeStatus.APPLIED, (1,)
    )
    assert await store.admit([tok("k")], T0, None) == AdmitResult(True, (Outcome(True, 1),))
    # zero and below do not
    await store.charge([charge("k", 2)], T0, None)
    assert await store.admit([tok("k")], T0, None) == AdmitResult(False, (Outcome(False, -1),))
    # one millisecond later the level is 4 again
    assert await store.admit([tok("k")], T0 + 1, None) == AdmitResult(True, (Outcome(True, 4),))


@pytest.mark.asyncio
async def test_charge_debt_refuses_until_paid_back_exactly(store: BucketStore) -> None:
    result = await store.charge([charge("k", 6 * TOKEN)], T0, None)
    assert result == ChargeResult(ChargeStatus.APPLIED, (-TOKEN,))
    # charges are never refused, however deep the debt
    result = await store.charge([charge("k", 3 * TOKEN)], T0, None)
    assert result == ChargeResult(ChargeStatus.APPLIED, (-4 * TOKEN,))
    # -480_000 needs 480_001 of refill to admit tokens (96_001 ms), 600_000 to give a request
    # its token (120_000 ms)
    assert await store.admit([tok("k")], T0 + 96_000, None) == AdmitResult(
        False, (Outcome(False, 0),)
    )
    assert await store.admit([tok("k")], T0 + 96_001, None) == AdmitResult(
        True, (Outcome(True, 5),)
    )
    assert not (await store.admit([req("k")], T0 + 119_999, None)).admitted
    assert await store.admit([req("k")], T0 + 120_000, None) == AdmitResult(
        True, (Outcome(True, 0),)
    )


@pytest.mark.asyncio
async def test_all_or_nothing(store: BucketStore) -> None:
    small = BucketSpec(limit=1, window_ms=60_000)
    assert (await store.admit([req("b", small)], T0, None)).admitted  # b is now empty
    result = await store.admit([req("a"), req("b", small)], T0, None)
    assert result == AdmitResult(False, (Outcome(True, FULL), Outcome(False, 0)))
    assert await level(store, "a", T0) == FULL
    assert await level(store, "b", T0, small) == 0
    # once b has refilled, both give up their token
    result = await store.admit([req("a"), req("b", small)], T0 + 60_000, None)
    assert result == AdmitResult(True, (Outcome(True, FULL - TOKEN), Outcome(True, 0)))


@pytest.mark.asyncio
async def test_shadow_bucket_never_refuses(store: BucketStore) -> None:
    small = BucketSpec(limit=1, window_ms=60_000)
    assert (await store.admit([req("s", small)], T0, None)).admitted  # s is now empty
    # an empty shadow bucket does not block and is not consumed, the enforced one is
    result = await store.admit([req("a"), req("s", small, shadow=True)], T0, None)
    assert result == AdmitResult(True, (Outcome(True, FULL - TOKEN), Outcome(False, 0)))
    assert await level(store, "s", T0, small) == 0
    # a shadow bucket that has its need is consumed along with the rest
    result = await store.admit([req("a"), req("s2", small, shadow=True)], T0, None)
    assert result == AdmitResult(True, (Outcome(True, FULL - 2 * TOKEN), Outcome(True, 0)))
    # ... and not when an enforced bucket refuses
    assert (await store.admit([req("e", small)], T0, None)).admitted  # e is now empty
    result = await store.admit([req("e", small), req("s3", small, shadow=True)], T0, None)
    assert result == AdmitResult(False, (Outcome(False, 0), Outcome(True, 60_000)))
    result = await store.admit([req("s4", small, shadow=True)], T0, None)
    assert result == AdmitResult(True, (Outcome(True, 0),))


@pytest.mark.asyncio
async def test_check_only_consumes_nothing(store: BucketStore) -> None:
    check = Admission("k", SPEC, need=TOKEN, take=0)
    for _ in range(10):
        assert await store.admit([check], T0, None) == AdmitResult(True, (Outcome(True, FULL),))
    await store.charge([charge("k", FULL)], T0, None)
    for _ in range(3):
        assert await store.admit([check], T0, None) == AdmitResult(False, (Outcome(False, 0),))


@pytest.mark.asyncio
async def test_charge_is_idempotent_per_request_id(store: BucketStore) -> None:
    first = await store.charge([charge("k", TOKEN), charge("k2", 7)], T0, "r1")
    assert first == ChargeResult(ChargeStatus.APPLIED, (FULL - TOKEN, FULL - 7))
    again = await store.charge([charge("k", 2 * TOKEN)], T0 + 5, "r1")
    assert again == ChargeResult(ChargeStatus.DUPLICATE, ())
    assert await level(store, "k", T0) == FULL - TOKEN
    # another request id is charged
    other = await store.charge([charge("k", TOKEN)], T0, "r2")
    assert other == ChargeResult(ChargeStatus.APPLIED, (FULL - 2 * TOKEN,))


@pytest.mark.asyncio
async def test_request_refused_at_admission_is_never_charged(store: BucketStore) -> None:
    await store.charge([charge("k", FULL)], T0, None)
    assert not (await store.admit([req("k")], T0, "denied-1")).admitted
    result = await store.charge([charge("k", TOKEN)], T0, "denied-1")
    assert result == ChargeResult(ChargeStatus.DENIED_REQUEST, ())
    assert await level(store, "k", T0) == 0
    # an admitted request id is charged normally, once
    assert (await store.admit([req("k2")], T0, "ok-1")).admitted
    result = await store.charge([charge("k2", 3)], T0, "ok-1")
    assert result == ChargeResult(ChargeStatus.APPLIED, (FULL - TOKEN - 3,))
    assert (await store.charge([charge("k2", 3)], T0, "ok-1")).status is ChargeStatus.DUPLICATE


@pytest.mark.asyncio
async def test_charge_without_request_id_always_applies(store: BucketStore) -> None:
    for i in range(1, 4):
        result = await store.charge([charge("k", TOKEN)], T0, None)
        assert result == ChargeResult(ChargeStatus.APPLIED, (FULL - i * TOKEN,))
    # an empty request id is no request id
    for i in range(4, 6):
        result = await store.charge([charge("k", TOKEN)], T0, "")
        assert result == ChargeResult(ChargeStatus.APPLIED, (FULL - i * TOKEN,))


@pytest.mark.asyncio
async def test_same_key_twice_in_one_operation(store: BucketStore) -> None:
    # admit reads every level before writing: the key gives up one take, not two
    result = await store.admit([req("k"), req("k")], T0, None)
    assert result == AdmitResult(True, (Outcome(True, FULL - TOKEN), Outcome(True, FULL - TOKEN)))
    assert await level(store, "k", T0) == FULL - TOKEN
    # charges apply one after the other
    charged = await store.charge([charge("c", 10), charge("c", 20)], T0, None)
    assert charged == ChargeResult(ChargeStatus.APPLIED, (FULL - 10, FULL - 30))
    # ... each seeing the previous one's state, rescaled if its window differs
    other = BucketSpec(limit=2, window_ms=7_001)
    charged = await store.charge([charge("d", 10), charge("d", 20, other)], T0, None)
    first = FULL - 10
    second = min(other.capacity, first * other.window_ms // SPEC.window_ms) - 20
    assert charged == ChargeResult(ChargeStatus.APPLIED, (first, second))
    assert await level(store, "d", T0, other) == second


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("used", "new_window", "new_limit"),
    [
        (2 * 60_000, 120_000, 5),  # whole tokens, longer window: 3 tokens stay 3 tokens
        (30_001, 120_000, 5),  # a fraction of a token
        (30_001, 7_000, 5),  # shorter window: the fraction is floored
        (390_001, 7_000, 5),  # debt (-90_001): floored toward -infinity, not toward zero
        (390_001, 120_000, 2),  # debt, and a new limit
        (299_999, 13, 5),  # one scaled unit left
    ],
)
async def test_window_change_keeps_the_number_of_tokens(
    store: BucketStore, used: int, new_window: int, new_limit: int
) -> None:
    old = BucketSpec(limit=5, window_ms=60_000)
    new = BucketSpec(limit=new_limit, window_ms=new_window)
    (before,) = (await store.charge([charge("k", used, old)], T0, None)).levels
    assert before == old.capacity - used
    expected = min(new.capacity, before * new.window_ms // old.window_ms)
    assert await level(store, "k", T0, new) == expected
    # and it refills at the new rate from there
    assert await level(store, "k", T0 + 3, new) == min(new.capacity, expected + 3 * new.limit)


@pytest.mark.asyncio
@pytest.mark.parametrize("used", [1_234_567, 2**31 + 5, 987_654_321_987_654])
async def test_window_change_is_exact_when_the_product_exceeds_2_53(
    store: BucketStore, used: int
) -> None:
    # level * window_ms would be far above 2**53 (inexact in Lua doubles): the result must be
    # the exact floor all the same
    old = BucketSpec(limit=3, window_ms=2**31 + 11)
    new = BucketSpec(limit=7, window_ms=2**30 + 3)
    (before,) = (await store.charge([charge("k", used, old)], T0, None)).levels
    assert abs(before * new.window_ms) > 2**53
    expected = min(new.capacity, before * new.window_ms // old.window_ms)
    assert await level(store, "k", T0, new) == expected


@pytest.mark.asyncio
async def test_time_going_backwards_refills_nothing(store: BucketStore) -> None:
    for _ in range(5):
        assert (await store.admit([req("k")], T0, None)).admitted
    await store.charge([charge("k", 10)], T0, None)
    assert await level(store, "k", T0 - 1) == -10
    assert await store.admit([req("k")], T0 - 60_000, None) == AdmitResult(
        False, (Outcome(False, -10),)
    )
    assert await store.admit([tok("k")], T0 - 60_000, None) == AdmitResult(
        False, (Outcome(False, -10),)
    )


@pytest.mark.asyncio
async def test_clock_skew_does_not_refill_the_same_time_twice(store: BucketStore) -> None:
    for _ in range(5):
        assert (await store.admit([req("k")], T0, None)).admitted
    # replica B, 60 s behind, looks at the bucket; replica A comes back 1 ms later
    assert not (await store.admit([req("k")], T0 - 60_000, None)).admitted
    assert await level(store, "k", T0 + 1) == 5  # 1 ms of refill, not 60_001 ms


@pytest.mark.asyncio
async def test_debt_stops_at_the_floor(store: BucketStore) -> None:
    result = await store.charge([charge("k", 10**6 * TOKEN)], T0, None)
    assert result.levels == (SPEC.floor,)
    assert SPEC.floor == -DEBT_WINDOWS * FULL
    # paid back after exactly DEBT_WINDOWS windows plus one token's refill time
    assert await level(store, "k", T0 + DEBT_WINDOWS * SPEC.window_ms) == 0


@pytest.mark.asyncio
async def test_level_never_exceeds_capacity(store: BucketStore) -> None:
    assert await level(store, "k", T0) == FULL
    assert (await store.admit([req("k")], T0, None)).admitted
    assert await level(store, "k", T0 + 24_000) == FULL
    assert await level(store, "k", T0 + 10**9) == FULL
    # a charge of zero on a full bucket, long after
    result = await store.charge([charge("k", 0)], T0 + 10**10, None)
    assert result == ChargeResult(ChargeStatus.APPLIED, (FULL,))


@pytest.mark.asyncio
async def test_a_reservation_is_taken_on_admission_possibly_into_debt(store: BucketStore) -> None:
    # tokens-style admission with a reservation: needs a level above zero, takes the estimate
    reserve = Admission("k", SPEC, need=1, take=4 * TOKEN)
    assert await store.admit([reserve], T0, "r1") == AdmitResult(
        True, (Outcome(True, FULL - 4 * TOKEN),)
    )
    # one token of credit left: still admitted, and the reservation drives the bucket into debt
    assert await store.admit([reserve], T0, "r2") == AdmitResult(
        True, (Outcome(True, FULL - 8 * TOKEN),)
    )
    # the next one sees both reservations in flight and is refused; nothing is taken
    assert await store.admit([reserve], T0, "r3") == AdmitResult(
        False, (Outcome(False, FULL - 8 * TOKEN),)
    )
    # ... and, refused, it is never charged (nor refunded) afterwards
    refund = await store.charge([charge("k", -4 * TOKEN)], T0, "r3")
    assert refund == ChargeResult(ChargeStatus.DENIED_REQUEST, ())
    assert await level(store, "k", T0) == FULL - 8 * TOKEN


@pytest.mark.asyncio
async def test_a_negative_charge_is_a_refund_clamped_at_capacity(store: BucketStore) -> None:
    assert (await store.admit([Admission("k", SPEC, need=1, take=3 * TOKEN)], T0, "r1")).admitted
    # part of the reservation comes back
    result = await store.charge([charge("k", -TOKEN)], T0, "r1")
    assert result == ChargeResult(ChargeStatus.APPLIED, (FULL - 2 * TOKEN,))
    # at most once per request id, like any charge
    again = await store.charge([charge("k", -TOKEN)], T0, "r1")
    assert again == ChargeResult(ChargeStatus.DUPLICATE, ())
    # a refund larger than the room left stops at the capacity
    result = await store.charge([charge("k", -5 * TOKEN)], T0, "r2")
    assert result == ChargeResult(ChargeStatus.APPLIED, (FULL,))
    assert await level(store, "k", T0) == FULL
    # ... also when refill has filled the bucket meanwhile, and for a bucket never written
    assert (await store.admit([Admission("k", SPEC, need=1, take=TOKEN)], T0, "r3")).admitted
    result = await store.charge([charge("k", -TOKEN)], T0 + 24_000, "r3")
    assert result == ChargeResult(ChargeStatus.APPLIED, (FULL,))
    result = await store.charge([charge("new", -TOKEN)], T0, None)
    assert result == ChargeResult(ChargeStatus.APPLIED, (FULL,))
    # one after the other in one operation: a charge, then a refund bigger than it
    both = await store.charge([charge("c", 2 * TOKEN), charge("c", -3 * TOKEN)], T0, None)
    assert both == ChargeResult(ChargeStatus.APPLIED, (FULL - 2 * TOKEN, FULL))
    # out of debt: a refund counts in full below the capacity
    (debt,) = (await store.charge([charge("d", 7 * TOKEN)], T0, None)).levels
    assert debt == -2 * TOKEN
    result = await store.charge([charge("d", -3 * TOKEN)], T0, None)
    assert result == ChargeResult(ChargeStatus.APPLIED, (TOKEN,))
    assert await store.admit([tok("d")], T0, None) == AdmitResult(True, (Outcome(True, TOKEN),))


@pytest.mark.asyncio
async def test_empty_operations(store: BucketStore) -> None:
    assert await store.admit([], T0, "r") == AdmitResult(True, ())
    assert await store.charge([], T0, None) == ChargeResult(ChargeStatus.APPLIED, ())
    # a charge of nothing still counts for its request id
    assert await store.charge([], T0, "r") == ChargeResult(ChargeStatus.APPLIED, ())
    assert await store.charge([], T0, "r") == ChargeResult(ChargeStatus.DUPLICATE, ())


@pytest.mark.asyncio
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_operations_give_identical_results(
    redis_server: RedisServer, seed: int
) -> None:
    """Both stores, side by side, fed the same random mix of operations."""
    # Request ids must not expire on the memory store's simulated clock meanwhile.
    ttl = 10**12
    memory = MemoryBucketStore(request_id_ttl_ms=ttl)
    redis_store = await _redis_store(redis_server, request_id_ttl_ms=ttl)
    rng = random.Random(seed)
    specs = {
        "a": BucketSpec(5, 120_000),
        "b": BucketSpec(3, 60_000),
        "c": BucketSpec(1, 10_000),
        "d": BucketSpec(100, 60_000),
    }
    request_ids = [None, None, "", *(f"r{i}" for i in range(30))]
    now = T0
    try:
        for step in range(300):
            # Redis expires keys in real time: advancing the simulated clock by more than the
            # real time an operation takes keeps an expired key full on both sides.
            now += rng.randrange(2_000, 30_000)
            keys = rng.choices(list(specs), k=rng.randint(1, 3))
            rid = rng.choice(request_ids)
            a: AdmitResult | ChargeResult
            b: AdmitResult | ChargeResult
            if rng.random() < 0.6:
                admissions = []
                for key in keys:
                    spec = specs[key]
                    style = rng.random()
                    if style < 0.5:
                        need = take = rng.randint(1, 3) * spec.window_ms
                    elif style < 0.7:
                        need, take = 1, 0
                    elif style < 0.8:  # a tokens limit's reservation, possibly into debt
                        need, take = 1, rng.randint(0, 2 * spec.capacity)
                    else:
                        need, take = rng.randint(0, spec.capacity), 0
                    admissions.append(Admission(key, spec, need, take, rng.random() < 0.2))
                a = await memory.admit(admissions, now, rid)
                b = await redis_store.admit(admissions, now, rid)
            else:
                # negative amounts are refunds (a settled reservation): clamped at the capacity
                charges = [
                    Charge(
                        key, specs[key], rng.randint(-specs[key].capacity, 2 * specs[key].capacity)
                    )
                    for key in keys
                ]
                a = await memory.charge(charges, now, rid)
                b = await redis_store.charge(charges, now, rid)
            assert a == b, f"step {step}"
    finally:
        await redis_store.close()


# --- a bucket's own clock (budgets) -----------------------------------------------------------

BUDGET = BucketSpec(limit=1000, window_ms=1)  # a calendar budget: 1000 units, level unscaled
PERIOD_END = T0 + 3_600_000


@pytest.mark.asyncio
async def test_a_bucket_frozen_at_its_period_end_never_refills(store: BucketStore) -> None:
    take = Admission("b", BUDGET, need=1, take=600, at=PERIOD_END)
    assert await store.admit([take], T0, None) == AdmitResult(True, (Outcome(True, 400),))
    # later in the period: no refill at all (an ordinary bucket of this spec refills 1000/ms)
    later = Admission("b", BUDGET, need=1, take=600, at=PERIOD_END)
    result = await store.admit([later], T0 + 1_000_000, None)
    assert result == AdmitResult(True, (Outcome(True, -200),))  # admitted on credit, into debt
    assert (await store.admit([later], T0 + 2_000_000, None)).admitted is False
    # settlement in the same clock: a refund of the unused reservation
    result_charge = await store.charge(
        [Charge("b", BUDGET, -300, at=PERIOD_END)], T0 + 2_500_000, "r1"
    )
    assert result_charge == ChargeResult(ChargeStatus.APPLIED, (100,))
    # an ordinary read of the same key at a later "now" would refill; the frozen one does not
    check = Admission("b", BUDGET, need=0, take=0, at=PERIOD_END)
    assert (await store.admit([check], T0 + 3_000_000, None)).outcomes[0].level == 100


@pytest.mark.asyncio
async def test_a_frozen_bucket_is_kept_until_its_period_ends(store: BucketStore) -> None:
    await store.admit([Admission("b", BUDGET, need=1, take=10, at=PERIOD_END)], T0, None)
    if isinstance(store, RedisBucketStore):
        ttl_ms = await store.client.pttl(store.bucket_key("b"))
        assert 3_600_000 - 60_000 < ttl_ms <= 3_600_000 + 1_000  # until the period's end
    else:
        assert isinstance(store, MemoryBucketStore)
        store._sweep(PERIOD_END - 1, 100)
        assert len(store) == 1
        store._sweep(PERIOD_END + 10, 100)
        assert len(store) == 0


@pytest.mark.asyncio
async def test_a_bucket_on_a_clock_of_minutes_refills_per_minute(store: BucketStore) -> None:
    # 1000 per 60 minutes, on a clock of minutes: level scaled by 60, refill 1000 per minute
    spec = BucketSpec(limit=1000, window_ms=60)
    minute = 60_000
    take = Admission("r", spec, need=1, take=1000 * 60, at=T0 // minute, unit_ms=minute)
    assert (await store.admit([take], T0, None)).outcomes[0].level == 0
    half_hour = (T0 + 30 * minute) // minute
    check = Admission("r", spec, need=0, take=0, at=half_hour, unit_ms=minute)
    assert (await store.admit([check], T0 + 30 * minute, None)).outcomes[0].level == 30 * 1000
    if isinstance(store, RedisBucketStore):  # full again after the other 30 minutes
        ttl_ms = await store.client.pttl(store.bucket_key("r"))
        assert 29 * minute < ttl_ms <= 31 * minute
