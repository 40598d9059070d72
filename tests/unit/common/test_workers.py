"""The pure parts of maas_common.workers, its purge fan-out, and SO_REUSEPORT in ServerRuntime."""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from prometheus_client import CollectorRegistry

from maas_common.errors import ConfigError
from maas_common.server import Readiness, ServerRuntime
from maas_common.workers import (
    SUPERVISOR_PID_ENV,
    WORKER_DIR_ENV,
    WORKER_INDEX_ENV,
    WorkerEnvironment,
    WorkerState,
    aggregate_readiness,
    check_port_free,
    current_worker,
    describe_exit,
    error_path,
    fan_out_post,
    report_path,
    restart_delay,
    sum_counts,
    worker_readiness_detail,
)

# --- readiness aggregation ------------------------------------------------------------------------


def serving(index: int, pid: int) -> WorkerState:
    return WorkerState(index, pid=pid, running=True, ready=True, detail="ready", http_port=9000)


def test_ready_when_the_supervisor_and_every_worker_are() -> None:
    own = Readiness()
    own.set("startup", True)
    ready, body = aggregate_readiness(own, [serving(0, 10), serving(1, 11)])
    assert ready
    assert body == {
        "ready": True,
        "components": {"startup": {"ready": True, "detail": ""}},
        "workers": {
            "0": {"ready": True, "detail": "ready", "pid": 10, "restarts": 0, "http_port": 9000},
            "1": {"ready": True, "detail": "ready", "pid": 11, "restarts": 0, "http_port": 9000},
        },
    }


def test_one_worker_not_ready_makes_the_whole_not_ready() -> None:
    starting = WorkerState(1, pid=11, running=True, detail="starting")
    ready, body = aggregate_readiness(Readiness(), [serving(0, 10), starting])
    assert not ready
    assert body["ready"] is False
    workers = body["workers"]
    assert isinstance(workers, dict)
    assert workers["0"]["ready"] is True
    assert workers["1"] == {
        "ready": False,
        "detail": "starting",
        "pid": 11,
        "restarts": 0,
        "http_port": None,
    }


def test_a_dead_worker_is_not_ready_even_if_it_was_and_shows_no_pid() -> None:
    dead = WorkerState(0, pid=10, running=False, ready=True, detail="exited", restarts=2)
    ready, body = aggregate_readiness(Readiness(), [dead])
    assert not ready
    workers = body["workers"]
    assert isinstance(workers, dict)
    assert workers["0"]["ready"] is False
    assert workers["0"]["pid"] is None
    assert workers["0"]["restarts"] == 2


def test_a_draining_supervisor_is_not_ready_and_no_workers_is_not_ready() -> None:
    own = Readiness()
    own.set("shutdown", False, "draining")
    assert not aggregate_readiness(own, [serving(0, 10)])[0]
    assert not aggregate_readiness(Readiness(), [])[0]


def test_worker_readiness_detail_names_the_components_not_ready() -> None:
    body = {
        "ready": False,
        "components": {
            "startup": {"ready": True, "detail": ""},
            "shutdown": {"ready": False, "detail": "draining"},
            "background:tiers": {"ready": False, "detail": ""},
        },
    }
    assert worker_readiness_detail(body) == (
        "not ready: shutdown (draining), background:tiers (not ready)"
    )
    assert worker_readiness_detail("oops") == "not ready"
    assert worker_readiness_detail({"components": {}}) == "not ready"


# --- small pieces ---------------------------------------------------------------------------------


def test_sum_counts_adds_whole_numbers_key_by_key() -> None:
    answers = [
        {"identities": 2, "access_decisions": 1},
        {"identities": 3, "access_decisions": 0, "extra": 4},
        {},
    ]
    assert sum_counts(answers) == {"identities": 5, "access_decisions": 1, "extra": 4}
    # flags and text are not counts
    assert sum_counts([{"identities": 1, "ok": True, "note": "x", "f": 1.5}]) == {"identities": 1}
    assert sum_counts([]) == {}


def test_restart_delay_doubles_up_to_the_ceiling() -> None:
    assert [restart_delay(n, 0.5, 30.0) for n in (1, 2, 3, 4, 7, 8, 50)] == [
        0.5,
        1.0,
        2.0,
        4.0,
        30.0,
        30.0,
        30.0,
    ]
    assert restart_delay(0, 0.5, 30.0) == 0.5


def test_describe_exit() -> None:
    assert describe_exit(0) == "exit status 0"
    assert describe_exit(1) == "exit status 1"
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(-200) == "killed by signal 200"


def test_current_worker_comes_from_the_environment(tmp_path: Path) -> None:
    assert current_worker({}) is None
    env = {WORKER_INDEX_ENV: "3", WORKER_DIR_ENV: str(tmp_path), SUPERVISOR_PID_ENV: "42"}
    assert current_worker(env) == WorkerEnvironment(3, tmp_path, 42)


def test_a_worker_reports_its_ports_and_its_config_errors_as_json_files(tmp_path: Path) -> None:
    worker = WorkerEnvironment(1, tmp_path, 42)
    (tmp_path / "payload").write_text("the config")
    assert worker.payload() == "the config"

    worker.report_serving(1234, 0)
    assert json.loads(report_path(tmp_path, 1).read_text()) == {
        "pid": os.getpid(),
        "http_port": 1234,
        "admin_port": 0,
    }
    assert worker.report_config_error(ConfigError("keys.yaml", "", "cannot be read"))
    assert json.loads(error_path(tmp_path, 1).read_text()) == {
        "source": "keys.yaml",
        "key": "",
        "problem": "cannot be read",
    }
    assert not list(tmp_path.glob("*.partial"))
    gone = WorkerEnvironment(1, tmp_path / "missing", 42)
    assert not gone.report_config_error(ConfigError("k", "", "p"))


