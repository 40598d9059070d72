"""maas-authz with `--workers 2` as real processes: one gRPC port shared by two workers, the
supervisor's summed /metrics, aggregated /readyz, purge fan-out, restarts and shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from maas_demo.stack import CONFIG_DIR, Child, free_port
from tests.support.authz_client import CheckResult, check_request, result_of
from tests.support.kube_platform import MODEL, MODEL_NS, PREMIUM_NS, Kube
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.integration
MODEL_PATH = "/llm/tiny/v1/chat/completions"
FREE_KEY = "sk-demo-free"


# --- helpers ------------------------------------------------------------------------------------


def get(url: str, method: str = "GET") -> tuple[int, Any]:
    """(status, the JSON body, or the text when it is not JSON)."""
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def metric_sum(body: str, sample_name: str, **labels: str) -> float:
    """The sum of every sample `sample_name` whose labels include `labels`."""
    total = 0.0
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == sample_name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def wait_for(what: str, predicate: Callable[[], object], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def alive(pid: int) -> bool:
    """Running: exists and is not a zombie waiting for a parent to reap it."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


class Supervised:
    """`maas-authz --workers N` started as an operator would, with its own TMPDIR."""

    def __init__(self, workdir: pathlib.Path, config: dict[str, Any], workers: int = 2) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.tmpdir = workdir / "tmp"
        self.tmpdir.mkdir(exist_ok=True)
        self.grpc_port, self.http_port, self.admin_port = free_port(), free_port(), free_port()
        config = {
            **config,
            "server": {
                "grpc_addr": f"127.0.0.1:{self.grpc_port}",
                "http_addr": f"127.0.0.1:{self.http_port}",
                "admin_addr": f"127.0.0.1:{self.admin_port}",
                "drain_timeout": "2s",
                "log_format": "text",
            },
        }
        path = workdir / "authz.yaml"
        path.write_text(yaml.safe_dump(config))
        self.child = Child(
            "authz",
            [sys.executable, "-m", "maas_authz", "--config", str(path), "--workers", str(workers)],
            workdir / "authz.log",
            echo=False,
            env={"TMPDIR": str(self.tmpdir)},
        )
        self.child.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def readyz(self) -> tuple[int, dict[str, Any]]:
        return get(self.url("/readyz"))

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        def ready() -> bool:
            if not self.child.alive():
                raise AssertionError(f"maas-authz exited:\n{self.child.log_tail()}")
            try:
                return self.readyz()[0] == 200
            except (urllib.error.URLError, ConnectionError):
                return False

        wait_for("the supervisor to be ready", ready, timeout)
        return self.readyz()[1]

    def workers(self) -> dict[str, dict[str, Any]]:
        workers: dict[str, dict[str, Any]] = self.readyz()[1]["workers"]
        return workers

    def metrics(self) -> str:
        return text(self.url("/metrics"))

    def worker_metrics(self, index: str) -> str:
        return text(f"http://127.0.0.1:{self.workers()[index]['http_port']}/metrics")

    def purge(self, query: str = "") -> tuple[int, Any]:
        return get(f"http://127.0.0.1:{self.admin_port}/admin/purge{query}", method="POST")

    def stop(self) -> int | None:
        return self.child.stop(timeout=20)


def static_config(keys_file: pathlib.Path = CONFIG_DIR / "keys.yaml") -> dict[str, Any]:
    return {
        "identity": {"source": "static", "static": {"keys_file": str(keys_file)}},
        "tiers": {"file": str(CONFIG_DIR / "tiers.yaml")},
        "access": {
            "source": "static",
            "static_grants": [{"models": ["llm/tiny"], "groups": ["tier-free-users"]}],
        },
    }


@pytest.fixture
def authz(tmp_path: pathlib.Path) -> Iterator[Supervised]:
    server = Supervised(tmp_path, static_config())
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


