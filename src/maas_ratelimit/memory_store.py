"""The in-process bucket store: exact, atomic by construction (no await inside an operation).

Memory stays bounded: a bucket that has refilled to full is indistinguishable from no bucket, so
one left full is not kept, and every few operations the store examines twice as many of the
least recently written buckets as were written since, dropping the full ones (the rest are
rotated to the back). Request ids are remembered for `request_id_ttl_ms`, oldest first out, up
to `max_request_ids`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from itertools import islice

from maas_ratelimit.bucket import BucketSpec, current_level, ms_until_full, next_updated
from maas_ratelimit.store import (
    Admission,
    AdmitResult,
    Charge,
    ChargeResult,
    ChargeStatus,
    Outcome,
)

_SWEEP_PER_WRITE = 2  # > 1 so that removal keeps up with creation
# Buckets are swept once this many have been written, 2x as many at once: the same work per write
# as a few per operation, without the fixed cost of a pass on every call.
_SWEEP_BATCH = 32

# A stored bucket: a BucketState's fields and the time it is full again, as one plain tuple
# (one built on every write, so no object per field group)
_Entry = tuple[int, int, int, int]


class MemoryBucketStore:
    name = "memory"

    def __init__(
        self, *, request_id_ttl_ms: int = 600_000, max_request_ids: int = 1_000_000
    ) -> None:
        self._buckets: OrderedDict[str, _Entry] = OrderedDict()  # least recently written first
        self._request_ids: OrderedDict[str, tuple[str, int]] = OrderedDict()  # id -> (mark, expiry)
        self._request_id_ttl_ms = request_id_ttl_ms
        self._max_request_ids = max_request_ids
        self._unswept = 0  # buckets written since the last sweep

    def __len__(self) -> int:
        return len(self._buckets)

    def level(self, key: str, spec: BucketSpec, now_ms: int) -> int:
        return current_level(self._buckets.get(key), spec, now_ms)

    async def admit(
        self, admissions: Sequence[Admission], now_ms: int, request_id: str | None
    ) -> AdmitResult:
        buckets = self._buckets
        entries = []
        levels = []
        admitted = True  # the rule of store.py: every enforced bucket must have its `need`
        for admission in admissions:
            entry = buckets.get(admission.key)
            level = current_level(entry, admission.spec, admission.at or now_ms)
            if level < admission.need and not admission.shadow:
                admitted = False
            entries.append(entry)
            levels.append(level)
        # every level was read before anything is written; a key named twice still ends up
        # with the same `updated` as if written one after the other
        outcomes = []
        for admission, entry, before in zip(admissions, entries, levels, strict=True):
            sufficient = before >= admission.need
            after = before - admission.take if admitted and sufficient else before
            outcomes.append(Outcome(sufficient, after))
            updated = next_updated(entry, admission.at or now_ms)
            self._put(
                admission.key, admission.spec, after, updated, now_ms, unit_ms=admission.unit_ms
            )
        if request_id and not admitted:
            self._mark(request_id, "denied", now_ms)
        self._after_writes(now_ms, max(1, len(admissions)))
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
        buckets = self._buckets
        levels = []
        for charge in charges:
            spec = charge.spec
            entry = buckets.get(charge.key)
            at = charge.at or now_ms
            level, updated = current_level(entry, spec, at), next_updated(entry, at)
            # a negative amount is a refund: never above the capacity, never below the floor
            level = min(spec.capacity, max(spec.floor, level - charge.amount))
            self._put(charge.key, spec, level, updated, now_ms, unit_ms=charge.unit_ms)
            levels.append(level)
        self._after_writes(now_ms, max(1, len(charges)))
        return ChargeResult(ChargeStatus.APPLIED, tuple(levels))

    async def close(self) -> None:
        self._buckets.clear()
        self._request_ids.clear()

    def _put(
        self, key: str, spec: BucketSpec, level: int, updated: int, now_ms: int, *, unit_ms: int = 1
    ) -> None:
        buckets = self._buckets
        full_at = updated + ms_until_full(level, spec)  # in the bucket's units (store.py)
        if unit_ms != 1:
            full_at *= unit_ms
        if full_at <= now_ms:  # full already: the same as no bucket, so none is kept
            buckets.pop(key, None)
            return
        buckets[key] = (level, updated, spec.window_ms, full_at)
        buckets.move_to_end(key)

    def _after_writes(self, now_ms: int, writes: int) -> None:
        self._unswept += writes
        if self._unswept >= _SWEEP_BATCH:
            self._sweep(now_ms, _SWEEP_PER_WRITE * self._unswept)
            self._unswept = 0
        self._expire_request_ids(now_ms, _SWEEP_PER_WRITE * writes)

    def _sweep(self, now_ms: int, count: int) -> None:
        buckets = self._buckets
        for key, entry in list(islice(buckets.items(), count)):
            if entry[3] <= now_ms:  # full again: the same as no bucket
                del buckets[key]
            else:
                buckets.move_to_end(key)

    def _expire_request_ids(self, now_ms: int, count: int) -> None:
        # Request ids expire in insertion order; a few per operation keep up with the one an
        # operation adds, and never stall the loop after an idle spell (expired ids left for
        # later are ignored by _recall anyway).
        request_ids = self._request_ids
        for _ in range(count + 1):
            if not request_ids:
                break
            oldest, (_, expiry) = next(iter(request_ids.items()))
            if expiry > now_ms and len(request_ids) <= self._max_request_ids:
                break
            del request_ids[oldest]

    def _mark(self, request_id: str, mark: str, now_ms: int) -> None:
        self._request_ids[request_id] = (mark, now_ms + self._request_id_ttl_ms)
        self._request_ids.move_to_end(request_id)

    def _recall(self, request_id: str, now_ms: int) -> str | None:
        entry = self._request_ids.get(request_id)
        if entry is None or entry[1] <= now_ms:
            return None
        return entry[0]
