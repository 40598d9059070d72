"""A BucketStore wrapper that times every operation and counts failures by kind."""

from __future__ import annotations

import time
from collections.abc import Sequence

from maas_common.errors import BackendUnavailable
from maas_ratelimit.metrics import RateLimitMetrics
from maas_ratelimit.store import Admission, AdmitResult, BucketStore, Charge, ChargeResult


class InstrumentedStore:
    def __init__(self, inner: BucketStore, metrics: RateLimitMetrics) -> None:
        self.name = inner.name
        self._inner = inner
        self._admit_seconds = metrics.store_seconds.child(inner.name, "admit")
        self._charge_seconds = metrics.store_seconds.child(inner.name, "charge")
        self._errors = metrics.store_errors

    async def admit(
        self, admissions: Sequence[Admission], now_ms: int, request_id: str | None
    ) -> AdmitResult:
        started = time.perf_counter()
        try:
            return await self._inner.admit(admissions, now_ms, request_id)
        except BackendUnavailable as exc:
            self._errors.inc(self.name, exc.kind)
            raise
        finally:
            self._admit_seconds.observe(time.perf_counter() - started)

    async def charge(
        self, charges: Sequence[Charge], now_ms: int, request_id: str | None
    ) -> ChargeResult:
        started = time.perf_counter()
        try:
            return await self._inner.charge(charges, now_ms, request_id)
        except BackendUnavailable as exc:
            self._errors.inc(self.name, exc.kind)
            raise
        finally:
            self._charge_seconds.observe(time.perf_counter() - started)

    async def close(self) -> None:
        await self._inner.close()
