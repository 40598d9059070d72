"""maas-api's `api_keys` table in PostgreSQL, read-only: one indexed lookup by key_hash.

asyncpg, because it is asyncio-native (nothing blocks the event loop) and its pool bounds the
connections: at most `max_connections` lookups run at once; a lookup waits for a connection and
runs its query within `timeout` in all, else BackendUnavailable. The pool is made on the first
lookup, so maas-authz starts (and serves every other credential) while the database is down.
Only the columns maas-api's own validator reads, filtered by its tenant as it does
(`maas-api/internal/api_keys/store_postgres.go`, GetByHash); the gateway never writes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg

from maas_authz.api_keys import ApiKeyRecord
from maas_common.errors import BackendUnavailable
from maas_common.postgres import CONNECTION_ERRORS

log = logging.getLogger(__name__)

_QUERY = (
    "SELECT id, username, name, user_groups, subscription, status, expires_at "
    "FROM api_keys WHERE key_hash = $1 AND tenant = $2"
)


class PostgresApiKeys:
    def __init__(
        self,
        dsn: str,
        *,
        password: Callable[[], str | None] = lambda: None,
        tenant: str = "models-as-a-service",
        max_connections: int = 8,
        timeout: float = 0.5,
        connect_timeout: float = 2.0,
        observe: Callable[[float, str], None] = lambda _seconds, _outcome: None,
    ) -> None:
        self._dsn = dsn
        self._password = password  # read at each connect: a rotated Secret applies
        self._tenant = tenant
        self._max_connections = max_connections
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._observe = observe
        self._pool: Any = None  # asyncpg.Pool once made
        self._making = asyncio.Lock()

    async def _get_pool(self) -> Any:
        if self._pool is not None:
            return self._pool
        async with self._making:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    self._dsn,
                    password=self._password,
                    min_size=0,  # connect on demand: a database that is down costs no start-up
                    max_size=self._max_connections,
                    timeout=self._connect_timeout,
                    command_timeout=self._timeout,
                    max_inactive_connection_lifetime=60.0,
                    server_settings={"application_name": "maas-authz"},
                )
        return self._pool

    async def find(self, key_hash: str) -> ApiKeyRecord | None:
        started = asyncio.get_running_loop().time()
        outcome = "error"
        try:
            async with asyncio.timeout(self._timeout + self._connect_timeout):
                pool = await self._get_pool()
                async with pool.acquire(timeout=self._timeout + self._connect_timeout) as conn:
                    row = await conn.fetchrow(_QUERY, key_hash, self._tenant, timeout=self._timeout)
            outcome = "found" if row is not None else "not_found"
        except TimeoutError:
            outcome = "timeout"
            raise BackendUnavailable(
                "postgresql", "timeout", f"api_keys lookup took longer than {self._timeout}s"
            ) from None
        except CONNECTION_ERRORS as exc:
            outcome = "connect"
            raise BackendUnavailable(
                "postgresql", "connect", f"api_keys lookup: {type(exc).__name__}: {exc}"
            ) from None
        except asyncpg.PostgresError as exc:  # e.g. no such table, permission denied
            outcome = "query"
            raise BackendUnavailable(
                "postgresql", "query", f"api_keys lookup: {exc.sqlstate}: {exc}"
            ) from None
        finally:
            self._observe(asyncio.get_running_loop().time() - started, outcome)
        if row is None:
            return None
        return _record(row)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 5.0)
            except TimeoutError:
                pool.terminate()


def _record(row: Any) -> ApiKeyRecord:
    groups: Sequence[str] = row["user_groups"] or ()
    return ApiKeyRecord(
        id=str(row["id"]),
        username=str(row["username"]),
        groups=tuple(str(g) for g in groups),
        status=str(row["status"]),
        expires_at=row["expires_at"],  # timestamptz: timezone-aware
        subscription=str(row["subscription"] or ""),
        name=str(row["name"] or ""),
    )
