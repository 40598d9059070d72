"""The ledger's writer in maas-ratelimit: a record per charged response, journaled, then shipped.

`record()` runs on the after-response call, once the store has applied the charge (so once per
request id across retries and replicas: the store says "duplicate" to any other): it builds the
record and appends it to the journal (usage_journal.py) before the answer goes back. `run()`
ships the journal to the database in batches off the hot path, in order; a database that is slow
or down leaves the records in the journal (retried with backoff, counted) until it answers, and a
restart ships what the last process did not. The database's request-id key makes a record
shipped twice count once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from maas_common.clock import Clock
from maas_common.errors import BackendUnavailable
from maas_common.ledger.database import LedgerDatabase
from maas_common.ledger.records import UsageRecord, clip, cost_nanos, parse_rate
from maas_common.logs import LogThrottle
from maas_ratelimit.descriptors import Descriptor
from maas_ratelimit.limiter import ChargeReport
from maas_ratelimit.limits import Price
from maas_ratelimit.usage_journal import UsageJournal

log = logging.getLogger(__name__)
_MAX_BACKOFF = 5.0


class LedgerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.records = Counter(
            "maas_ratelimit_ledger_records",
            "Usage records by what became of them: journaled, written (new in the database), "
            "duplicate (already there), dropped (journal full), corrupt (unreadable line)",
            ["result"],
            registry=registry,
        )
        self.failures = Counter(
            "maas_ratelimit_ledger_write_failures",
            "Batches the database did not take (retried)",
            registry=registry,
        )
        self.pending = Gauge(
            "maas_ratelimit_ledger_pending_records",
            "Records in the journal not yet in the database",
            registry=registry,
        )
        self.spool_bytes = Gauge(
            "maas_ratelimit_ledger_spool_bytes",
            "Bytes of the journal not yet in the database",
            registry=registry,
        )
        self.lag = Gauge(
            "maas_ratelimit_ledger_lag_seconds",
            "Age of the oldest record not yet in the database (0 when none)",
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "maas_ratelimit_ledger_batch_duration_seconds",
            "Time to write one batch to the database",
            registry=registry,
        )
        for result in ("journaled", "written", "duplicate", "dropped", "corrupt"):
            self.records.labels(result)


class UsageLedger:
    def __init__(
        self,
        journal: UsageJournal,
        database: LedgerDatabase,
        registry: CollectorRegistry,
        *,
        clock: Clock,
        prices: Callable[[], Callable[[str], Price | None]],
        batch_size: int = 500,
        flush_interval: float = 0.2,
        drain_timeout: float = 5.0,
    ) -> None:
        self._drain_timeout = drain_timeout
        self._journal = journal
        self._database = database
        self._metrics = LedgerMetrics(registry)
        self._clock = clock
        self._prices = prices  # the limits table's price lookup, read at every record (reloads)
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._wake = asyncio.Event()
        self._oldest_ms: int | None = None  # ts of the oldest pending record, when known
        # one line per 10 s of each: a failing database must not hide that records are dropped
        self._drop_log = LogThrottle(clock, seconds=10.0)
        self._failure_log = LogThrottle(clock, seconds=10.0)
        self._journaled = self._metrics.records.labels("journaled")
        self._dropped = self._metrics.records.labels("dropped")
        metrics = self._metrics
        metrics.pending.set_function(lambda: float(journal.pending_records))
        metrics.spool_bytes.set_function(lambda: float(journal.pending_bytes))
        metrics.lag.set_function(self._lag)

    def _lag(self) -> float:
        if self._journal.pending_records == 0 or self._oldest_ms is None:
            return 0.0
        return max(0.0, self._clock.wall() - self._oldest_ms / 1000)

    # -- the hot path --------------------------------------------------------------------------

    def record(
        self,
        descriptors: Sequence[Descriptor],
        charges: Sequence[ChargeReport],
        request_id: str | None,
        now_ms: int,
    ) -> None:
        """The record of one settled response (its charges applied by the store). Never raises:
        the charge is applied whatever becomes of its record."""
        try:
            record = self.build(descriptors, charges, request_id, now_ms)
        except Exception:  # a bug must not turn an applied charge into an error answer
            log.exception("usage record not built")
            self._dropped.inc()
            return
        if record is None:
            return
        if not self._journal.append(record):
            self._dropped.inc()
            self._drop_log.log(
                log,
                logging.ERROR,
                "usage record dropped: the journal is full or cannot be written (%d bytes pending)",
                self._journal.pending_bytes,
            )
            return
        self._journaled.inc()
        if self._oldest_ms is None:
            self._oldest_ms = now_ms
        if self._journal.pending_records >= self._batch_size:
            self._wake.set()

    def build(
        self,
        descriptors: Sequence[Descriptor],
        charges: Sequence[ChargeReport],
        request_id: str | None,
        now_ms: int,
    ) -> UsageRecord | None:
        if not charges:
            return None
        prompt = completion = total = 0  # total: usage reported without a split
        for charge in charges:
            if charge.kind == "prompt_tokens":
                prompt += charge.tokens
            elif charge.kind == "completion_tokens":
                completion += charge.tokens
            else:
                total += charge.tokens
        first = descriptors[0]
        entries: dict[str, str] = {}
        for descriptor in descriptors:  # the prompt charge carries key id, status, streamed, ...
            entries.update(descriptor.entries)
        model = entries.get("model", "")
        # usage without a split is priced as completion tokens (the dearer kind, as a rule)
        cost: int | None
        rate = parse_rate(entries.get("billing_rate"))
        if rate is not None:
            cost = cost_nanos(prompt, completion + total, per_token=rate)
        else:
            price = self._prices()(model)
            cost = None
            if price is not None:
                cost = cost_nanos(
                    prompt,
                    completion + total,
                    prompt_per_million=price.prompt_per_million,
                    completion_per_million=price.completion_per_million,
                )
        status = entries.get("status", "")
        return UsageRecord(
            # without a request id (not maas-authz's metadata) nothing de-duplicates it
            request_id=clip(request_id) or f"local-{now_ms}-{time.perf_counter_ns()}",
            ts_ms=now_ms,
            user=clip(first.user),
            model=clip(model),
            tier="" if first.by_subscription else clip(first.tier),
            subscription=clip(first.subscription),
            key_id=clip(entries.get("key_id")),
            organization_id=clip(entries.get("organization_id")),
            cost_center=clip(entries.get("cost_center")),
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion + total,
            cost_nanos=cost or 0,
            priced=cost is not None,
            status=int(status) if status.isdigit() and len(status) <= 3 else 0,
            streamed=entries.get("streamed") == "true",
        )

    # -- shipping ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Migrates (retrying until the database answers), then ships for ever."""
        backoff = 0.5
        while True:
            try:
                version = await self._database.migrate()
                log.info("usage ledger ready (%s, schema %d)", self._database.engine, version)
                break
            except BackendUnavailable as exc:
                self._metrics.failures.inc()
                log.warning("usage ledger database unavailable, retrying: %s", exc)
                await asyncio.sleep(backoff)
                backoff = min(_MAX_BACKOFF, backoff * 2)
        backoff = 0.5
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._flush_interval)
            self._wake.clear()
            # full batches go one after the other (a backlog drains at the database's pace);
            # a partial one waits for the next interval, so that batches stay large
            while self._journal.pending_records:
                if not await self.ship_once():
                    await asyncio.sleep(backoff)
                    backoff = min(_MAX_BACKOFF, backoff * 2)
                    continue
                backoff = 0.5
                if self._journal.pending_records < self._batch_size:
                    break

    async def ship_once(self) -> bool:
        """One batch from the journal to the database; False if the database did not take it."""
        end = self._journal.end()
        batch = await asyncio.to_thread(self._journal.read, end, self._batch_size)
        if batch.corrupt:
            self._metrics.records.labels("corrupt").inc(batch.corrupt)
        if batch.records:
            self._oldest_ms = batch.records[0].ts_ms
            started = time.perf_counter()
            try:
                written = await self._database.insert(batch.records)
            except BackendUnavailable as exc:
                self._metrics.failures.inc()
                self._failure_log.log(
                    log,
                    logging.WARNING,
                    "usage ledger write failed, %d records kept in the journal: %s",
                    self._journal.pending_records,
                    exc,
                )
                return False
            self._metrics.batch_seconds.observe(time.perf_counter() - started)
            self._metrics.records.labels("written").inc(written)
            self._metrics.records.labels("duplicate").inc(len(batch.records) - written)
        self._journal.ack(batch)
        self._oldest_ms = None if not self._journal.pending_records else self._oldest_ms
        return True

    async def close(self) -> None:
        """Ships what it can within the drain timeout (the rest stays journaled for the next
        start), then closes the journal and the database."""
        try:
            async with asyncio.timeout(self._drain_timeout):
                while self._journal.pending_records and await self.ship_once():
                    pass
        except TimeoutError:
            pass
        self._journal.close()
        await self._database.close()
