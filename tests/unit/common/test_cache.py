"""Unit tests for maas_common.cache.TtlCache: TTLs, LRU bound, events and load coalescing."""

from __future__ import annotations

import asyncio

import pytest

from maas_common.cache import CacheEvent, TtlCache
from maas_common.clock import ManualClock


class Recorder:
    """A cache whose events are recorded, on a clock that moves only when told to."""

    def __init__(self, max_entries: int = 10) -> None:
        self.clock = ManualClock()
        self.events: list[CacheEvent] = []
        self.cache: TtlCache[str, object] = TtlCache(
            max_entries=max_entries, clock=self.clock, on_event=self.events.append
        )


class HeldLoader:
    """A loader that stays open until released, counting its calls."""

    def __init__(self, value: object = "v", ttl: float = 60.0) -> None:
        self.value = value
        self.ttl = ttl
        self.calls = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.error: Exception | None = None

    async def __call__(self) -> tuple[object, float]:
        self.calls += 1
        self.started.set()
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return self.value, self.ttl


async def instant(value: object, ttl: float = 60.0) -> tuple[object, float]:
    return value, ttl


# --- get / put / expiry ---------------------------------------------------------------------


def test_max_entries_must_be_at_least_one() -> None:
    with pytest.raises(ValueError, match=r"^max_entries must be at least 1$"):
        TtlCache(max_entries=0, clock=ManualClock())


def test_get_of_an_unknown_key_is_a_miss_without_an_event() -> None:
    r = Recorder()
    assert r.cache.get("nope") == (False, None)
    assert r.events == []


def test_put_then_get_is_a_hit_until_the_ttl_runs_out() -> None:
    r = Recorder()
    r.cache.put("k", "v", ttl=10)
    r.clock.advance(9.999)
    assert r.cache.get("k") == (True, "v")
    assert r.events == ["hit"]
    r.clock.advance(0.001)  # exactly at the expiry time the entry is gone
    assert r.cache.get("k") == (False, None)
    assert r.events == ["hit", "expired"]
    assert len(r.cache) == 0


def test_an_expired_entry_is_reported_once_and_then_simply_missing() -> None:
    r = Recorder()
    r.cache.put("k", "v", ttl=1)
    r.clock.advance(5)
    assert r.cache.get("k") == (False, None)
    assert r.cache.get("k") == (False, None)
    assert r.events == ["expired"]


def test_put_replaces_the_value_and_restarts_the_ttl() -> None:
    r = Recorder()
    r.cache.put("k", "old", ttl=10)
    r.clock.advance(8)
    r.cache.put("k", "new", ttl=10)
    r.clock.advance(8)
    assert r.cache.get("k") == (True, "new")
    assert len(r.cache) == 1


@pytest.mark.parametrize("ttl", [0, -1])
def test_a_ttl_of_zero_or_less_is_not_stored(ttl: float) -> None:
    r = Recorder()
    r.cache.put("k", "v", ttl=ttl)
    assert len(r.cache) == 0
    assert r.cache.get("k") == (False, None)


def test_a_ttl_of_zero_drops_an_existing_entry() -> None:
    r = Recorder()
    r.cache.put("k", "v", ttl=10)
    r.cache.put("k", "v2", ttl=0)
    assert r.cache.get("k") == (False, None)


def test_none_is_cached_as_a_value() -> None:
    r = Recorder()
    r.cache.put("k", None, ttl=10)
    assert r.cache.get("k") == (True, None)
    assert r.events == ["hit"]


# --- LRU bound ------------------------------------------------------------------------------


def test_the_least_recently_stored_entry_is_evicted_when_full() -> None:
    r = Recorder(max_entries=2)
    r.cache.put("a", 1, ttl=10)
    r.cache.put("b", 2, ttl=10)
    r.cache.put("c", 3, ttl=10)
    assert len(r.cache) == 2
    assert r.events == ["evicted"]
    assert r.cache.get("a") == (False, None)
    assert r.cache.get("b") == (True, 2)
    assert r.cache.get("c") == (True, 3)


