"""Two maas-authz replicas, as a Deployment runs them: Envoy's access log reaches each over
real gRPC streams, and the operator API of either one answers for both (decisions, the live
stream, purge), naming a replica that does not answer instead of hiding it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
import pytest_asyncio
from envoy.data.accesslog.v3.accesslog_pb2 import HTTPAccessLogEntry
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from prometheus_client import CollectorRegistry

from maas_authz.app import AuthzApp, build_app
from maas_authz.config import AuthzConfig
from maas_authz.decisions import AUTHZ_NAMESPACE, RATELIMIT_NAMESPACE
from maas_common.config import validate
from maas_demo.processes import free_port

pytestmark = pytest.mark.integration
ADMIN = {"Authorization": "Bearer sk-test-admin"}


def _config(tmp_path: pathlib.Path, name: str, port: int, peers: list[str]) -> AuthzConfig:
    keys = tmp_path / "admin-keys.yaml"
    digest = hashlib.sha256(b"sk-test-admin").hexdigest()
    keys.write_text(f"keys:\n  - {{name: ops, sha256: {digest}, access: write}}\n")
    static = tmp_path / "keys.yaml"
    static.write_text("keys: []\n")
    raw = {
        "server": {"grpc_addr": "127.0.0.1:0", "http_addr": "127.0.0.1:0",
                   "admin_api_addr": f"127.0.0.1:{port}"},
        "identity": {"source": "static", "static": {"keys_file": str(static)}},
        "access": {"source": "static"},
        "admin": {"auth": {"source": "keys", "keys_file": str(keys)},
                  "peers": {"addresses": peers, "timeout": "1s"}},
    }  # fmt: skip
    return validate(AuthzConfig, raw, f"{name} config")


class Replicas:
    def __init__(self, apps: list[AuthzApp], ports: list[int]) -> None:
        self.apps = apps
        self.urls = [f"http://127.0.0.1:{port}" for port in ports]

    async def log(self, replica: int, user: str, status: int = 200) -> None:
        """What Envoy does: an access log entry on a gRPC stream to that replica."""
        entry = HTTPAccessLogEntry()
        entry.request.path = "/llm/tiny/v1/chat/completions"
        entry.response.response_code.value = status
        entry.common_properties.start_time.GetCurrentTime()
        metadata = entry.common_properties.metadata.filter_metadata
        metadata[AUTHZ_NAMESPACE].update({"user": user, "tier": "free", "model": "llm/tiny"})
        if status == 429:  # refused by maas-ratelimit, which names the limit
            metadata[RATELIMIT_NAMESPACE].update({"limit": "free-requests"})
        message = als_pb2.StreamAccessLogsMessage()
        message.http_logs.log_entry.append(entry)
        port = self.apps[replica].runtime.grpc_port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = als_pb2_grpc.AccessLogServiceStub(channel)

            async def one() -> AsyncIterator[als_pb2.StreamAccessLogsMessage]:
                yield message

            await stub.StreamAccessLogs(one())


@pytest_asyncio.fixture
async def replicas(tmp_path: pathlib.Path) -> AsyncIterator[Replicas]:
    ports = [free_port(), free_port()]
    peers = [f"127.0.0.1:{port}" for port in ports]
    apps = []
    for index, port in enumerate(ports):
        app = await build_app(
            _config(tmp_path, f"replica {index}", port, peers),
            tmp_path,
            registry=CollectorRegistry(),
        )
        await app.runtime.start()
        apps.append(app)
    yield Replicas(apps, ports)
    for app in apps:
        await app.runtime.stop()


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with session.get(url, headers=ADMIN) as response:
        return response.status, await response.json()


@pytest.mark.asyncio
async def test_either_replica_shows_every_replicas_decisions(replicas: Replicas) -> None:
    await replicas.log(0, "alice")
    await replicas.log(1, "bob", status=429)
    async with aiohttp.ClientSession() as session:
        for url in replicas.urls:
            status, body = await _get(session, f"{url}/admin/v1/decisions")
            assert status == 200
            assert sorted(d["user"] for d in body["decisions"]) == ["alice", "bob"]
            assert (body["replicas"], body["unreachable"]) == (2, [])
        # one replica's own view, as the others ask for it
        _, local = await _get(session, f"{replicas.urls[0]}/admin/v1/decisions?local=true")
        assert [d["user"] for d in local["decisions"]] == ["alice"]
        _, denied = await _get(session, f"{replicas.urls[0]}/admin/v1/decisions?allowed=false")
        assert [d["user"] for d in denied["decisions"]] == ["bob"]  # filters reach every replica


@pytest.mark.asyncio
async def test_the_live_stream_merges_the_replicas(replicas: Replicas) -> None:
    url = f"{replicas.urls[0]}/admin/v1/decisions?follow=true&limit=0"
    async with aiohttp.ClientSession() as session, session.get(url, headers=ADMIN) as response:
        assert response.status == 200

        async def next_data() -> dict[str, Any]:
            while True:
                line = (await response.content.readline()).decode()
                if line.startswith("data: "):
                    data: dict[str, Any] = json.loads(line[6:])
                    return data

        await asyncio.sleep(0.3)  # the replica's own streams to both replicas are open
        await replicas.log(1, "carol")
        assert (await asyncio.wait_for(next_data(), 10))["user"] == "carol"
        await replicas.log(0, "dave")
        assert (await asyncio.wait_for(next_data(), 10))["user"] == "dave"


@pytest.mark.asyncio
async def test_a_purge_reaches_every_replica_or_says_which_it_missed(replicas: Replicas) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{replicas.urls[0]}/admin/v1/purge", headers=ADMIN) as response:
            body = await response.json()
            assert response.status == 200
            assert (body["replicas"], body["unreachable"]) == (2, [])
        await replicas.apps[1].runtime.stop()
        async with session.post(f"{replicas.urls[0]}/admin/v1/purge", headers=ADMIN) as response:
            body = await response.json()
            assert response.status == 502
            assert body["replicas"] == 1
            assert body["unreachable"][0].startswith(replicas.urls[1])
            assert body["error"]["code"] == "partial_purge"
        status, listing = await _get(session, f"{replicas.urls[0]}/admin/v1/decisions")
        assert status == 200 and listing["replicas"] == 1 and len(listing["unreachable"]) == 1
