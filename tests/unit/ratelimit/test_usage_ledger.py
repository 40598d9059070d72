"""The usage ledger's writer: the journal on disk, shipping to a real SQLite file, idempotence by
request id, a database that fails (records kept, shipped later in order), a process that dies
(the journal reopened: nothing lost, nothing twice), records built from real descriptors."""

from __future__ import annotations

import asyncio
import os
import pathlib
from collections.abc import Sequence
from decimal import Decimal

import pytest
from prometheus_client import CollectorRegistry

from maas_common.clock import ManualClock
from maas_common.errors import BackendUnavailable, ConfigError
from maas_common.ledger.database import LedgerDatabase, SqliteLedger, open_ledger
from maas_common.ledger.queries import Summary, UsageQuery
from maas_common.ledger.records import UsageRecord, cost_nanos, format_cost
from maas_ratelimit.descriptors import Descriptor
from maas_ratelimit.limiter import ChargeReport
from maas_ratelimit.limits import Price
from maas_ratelimit.store import ChargeStatus
from maas_ratelimit.usage_journal import UsageJournal
from maas_ratelimit.usage_ledger import UsageLedger


def record(n: int, user: str = "alice", **kw: object) -> UsageRecord:
    fields: dict[str, object] = {
        "request_id": f"r{n:04d}",
        "ts_ms": 1_796_000_000_000 + n,
        "user": user,
        "model": "llm/tiny",
        "tier": "free",
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
        "cost_nanos": 10,
        "priced": True,
        "status": 200,
    }
    fields.update(kw)
    return UsageRecord(**fields)  # type: ignore[arg-type]


def test_a_record_survives_its_journal_line() -> None:
    original = record(1, key_id="k1", streamed=True, organization_id="org", cost_center="cc")
    assert UsageRecord.from_line(original.to_line()) == original
    with pytest.raises(ValueError):
        UsageRecord.from_line(b'["too", "short"]\n')


def test_costs_are_exact_nano_units() -> None:
    assert cost_nanos(1000, 1000, per_token=Decimal("0.000002")) == 4_000_000  # 0.004
    assert (
        cost_nanos(
            1_000_000,
            500_000,
            prompt_per_million=Decimal("0.5"),
            completion_per_million=Decimal("1.5"),
        )
        == 1_250_000_000
    )
    assert cost_nanos(7, 3) is None  # no price: unpriced, not free
    assert format_cost(1_250_000_000) == "1.25" and format_cost(0) == "0"
    assert format_cost(14500) == "0.0000145"


def test_the_journal_rotates_reads_in_order_and_forgets_what_is_acknowledged(
    tmp_path: pathlib.Path,
) -> None:
    journal = UsageJournal(tmp_path, segment_bytes=1000)
    journal.open()
    for n in range(30):
        assert journal.append(record(n))
    assert len(journal.segments()) > 1
    assert journal.pending_records == 30
    first = journal.read(journal.end(), 12)
    assert [r.request_id for r in first.records] == [f"r{n:04d}" for n in range(12)]
    journal.ack(first)
    rest = journal.read(journal.end(), 100)
    assert [r.request_id for r in rest.records] == [f"r{n:04d}" for n in range(12, 30)]
    journal.ack(rest)
    assert journal.pending_records == 0 and journal.pending_bytes == 0
    assert len(journal.segments()) == 1  # shipped segments are deleted
    journal.close()


def test_a_journal_reopened_after_a_crash_resumes_after_what_was_acknowledged(
    tmp_path: pathlib.Path,
) -> None:
    journal = UsageJournal(tmp_path, segment_bytes=700)
    journal.open()
    for n in range(10):
        journal.append(record(n))
    batch = journal.read(journal.end(), 4)
    journal.ack(batch)
    # the process dies mid-write: a torn last line
    last = tmp_path / f"{max(journal.segments()):012d}.jsonl"
    with open(last, "ab") as handle:
        handle.write(b'["r9999", 17')
    journal.close()  # (a killed process closes nothing; the lock goes with it)
    again = UsageJournal(tmp_path, segment_bytes=700)
    again.open()
    assert again.pending_records == 6
    replay = again.read(again.end(), 100)
    assert [r.request_id for r in replay.records] == [f"r{n:04d}" for n in range(4, 10)]
    assert replay.corrupt == 0  # the torn line was cut, not read
    again.append(record(10))
    assert [r.request_id for r in again.read(again.end(), 100).records][-1] == "r0010"
    again.close()


