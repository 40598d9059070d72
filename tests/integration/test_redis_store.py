"""RedisBucketStore against a real redis-server: key layout and expiry, one round trip per
operation, atomicity under concurrency from two clients, error classification, and recovery
after the server is stopped and started again on the same port.

The arithmetic itself is covered by tests/unit/ratelimit/test_store_contract.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from maas_common.errors import BackendUnavailable
from maas_ratelimit.bucket import BucketSpec
from maas_ratelimit.redis_store import RedisBucketStore
from maas_ratelimit.store import Admission, Charge, ChargeStatus
from tests.support.redis_server import RedisServer, find_redis_server

SPEC = BucketSpec(limit=5, window_ms=120_000)
TOKEN = SPEC.window_ms
T0 = 1_700_000_000_000


def _new_server(tmp_path_factory: pytest.TempPathFactory) -> RedisServer:
    if find_redis_server() is None:
        pytest.fail("redis-server not found: apt-get install redis-server", pytrace=False)
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    return server


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = _new_server(tmp_path_factory)
    yield server
    server.stop()


def _store(
    server: RedisServer, *, timeout: float = 5.0, max_connections: int = 8
) -> RedisBucketStore:
    return RedisBucketStore.from_url(
        server.url, timeout=timeout, connect_timeout=2.0, max_connections=max_connections
    )


@pytest_asyncio.fixture
async def admin(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A plain client for looking at what the store wrote; flushes the db first."""
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest_asyncio.fixture
async def store(
    redis_server: RedisServer, admin: aioredis.Redis
) -> AsyncIterator[RedisBucketStore]:
    s = _store(redis_server)
    yield s
    await s.close()


def req(key: str, spec: BucketSpec = SPEC) -> Admission:
    return Admission(key, spec, need=spec.window_ms, take=spec.window_ms)


@pytest.mark.asyncio
async def test_bucket_hash_and_expiry_at_time_until_full(
    store: RedisBucketStore, admin: aioredis.Redis
) -> None:
    assert (await store.admit([req("user:a")], T0, None)).admitted
    key = "maas:rl:user:a"
    assert await admin.hgetall(key) == {"v": str(4 * TOKEN), "t": str(T0), "s": "120000"}
    # one token short: 24_000 ms until full
    assert 23_000 < await admin.pttl(key) <= 24_000
    # in debt: -2 tokens -> 7 tokens to refill: 168_000 ms
    result = await store.charge([Charge("user:a", SPEC, 6 * TOKEN)], T0, None)
    assert result.levels == (-2 * TOKEN,)
    assert await admin.hget(key, "v") == str(-2 * TOKEN)
    assert 167_000 < await admin.pttl(key) <= 168_000
    # full again (a check at a later time): kept for at most a millisecond
    await store.admit([Admission("user:a", SPEC, 0, 0)], T0 + 10**7, None)
    assert await admin.pttl(key) in (-2, 0, 1)


@pytest.mark.asyncio
async def test_request_id_marks(store: RedisBucketStore, admin: aioredis.Redis) -> None:
    await store.charge([Charge("k", SPEC, 5 * TOKEN)], T0, None)
    assert not (await store.admit([req("k")], T0, "req-1")).admitted
    assert await admin.get("maas:rl:rid:req-1") == "denied"
    assert 590_000 < await admin.pttl("maas:rl:rid:req-1") <= 600_000
    assert (await store.charge([Charge("k2", SPEC, 1)], T0, "req-2")).status is (
        ChargeStatus.APPLIED
    )
    assert await admin.get("maas:rl:rid:req-2") == "charged"
    # an admitted request leaves no mark
    assert (await store.admit([req("k3")], T0, "req-3")).admitted
    assert await admin.exists("maas:rl:rid:req-3") == 0


