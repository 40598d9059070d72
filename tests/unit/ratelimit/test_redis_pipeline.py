"""The pipelined Redis connection (redis_pipeline.py): RESP2 packing and parsing, and the
connection's behaviour against a scripted fake server (order, deadlines, losses, set-up).

The store's use of it against a real redis-server is covered by test_store_contract.py and
tests/integration/test_redis_store.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio

from maas_ratelimit import redis_pipeline
from maas_ratelimit.redis_pipeline import (
    ConnectionClosed,
    Endpoint,
    PipelinedConnection,
    ProtocolError,
    ReplyError,
    pack,
    reader,
)

# --- pack / parse -------------------------------------------------------------------------------


def _reference_pack(*args: str | int | bytes) -> bytes:
    out = b"*%d\r\n" % len(args)
    for arg in args:
        if isinstance(arg, str):
            data = arg.encode()
        else:
            data = arg if isinstance(arg, bytes) else b"%d" % arg
        out += b"$%d\r\n%b\r\n" % (len(data), data)
    return out


@pytest.mark.parametrize(
    "args",
    [
        ("PING",),
        ("EVALSHA", "f" * 40, 2, "maas:rl:free-requests\x1falice", "k2", 1_700_000_000_000, -5, 0),
        ("SET", "user:ünïcødé", "välue"),  # lengths are in bytes, not characters
        ("SET", b"raw\r\nbytes", 7),
        ("SELECT", True),
        ("ECHO", ""),
    ],
)
def test_pack_is_resp2_arrays_of_bulk_strings(args: tuple[str | int | bytes, ...]) -> None:
    assert pack(*args) == _reference_pack(*args)
    assert pack(*args) == _reference_pack(*args)  # the second time from the segment cache


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b":42\r\n", 42),
        (b":-7\r\n", -7),
        (b"+OK\r\n", b"OK"),
        (b"$5\r\nhello\r\n", b"hello"),
        (b"$0\r\n\r\n", b""),
        (b"$-1\r\n", None),
        (b"*-1\r\n", None),
        (b"*0\r\n", []),
        (b"*3\r\n:1\r\n$2\r\nab\r\n*1\r\n:-3\r\n", [1, b"ab", [-3]]),
        (b"$4\r\na\r\nb\r\n", b"a\r\nb"),  # a bulk string may hold CRLF
    ],
)
def test_parse_complete_replies(data: bytes, expected: object) -> None:
    replies = reader()
    replies.feed(data + b":9\r\n")
    assert replies.gets() == expected
    assert replies.gets() == 9
    assert replies.gets() is False


def test_parse_error_replies_are_returned_not_raised() -> None:
    replies = reader()
    replies.feed(b"-NOSCRIPT No matching script\r\n")
    error = replies.gets()
    assert isinstance(error, ReplyError)
    assert str(error) == "NOSCRIPT No matching script"


@pytest.mark.parametrize(
    "data", [b"", b":1", b"$5\r\nhel", b"$5\r\nhello", b"*2\r\n:1\r\n", b"*2\r\n:1\r\n$3\r\nab"]
)
def test_parse_incomplete_replies_wait_for_more(data: bytes) -> None:
    replies = reader()
    replies.feed(data)
    assert replies.gets() is False


def test_parse_refuses_what_is_not_resp2() -> None:
    replies = reader()
    replies.feed(b"!oops\r\n")
    with pytest.raises(ProtocolError):
        replies.gets()


# --- the connection, against a fake server ------------------------------------------------------

Handler = Callable[[list[bytes]], Awaitable[bytes | None]]


class FakeRedis:
    """Answers each connection's commands in order, as Redis does, with `handler`'s reply
    (None: close the connection). Records every command it was sent."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.commands: list[list[bytes]] = []
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                command = await _read_command(reader)
                if command is None:
                    return
                self.commands.append(command)
                reply = await self.handler(command)
                if reply is None:
                    return
                writer.write(reply)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def _read_command(reader: asyncio.StreamReader) -> list[bytes] | None:
    header = await reader.readline()
    if not header:
        return None
    assert header.startswith(b"*")
    args = []
    for _ in range(int(header[1:])):
        length = int((await reader.readline())[1:])
        args.append((await reader.readexactly(length + 2))[:-2])
    return args


async def echo_or_delay(command: list[bytes]) -> bytes | None:
    """ECHO x -> x; SLEEP ms x -> x after ms; FAIL -> an error reply; DROP -> hang up."""
    name = command[0]
    if name == b"SLEEP":
        await asyncio.sleep(int(command[1]) / 1000)
        return b"$%d\r\n%b\r\n" % (len(command[2]), command[2])
    if name == b"ECHO":
        return b"$%d\r\n%b\r\n" % (len(command[1]), command[1])
    if name == b"FAIL":
        return b"-ERR failed as asked\r\n"
    if name == b"DROP":
        return None
    return b"+OK\r\n"


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeRedis]:
    server = FakeRedis(echo_or_delay)
    yield server
    await server.stop()


async def _connection(fake: FakeRedis, **endpoint: object) -> PipelinedConnection:
    port = await fake.start()
    return PipelinedConnection(Endpoint(host="127.0.0.1", port=port, **endpoint))  # type: ignore[arg-type]


