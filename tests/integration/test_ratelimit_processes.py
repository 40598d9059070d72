"""maas-ratelimit as real processes: concurrency in memory and across two processes on one real
Redis, and Redis killed and restarted under each failure mode."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Iterator

import grpc
import pytest
import yaml
from envoy.service.ratelimit.v3 import rls_pb2

from tests.support.ratelimit_client import RateLimitClient, descriptor
from tests.support.redis_server import RedisServer
from tests.support.server_process import ServerProcess

pytestmark = pytest.mark.integration
LIMITS = """\
domain: maas
limits:
  - {name: burst, tier: free, kind: requests, limit: 20, window: 1h}
"""


class Server(ServerProcess):
    def client(self) -> RateLimitClient:
        return RateLimitClient(self.target)


def start_server(
    workdir: pathlib.Path, name: str, store: dict[str, object], limits: str = LIMITS
) -> Server:
    """A real maas-ratelimit process with `limits` and `store`, on free ports, ready."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "limits.yaml").write_text(limits)
    config = workdir / f"{name}.yaml"
    config.write_text(yaml.safe_dump({"limits": {"file": "limits.yaml"}, "store": store}))
    return Server.start(name, ["maas_ratelimit", "--config", str(config)], workdir)


@pytest.fixture
def redis(tmp_path: pathlib.Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


async def _race(servers: list[Server], user: str, calls: int) -> int:
    clients = [s.client() for s in servers]
    try:
        results = await asyncio.gather(
            *(clients[i % len(clients)].admitted("free", user) for i in range(calls))
        )
    finally:
        for client in clients:
            await client.close()
    return sum(results)


@pytest.mark.asyncio
async def test_concurrent_requests_admit_exactly_the_limit_in_memory(
    tmp_path: pathlib.Path,
) -> None:
    server = start_server(tmp_path, "memory", {"type": "memory"})
    try:
        assert await _race([server], "alice", 100) == 20
    finally:
        assert server.child.stop() == 0


@pytest.mark.asyncio
async def test_two_processes_sharing_redis_admit_exactly_the_limit(
    tmp_path: pathlib.Path, redis: RedisServer
) -> None:
    store = {"type": "redis", "redis": {"url": redis.url, "timeout": "1s"}}
    first = start_server(tmp_path, "first", store)
    second = start_server(tmp_path, "second", store)
    try:
        assert await _race([first, second], "bob", 200) == 20
        # both really took part
        for server in (first, second):
            assert (
                'maas_ratelimit_store_duration_seconds_count{op="admit",store="redis"} 100.0'
                in (server.metrics())
            )
    finally:
        assert first.child.stop() == 0
        assert second.child.stop() == 0


@pytest.mark.asyncio
async def test_redis_restart_fail_open_allows_counts_and_recovers(
    tmp_path: pathlib.Path, redis: RedisServer
) -> None:
    store = {"type": "redis", "failure_mode": "open", "redis": {"url": redis.url}}
    server = start_server(tmp_path, "open", store)
    client = server.client()
    try:
        answer = await client.should_rate_limit(descriptor(tier="free", user="carol", hits=25))
        assert answer.overall_code == rls_pb2.RateLimitResponse.OVER_LIMIT

        redis.stop()
        during = await client.should_rate_limit(descriptor(tier="free", user="carol", hits=25))
        assert during.overall_code == rls_pb2.RateLimitResponse.OK  # failed open
        assert 'maas_ratelimit_calls_total{answer="failure_open"} 1.0' in server.metrics()
        assert 'maas_ratelimit_store_errors_total{kind="connect",store="redis"}' in (
            server.metrics()
        )

        redis.start()  # same port, empty: the store reconnects by itself
        after = await client.should_rate_limit(descriptor(tier="free", user="carol", hits=25))
        assert after.overall_code == rls_pb2.RateLimitResponse.OVER_LIMIT
        assert server.child.alive()
    finally:
        await client.close()
        assert server.child.stop() == 0


@pytest.mark.asyncio
async def test_redis_restart_fail_closed_answers_unavailable_and_recovers(
    tmp_path: pathlib.Path, redis: RedisServer
) -> None:
    store = {"type": "redis", "failure_mode": "closed", "redis": {"url": redis.url}}
    server = start_server(tmp_path, "closed", store)
    client = server.client()
    try:
        assert await client.admitted("free", "dave")
        redis.stop()
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await client.admitted("free", "dave")
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "rate limit store unavailable" in (failure.value.details() or "")

        redis.start()
        assert await client.admitted("free", "dave")
        assert server.child.alive()
    finally:
        await client.close()
        assert server.child.stop() == 0
