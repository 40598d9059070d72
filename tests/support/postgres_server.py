"""A throwaway PostgreSQL on a loopback port, for tests (Debian's ``postgresql`` package).

``initdb`` into a fresh directory (trust authentication on loopback, user ``maas``), then
``postgres`` in its own process group; :meth:`PostgresServer.stop` and :meth:`start` keep the
data and the port, so a client's DSN stays valid across a stop-and-start. PostgreSQL refuses
to run as root: as root, the data directory belongs to the ``postgres`` system user the package
creates and the server runs as that user (``runuser``). Live servers stop at interpreter exit.
"""

from __future__ import annotations

import glob
import os
import pathlib
import pwd
import shutil
import subprocess
import tempfile

from maas_demo.processes import (
    LiveSet,
    free_port,
    spawn_logged,
    stop_process_group,
    wait_until_ready,
)

__all__ = ["PostgresServer", "find_postgres_bin"]

USER = "maas"
DATABASE = "maas"
_LIVE: LiveSet[PostgresServer] = LiveSet("stop")


def find_postgres_bin() -> pathlib.Path | None:
    """The newest /usr/lib/postgresql/<version>/bin that has a server, or None."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda path: int(pathlib.Path(path).parts[-3]),
    )
    return pathlib.Path(found[-1]).parent if found else None


class PostgresServer:
    def __init__(self, workdir: pathlib.Path | None = None, *, ready_timeout: float = 30.0) -> None:
        self.workdir = pathlib.Path(workdir or tempfile.mkdtemp(prefix="maas-pg-")).resolve()
        self.data = self.workdir / "data"
        self.sockets = self.workdir / "sockets"
        self.log_file = self.workdir / "postgres.log"
        self.ready_timeout = ready_timeout
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._bin = find_postgres_bin()
        # as root, everything runs as the package's `postgres` user
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @property
    def dsn(self) -> str:
        if not self.port:
            raise RuntimeError("call start() first")
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _tool(self, name: str) -> str:
        if self._bin is None:
            raise RuntimeError(
                "no PostgreSQL server: install Debian's postgresql package "
                "(scripts/install-test-packages.sh does)"
            )
        return str(self._bin / name)

    def _initdb(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.sockets.mkdir(exist_ok=True)
        if self._as:
            owner = pwd.getpwnam("postgres")
            for path in (self.workdir, self.sockets):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        subprocess.run(
            [*self._as, self._tool("initdb"), "-D", str(self.data), "-U", USER, "-A", "trust",
             "-E", "UTF8", "--no-sync"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip

    def start(self) -> None:
        """Start (or restart on the same port, with the same data); block until it answers."""
        if self.running:
            return
        if not self.data.exists():
            self._initdb()
        # a port picked here may be taken before postgres binds it: pick again, but only at the
        # first start (a restart keeps its port, so DSNs stay valid)
        attempts = 1 if self.port else 3
        for attempt in range(attempts):
            if attempts > 1:
                self.port = free_port()
            try:
                self._spawn()
                return
            except RuntimeError:
                self.stop()
                if attempt + 1 == attempts:
                    raise

    def _spawn(self) -> None:
        args = [
            *self._as, self._tool("postgres"), "-D", str(self.data), "-p", str(self.port),
            "-k", str(self.sockets), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
        ]  # fmt: skip
        self._proc = spawn_logged(args, self.log_file, cwd=self.workdir)
        _LIVE.add(self)
        wait_until_ready(
            self._proc,
            self._ready,
            name="postgres",
            log_file=self.log_file,
            timeout=self.ready_timeout,
            interval=0.1,
            not_ready=lambda: "pg_isready said no",
        )
        self._ensure_database()

    def _ready(self) -> bool:
        answer = subprocess.run(
            [self._tool("pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", USER],
            capture_output=True,
            timeout=10,
            check=False,
        )
        return answer.returncode == 0

    def _ensure_database(self) -> None:
        exists = self.psql("SELECT 1 FROM pg_database WHERE datname = 'maas'", database="postgres")
        if exists.strip() != "1":
            self.psql(f"CREATE DATABASE {DATABASE}", database="postgres")

    def psql(self, sql: str, *, database: str = DATABASE) -> str:
        """Runs `sql` with psql; its unaligned, tuples-only output."""
        answer = subprocess.run(
            [self._tool("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", USER,
             "-d", database, "-v", "ON_ERROR_STOP=1", "-At", "-c", sql],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        if answer.returncode != 0:
            raise RuntimeError(f"psql failed: {answer.stderr.strip()}")
        return answer.stdout

    def stop(self) -> None:
        """A fast shutdown (clients disconnected, data consistent), as an operator's
        `pg_ctl stop -m fast`; the process group killed if that fails. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                subprocess.run(
                    [*self._as, self._tool("pg_ctl"), "stop", "-D", str(self.data), "-m", "fast",
                     "-w", "-t", "15"],
                    capture_output=True, timeout=30, check=False,
                )  # fmt: skip
            stop_process_group(proc, grace=5.0)
        _LIVE.discard(self)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


SCHEMA = pathlib.Path(__file__).resolve().parent / "sql" / "maas_api_keys.sql"
GATEWAY_ROLE = "maas_gateway"  # SELECT on api_keys only (the schema file grants it)


def maas_api_database() -> PostgresServer:
    """A started server holding maas-api's api_keys table (empty)."""
    server = PostgresServer()
    server.start()
    server.psql(SCHEMA.read_text())
    return server


def gateway_dsn(server: PostgresServer) -> str:
    """The gateway's read-only DSN."""
    return f"postgresql://{GATEWAY_ROLE}@127.0.0.1:{server.port}/{DATABASE}"


def api_keys_section(server: PostgresServer) -> dict[str, object]:
    """maas-authz's `api_keys` on this database, with bounds short enough for a test to see an
    outage: 300 ms timeouts, a 1 s cache that serves stale entries for 60 s while it is down."""
    return {
        "source": "postgresql",
        "postgresql": {"dsn": gateway_dsn(server), "timeout": "300ms",
                       "connect_timeout": "300ms", "max_connections": 4},
        "cache": {"ttl": "1s", "negative_ttl": "1s", "stale_if_error": "60s"},
    }  # fmt: skip


def insert_key(
    server: PostgresServer,
    *,
    key_id: str,
    username: str,
    key_hash: str,
    groups: list[str],
    subscription: str,
    status: str = "active",
    expires_at: str | None = None,
    tenant: str = "models-as-a-service",
) -> None:
    """One row as maas-api writes it (values are the test's own: quoted, not parameterised)."""

    def quote(text: str) -> str:
        return "'" + text.replace("'", "''") + "'"

    array = "ARRAY[" + ",".join(quote(g) for g in groups) + "]::text[]"
    expiry = quote(expires_at) if expires_at else "NULL"
    server.psql(
        "INSERT INTO api_keys (id, username, name, key_hash, status, user_groups, expires_at, "
        f"subscription, tenant) VALUES ({quote(key_id)}, {quote(username)}, 'test key', "
        f"{quote(key_hash)}, {quote(status)}, {array}, {expiry}, {quote(subscription)}, "
        f"{quote(tenant)})"
    )