def test_check_port_free_refuses_a_port_someone_listens_on() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError) as caught:
            check_port_free(f"127.0.0.1:{port}")
        assert str(caught.value) == (
            f"--grpc-addr: cannot listen on 127.0.0.1:{port}: Address already in use"
        )
        # the wildcard address overlaps it too
        with pytest.raises(ConfigError):
            check_port_free(f"0.0.0.0:{port}")
    check_port_free(f"127.0.0.1:{port}")  # free again


# --- SO_REUSEPORT in ServerRuntime --------------------------------------------------------------


def runtime(grpc_addr: str, reuse_port: bool) -> ServerRuntime:
    return ServerRuntime(
        name="test",
        grpc_addr=grpc_addr,
        http_addr="127.0.0.1:0",
        services=[],
        registry=CollectorRegistry(),
        drain_timeout=0.1,
        reuse_port=reuse_port,
    )


@pytest.mark.asyncio
async def test_runtimes_that_reuse_the_port_share_it_and_others_are_refused() -> None:
    first = runtime("127.0.0.1:0", reuse_port=True)
    await first.start()
    try:
        shared = f"127.0.0.1:{first.grpc_port}"
        second = runtime(shared, reuse_port=True)
        await second.start()
        try:
            assert second.grpc_port == first.grpc_port
            with pytest.raises(ConfigError, match="cannot listen on"):
                await runtime(shared, reuse_port=False).start()
        finally:
            await second.stop()
    finally:
        await first.stop()


# --- purge fan-out ------------------------------------------------------------------------------


class FakeWorker:
    """An admin listener answering like a worker's POST /admin/purge, recording the queries."""

    def __init__(self, answer: object, status: int = 200) -> None:
        self.answer = answer
        self.status = status
        self.queries: list[dict[str, str]] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application()
        app.add_routes([web.post("/admin/purge", self._purge)])
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def _purge(self, request: web.Request) -> web.Response:
        self.queries.append(dict(request.query))
        return web.json_response(self.answer, status=self.status)


@pytest_asyncio.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def started(*fakes: FakeWorker) -> list[WorkerState]:
    states = []
    for index, fake in enumerate(fakes):
        await fake.start()
        states.append(WorkerState(index, pid=100 + index, running=True, admin_port=fake.port))
    return states


async def stop(*fakes: FakeWorker) -> None:
    for fake in fakes:
        if fake.runner is not None:
            await fake.runner.cleanup()


LIMIT = aiohttp.ClientTimeout(total=5)


@pytest.mark.asyncio
async def test_purge_goes_to_every_worker_with_its_query_and_the_counts_are_summed(
    session: aiohttp.ClientSession,
) -> None:
    fakes = (
        FakeWorker({"identities": 1, "access_decisions": 2}),
        FakeWorker({"identities": 1, "access_decisions": 0}),
        FakeWorker({"identities": 0, "access_decisions": 5}),
    )
    workers = await started(*fakes)
    try:
        status, body = await fan_out_post(session, workers, "/admin/purge?user=alice", LIMIT)
    finally:
        await stop(*fakes)
    assert status == 200
    assert body == {
        "identities": 2,
        "access_decisions": 7,
        "workers": {
            "0": {"identities": 1, "access_decisions": 2},
            "1": {"identities": 1, "access_decisions": 0},
            "2": {"identities": 0, "access_decisions": 5},
        },
    }
    assert [f.queries for f in fakes] == [[{"user": "alice"}]] * 3


@pytest.mark.asyncio
async def test_workers_not_serving_are_skipped(session: aiohttp.ClientSession) -> None:
    fake = FakeWorker({"identities": 4, "access_decisions": 1})
    workers = await started(fake)
    workers += [
        WorkerState(1, pid=None, running=False, admin_port=0),  # restarting: fresh caches
        WorkerState(2, pid=7, running=True, admin_port=0),  # starting: not serving yet
    ]
    try:
        status, body = await fan_out_post(session, workers, "/admin/purge", LIMIT)
    finally:
        await stop(fake)
    assert status == 200
    assert body == {
        "identities": 4,
        "access_decisions": 1,
        "workers": {"0": {"identities": 4, "access_decisions": 1}},
    }
    assert fake.queries == [{}]


@pytest.mark.asyncio
async def test_a_failing_worker_makes_the_purge_502_naming_it(
    session: aiohttp.ClientSession,
) -> None:
    good = FakeWorker({"identities": 1, "access_decisions": 1})
    failing = FakeWorker({"error": "boom"}, status=500)
    not_json_object = FakeWorker(["x"])
    workers = await started(good, failing, not_json_object)
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        workers.append(WorkerState(3, pid=9, running=True, admin_port=closed.getsockname()[1]))
        try:
            status, body = await fan_out_post(session, workers, "/admin/purge", LIMIT)
        finally:
            await stop(good, failing, not_json_object)
    assert status == 502
    assert body["identities"] == 1
    assert body["access_decisions"] == 1
    assert body["workers"] == {"0": {"identities": 1, "access_decisions": 1}}
    errors = body["errors"]
    assert isinstance(errors, dict)
    assert set(errors) == {"1", "2", "3"}
    assert errors["1"] == "answered HTTP 500"
    assert errors["2"] == "answered something other than a JSON object"
    assert errors["3"].startswith("unreachable: ")