def deadline_in(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


@pytest.mark.asyncio
async def test_concurrent_calls_share_one_connection_and_get_their_own_replies(
    fake: FakeRedis,
) -> None:
    connection = await _connection(fake)
    try:
        replies = await asyncio.gather(
            *(connection.call(pack("ECHO", f"reply-{i}")) for i in range(200))
        )
        assert replies == [f"reply-{i}".encode() for i in range(200)]
        assert fake.connections == 1
    finally:
        await connection.close()


@pytest.mark.asyncio
async def test_an_error_reply_fails_only_its_call(fake: FakeRedis) -> None:
    connection = await _connection(fake)
    try:
        results = await asyncio.gather(
            connection.call(pack("ECHO", "a")),
            connection.call(pack("FAIL")),
            connection.call(pack("ECHO", "b")),
            return_exceptions=True,
        )
        assert results[0] == b"a" and results[2] == b"b"
        assert isinstance(results[1], ReplyError)
        assert await connection.call(pack("ECHO", "c")) == b"c"
        assert fake.connections == 1
    finally:
        await connection.close()


@pytest.mark.asyncio
async def test_a_late_reply_is_dropped_and_later_calls_stay_matched(fake: FakeRedis) -> None:
    connection = await _connection(fake)
    try:
        slow = asyncio.ensure_future(connection.call(pack("SLEEP", 200, "slow"), deadline_in(0.05)))
        after = asyncio.ensure_future(connection.call(pack("ECHO", "after"), deadline_in(5)))
        with pytest.raises(TimeoutError):
            await slow
        assert await after == b"after"  # queued behind the slow one, and still its own reply
        assert await connection.call(pack("ECHO", "next"), deadline_in(5)) == b"next"
        assert fake.connections == 1  # a timeout does not cost the connection
    finally:
        await connection.close()


@pytest.mark.asyncio
async def test_a_cancelled_call_leaves_the_others_matched(fake: FakeRedis) -> None:
    connection = await _connection(fake)
    try:
        first = asyncio.ensure_future(connection.call(pack("SLEEP", 50, "first")))
        second = asyncio.ensure_future(connection.call(pack("ECHO", "second")))
        await asyncio.sleep(0.01)
        first.cancel()
        assert await second == b"second"
        assert await connection.call(pack("ECHO", "third")) == b"third"
    finally:
        await connection.close()


@pytest.mark.asyncio
async def test_a_lost_connection_fails_what_waits_and_the_next_call_reconnects(
    fake: FakeRedis,
) -> None:
    connection = await _connection(fake)
    try:
        assert await connection.call(pack("ECHO", "a")) == b"a"
        results = await asyncio.gather(
            connection.call(pack("DROP")),
            connection.call(pack("ECHO", "b")),
            return_exceptions=True,
        )
        assert all(isinstance(r, ConnectionClosed) and r.kind == "connect" for r in results)
        assert await connection.call(pack("ECHO", "c")) == b"c"
        assert fake.connections == 2
    finally:
        await connection.close()


@pytest.mark.asyncio
async def test_a_stalled_connection_is_given_up(fake: FakeRedis) -> None:
    connection = await _connection(fake, stall_timeout=0.05)
    try:
        stuck = asyncio.ensure_future(connection.call(pack("SLEEP", 10_000, "x")))
        await asyncio.sleep(0.1)
        # the next command finds the oldest one unanswered for too long: both fail, as timeouts
        with pytest.raises(ConnectionClosed) as caught:
            await connection.call(pack("ECHO", "y"))
        assert caught.value.kind == "timeout"
        with pytest.raises(ConnectionClosed):
            await stuck
        assert await connection.call(pack("ECHO", "z")) == b"z"  # on a new connection
        assert fake.connections == 2
    finally:
        await connection.close()


@pytest.mark.asyncio
async def test_auth_and_select_on_connect(fake: FakeRedis) -> None:
    connection = await _connection(fake, username="bob", password="secret", db=3)
    try:
        assert await connection.call(pack("ECHO", "x")) == b"x"
        assert fake.commands[:2] == [[b"AUTH", b"bob", b"secret"], [b"SELECT", b"3"]]
    finally:
        await connection.close()


@pytest.mark.asyncio
async def test_a_refused_set_up_is_a_connection_failure(fake: FakeRedis) -> None:
    async def refuse_auth(command: list[bytes]) -> bytes | None:
        return b"-WRONGPASS invalid password\r\n" if command[0] == b"AUTH" else b"+OK\r\n"

    fake.handler = refuse_auth
    connection = await _connection(fake, password="wrong")
    try:
        with pytest.raises(ConnectionClosed, match="WRONGPASS"):
            await connection.call(pack("PING"))
    finally:
        await connection.close()


@pytest.mark.asyncio
async def test_connecting_nowhere_raises_oserror() -> None:
    server = await asyncio.start_server(lambda _r, _w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    connection = PipelinedConnection(Endpoint(host="127.0.0.1", port=port))
    with pytest.raises(OSError):
        await connection.call(pack("PING"))
    await connection.close()


@pytest.mark.asyncio
async def test_concurrent_callers_share_one_connection_attempt(fake: FakeRedis) -> None:
    connection = await _connection(fake)
    try:
        await asyncio.gather(*(connection.call(pack("ECHO", "x")) for _ in range(20)))
        assert fake.connections == 1
    finally:
        await connection.close()


@pytest.mark.asyncio
async def test_close_fails_what_waits(fake: FakeRedis) -> None:
    connection = await _connection(fake)
    waiting = asyncio.ensure_future(connection.call(pack("SLEEP", 10_000, "x")))
    await asyncio.sleep(0.02)
    await connection.close()
    with pytest.raises(ConnectionClosed):
        await waiting


@pytest.mark.asyncio
async def test_the_password_is_not_kept_in_the_packing_cache(fake: FakeRedis) -> None:
    connection = await _connection(fake, password="hunter2-secret")
    try:
        await connection.call(pack("PING"))
        assert "hunter2-secret" not in redis_pipeline._SEGMENTS
    finally:
        await connection.close()
