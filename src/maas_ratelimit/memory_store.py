"""The in-process bucket store: exact, atomic by construction (no await inside an operation).

Memory stays bounded: a bucket that has refilled to full is indistinguishable from no bucket, so
each operation also examines a few of the least recently written buckets and drops the full ones
(the rest are rotated to the back). Request ids are remembered for `request_id_ttl_ms`, oldest
first out, up to `max_request_ids`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from maas_ratelimit.bucket import (
    BucketSpec,
    BucketState,
    current_level,
    ms_until_full,
    next_updated,
)
from maas_ratelimit.store import (
    Admission,
    AdmitResult,
    Charge,
    ChargeResult,
    ChargeStatus,
    apply_admission,
)

_SWEEP_PER_WRITE = 2  # > 1 so that removal keeps up with creation


class MemoryBucketStore:
    name = "memory"

    def __init__(
        self, *, request_id_ttl_ms: int = 600_000, max_request_ids: int = 1_000_000
    ) -> None:
        # key -> (state, the time it will be full again)
        self._buckets: OrderedDict[str, tuple[BucketState, int]] = OrderedDict()
        self._request_ids: OrderedDict[str, tuple[str, int]] = OrderedDict()  # id -> (mark, expiry)
        self._request_id_ttl_ms = request_id_ttl_ms
        self._max_request_ids = max_request_ids

    def __len__(self) -> int:
        return len(self._buckets)

    def level(self, key: str, spec: BucketSpec, now_ms: int) -> int:
        entry = self._buckets.get(key)
        return current_level(entry[0] if entry else None, spec, now_ms)

    async def admit(
        self, admissions: Sequence[Admission], now_ms: int, request_id: str | None
    ) -> AdmitResult:
        buckets = self._buckets
        states = []
        levels = []
        for admission in admissions:
            entry = buckets.get(admission.key)
            state = entry[0] if entry else None
            states.append(state)
            levels.append(current_level(state, admission.spec, now_ms))
        admitted, outcomes = apply_admission(levels, admissions)
        # every level was read before anything is written; a key named twice still ends up
        # with the same `updated` as if written one after the other
        for admission, outcome, state in zip(admissions, outcomes, states, strict=True):
            self._put(admission.key, admission.spec, outcome.level, next_updated(state, now_ms))
        if request_id and not admitted:
            self._mark(request_id, "denied", now_ms)
        self._sweep(now_ms, _SWEEP_PER_WRITE * max(1, len(admissions)))
        return AdmitResult(admitted, tuple(outcomes))

    async def charge(
        self, charges: Sequence[Charge], now_ms: int, request_id: str | None
    ) -> ChargeResult:
        if request_id:
            mark = self._recall(request_id, now_ms)
            if mark == "denied":
                return ChargeResult(ChargeStatus.DENIED_REQUEST, ())
            if mark == "charged":
                return ChargeResult(ChargeStatus.DUPLICATE, ())
            self._mark(request_id, "charged", now_ms)
        levels = []
        for charge in charges:
            spec = charge.spec
            level = self.level(charge.key, spec, now_ms) - charge.amount
            # a negative amount is a refund: never above the capacity, never below the floor
            level = min(spec.capacity, max(spec.floor, level))
            self._write(charge.key, spec, level, now_ms)
            levels.append(level)
        self._sweep(now_ms, _SWEEP_PER_WRITE * max(1, len(charges)))
        return ChargeResult(ChargeStatus.APPLIED, tuple(levels))

    async def close(self) -> None:
        self._buckets.clear()
        self._request_ids.clear()

    def _write(self, key: str, spec: BucketSpec, level: int, now_ms: int) -> None:
        entry = self._buckets.get(key)
        self._put(key, spec, level, next_updated(entry[0] if entry else None, now_ms))

    def _put(self, key: str, spec: BucketSpec, level: int, updated: int) -> None:
        full_at = updated + ms_until_full(level, spec)
        self._buckets[key] = (BucketState(level, updated, spec.window_ms), full_at)
        self._buckets.move_to_end(key)

    def _sweep(self, now_ms: int, count: int) -> None:
        for _ in range(min(count, len(self._buckets))):
            key, (_, full_at) = next(iter(self._buckets.items()))
            if full_at <= now_ms:
                del self._buckets[key]
            else:
                self._buckets.move_to_end(key)
        # Request ids expire in insertion order; a few per operation keep up with the one an
        # operation adds, and never stall the loop after an idle spell (expired ids left for
        # later are ignored by _recall anyway).
        for _ in range(count + 1):
            if not self._request_ids:
                break
            oldest, (_, expiry) = next(iter(self._request_ids.items()))
            if expiry > now_ms and len(self._request_ids) <= self._max_request_ids:
                break
            del self._request_ids[oldest]

    def _mark(self, request_id: str, mark: str, now_ms: int) -> None:
        self._request_ids[request_id] = (mark, now_ms + self._request_id_ttl_ms)
        self._request_ids.move_to_end(request_id)

    def _recall(self, request_id: str, now_ms: int) -> str | None:
        entry = self._request_ids.get(request_id)
        if entry is None or entry[1] <= now_ms:
            return None
        return entry[0]