@pytest.mark.asyncio
async def test_key_prefix_and_request_id_ttl(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    store = RedisBucketStore(client, key_prefix="other:", request_id_ttl_ms=5_000)
    try:
        await store.charge([Charge("k", SPEC, 1)], T0, "r")
        assert sorted(await admin.keys("*")) == ["other:k", "other:rid:r"]
        assert 4_000 < await admin.pttl("other:rid:r") <= 5_000
    finally:
        await store.close()


async def _command_calls(client: aioredis.Redis) -> dict[str, int]:
    stats = await client.info("commandstats")
    return {name: int(value["calls"]) for name, value in stats.items()}


@pytest.mark.asyncio
async def test_one_round_trip_per_operation(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    # a pool without health checks, so that nothing but the scripts is sent
    client = aioredis.Redis.from_url(redis_server.url)
    store = RedisBucketStore(client)
    try:
        # warm up: connect, and load the scripts (a first EVALSHA may meet NOSCRIPT)
        await store.admit([req("warm")], T0, None)
        await store.charge([Charge("warm", SPEC, 1)], T0, None)
        before = await _command_calls(admin)
        for i in range(10):
            await store.admit([req("a"), req("b"), req("c")], T0 + i, f"r{i}")
        for i in range(5):
            await store.charge([Charge("a", SPEC, 7), Charge("b", SPEC, 9)], T0 + i, f"r{i}")
        await store.charge([Charge("a", SPEC, 1)], T0, None)
        after = await _command_calls(admin)
        delta = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
        delta.pop("cmdstat_info", None)  # the two INFO calls of this test
        # Commands run inside a script are counted too; everything else would be a round trip.
        inside = {"cmdstat_hmget", "cmdstat_hset", "cmdstat_pexpire", "cmdstat_get", "cmdstat_set"}
        assert {k: v for k, v in delta.items() if k not in inside} == {"cmdstat_evalsha": 16}
        # one HMGET + HSET + PEXPIRE per bucket (41 buckets); GET + SET per charge with an id;
        # SET per refused admission with an id ("a" runs dry after 5)
        assert {k: delta.get(k, 0) for k in sorted(inside)} == {
            "cmdstat_get": 5,
            "cmdstat_hmget": 41,
            "cmdstat_hset": 41,
            "cmdstat_pexpire": 41,
            "cmdstat_set": 10,
        }
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_two_stores_racing_admit_exactly_the_limit(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    spec = BucketSpec(limit=50, window_ms=60_000)
    stores = [_store(redis_server, max_connections=20) for _ in range(2)]
    try:
        results = await asyncio.gather(
            *(stores[i % 2].admit([req("race", spec)], T0, None) for i in range(200))
        )
        assert sum(r.admitted for r in results) == 50
        levels = sorted(r.outcomes[0].level for r in results if r.admitted)
        assert levels == [i * spec.window_ms for i in range(50)]  # each token given out once
        assert await admin.hget("maas:rl:race", "v") == "0"
    finally:
        for s in stores:
            await s.close()


@pytest.mark.asyncio
async def test_script_errors_are_classified(store: RedisBucketStore, admin: aioredis.Redis) -> None:
    await admin.set("maas:rl:wrongtype", "x")
    with pytest.raises(BackendUnavailable) as info:
        await store.admit([req("wrongtype")], T0, None)
    assert (info.value.backend, info.value.kind) == ("redis", "script_error")
    await admin.hset("maas:rl:partial", "v", "5")
    with pytest.raises(BackendUnavailable) as info:
        await store.charge([Charge("partial", SPEC, 1)], T0, None)
    assert info.value.kind == "script_error"
    assert "corrupt bucket state" in info.value.detail
    # a failed script has written nothing: not the good bucket before the bad one, not the mark
    with pytest.raises(BackendUnavailable):
        await store.charge([Charge("good", SPEC, 1), Charge("partial", SPEC, 1)], T0, "r1")
    with pytest.raises(BackendUnavailable):
        await store.admit([req("good"), req("wrongtype")], T0, "r2")
    assert sorted(await admin.keys("*")) == ["maas:rl:partial", "maas:rl:wrongtype"]
    assert await admin.hgetall("maas:rl:partial") == {"v": "5"}
    # and the store goes on working
    assert (await store.admit([req("fine")], T0, None)).admitted


@pytest.mark.asyncio
async def test_timeout_is_classified_and_recovers(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    store = _store(redis_server, timeout=0.2)
    try:
        assert (await store.admit([req("k")], T0, None)).admitted  # connected, scripts loaded
        await admin.client_pause(1000, all=True)
        try:
            with pytest.raises(BackendUnavailable) as info:
                await store.admit([req("k")], T0, None)
            assert (info.value.backend, info.value.kind) == ("redis", "timeout")
            assert not await store.ping()
        finally:
            await admin.client_unpause()
        # the timed-out script may or may not have run: only its arrival is uncertain
        result = await store.admit([req("k")], T0, None)
        assert result.admitted
        assert result.outcomes[0].level in (2 * TOKEN, 3 * TOKEN)
        assert await store.ping()
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_stopped_server_is_unavailable_and_restart_recovers(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    server = _new_server(tmp_path_factory)
    store = _store(server)
    try:
        assert (await store.admit([req("k")], T0, None)).admitted
        assert await store.ping()
        server.stop()
        # connection refused: raised at once (redis-py's retries are off), classified
        for _ in range(3):
            with pytest.raises(BackendUnavailable) as info:
                await store.admit([req("k")], T0, None)
            assert (info.value.backend, info.value.kind) == ("redis", "connect")
            with pytest.raises(BackendUnavailable) as info:
                await store.charge([Charge("k", SPEC, 1)], T0, "rid")
            assert info.value.kind == "connect"
        assert not await store.ping()
        # same port, empty (no persistence) and without the scripts: the same object recovers
        server.start()
        result = await store.admit([req("k")], T0, None)
        assert result.admitted
        assert result.outcomes[0].level == 4 * TOKEN
        assert (await store.charge([Charge("k", SPEC, 1)], T0, "rid")).status is (
            ChargeStatus.APPLIED
        )
        assert await store.ping()
    finally:
        await store.close()
        server.stop()


@pytest.mark.asyncio
async def test_close_is_safe_when_the_server_is_gone(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    server = _new_server(tmp_path_factory)
    store = _store(server)
    assert (await store.admit([req("k")], T0, None)).admitted
    server.stop()
    await store.close()
