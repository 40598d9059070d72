"""The Redis bucket store: the arithmetic of bucket.py in Lua, one script call per operation.

The scripts are lua/admit.lua and lua/charge.lua (loaded by redis_scripts.py).

Each operation is a single EVALSHA (EVAL with the text on NOSCRIPT), so it is atomic on the
server and costs one round trip. `now_ms` comes from the caller's clock, never from Redis TIME,
so both stores give the same answers for the same calls.

The scripts go over one pipelined connection of our own (redis_pipeline.py: ~11 µs of CPU per
call under concurrency, where redis-py's asyncio client spends ~100 µs); redis-py serves the
rest (readiness PINGs) and, for what the pipeline does not speak (TLS, credential providers), the
scripts too.

Layout, under a prefix (default "maas:rl:"):
- prefix + bucket key: a hash {v: level, t: updated_ms, s: scale}, as BucketState. Each write
  sets PEXPIRE to the time until the bucket is full again: a full bucket equals no bucket, so
  idle buckets disappear by themselves.
- prefix + "rid:" + request id: "denied" (refused at admission) or "charged", with a TTL.

Every key an operation touches is passed in KEYS (what Redis Cluster needs to route a script),
though keys carry no hash tags, so one operation's keys may still map to different slots.

Lua numbers are doubles: every value the scripts hold is an integer below 2**53 (see
bucket.MAX_EXACT), so +, - and * are exact; divisions are floored and then corrected, and the
rescale on a window change avoids the product level * window_ms, which may not stay below 2**53.
Numbers are written with %.0f: Redis's own number-to-string conversion may use an exponent.

Retries: a script that was sent may have run even if its reply was lost, and re-running admit or
charge would apply it twice. Nothing is retried: the pipeline never re-sends, and from_url
disables redis-py's retries; the next operation simply tries again on a fresh connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any, Self

import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from maas_common.errors import BackendUnavailable
from maas_ratelimit import redis_scripts
from maas_ratelimit.redis_pipeline import (
    ConnectionClosed,
    Endpoint,
    PipelinedConnection,
    ReplyError,
    pack,
)
from maas_ratelimit.store import (
    Admission,
    AdmitResult,
    Charge,
    ChargeResult,
    ChargeStatus,
    Outcome,
)

_CHARGE_STATUS = {
    0: ChargeStatus.APPLIED,
    1: ChargeStatus.DUPLICATE,
    2: ChargeStatus.DENIED_REQUEST,
}

# Seconds a pooled connection may sit idle before it is PINGed on its next use: catches a
# connection the network silently dropped, at the price of one PING after idle periods.
_HEALTH_CHECK_INTERVAL_S = 2


class RedisBucketStore:
    """A BucketStore on Redis. Any failure surfaces as BackendUnavailable("redis", kind, ...).

    `timeout` bounds each whole operation (connect, script), in seconds; None leaves only the
    client's own socket timeouts. The scripts go over a pipelined connection to where `client`
    connects (the same address, database and credentials) unless `pipelined` is False or the
    client connects in a way the pipeline does not speak (TLS, a credential provider): then
    through `client` itself, which keeps its own retry policy (from_url turns retries off).
    """

    name = "redis"

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        key_prefix: str = "maas:rl:",
        request_id_ttl_ms: int = 600_000,
        timeout: float | None = None,
        pipelined: bool = True,
    ) -> None:
        if request_id_ttl_ms <= 0:
            raise ValueError("request_id_ttl_ms must be positive")
        self._client = client
        self._prefix = key_prefix
        self._request_id_ttl_ms = request_id_ttl_ms
        self._timeout = timeout
        self._admit_script = client.register_script(redis_scripts.ADMIT)
        self._charge_script = client.register_script(redis_scripts.CHARGE)
        endpoint = _endpoint_of(client, timeout) if pipelined else None
        self._pipeline = PipelinedConnection(endpoint) if endpoint is not None else None

    @property
    def pipelined(self) -> bool:
        """Whether the scripts go over the pipelined connection (else through redis-py)."""
        return self._pipeline is not None

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout: float,
        connect_timeout: float,
        max_connections: int,
        key_prefix: str = "maas:rl:",
        request_id_ttl_ms: int = 600_000,
        pipelined: bool = True,
    ) -> Self:
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout,  # waiting for a free connection
            socket_timeout=timeout,
            socket_connect_timeout=connect_timeout,
            # No retries (not even on timeout): a re-sent script could apply twice.
            # (retry_on_timeout=False is the default and is deprecated as an argument.)
            retry=Retry(NoBackoff(), 0),
            health_check_interval=_HEALTH_CHECK_INTERVAL_S,
        )
        client = aioredis.Redis.from_pool(pool)  # the client owns and closes the pool
        return cls(
            client,
            key_prefix=key_prefix,
            request_id_ttl_ms=request_id_ttl_ms,
            timeout=timeout,
            pipelined=pipelined,
        )

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    def bucket_key(self, key: str) -> str:
        return self._prefix + key

    def request_id_key(self, request_id: str) -> str:
        return self._prefix + "rid:" + request_id

    async def admit(
        self, admissions: Sequence[Admission], now_ms: int, request_id: str | None
    ) -> AdmitResult:
        if not admissions:
            return AdmitResult(True, ())  # nothing to check, nothing to refuse or mark
        keys = [self.bucket_key(a.key) for a in admissions]
        if request_id:
            keys.append(self.request_id_key(request_id))
        args: list[int] = [now_ms, len(admissions), self._request_id_ttl_ms]
        for a in admissions:
            args += [a.spec.limit, a.spec.window_ms, a.need, a.take, int(a.shadow), a.at, a.unit_ms]
        reply = await self._run(self._admit_script, keys, args)
        try:
            if len(reply) != 1 + 2 * len(admissions):
                raise ValueError(f"{len(reply)} values")
            outcomes = tuple(
                Outcome(bool(int(reply[1 + 2 * i])), int(reply[2 + 2 * i]))
                for i in range(len(admissions))
            )
            return AdmitResult(bool(int(reply[0])), outcomes)
        except (TypeError, ValueError) as exc:
            raise BackendUnavailable("redis", "error", f"unexpected admit reply: {exc}") from exc

    async def charge(
        self, charges: Sequence[Charge], now_ms: int, request_id: str | None
    ) -> ChargeResult:
        if not charges and not request_id:
            return ChargeResult(ChargeStatus.APPLIED, ())
        keys = [self.bucket_key(c.key) for c in charges]
        if request_id:
            keys.append(self.request_id_key(request_id))
        args: list[int] = [now_ms, len(charges), self._request_id_ttl_ms]
        for c in charges:
            args += [c.spec.limit, c.spec.window_ms, c.amount, c.at, c.unit_ms]
        reply = await self._run(self._charge_script, keys, args)
        try:
            status = _CHARGE_STATUS[int(reply[0])]
            levels = tuple(int(level) for level in reply[1:])
            expected = len(charges) if status is ChargeStatus.APPLIED else 0
            if len(levels) != expected:
                raise ValueError(f"{len(reply)} values")
            return ChargeResult(status, levels)
        except (TypeError, ValueError, KeyError, IndexError) as exc:
            raise BackendUnavailable("redis", "error", f"unexpected charge reply: {exc}") from exc

    async def ping(self) -> bool:
        """Readiness: whether Redis answers now."""
        try:
            async with asyncio.timeout(self._timeout):
                return bool(await self._client.ping())
        except (rex.RedisError, TimeoutError, OSError):
            return False

    async def close(self) -> None:
        if self._pipeline is not None:
            await self._pipeline.close()
        # closing the sockets of a server that is gone: nothing is left to release
        with contextlib.suppress(rex.RedisError, OSError):
            await self._client.aclose()

    async def _run(self, script: AsyncScript, keys: list[str], args: list[int]) -> list[Any]:
        if self._pipeline is not None:
            reply = await self._run_pipelined(self._pipeline, script, keys, args)
        else:
            reply = await self._run_client(script, keys, args)
        if not isinstance(reply, list) or not reply:
            raise BackendUnavailable("redis", "error", f"unexpected script reply {reply!r}")
        return reply

    async def _run_pipelined(
        self, pipeline: PipelinedConnection, script: AsyncScript, keys: list[str], args: list[int]
    ) -> Any:
        timeout = self._timeout
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        try:
            try:
                command = pack("EVALSHA", script.sha, len(keys), *keys, *args)
                return await pipeline.call(command, deadline)
            except ReplyError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
            # not cached on this server yet (or any more): EVAL caches it for next time
            text = script.script
            assert isinstance(text, str)  # registered from redis_scripts' strings
            return await pipeline.call(pack("EVAL", text, len(keys), *keys, *args), deadline)
        except TimeoutError as exc:  # before OSError, of which it is a subclass
            raise BackendUnavailable(
                "redis", "timeout", f"no answer within {self._timeout}s"
            ) from exc
        except ReplyError as exc:
            raise BackendUnavailable("redis", "script_error", f"ResponseError: {exc}") from exc
        except ConnectionClosed as exc:
            raise BackendUnavailable("redis", exc.kind, str(exc)) from exc
        except OSError as exc:
            raise BackendUnavailable("redis", "connect", _describe(exc)) from exc

    async def _run_client(self, script: AsyncScript, keys: list[str], args: list[int]) -> Any:
        try:
            async with asyncio.timeout(self._timeout):
                reply = await script(keys=keys, args=args)
        except rex.TimeoutError as exc:
            raise BackendUnavailable("redis", "timeout", _describe(exc)) from exc
        except TimeoutError as exc:  # asyncio.timeout
            raise BackendUnavailable(
                "redis", "timeout", f"no answer within {self._timeout}s"
            ) from exc
        except rex.ConnectionError as exc:
            # A BlockingConnectionPool that waited in vain says ConnectionError, from a timeout
            kind = "timeout" if isinstance(exc.__cause__, TimeoutError) else "connect"
            raise BackendUnavailable("redis", kind, _describe(exc)) from exc
        except rex.ResponseError as exc:
            raise BackendUnavailable("redis", "script_error", _describe(exc)) from exc
        except (rex.RedisError, OSError) as exc:
            raise BackendUnavailable("redis", "error", _describe(exc)) from exc
        return reply


def _endpoint_of(client: aioredis.Redis, timeout: float | None) -> Endpoint | None:
    """Where `client` connects, for the pipeline; None when the pipeline cannot go there."""
    pool = client.connection_pool
    kwargs: dict[str, Any] = pool.connection_kwargs
    if kwargs.get("credential_provider") is not None:
        return None
    connect_timeout = kwargs.get("socket_connect_timeout") or kwargs.get("socket_timeout")
    common: dict[str, Any] = {
        "db": int(kwargs.get("db") or 0),
        "username": kwargs.get("username"),
        "password": kwargs.get("password"),
        "connect_timeout": connect_timeout,
        # a connection whose oldest command has waited this long is given up
        "stall_timeout": max(1.0, 10 * timeout) if timeout else 30.0,
    }
    if pool.connection_class is Connection:  # exactly: SSLConnection is a subclass
        return Endpoint(
            host=kwargs.get("host") or "localhost", port=int(kwargs.get("port") or 6379), **common
        )
    if pool.connection_class is UnixDomainSocketConnection:
        return Endpoint(path=kwargs["path"], **common)
    return None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