def test_one_process_per_journal(tmp_path: pathlib.Path) -> None:
    first = UsageJournal(tmp_path)
    first.open()
    second = UsageJournal(tmp_path)
    with pytest.raises(ConfigError, match="in use by another process"):
        second.open()
    first.close()
    second.open()
    second.close()


def test_a_full_journal_refuses_records_instead_of_growing(tmp_path: pathlib.Path) -> None:
    journal = UsageJournal(tmp_path, max_bytes=1 << 16)
    journal.open()
    accepted = sum(journal.append(record(n)) for n in range(1000))
    assert 100 < accepted < 1000
    assert journal.pending_bytes <= 1 << 16
    journal.close()


class FlakyDatabase:
    """A real SQLite ledger that can be made to fail, as a database that is down."""

    engine = "sqlite"

    def __init__(self, inner: LedgerDatabase) -> None:
        self.inner = inner
        self.down = False
        self.batches: list[int] = []

    async def migrate(self) -> int:
        if self.down:
            raise BackendUnavailable("ledger", "error", "down")
        return await self.inner.migrate()

    async def insert(self, records: Sequence[UsageRecord]) -> int:
        if self.down:
            raise BackendUnavailable("ledger", "error", "down")
        self.batches.append(len(records))
        return await self.inner.insert(records)

    async def summary(self, query: UsageQuery) -> Summary:
        return await self.inner.summary(query)

    async def records(
        self, query: UsageQuery, limit: int, after: tuple[int, str] | None = None
    ) -> list[UsageRecord]:
        return await self.inner.records(query, limit, after)

    async def close(self) -> None:
        await self.inner.close()


def ledger_of(
    tmp_path: pathlib.Path, database: LedgerDatabase, registry: CollectorRegistry
) -> UsageLedger:
    journal = UsageJournal(tmp_path / "journal")
    journal.open()
    return UsageLedger(
        journal,
        database,
        registry,
        clock=ManualClock(wall=1_796_000_000.0),
        prices=lambda: lambda model: Price(Decimal("0.5"), Decimal("1.5")),
        batch_size=50,
        flush_interval=0.01,
        drain_timeout=2.0,
    )


def charged(
    request_id: str, prompt: int, completion: int, **entries: str
) -> tuple[list[Descriptor], list[ChargeReport]]:
    base = {"tier": "free", "user": "alice", "model": "llm/tiny", "request_id": request_id}
    descriptors = [
        Descriptor({**base, "charge": "prompt_tokens", **entries}, prompt, False),
        Descriptor({**base, "charge": "completion_tokens"}, completion, False),
    ]
    charges = [
        ChargeReport("free", "llm/tiny", "prompt_tokens", prompt, ChargeStatus.APPLIED),
        ChargeReport("free", "llm/tiny", "completion_tokens", completion, ChargeStatus.APPLIED),
    ]
    return descriptors, charges


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return found if found is not None else 0.0


