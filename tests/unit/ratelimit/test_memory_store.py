"""What only the memory store has: bounded memory without stalls."""

from __future__ import annotations

import pytest

from maas_ratelimit.bucket import BucketSpec
from maas_ratelimit.memory_store import MemoryBucketStore
from maas_ratelimit.store import Admission, Charge, ChargeStatus

SPEC = BucketSpec(limit=1, window_ms=1000)
T0 = 1_700_000_000_000


@pytest.mark.asyncio
async def test_expired_request_ids_are_dropped_a_few_per_operation_and_then_ignored() -> None:
    store = MemoryBucketStore(request_id_ttl_ms=10_000)
    empty = Admission("k", SPEC, need=2 * SPEC.capacity, take=0)  # never sufficient: refused
    for i in range(1000):
        assert not (await store.admit([empty], T0, f"r{i}")).admitted
    assert len(store._request_ids) == 1000

    # long after their TTL, one operation does a bounded amount of clean-up, not all 1000 ...
    later = T0 + 60_000
    await store.admit([Admission("other", SPEC, need=1, take=0)], later, None)
    assert 990 <= len(store._request_ids) < 1000
    # ... and an expired mark no longer counts: a charge for "r999" now applies
    result = await store.charge([Charge("k", SPEC, 0)], later, "r999")
    assert result.status is ChargeStatus.APPLIED


@pytest.mark.asyncio
async def test_full_buckets_are_dropped_as_operations_go_on() -> None:
    store = MemoryBucketStore()
    for i in range(100):
        await store.admit(
            [Admission(f"k{i}", SPEC, need=SPEC.window_ms, take=SPEC.window_ms)], T0, None
        )
    assert len(store) == 100
    # after a window every bucket is full again; ongoing traffic sweeps them away
    for i in range(100):
        await store.admit([Admission("busy", SPEC, need=1, take=0)], T0 + 2_000 + i, None)
    assert len(store) <= 2


@pytest.mark.asyncio
async def test_a_bucket_left_full_is_not_kept() -> None:
    store = MemoryBucketStore()
    check = Admission("k", SPEC, need=1, take=0)  # e.g. a tokens limit without a reservation
    assert (await store.admit([check], T0, None)).admitted
    assert len(store) == 0  # nothing was taken: no bucket to remember
    await store.admit([Admission("k", SPEC, need=SPEC.window_ms, take=SPEC.window_ms)], T0, None)
    assert len(store) == 1
    assert store.level("k", SPEC, T0) == 0


@pytest.mark.asyncio
async def test_buckets_are_swept_in_batches_at_twice_the_write_rate() -> None:
    store = MemoryBucketStore()
    take = SPEC.window_ms
    for i in range(31):  # one write short of a sweep: the refilled buckets are still held
        await store.admit([Admission(f"k{i}", SPEC, need=take, take=take)], T0 + i * 100, None)
    assert len(store) == 31
    # the 32nd write, 2 s later: every earlier bucket is full by now, and the sweep examines
    # 64 buckets, so all of them go; the new one stays
    await store.admit([Admission("new", SPEC, need=take, take=take)], T0 + 5_000, None)
    assert len(store) == 1
