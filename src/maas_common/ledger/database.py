"""The ledger's databases: SQLite (embedded, one writer process) and PostgreSQL (replicas).

Both take the same batch of records with one idempotent statement (a request id already there
is left as it is and counted as a duplicate), run the same queries (queries.py), and apply the
migrations under migrations/<engine>/ in order, each once, recorded in `ledger_migrations`.
Every operation has a timeout; SQLite runs on one thread of its own (the event loop never
waits on the file), PostgreSQL through a bounded asyncpg pool.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import asyncpg

from maas_common.errors import BackendUnavailable
from maas_common.ledger.queries import SELECT_COLUMNS, Summary, UsageQuery, fold
from maas_common.ledger.records import COLUMNS, UsageRecord
from maas_common.postgres import CONNECTION_ERRORS

T = TypeVar("T")
_INSERT_COLUMNS = SELECT_COLUMNS
# the database unavailable, a timeout, or the schema not there yet (the writer migrates)
_PG_DOWN = (*CONNECTION_ERRORS, TimeoutError, asyncpg.exceptions.UndefinedTableError)


def migrations(engine: str) -> list[tuple[int, str, str]]:
    """(version, name, SQL) of the engine's migrations, in order."""
    folder = resources.files("maas_common.ledger") / "migrations" / engine
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            version, _, name = entry.name.removesuffix(".sql").partition("_")
            found.append((int(version), name, entry.read_text()))
    return sorted(found)


class LedgerDatabase(Protocol):
    engine: str

    async def migrate(self) -> int:
        """Applies what is missing; the schema version after."""
        ...

    async def insert(self, records: Sequence[UsageRecord]) -> int:
        """Writes the records not there yet; how many were new."""
        ...

    async def summary(self, query: UsageQuery) -> Summary: ...

    async def records(
        self, query: UsageQuery, limit: int, after: tuple[int, str] | None = None
    ) -> list[UsageRecord]: ...

    async def close(self) -> None: ...


def open_ledger(
    url: str,
    *,
    base_dir: Path | None = None,
    timeout: float = 5.0,
    max_connections: int = 4,
    password: Callable[[], str | None] = lambda: None,
    application_name: str = "maas-gateway",
) -> LedgerDatabase:
    """sqlite:///relative/or//absolute/path, or postgresql://... (ValueError otherwise)."""
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        return SqliteLedger(sqlite_path(url, base_dir), timeout=timeout)
    if scheme in ("postgres", "postgresql"):
        return PostgresLedger(
            url,
            timeout=timeout,
            max_connections=max_connections,
            password=password,
            application_name=application_name,
        )
    raise ValueError(f"expected a sqlite:/// or postgresql:// URL, got scheme {scheme!r}")


def sqlite_path(url: str, base_dir: Path | None = None) -> Path:
    """The file of sqlite:///relative (to base_dir) or sqlite:////absolute (ValueError if the URL
    names no file)."""
    rest = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else ""
    if not rest or rest.endswith("/"):
        raise ValueError("a sqlite URL names a file: sqlite:///ledger.db or sqlite:////abs/path")
    path = Path(rest)  # sqlite:////abs/file: "/abs/file", absolute
    return base_dir / path if not path.is_absolute() and base_dir is not None else path


def _row(record: UsageRecord) -> tuple[Any, ...]:
    return tuple(getattr(record, name) for name in COLUMNS)


def _record(row: Sequence[Any]) -> UsageRecord:
    values = list(row)
    for index, name in enumerate(COLUMNS):
        if name in ("priced", "streamed"):
            values[index] = bool(values[index])
    return UsageRecord(*values)


class SqliteLedger:
    """One connection on one thread of its own; WAL, so that readers (maas-authz) never wait."""

    engine = "sqlite"

    def __init__(self, path: Path, *, timeout: float = 5.0) -> None:
        self.path = path
        self._timeout = timeout
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-sqlite")
        self._connection: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(
                self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False
            )
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            self._connection = connection
        return self._connection

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            return work(self._connect())

        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(self._thread, run), self._timeout)
        except (sqlite3.OperationalError, TimeoutError, OSError) as exc:
            raise BackendUnavailable("ledger", "error", f"sqlite {self.path}: {exc}") from exc

    async def migrate(self) -> int:
        def apply(connection: sqlite3.Connection) -> int:
            connection.execute(
                "CREATE TABLE IF NOT EXISTS ledger_migrations "
                "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_ms INTEGER NOT NULL)"
            )
            connection.execute("BEGIN IMMEDIATE")  # one process migrates at a time
            try:
                done = {v for (v,) in connection.execute("SELECT version FROM ledger_migrations")}
                version = max(done, default=0)
                for number, name, sql in migrations("sqlite"):
                    if number in done:
                        continue
                    for statement in _statements(sql):
                        connection.execute(statement)
                    connection.execute(
                        "INSERT INTO ledger_migrations VALUES (?, ?, ?)",
                        (number, name, int(time.time() * 1000)),
                    )
                    version = number
                connection.execute("COMMIT")
                return version
            except BaseException:
                connection.execute("ROLLBACK")
                raise

        return await self._run(apply)

    async def insert(self, records: Sequence[UsageRecord]) -> int:
        placeholders = ", ".join("?" for _ in COLUMNS)
        sql = f"INSERT OR IGNORE INTO usage_records ({_INSERT_COLUMNS}) VALUES ({placeholders})"  # noqa: S608
        rows = [_row(record) for record in records]

        def write(connection: sqlite3.Connection) -> int:
            before = connection.total_changes
            connection.execute("BEGIN IMMEDIATE")
            try:
                connection.executemany(sql, rows)
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            return connection.total_changes - before

        return await self._run(write)

    async def summary(self, query: UsageQuery) -> Summary:
        sql, params = query.summary_sql(lambda _i: "?")
        rows = await self._run(lambda c: c.execute(sql, params).fetchall())
        return fold(query, rows)

    async def records(
        self, query: UsageQuery, limit: int, after: tuple[int, str] | None = None
    ) -> list[UsageRecord]:
        sql, params = query.records_sql(lambda _i: "?", limit, after)
        rows = await self._run(lambda c: c.execute(sql, params).fetchall())
        return [_record(row) for row in rows]

    async def close(self) -> None:
        def close(_unused: None) -> None:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

        if self._connection is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, close, None)
        self._thread.shutdown(wait=True)


