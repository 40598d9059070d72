"""What both servers' PostgreSQL clients (API keys, the usage ledger) count as the database
being unavailable: asyncpg's connection-level failures (the server gone, the network, too many
clients, a server shutting down)."""

from __future__ import annotations

import asyncpg


def has_password(url: str) -> bool:
    """Whether a postgresql:// URL carries a password (user:password@host): the servers refuse
    one there and read it from a password file."""
    rest = url.split("://", 1)[-1]
    return "@" in rest and ":" in rest.split("@", 1)[0]


CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.TooManyConnectionsError,
    asyncpg.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
)
