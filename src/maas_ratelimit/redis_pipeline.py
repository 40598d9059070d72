"""One pipelined connection to Redis, for the store's hot path: a few µs per command.

redis-py's asyncio client spends 100-150 µs of CPU per EVALSHA (pool checkout, three nested
timeouts, command packing, a readline per reply element); the rate limiter sends one script per
call, so that was most of its cost. Here every command is written as it comes (all the commands
of one event-loop turn in one write) on a single connection, and the replies, which Redis sends
in order, are parsed by hiredis from the received bytes and handed to the waiting callers in
order. Redis runs commands one at a time anyway, so one connection loses nothing.

Only what the store needs: RESP2 over TCP or a Unix socket, AUTH and SELECT on connect. A
caller that stops waiting (its timeout, a cancelled call) leaves its command in the line: the
reply still comes in its turn and is dropped, so the others' replies stay matched. A connection
that is lost, or on which Redis has not answered for `stall_timeout`, fails every command still
waiting on it, and the next command connects afresh. Nothing is ever retried: a command that was
sent may have run.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass
from typing import Any, cast

import hiredis


class ReplyError(Exception):
    """An error reply (`-ERR ...`); the connection stays usable."""


class ConnectionClosed(ConnectionError):
    """The connection was closed with commands still waiting for their replies."""

    def __init__(self, message: str, *, kind: str = "connect") -> None:
        super().__init__(message)
        self.kind = kind  # connect | timeout | error, as BackendUnavailable kinds


class ProtocolError(ValueError):
    """Bytes that are not RESP2."""


# argument -> its bulk string, for the ASCII strings and integers that come again and again (key
# names, limits, windows); bounded: emptied when full, as per-request values pass through it too
_SEGMENTS: dict[str | int | bytes, str] = {}
_MAX_SEGMENTS = 8192


def pack(*args: str | int | bytes) -> bytes:
    """A command in RESP2: an array of bulk strings (strings as UTF-8, integers in decimal)."""
    segments = _SEGMENTS
    out = [f"*{len(args)}\r\n"]
    for arg in args:
        segment = segments.get(arg)
        if segment is None:
            if isinstance(arg, int):
                text = format(arg, "d")
            elif isinstance(arg, str) and arg.isascii():
                text = arg
            else:
                return _pack_bytes(args)  # lengths in bytes differ from lengths in characters
            segment = f"${len(text)}\r\n{text}\r\n"
            if len(segments) >= _MAX_SEGMENTS:
                segments.clear()
            segments[arg] = segment
        out.append(segment)
    return "".join(out).encode("ascii")


def _pack_bytes(args: tuple[str | int | bytes, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, bytes):
            data = arg
        else:
            data = b"%d" % arg
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


def reader() -> hiredis.Reader:
    """A RESP2 reply parser (hiredis, the C parser redis-py uses when it is installed).

    `feed(bytes)` it what arrives; `gets()` then returns the next complete reply, or False while
    none is complete. Integers are ints, simple and bulk strings bytes, nil None, arrays lists,
    error replies ReplyError instances (returned, not raised); bytes that are not RESP raise
    ProtocolError.
    """
    return hiredis.Reader(protocolError=ProtocolError, replyError=ReplyError)


class _Protocol(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, stall_timeout: float) -> None:
        self._loop = loop
        self._stall_timeout = stall_timeout
        self._transport: asyncio.Transport | None = None
        self._reader = reader()
        self._waiting: deque[tuple[asyncio.Future[Any], float]] = deque()  # (reply, sent at)
        # (deadline, reply) in the order sent, and one timer for the first: cheaper than a
        # timer per command (asyncio.timeout), as the deadlines come nearly in order
        self._deadlines: deque[tuple[float, asyncio.Future[Any]]] = deque()
        self._expiry: asyncio.TimerHandle | None = None
        self._outgoing: list[bytes] = []
        self.closed: ConnectionClosed | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (not necessarily an asyncio.Transport instance: uvloop's are not)
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        replies = self._reader
        waiting = self._waiting
        try:
            replies.feed(data)
            while (reply := replies.gets()) is not False:
                if not waiting:
                    raise ProtocolError("a reply nobody asked for")
                future = waiting.popleft()[0]
                if not future.done():  # else its caller gave up (timed out, cancelled)
                    if isinstance(reply, ReplyError):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
        except ProtocolError as exc:
            self.close(ConnectionClosed(f"bad reply from Redis: {exc}", kind="error"))

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"connection lost: {exc}" if exc else "connection closed by Redis"
        self._fail(ConnectionClosed(reason))

    def send(self, command: bytes, deadline: float | None) -> asyncio.Future[Any]:
        """The reply to `command`, failing with TimeoutError at `deadline` (loop time)."""
        now = self._loop.time()
        if self._waiting and now - self._waiting[0][1] > self._stall_timeout:
            reason = f"Redis has not answered for {self._stall_timeout:g}s"
            self.close(ConnectionClosed(reason, kind="timeout"))
        if self.closed is not None:
            raise self.closed
        future = self._loop.create_future()
        self._waiting.append((future, now))
        if deadline is not None:
            self._deadlines.append((deadline, future))
            if self._expiry is None:
                self._expiry = self._loop.call_at(deadline, self._expire)
        if not self._outgoing:
            self._loop.call_soon(self._flush)
        self._outgoing.append(command)
        return future

    def _expire(self) -> None:
        # Fail the commands whose deadline has passed; their replies, when they come, are
        # dropped. Answered ones are forgotten on the way; stop at the first still in time.
        self._expiry = None
        now = self._loop.time()
        deadlines = self._deadlines
        while deadlines:
            deadline, future = deadlines[0]
            if not future.done():
                if deadline > now:
                    self._expiry = self._loop.call_at(deadline, self._expire)
                    return
                future.set_exception(TimeoutError("no reply from Redis in time"))
            deadlines.popleft()

    def _flush(self) -> None:
        outgoing, self._outgoing = self._outgoing, []
        if self.closed is None and self._transport is not None:
            self._transport.write(b"".join(outgoing))

    def close(self, reason: ConnectionClosed) -> None:
        self._fail(reason)
        if self._transport is not None:
            self._transport.abort()

    def _fail(self, reason: ConnectionClosed) -> None:
        if self.closed is None:
            self.closed = reason
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self._deadlines.clear()
        while self._waiting:
            future = self._waiting.popleft()[0]
            if not future.done():
                future.set_exception(reason)


@dataclass(frozen=True)
class Endpoint:
    """Where and how to connect: a TCP address or a Unix socket path, then AUTH and SELECT."""

    host: str = "localhost"
    port: int = 6379
    path: str | None = None  # a Unix socket instead of host and port
    db: int = 0
    username: str | None = None
    password: str | None = None
    connect_timeout: float | None = None
    stall_timeout: float = 30.0  # no reply for this long: the connection is given up


class PipelinedConnection:
    """Commands in, replies out, on one connection made when first needed and after a failure.

    `call` raises ReplyError for an error reply, TimeoutError when the deadline passes first,
    ConnectionClosed when the connection fails or was closed before the reply came, and OSError
    when connecting fails.
    """

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None

    async def call(self, command: bytes, deadline: float | None = None) -> Any:
        """The reply to `command`; `deadline` is in event loop time (loop.time()), None: none."""
        protocol = self._protocol
        if protocol is None or protocol.closed is not None:
            async with asyncio.timeout_at(deadline):
                protocol = await self._connected()
        return await protocol.send(command, deadline)

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(BaseException):
                await self._connecting
            self._connecting = None
        if self._protocol is not None:
            self._protocol.close(ConnectionClosed("the store was closed"))
            self._protocol = None

    async def _connected(self) -> _Protocol:
        # one connection attempt at a time; every caller waiting meanwhile shares its outcome
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(self._connect_done)
        return await asyncio.shield(self._connecting)

    def _connect_done(self, future: asyncio.Future[_Protocol]) -> None:
        if self._connecting is future:
            self._connecting = None
        if not future.cancelled() and future.exception() is None:
            self._protocol = future.result()

    async def _connect(self) -> _Protocol:
        endpoint = self._endpoint
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(endpoint.connect_timeout):
            if endpoint.path is not None:
                _, protocol = await loop.create_unix_connection(
                    lambda: _Protocol(loop, endpoint.stall_timeout), endpoint.path
                )
            else:
                _, protocol = await loop.create_connection(
                    lambda: _Protocol(loop, endpoint.stall_timeout), endpoint.host, endpoint.port
                )
            try:
                if endpoint.password is not None:
                    credentials = (endpoint.username, endpoint.password)
                    # not through pack(): its cache must never hold a password
                    auth = _pack_bytes(("AUTH", *[c for c in credentials if c is not None]))
                    await protocol.send(auth, None)  # (within the connect timeout)
                if endpoint.db:
                    await protocol.send(pack("SELECT", endpoint.db), None)
            except BaseException as exc:
                protocol.close(ConnectionClosed(f"connection set-up failed: {exc}"))
                if isinstance(exc, ReplyError):
                    raise ConnectionClosed(f"connection set-up failed: {exc}") from exc
                raise
        return protocol