def test_a_get_refreshes_recency_so_another_entry_is_evicted() -> None:
    r = Recorder(max_entries=2)
    r.cache.put("a", 1, ttl=10)
    r.cache.put("b", 2, ttl=10)
    assert r.cache.get("a") == (True, 1)
    r.cache.put("c", 3, ttl=10)
    assert r.cache.get("b") == (False, None)
    assert r.cache.get("a") == (True, 1)
    assert r.cache.get("c") == (True, 3)


def test_re_putting_an_entry_refreshes_its_recency() -> None:
    r = Recorder(max_entries=2)
    r.cache.put("a", 1, ttl=10)
    r.cache.put("b", 2, ttl=10)
    r.cache.put("a", 10, ttl=10)
    r.cache.put("c", 3, ttl=10)
    assert r.cache.get("b") == (False, None)
    assert r.cache.get("a") == (True, 10)


# --- invalidate / clear ---------------------------------------------------------------------


def test_invalidate_drops_matching_entries_and_counts_them() -> None:
    r = Recorder()
    for key, value in [("user:a", 1), ("user:b", 2), ("group:a", 3)]:
        r.cache.put(key, value, ttl=10)
    assert r.cache.invalidate(lambda key, _value: key.startswith("user:")) == 2
    assert r.cache.get("user:a") == (False, None)
    assert r.cache.get("user:b") == (False, None)
    assert r.cache.get("group:a") == (True, 3)
    assert r.cache.invalidate(lambda _key, value: value == 99) == 0


def test_invalidate_can_match_on_the_value() -> None:
    r = Recorder()
    r.cache.put("a", 1, ttl=10)
    r.cache.put("b", 2, ttl=10)
    assert r.cache.invalidate(lambda _key, value: value == 2) == 1
    assert len(r.cache) == 1


def test_clear_empties_the_cache_and_counts_entries() -> None:
    r = Recorder()
    r.cache.put("a", 1, ttl=10)
    r.cache.put("b", 2, ttl=10)
    assert r.cache.clear() == 2
    assert len(r.cache) == 0
    assert r.cache.get("a") == (False, None)
    assert r.cache.clear() == 0


# --- get_or_load ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_get_or_load_loads_on_a_miss_and_serves_the_cache_until_expiry() -> None:
    r = Recorder()
    calls: list[str] = []

    async def load() -> tuple[object, float]:
        calls.append("load")
        return f"value{len(calls)}", 30.0

    assert await r.cache.get_or_load("k", load) == "value1"
    assert await r.cache.get_or_load("k", load) == "value1"
    assert calls == ["load"]
    assert r.events == ["miss", "hit"]
    r.clock.advance(30)
    assert await r.cache.get_or_load("k", load) == "value2"
    assert r.events == ["miss", "hit", "expired", "miss"]


@pytest.mark.asyncio
async def test_the_loader_chooses_the_ttl_and_zero_means_not_cached() -> None:
    r = Recorder()
    loads = 0

    async def load() -> tuple[object, float]:
        nonlocal loads
        loads += 1
        return "negative", 0.0

    assert await r.cache.get_or_load("k", load) == "negative"
    assert await r.cache.get_or_load("k", load) == "negative"
    assert loads == 2
    assert len(r.cache) == 0


@pytest.mark.asyncio
async def test_a_none_result_is_cached_like_any_other_value() -> None:
    r = Recorder()
    loads = 0

    async def load() -> tuple[object, float]:
        nonlocal loads
        loads += 1
        return None, 10.0

    assert await r.cache.get_or_load("k", load) is None
    assert await r.cache.get_or_load("k", load) is None
    assert loads == 1
    assert r.cache.get("k") == (True, None)


@pytest.mark.asyncio
async def test_concurrent_callers_for_one_key_share_a_single_load() -> None:
    r = Recorder()
    loader = HeldLoader(value="shared")
    callers = [asyncio.create_task(r.cache.get_or_load("k", loader)) for _ in range(5)]
    await loader.started.wait()
    assert r.events == ["miss", "coalesced", "coalesced", "coalesced", "coalesced"]
    assert not any(task.done() for task in callers)

    loader.release.set()
    assert await asyncio.gather(*callers) == ["shared"] * 5
    assert loader.calls == 1
    assert r.cache.get("k") == (True, "shared")


