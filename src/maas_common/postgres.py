"""What both servers' PostgreSQL clients (API keys, the usage ledger) count as the database
being unavailable: asyncpg's connection-level failures (the server gone, the network, too many
clients, a server shutting down)."""

from __future__ import annotations

import asyncpg

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.TooManyConnectionsError,
    asyncpg.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
)