@pytest.mark.asyncio
async def test_records_reach_sqlite_once_each_even_when_the_database_fails_for_a_while(
    tmp_path: pathlib.Path,
) -> None:
    database = FlakyDatabase(open_ledger("sqlite:///ledger.db", base_dir=tmp_path))
    registry = CollectorRegistry()
    ledger = ledger_of(tmp_path, database, registry)
    runner = asyncio.create_task(ledger.run())
    for n in range(120):
        descriptors, charges = charged(f"q{n}", 10, 5, key_id="key-1", status="200")
        ledger.record(descriptors, charges, f"q{n}", 1_796_000_000_000 + n)
    await _until(lambda: value(registry, "maas_ratelimit_ledger_pending_records") == 0)
    database.down = True
    for n in range(120, 300):
        descriptors, charges = charged(f"q{n}", 10, 5)
        ledger.record(descriptors, charges, f"q{n}", 1_796_000_000_000 + n)
    await asyncio.sleep(0.3)
    assert value(registry, "maas_ratelimit_ledger_pending_records") == 180
    assert value(registry, "maas_ratelimit_ledger_write_failures_total") >= 1
    assert value(registry, "maas_ratelimit_ledger_spool_bytes") > 0
    database.down = False
    await _until(lambda: value(registry, "maas_ratelimit_ledger_pending_records") == 0, 15)
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    # the same records once more (a replica's retry, a replayed journal): no duplicates
    duplicate = [r for r in await database.records(UsageQuery(), 10)]
    assert await database.insert(duplicate) == 0
    summary = await database.summary(UsageQuery({"user": "alice"}))
    assert summary.totals.requests == 300
    assert summary.totals.total_tokens == 300 * 15
    assert summary.totals.cost_nanos == 300 * (10 * 500 + 5 * 1500)
    records = await database.records(UsageQuery(), 1000)
    assert [r.request_id for r in records] == [f"q{n}" for n in range(300)]  # in order
    assert records[0].key_id == "key-1" and records[0].status == 200 and records[0].priced
    assert value(registry, "maas_ratelimit_ledger_records_total", result="written") == 300
    await ledger.close()


@pytest.mark.asyncio
async def test_a_ledger_that_stops_with_the_database_down_ships_its_journal_at_the_next_start(
    tmp_path: pathlib.Path,
) -> None:
    database = FlakyDatabase(open_ledger("sqlite:///ledger.db", base_dir=tmp_path))
    database.down = True
    ledger = ledger_of(tmp_path, database, CollectorRegistry())
    for n in range(40):
        ledger.record(*charged(f"s{n}", 1, 1), f"s{n}", 1_796_000_000_000 + n)
    await ledger.close()  # drains what it can: nothing, the database is down
    restarted_db = SqliteLedger(tmp_path / "ledger.db")
    registry = CollectorRegistry()
    again = ledger_of(tmp_path, restarted_db, registry)
    runner = asyncio.create_task(again.run())
    await _until(lambda: value(registry, "maas_ratelimit_ledger_pending_records") == 0, 15)
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    assert (await restarted_db.summary(UsageQuery())).totals.requests == 40
    await again.close()


def test_a_record_names_what_the_descriptors_carry_and_never_the_key(
    tmp_path: pathlib.Path,
) -> None:
    ledger = ledger_of(
        tmp_path, open_ledger("sqlite:///x.db", base_dir=tmp_path), CollectorRegistry()
    )
    descriptors, charges = charged(
        "abc",
        100,
        20,
        key_id="k9",
        organization_id="acme",
        cost_center="cc-1",
        status="200",
        streamed="true",
    )
    built = ledger.build(descriptors, charges, "abc", 1_796_000_000_000)
    assert built is not None
    assert (built.key_id, built.organization_id, built.cost_center) == ("k9", "acme", "cc-1")
    assert (built.prompt_tokens, built.completion_tokens, built.total_tokens) == (100, 20, 120)
    assert built.streamed and built.status == 200 and built.tier == "free"
    assert built.cost_nanos == 100 * 500 + 20 * 1500  # the limits file's price
    # a subscription's billing rate wins over the price; the subscription is recorded
    sub = {"subscription": "ns/gold", "billing_rate": "0.000002", "user": "bob",
           "request_id": "s", "charge": "prompt_tokens"}  # fmt: skip
    built = ledger.build([Descriptor(sub, 1000, False)], charges[:1], "s", 1)
    assert built is not None and built.subscription == "ns/gold" and built.tier == ""
    assert built.cost_nanos == 100 * 2000
    assert ledger.build(descriptors, [], "abc", 1) is None  # nothing charged: no record


async def _until(condition: object, seconds: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def test_a_journal_that_cannot_be_written_refuses_the_record_and_raises_nothing(
    tmp_path: pathlib.Path,
) -> None:
    journal = UsageJournal(tmp_path)
    journal.open()
    assert journal._fd is not None
    os.close(journal._fd)  # as a disk gone bad: every write fails with EBADF
    journal._fd = os.open(os.devnull, os.O_RDONLY)
    assert journal.append(record(1)) is False
    assert journal.pending_records == 0
    journal.close()
