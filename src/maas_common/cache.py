"""A bounded TTL cache with request coalescing, keyed by anything hashable.

Used in front of every slow lookup (TokenReview, SubjectAccessReview): concurrent misses for the
same key share one load, results live for a TTL chosen by the loader (so positive and negative
results can differ, and a token's own expiry can cap its entry), and the least recently used entry
is dropped when the cache is full. Errors are never cached.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, Literal, TypeVar, TypeVarTuple

from maas_common.clock import Clock

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
Ts = TypeVarTuple("Ts")

CacheEvent = Literal["hit", "miss", "coalesced", "expired", "evicted"]


class TtlCache(Generic[K, V]):
    def __init__(
        self,
        *,
        max_entries: int,
        clock: Clock,
        on_event: Callable[[CacheEvent], None] | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max_entries = max_entries
        self._clock = clock
        self._on_event = on_event or (lambda _event: None)
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._inflight: dict[K, asyncio.Task[V]] = {}
        # Bumped by invalidate()/clear(): a load that started before a purge must not store its
        # (possibly revoked) result afterwards.
        self._generation = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> tuple[bool, V | None]:
        """(True, value) for a live entry, else (False, None). Counts a hit, never a miss."""
        entry = self._entries.get(key)
        if entry is None:
            return False, None
        expires, value = entry
        if expires <= self._clock.monotonic():
            del self._entries[key]
            self._on_event("expired")
            return False, None
        self._entries.move_to_end(key)
        self._on_event("hit")
        return True, value

    def put(self, key: K, value: V, ttl: float) -> None:
        if ttl <= 0:
            self._entries.pop(key, None)
            return
        self._entries[key] = (self._clock.monotonic() + ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
            self._on_event("evicted")

    async def get_or_load(
        self, key: K, load: Callable[[*Ts], Awaitable[tuple[V, float]]], *args: *Ts
    ) -> V:
        """The cached value, or the result of `load(*args)` (value, ttl) shared by concurrent
        callers. `load` with its arguments rather than a closure: a hit, the usual case, then
        builds nothing."""
        found, value = self.get(key)
        if found:
            return value  # type: ignore[return-value]
        task = self._inflight.get(key)
        if task is None:
            self._on_event("miss")
            task = asyncio.ensure_future(self._load(key, load(*args), self._generation))
            self._inflight[key] = task
            # The load must finish even if its first caller goes away, and its error must not be
            # reported as "never retrieved" when nobody waits any more.
            task.add_done_callback(_consume_exception)
        else:
            self._on_event("coalesced")
        return await asyncio.shield(task)

    async def _load(self, key: K, load: Awaitable[tuple[V, float]], generation: int) -> V:
        try:
            value, ttl = await load
            if generation == self._generation:
                self.put(key, value, ttl)
            return value
        finally:
            if self._inflight.get(key) is asyncio.current_task():
                del self._inflight[key]

    def invalidate(self, predicate: Callable[[K, V], bool]) -> int:
        """Drop every entry for which predicate(key, value) holds; returns how many."""
        doomed = [k for k, (_, v) in self._entries.items() if predicate(k, v)]
        for key in doomed:
            del self._entries[key]
        self._generation += 1
        self._inflight.clear()  # later callers start a fresh load; current waiters keep theirs
        return len(doomed)

    def clear(self) -> int:
        count = len(self._entries)
        self._entries.clear()
        self._generation += 1
        self._inflight.clear()
        return count


def _consume_exception(task: asyncio.Task[object]) -> None:
    if not task.cancelled():
        task.exception()