def _statements(sql: str) -> list[str]:
    """The statements of a migration file (no semicolons inside them in ours)."""
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    return [part.strip() for part in "\n".join(lines).split(";") if part.strip()]


_MIGRATION_LOCK = 0x6D616173  # "maas": pg_advisory_xact_lock key, one migrator at a time


class PostgresLedger:
    """asyncpg; the pool is made on first use (a database that is down costs no start-up) and
    bounds the connections."""

    engine = "postgresql"

    def __init__(
        self,
        dsn: str,
        *,
        timeout: float = 5.0,
        max_connections: int = 4,
        password: Callable[[], str | None] = lambda: None,
        application_name: str = "maas-gateway",
    ) -> None:
        self._dsn = dsn
        self._timeout = timeout
        self._max_connections = max_connections
        self._password = password
        self._application_name = application_name
        self._pool: Any = None
        self._making = asyncio.Lock()

    async def _get_pool(self) -> Any:
        if self._pool is None:
            async with self._making:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(
                        self._dsn,
                        password=self._password,
                        min_size=0,
                        max_size=self._max_connections,
                        timeout=self._timeout,
                        command_timeout=self._timeout,
                        max_inactive_connection_lifetime=60.0,
                        server_settings={"application_name": self._application_name},
                    )
        return self._pool

    async def _run(self, work: Callable[[Any], Any]) -> Any:
        try:
            async with asyncio.timeout(self._timeout * 2):  # the wait for a connection included
                pool = await self._get_pool()
                async with pool.acquire() as connection:
                    return await work(connection)
        except _PG_DOWN as exc:
            raise BackendUnavailable("ledger", "error", f"postgresql: {exc}") from exc

    async def migrate(self) -> int:
        async def apply(connection: Any) -> int:
            async with connection.transaction():
                await connection.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                await connection.execute(
                    "CREATE TABLE IF NOT EXISTS ledger_migrations (version INTEGER PRIMARY KEY,"
                    " name TEXT NOT NULL, applied_ms BIGINT NOT NULL)"
                )
                done = {
                    r[0] for r in await connection.fetch("SELECT version FROM ledger_migrations")
                }
                version = max(done, default=0)
                for number, name, sql in migrations("postgresql"):
                    if number in done:
                        continue
                    await connection.execute(sql)
                    await connection.execute(
                        "INSERT INTO ledger_migrations VALUES ($1, $2, $3)",
                        number,
                        name,
                        int(time.time() * 1000),
                    )
                    version = number
                return version

        return int(await self._run(apply))

    async def insert(self, records: Sequence[UsageRecord]) -> int:
        columns = list(zip(*(_row(record) for record in records), strict=True))
        types = [_PG_TYPES[name] for name in COLUMNS]
        unnest = ", ".join(f"${i + 1}::{kind}[]" for i, kind in enumerate(types))
        sql = (
            f"INSERT INTO usage_records ({_INSERT_COLUMNS}) SELECT * FROM unnest({unnest})"  # noqa: S608
            " ON CONFLICT (request_id) DO NOTHING"
        )

        async def write(connection: Any) -> int:
            status: str = await connection.execute(sql, *[list(column) for column in columns])
            return int(status.rsplit(" ", 1)[-1])  # "INSERT 0 <n>"

        return int(await self._run(write)) if records else 0

    async def summary(self, query: UsageQuery) -> Summary:
        sql, params = query.summary_sql(lambda i: f"${i}")

        async def read(connection: Any) -> Summary:
            return fold(query, [tuple(row) for row in await connection.fetch(sql, *params)])

        result: Summary = await self._run(read)
        return result

    async def records(
        self, query: UsageQuery, limit: int, after: tuple[int, str] | None = None
    ) -> list[UsageRecord]:
        sql, params = query.records_sql(lambda i: f"${i}", limit, after)

        async def read(connection: Any) -> list[UsageRecord]:
            return [_record(tuple(row)) for row in await connection.fetch(sql, *params)]

        result: list[UsageRecord] = await self._run(read)
        return result

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()


_PG_TYPES = {
    "request_id": "text",
    "ts_ms": "bigint",
    "user": "text",
    "model": "text",
    "tier": "text",
    "subscription": "text",
    "key_id": "text",
    "organization_id": "text",
    "cost_center": "text",
    "prompt_tokens": "bigint",
    "completion_tokens": "bigint",
    "total_tokens": "bigint",
    "cost_nanos": "bigint",
    "priced": "boolean",
    "status": "integer",
    "streamed": "boolean",
}