async def checks_over_separate_connections(
    target: str, token: str, path: str, connections: int, calls_each: int
) -> list[CheckResult]:
    """`calls_each` Checks on each of `connections` channels that share no connection."""

    async def one_connection() -> list[CheckResult]:
        # a local subchannel pool: without it, channels to one target share one TCP connection
        options = [("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            request = check_request(path, {"authorization": f"Bearer {token}"})
            return [result_of(await stub.Check(request, timeout=10)) for _ in range(calls_each)]

    batches = await asyncio.gather(*(one_connection() for _ in range(connections)))
    return [result for batch in batches for result in batch]


def allowed(metrics: str) -> float:
    return metric_sum(metrics, "maas_authz_decisions_total", result="allowed")


# --- tests --------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_two_workers_share_the_port_and_the_supervisor_sums_their_metrics(
    authz: Supervised, tmp_path: pathlib.Path
) -> None:
    body = authz.readyz()[1]
    assert body["ready"] is True
    workers = body["workers"]
    assert set(workers) == {"0", "1"}
    assert all(w["ready"] for w in workers.values())
    pids = {w["pid"] for w in workers.values()}
    assert len(pids) == 2 and authz.child.process is not None
    assert authz.child.process.pid not in pids

    results = await checks_over_separate_connections(authz.target, FREE_KEY, MODEL_PATH, 32, 4)
    assert [r.http_status for r in results] == [200] * 128
    assert {r.headers["x-maas-tier"] for r in results} == {"free"}

    # the supervisor's /metrics is the sum over both workers, and each worker served some of the
    # 32 connections (all on one worker: a chance of 2 in 2**32)
    per_worker = [allowed(authz.worker_metrics(index)) for index in ("0", "1")]
    assert all(count > 0 for count in per_worker), per_worker
    assert sum(per_worker) == 128
    supervisor_metrics = authz.metrics()
    assert allowed(supervisor_metrics) == 128
    assert metric_sum(supervisor_metrics, "maas_authz_check_duration_seconds_count") == 128
    # the supervisor's own process metrics and restart counter are there too
    assert metric_sum(supervisor_metrics, "process_cpu_seconds_total") > 0
    assert "maas_authz_worker_restarts_total" in supervisor_metrics

    # a second deployment on the same port fails loudly instead of joining it
    second = subprocess.run(
        [sys.executable, "-m", "maas_authz", "--workers", "2", "--grpc-addr", authz.target,
         "--http-addr", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert second.returncode == 2
    assert f"--grpc-addr: cannot listen on {authz.target}: Address already in use" in (
        second.stderr
    )


@pytest.mark.asyncio
async def test_purge_on_the_supervisor_reaches_every_worker(authz: Supervised) -> None:
    status, body = authz.purge("?user=demo-free")
    # static keys and grants are not cached: nothing to drop, but both workers answered
    assert status == 200
    assert body == {
        "identities": 0,
        "access_decisions": 0,
        "api_keys": 0,
        "workers": {
            "0": {"identities": 0, "access_decisions": 0, "api_keys": 0},
            "1": {"identities": 0, "access_decisions": 0, "api_keys": 0},
        },
    }
    # the public HTTP listener does not purge
    assert get(authz.url("/admin/purge"), method="POST")[0] in (404, 405)


@pytest.mark.asyncio
async def test_a_killed_worker_is_restarted_and_readiness_follows(authz: Supervised) -> None:
    await checks_over_separate_connections(authz.target, FREE_KEY, MODEL_PATH, 8, 2)
    before = allowed(authz.metrics())
    assert before == 16
    victim = authz.workers()["0"]["pid"]
    survivor = authz.workers()["1"]["pid"]

    os.kill(victim, signal.SIGKILL)
    wait_for("readiness to drop", lambda: authz.readyz()[0] == 503, timeout=10)
    body = authz.wait_ready()

    restarted = body["workers"]["0"]
    assert restarted["ready"] is True
    assert restarted["pid"] not in (victim, survivor, None)
    assert restarted["restarts"] == 1
    assert body["workers"]["1"]["pid"] == survivor
    assert body["workers"]["1"]["restarts"] == 0
    assert not alive(victim)
    metrics = authz.metrics()
    assert metric_sum(metrics, "maas_authz_worker_restarts_total", worker="0") == 1
    assert metric_sum(metrics, "maas_authz_worker_restarts_total", worker="1") == 0
    # the dead worker's counts stay in the sums: totals never go backwards
    assert allowed(metrics) == before
    assert "restarting" in authz.child.log_tail(200)

    results = await checks_over_separate_connections(authz.target, FREE_KEY, MODEL_PATH, 16, 1)
    assert [r.http_status for r in results] == [200] * 16
    assert allowed(authz.metrics()) == before + 16


def test_sigterm_stops_the_workers_and_exits_0(tmp_path: pathlib.Path) -> None:
    server = Supervised(tmp_path, static_config())
    try:
        server.wait_ready()
        pids = [w["pid"] for w in server.workers().values()]
        assert len(pids) == 2 and all(alive(pid) for pid in pids)
        assert len(list(server.tmpdir.iterdir())) == 1  # the supervisor's run directory

        assert server.stop() == 0
        assert not any(alive(pid) for pid in pids)
        assert list(server.tmpdir.iterdir()) == []  # metrics files and reports removed
        log = server.child.log_tail(200)
        assert "worker 0 stopped (exit status 0)" in log
        assert "worker 1 stopped (exit status 0)" in log
    finally:
        server.stop()


def test_workers_stop_by_themselves_when_the_supervisor_is_killed(tmp_path: pathlib.Path) -> None:
    server = Supervised(tmp_path, static_config())
    try:
        server.wait_ready()
        pids = [w["pid"] for w in server.workers().values()]
        assert server.child.process is not None
        server.child.process.kill()
        assert server.child.process.wait(timeout=10) == -signal.SIGKILL
        # orphaned, they drain and exit (reaped by init); none keeps serving the port
        wait_for("orphaned workers to exit", lambda: not any(alive(p) for p in pids), 15)
        assert "the supervisor (pid" in server.child.log_tail(200)
    finally:
        server.stop()


def test_a_worker_config_error_at_start_up_exits_2_with_its_message(
    tmp_path: pathlib.Path,
) -> None:
    missing = tmp_path / "no-such-keys.yaml"
    server = Supervised(tmp_path, static_config(keys_file=missing))
    try:
        assert server.child.process is not None
        assert server.child.process.wait(timeout=30) == 2
        log = server.child.log_tail(200)
        assert log.count(f"maas-authz: configuration error: {missing}: cannot be read") == 1
        assert "restarting" not in log
        assert list(server.tmpdir.iterdir()) == []
    finally:
        server.stop()


def test_a_busy_grpc_port_exits_2(tmp_path: pathlib.Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "maas_authz", "--workers", "2",
             "--grpc-addr", f"127.0.0.1:{port}", "--http-addr", "127.0.0.1:0"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == (
        f"maas-authz: configuration error: --grpc-addr: cannot listen on 127.0.0.1:{port}: "
        "Address already in use\n"
    )


@pytest.mark.asyncio
async def test_each_worker_has_its_own_caches_and_purge_sums_them(
    kube: Kube, authz_kubeconfig: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    name = f"workers-{os.getpid()}-{time.monotonic_ns() % 100000}"
    kube.service_account(PREMIUM_NS, name)
    token = kube.mint_token(PREMIUM_NS, name)
    username = f"system:serviceaccount:{PREMIUM_NS}:{name}"
    config = {
        "identity": {"source": "kubernetes"},
        "access": {"source": "kubernetes"},
        "kubernetes": {"kubeconfig": str(authz_kubeconfig), "timeout": "2s"},
    }
    server = Supervised(tmp_path, config)
    try:
        server.wait_ready(timeout=60)
        path = f"/{MODEL_NS}/{MODEL}/v1/chat/completions"
        results = await checks_over_separate_connections(server.target, token, path, 32, 2)
        assert [r.http_status for r in results] == [200] * 64

        # the trade-off: one TokenReview (and one SubjectAccessReview) per worker, not one in all
        metrics = server.metrics()
        reviews = "maas_authz_kubernetes_request_duration_seconds_count"
        assert metric_sum(metrics, reviews, call="tokenreview") == 2
        assert metric_sum(metrics, reviews, call="subjectaccessreview") == 2

        status, body = server.purge(f"?user={username}")
        assert status == 200
        assert body == {
            "identities": 2,
            "access_decisions": 2,
            "api_keys": 0,
            "workers": {
                "0": {"identities": 1, "access_decisions": 1, "api_keys": 0},
                "1": {"identities": 1, "access_decisions": 1, "api_keys": 0},
            },
        }
        assert server.purge(f"?user={username}")[1]["identities"] == 0
    finally:
        assert server.stop() == 0


@pytest.mark.asyncio
async def test_two_workers_limit_inline_on_one_redis_and_the_supervisor_sums_the_limiter(
    tmp_path: pathlib.Path,
) -> None:
    """One hop with workers: both workers admit against the same Redis buckets (the free
    tier's 5 requests in 2 minutes hold across them), and the limiter's maas_ratelimit_*
    series, prometheus_client's own in a worker, are summed by the supervisor."""
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    config = {
        **static_config(),
        "ratelimit": {
            "mode": "inline",
            "limits": {"file": str(CONFIG_DIR / "limits.yaml")},
            "store": {"type": "redis", "redis": {"url": redis.url}},
        },
    }
    server = Supervised(tmp_path / "authz", config)
    try:
        server.wait_ready()
        # 32 connections: all on one worker has a chance of 2 in 2**32
        results = await checks_over_separate_connections(server.target, FREE_KEY, MODEL_PATH, 32, 1)
        assert sorted(r.http_status for r in results) == [200] * 5 + [429] * 27
        per_worker = [
            metric_sum(server.worker_metrics(i), "maas_ratelimit_calls_total") for i in ("0", "1")
        ]
        assert all(count > 0 for count in per_worker), per_worker
        summed = server.metrics()
        assert metric_sum(summed, "maas_ratelimit_calls_total", answer="ok") == 5
        assert metric_sum(summed, "maas_ratelimit_calls_total", answer="over_limit") == 27
        assert (
            metric_sum(
                summed, "maas_ratelimit_decisions_total", limit="free-requests", result="limited"
            )
            == 27
        )
    finally:
        server.stop()
        redis.cleanup()