@pytest.mark.asyncio
async def test_different_keys_load_separately() -> None:
    r = Recorder()
    loader_a = HeldLoader(value="A")
    loader_b = HeldLoader(value="B")
    task_a = asyncio.create_task(r.cache.get_or_load("a", loader_a))
    task_b = asyncio.create_task(r.cache.get_or_load("b", loader_b))
    await loader_a.started.wait()
    await loader_b.started.wait()
    assert r.events == ["miss", "miss"]

    loader_b.release.set()
    assert await task_b == "B"
    assert not task_a.done()  # key "a" is still loading on its own
    loader_a.release.set()
    assert await task_a == "A"
    assert (loader_a.calls, loader_b.calls) == (1, 1)


@pytest.mark.asyncio
async def test_a_loader_error_reaches_every_waiter_and_is_not_cached() -> None:
    r = Recorder()
    loader = HeldLoader()
    loader.error = RuntimeError("backend down")
    callers = [asyncio.create_task(r.cache.get_or_load("k", loader)) for _ in range(3)]
    await loader.started.wait()
    loader.release.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(result, RuntimeError) for result in results)
    assert [str(result) for result in results] == ["backend down"] * 3
    assert loader.calls == 1
    assert len(r.cache) == 0

    loader.error = None
    loader.value = "recovered"
    assert await r.cache.get_or_load("k", loader) == "recovered"
    assert loader.calls == 2


@pytest.mark.asyncio
async def test_cancelling_the_first_waiter_does_not_cancel_the_load_for_others() -> None:
    r = Recorder()
    loader = HeldLoader(value="kept")
    first = asyncio.create_task(r.cache.get_or_load("k", loader))
    second = asyncio.create_task(r.cache.get_or_load("k", loader))
    await loader.started.wait()

    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert not second.done()

    loader.release.set()
    assert await second == "kept"
    assert loader.calls == 1
    assert r.cache.get("k") == (True, "kept")


@pytest.mark.asyncio
async def test_a_load_whose_only_waiter_left_still_finishes_and_is_cached() -> None:
    r = Recorder()
    loader = HeldLoader(value="late")
    only = asyncio.create_task(r.cache.get_or_load("k", loader))
    await loader.started.wait()
    only.cancel()
    with pytest.raises(asyncio.CancelledError):
        await only

    # A later caller joins the same load instead of starting a new one.
    later = asyncio.create_task(r.cache.get_or_load("k", loader))
    loader.release.set()
    assert await later == "late"
    assert loader.calls == 1
    assert r.events == ["miss", "coalesced"]


@pytest.mark.asyncio
async def test_a_cached_value_is_served_while_another_key_is_loading() -> None:
    r = Recorder()
    r.cache.put("ready", "now", ttl=10)
    loader = HeldLoader()
    pending = asyncio.create_task(r.cache.get_or_load("slow", loader))
    await loader.started.wait()
    assert await r.cache.get_or_load("ready", loader) == "now"
    loader.release.set()
    assert await pending == "v"
    assert loader.calls == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("purge", ["clear", "invalidate"])
async def test_a_load_in_flight_during_a_purge_does_not_store_its_result(purge: str) -> None:
    # a TokenReview that started before /admin/purge must not re-fill the cache afterwards
    cache: TtlCache[str, str] = TtlCache(max_entries=10, clock=ManualClock())
    release = asyncio.Event()
    calls = 0

    async def slow() -> tuple[str, float]:
        nonlocal calls
        calls += 1
        mine = calls
        await release.wait()
        return f"v{mine}", 60.0

    first = asyncio.create_task(cache.get_or_load("k", slow))
    await asyncio.sleep(0)
    if purge == "clear":
        cache.clear()
    else:
        cache.invalidate(lambda _k, _v: True)
    second = asyncio.create_task(cache.get_or_load("k", slow))  # a fresh load, not the old one
    await asyncio.sleep(0)
    release.set()
    assert await first == "v1"
    assert await second == "v2"
    assert cache.get("k") == (True, "v2")
    assert calls == 2
