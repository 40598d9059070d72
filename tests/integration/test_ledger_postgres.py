"""The usage ledger on a real PostgreSQL (Debian's, started by the test): migrations applied once
however many replicas start at once, replicas writing the same records at once (each stored
once), the same answers as SQLite for the same records, and the database stopped and started
again under a live writer."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from maas_common.clock import SystemClock
from maas_common.errors import BackendUnavailable
from maas_common.ledger.database import PostgresLedger, SqliteLedger, migrations
from maas_common.ledger.queries import UsageQuery
from maas_common.ledger.records import UsageRecord
from maas_ratelimit.usage_journal import UsageJournal
from maas_ratelimit.usage_ledger import UsageLedger
from tests.support.postgres_server import PostgresServer

T0 = 1_796_000_000_000


def record(n: int) -> UsageRecord:
    return UsageRecord(
        request_id=f"r{n:05d}",
        ts_ms=T0 + n * 600_000,  # one every 10 minutes: several days
        user=f"user-{n % 3}",
        model=("llm/a", "llm/b")[n % 2],
        tier="free" if n % 4 else "",
        subscription="" if n % 4 else "ns/gold",
        prompt_tokens=n % 7,
        completion_tokens=n % 5,
        total_tokens=n % 7 + n % 5,
        cost_nanos=n * 11,
        priced=True,
        status=200,
        streamed=n % 2 == 0,
    )


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    yield server
    server.cleanup()


@pytest.mark.asyncio
async def test_replicas_migrate_once_and_write_each_record_once(postgres: PostgresServer) -> None:
    replicas = [PostgresLedger(postgres.dsn, max_connections=2) for _ in range(4)]
    versions = await asyncio.gather(*(r.migrate() for r in replicas))
    newest = migrations("postgresql")[-1][0]
    assert versions == [newest] * 4
    assert postgres.psql("SELECT count(*) FROM ledger_migrations").strip() == str(newest)
    records = [record(n) for n in range(600)]
    # every replica writes overlapping batches at the same time (a journal replayed, a retry)
    batches = [records[i : i + 200] for i in range(0, 600, 100)]
    written = await asyncio.gather(
        *(replicas[i % 4].insert(batch) for i, batch in enumerate(batches))
    )
    assert sum(written) == 600
    assert postgres.psql(
        "SELECT count(*), count(DISTINCT request_id) FROM usage_records"
    ).strip() == ("600|600")
    for replica in replicas:
        await replica.close()


@pytest.mark.asyncio
async def test_postgresql_and_sqlite_answer_the_same(
    postgres: PostgresServer, tmp_path: pathlib.Path
) -> None:
    pg = PostgresLedger(postgres.dsn)
    lite = SqliteLedger(tmp_path / "ledger.db")
    await lite.migrate()
    await pg.migrate()
    records = [record(n) for n in range(600)]
    await lite.insert(records)
    await pg.insert(records)  # already there from the first test, or new: the same rows
    queries = [
        UsageQuery(),
        UsageQuery({"user": "user-1"}),
        UsageQuery({"subscription": "ns/gold"}, group_by=("day",)),
        UsageQuery(group_by=("day", "model"), timezone="America/New_York"),
        UsageQuery(since_ms=T0 + 86_400_000, until_ms=T0 + 2 * 86_400_000, group_by=("user",)),
        UsageQuery({"model": "llm/b", "tier": "free"}, group_by=("tier", "model")),
    ]
    for query in queries:
        assert (await pg.summary(query)) == (await lite.summary(query)), query
    assert (await pg.summary(UsageQuery())).totals.requests == 600
    page = await pg.records(UsageQuery({"user": "user-2"}), 50)
    assert page == await lite.records(UsageQuery({"user": "user-2"}), 50)
    after = (page[-1].ts_ms, page[-1].request_id)
    assert await pg.records(UsageQuery({"user": "user-2"}), 50, after) == await lite.records(
        UsageQuery({"user": "user-2"}), 50, after
    )
    await pg.close()
    await lite.close()


@pytest.mark.asyncio
async def test_postgresql_stopped_and_started_under_a_live_writer(
    postgres: PostgresServer, tmp_path: pathlib.Path
) -> None:
    database = PostgresLedger(postgres.dsn, timeout=1.0)
    journal = UsageJournal(tmp_path / "journal")
    journal.open()
    registry = CollectorRegistry()
    ledger = UsageLedger(
        journal, database, registry, clock=SystemClock(), prices=lambda: lambda _m: None,
        batch_size=50, flush_interval=0.05,
    )  # fmt: skip
    runner = asyncio.create_task(ledger.run())
    base = 10_000
    for n in range(base, base + 100):
        assert journal.append(record(n))
    await _until(lambda: journal.pending_records == 0)
    await asyncio.to_thread(postgres.stop)
    with pytest.raises(BackendUnavailable):
        await database.summary(UsageQuery())
    for n in range(base + 100, base + 400):
        assert journal.append(record(n))
    await asyncio.sleep(1.0)
    assert journal.pending_records == 300
    assert (registry.get_sample_value("maas_ratelimit_ledger_write_failures_total") or 0) >= 1
    await asyncio.to_thread(postgres.start)
    await _until(lambda: journal.pending_records == 0, 30)
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    count = postgres.psql(
        f"SELECT count(*) FROM usage_records WHERE request_id >= 'r{base:05d}'"
    ).strip()
    assert count == "400"
    await ledger.close()


async def _until(condition: object, seconds: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)
