"""The supervisor: the process an operator starts when `workers` is more than 1.

- it checks the gRPC port is free (so two deployments still cannot share a port by accident),
  then starts `workers` copies of a command (`python -m <server>`), each a fresh interpreter that
  runs :func:`~maas_common.workers.worker.run_worker_main` with the payload it was handed;
- it serves the public HTTP side: /healthz, /readyz (ready when every worker is alive and ready,
  polled on the workers' own /readyz), /metrics (every worker's metrics summed by
  prometheus_client's multiprocess mode, plus the supervisor's own); on the admin address it fans
  POSTs out to every worker's admin listener and sums the counts they answer;
- a worker that dies is restarted with backoff and counted; one that stops at start-up with a
  configuration error (exit status 2) stops everything with that error instead;
- SIGTERM/SIGINT: the supervisor passes SIGTERM on, the workers drain as a single server does,
  and after drain_timeout (plus a margin) what is left is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from maas_common.config import parse_address
from maas_common.errors import ConfigError
from maas_common.server import Readiness, probe_routes, serve_http
from maas_common.workers.handoff import (
    MULTIPROC_ENV,
    PAYLOAD_FILE,
    SUPERVISOR_PID_ENV,
    WORKER_DIR_ENV,
    WORKER_INDEX_ENV,
    error_path,
    read_json,
    report_path,
)

log = logging.getLogger(__name__)

STABLE_AFTER = 30.0  # seconds a worker must have run for its restart backoff to start over


# --- pure parts of the supervisor ----------------------------------------------------------------


@dataclass
class WorkerState:
    """What the supervisor knows of one worker slot (a restarted worker keeps its slot)."""

    index: int
    pid: int | None = None
    running: bool = False
    ready: bool = False
    detail: str = "not started"
    restarts: int = 0
    http_port: int = 0
    admin_port: int = 0

    def describe(self) -> dict[str, object]:
        return {
            "ready": self.running and self.ready,
            "detail": self.detail,
            "pid": self.pid if self.running else None,
            "restarts": self.restarts,
            "http_port": self.http_port or None,
        }


def aggregate_readiness(
    own: Readiness, workers: Sequence[WorkerState]
) -> tuple[bool, dict[str, object]]:
    """Ready when the supervisor itself is and every worker is alive and ready."""
    ready = own.ready and bool(workers) and all(w.running and w.ready for w in workers)
    return ready, {
        "ready": ready,
        "components": own.snapshot(),
        "workers": {str(w.index): w.describe() for w in workers},
    }


def sum_counts(answers: Iterable[Mapping[str, object]]) -> dict[str, int]:
    """Key-wise sum of the whole-number fields of several answers (e.g. purge counts)."""
    total: dict[str, int] = {}
    for answer in answers:
        for key, value in answer.items():
            if isinstance(value, int) and not isinstance(value, bool):
                total[key] = total.get(key, 0) + value
    return total


def restart_delay(failures: int, base: float, ceiling: float) -> float:
    """Backoff before restarting after `failures` quick failures in a row (1, 2, ...)."""
    return float(min(ceiling, base * 2 ** max(failures - 1, 0)))


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def worker_readiness_detail(body: object) -> str:
    """A short reason from a worker's /readyz answer: the components that are not ready."""
    components = body.get("components") if isinstance(body, dict) else None
    if not isinstance(components, dict):
        return "not ready"
    waiting = [
        f"{name} ({state.get('detail') or 'not ready'})"
        for name, state in components.items()
        if isinstance(state, dict) and not state.get("ready")
    ]
    return "not ready: " + ", ".join(waiting) if waiting else "not ready"


def check_port_free(addr: str, setting: str = "--grpc-addr") -> None:
    """ConfigError when something listens on `addr` already.

    The workers bind with SO_REUSEPORT, which would let them join another server's port (any of
    the same user that also set it) without a word; this probe, without SO_REUSEPORT, keeps the
    single server's "a busy port fails loudly".
    """
    host, port = parse_address(addr)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(setting, "", f"cannot listen on {addr}: {exc.strerror}") from None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC's own bind
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ConfigError(
                        setting, "", f"cannot listen on {addr}: {exc.strerror}"
                    ) from None
                # anything else (an address family this host lacks): the workers' bind says


# --- the supervisor ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SupervisorSettings:
    name: str  # the server's name, for logs ("maas-authz")
    metric_prefix: str  # "maas_authz" -> maas_authz_worker_restarts_total
    workers: int
    command: Sequence[str]  # starts one worker; it must end up in run_worker_main()
    payload: str  # handed to every worker (a file in the run directory)
    grpc_addr: str
    http_addr: str
    admin_addr: str | None = None
    admin_fanout: Sequence[str] = ()  # POST paths passed on to every worker's admin listener
    drain_timeout: float = 10.0
    shutdown_delay: float = 0.0  # the workers keep serving this long after SIGTERM
    stop_margin: float = 5.0  # on top of drain_timeout before workers are killed
    poll_interval: float = 0.5  # between readiness probes of the workers
    probe_timeout: float = 2.0
    fanout_timeout: float = 10.0
    restart_backoff: float = 0.5  # first restart delay, doubled per quick failure ...
    restart_backoff_max: float = 30.0  # ... up to this


class Supervisor:
    def __init__(self, settings: SupervisorSettings) -> None:
        self.settings = settings
        self.readiness = Readiness()
        self.workers = [WorkerState(i) for i in range(settings.workers)]
        # The supervisor's own metrics, plus (once the directory exists) every worker's summed
        # by MultiProcessCollector. ProcessCollector/PlatformCollector read /proc/self and the
        # interpreter at scrape time and cannot be merged across processes: here they describe
        # the supervisor; workers leave them out (their CPU and memory show per container).
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self._restarts = Counter(
            f"{settings.metric_prefix}_worker_restarts",
            "Worker processes restarted after they exited unexpectedly, by worker slot",
            ["worker"],
            registry=self.registry,
        )
        self.http_port = 0
        self.admin_port = 0
        self.run_dir: Path | None = None
        self._stop = asyncio.Event()
        self._failure: BaseException | None = None
        self._processes: dict[int, asyncio.subprocess.Process] = {}
        self._slots: list[asyncio.Task[None]] = []
        self._poller: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._http: web.AppRunner | None = None
        self._admin: web.AppRunner | None = None

    @property
    def metrics_dir(self) -> Path:
        assert self.run_dir is not None
        return self.run_dir / "metrics"

    # --- life cycle

    async def run_until_signal(self) -> None:
        """Start, serve until SIGTERM/SIGINT (or a fatal worker failure), stop; then raise the
        failure if there was one (a ConfigError of a worker: exit status 2)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        await self.start()
        try:
            await self._stop.wait()
            if self._failure is None:
                log.info("%s supervisor received a stop signal", self.settings.name)
        finally:
            await self.stop()
        if self._failure is not None:
            raise self._failure

    async def start(self) -> None:
        s = self.settings
        self.readiness.set("startup", False, "starting")
        check_port_free(s.grpc_addr)
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"{s.name}-workers-"))  # mode 0700
        try:
            self.metrics_dir.mkdir()
            (self.run_dir / PAYLOAD_FILE).write_text(s.payload, encoding="utf-8")
            MultiProcessCollector(self.registry, path=str(self.metrics_dir))  # type: ignore[no-untyped-call]
            self._session = aiohttp.ClientSession()
            routes = probe_routes(
                self.registry, lambda: aggregate_readiness(self.readiness, self.workers)
            )
            self._http, self.http_port = await serve_http(s.http_addr, routes, "--http-addr")
            if s.admin_addr and s.admin_fanout:
                admin_routes = [web.post(path, self._fan_out) for path in s.admin_fanout]
                self._admin, self.admin_port = await serve_http(
                    s.admin_addr, admin_routes, "server.admin_addr"
                )
        except BaseException:
            await self._close()
            raise
        self._slots = [asyncio.create_task(self._run_slot(w)) for w in self.workers]
        for task in self._slots:
            task.add_done_callback(self._slot_done)
        self._poller = asyncio.create_task(self._poll_readiness())
        self.readiness.set("startup", True)
        log.info(
            "%s supervising %d workers",
            s.name,
            s.workers,
            extra={"grpc_addr": s.grpc_addr, "http_addr": s.http_addr, "http_port": self.http_port},
        )

    async def stop(self) -> None:
        """SIGTERM to every worker, wait for their drain (bounded), kill what is left, clean up."""
        self.readiness.set("shutdown", False, "draining")
        self._stop.set()
        for process in list(self._processes.values()):
            _signal(process, signal.SIGTERM)
        if self._slots:
            grace = (
                self.settings.shutdown_delay
                + self.settings.drain_timeout
                + self.settings.stop_margin
            )
            _, pending = await asyncio.wait(self._slots, timeout=grace)
            if pending:
                log.warning(
                    "%s: %d worker(s) still running after %.1fs; killing them",
                    self.settings.name,
                    len(pending),
                    grace,
                )
                for process in list(self._processes.values()):
                    _signal(process, signal.SIGKILL)
                await asyncio.wait(pending, timeout=self.settings.stop_margin)
            for task in self._slots:
                task.cancel()
        self._slots = []
        await self._close()
        log.info("%s supervisor stopped", self.settings.name)

    async def _close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        for runner in (self._admin, self._http):
            if runner is not None:
                await runner.cleanup()
        self._admin = self._http = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None

    def _fail(self, failure: BaseException) -> None:
        if self._failure is None:
            self._failure = failure
        self._stop.set()

    def _slot_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            name = self.settings.name
            log.error("%s: supervising a worker failed", name, exc_info=task.exception())
            self._fail(task.exception() or RuntimeError("worker slot failed"))

    # --- one worker slot: start, wait, restart

    async def _run_slot(self, state: WorkerState) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        failures = 0
        while not self._stop.is_set():
            started = loop.time()
            process = await self._spawn(state)
            if self._stop.is_set():  # stop() signalled before this process existed
                _signal(process, signal.SIGTERM)
            code = await process.wait()
            self._processes.pop(state.index, None)
            state.running = state.ready = False
            state.http_port = state.admin_port = 0
            # its live gauges go; its counters stay in the sums, so totals never go backwards
            mark_process_dead(process.pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]
            if self._stop.is_set():
                state.detail = f"stopped ({describe_exit(code)})"
                log.info("%s worker %d stopped (%s)", s.name, state.index, describe_exit(code))
                return
            assert self.run_dir is not None
            if code == 2 and not report_path(self.run_dir, state.index).exists():
                state.detail = "configuration error"
                self._fail(self._config_error_of(state))
                return
            failures = failures + 1 if loop.time() - started < STABLE_AFTER else 1
            delay = restart_delay(failures, s.restart_backoff, s.restart_backoff_max)
            state.detail = f"exited ({describe_exit(code)}); restarting in {delay:.1f}s"
            log.error(
                "%s worker %d (pid %d) exited unexpectedly (%s); restarting in %.1fs",
                s.name,
                state.index,
                process.pid,
                describe_exit(code),
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            if self._stop.is_set():
                return
            state.restarts += 1
            self._restarts.labels(str(state.index)).inc()

    async def _spawn(self, state: WorkerState) -> asyncio.subprocess.Process:
        assert self.run_dir is not None
        report_path(self.run_dir, state.index).unlink(missing_ok=True)
        error_path(self.run_dir, state.index).unlink(missing_ok=True)
        env = {
            **os.environ,
            MULTIPROC_ENV: str(self.metrics_dir),
            WORKER_INDEX_ENV: str(state.index),
            WORKER_DIR_ENV: str(self.run_dir),
            SUPERVISOR_PID_ENV: str(os.getpid()),
        }
        # a fresh interpreter (not fork): no inherited event loop, threads or gRPC state
        process = await asyncio.create_subprocess_exec(
            *self.settings.command, env=env, stdin=asyncio.subprocess.DEVNULL
        )
        self._processes[state.index] = process
        state.pid, state.running, state.ready, state.detail = process.pid, True, False, "starting"
        log.info("%s worker %d started (pid %d)", self.settings.name, state.index, process.pid)
        return process

    def _config_error_of(self, state: WorkerState) -> ConfigError:
        assert self.run_dir is not None
        try:
            data = json.loads(error_path(self.run_dir, state.index).read_text(encoding="utf-8"))
            return ConfigError(str(data["source"]), str(data["key"]), str(data["problem"]))
        except (OSError, ValueError, KeyError, TypeError):
            problem = "exited with status 2 (a configuration error) at start-up"
            return ConfigError(f"worker {state.index}", "", problem)

    # --- readiness of the workers

    async def _poll_readiness(self) -> None:
        while True:
            await asyncio.gather(*(self._probe(w) for w in self.workers))
            await asyncio.sleep(self.settings.poll_interval)

    async def _probe(self, state: WorkerState) -> None:
        pid = state.pid
        if not state.running:
            return
        if not state.http_port:
            assert self.run_dir is not None
            report = read_json(report_path(self.run_dir, state.index))
            if report is None or report.get("pid") != pid:
                state.ready, state.detail = False, "starting"
                return
            state.http_port = int(report["http_port"])
            state.admin_port = int(report["admin_port"])
        assert self._session is not None
        url = f"http://127.0.0.1:{state.http_port}/readyz"
        try:
            timeout = aiohttp.ClientTimeout(total=self.settings.probe_timeout)
            async with self._session.get(url, timeout=timeout) as response:
                ok = response.status == 200
                body = await response.json(content_type=None)
            detail = "ready" if ok else worker_readiness_detail(body)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            ok, detail = False, f"readiness probe failed: {exc or type(exc).__name__}"
        if state.pid == pid and state.running:  # not replaced meanwhile
            state.ready, state.detail = ok, detail

    # --- HTTP side

    async def _fan_out(self, request: web.Request) -> web.Response:
        assert self._session is not None
        status, body = await fan_out_post(
            self._session,
            self.workers,
            request.rel_url.path_qs,
            aiohttp.ClientTimeout(total=self.settings.fanout_timeout),
        )
        if status != 200:
            log.error("%s: admin %s failed on some workers", self.settings.name, request.path)
        return web.json_response(body, status=status)


async def fan_out_post(
    session: aiohttp.ClientSession,
    workers: Sequence[WorkerState],
    path_qs: str,
    limit: aiohttp.ClientTimeout,
) -> tuple[int, dict[str, object]]:
    """The same POST to every serving worker's admin listener: (status, the counts summed).

    A worker that is not serving yet (starting, restarting) is skipped: it starts with empty
    caches. One that serves but does not answer 200 makes the status 502 (naming it in `errors`),
    so a purge for instant revocation never looks complete when it is not.
    """
    targets = [w for w in workers if w.running and w.admin_port]
    answers = await asyncio.gather(
        *(_post_admin(session, w.admin_port, path_qs, limit) for w in targets),
        return_exceptions=True,
    )
    counts: dict[str, dict[str, object]] = {}
    errors: dict[str, str] = {}
    for worker, answer in zip(targets, answers, strict=True):
        if isinstance(answer, BaseException):
            errors[str(worker.index)] = str(answer) or type(answer).__name__
        else:
            counts[str(worker.index)] = answer
    body: dict[str, object] = {**sum_counts(counts.values()), "workers": counts}
    if errors:
        body["errors"] = errors
    return (502 if errors else 200), body


async def _post_admin(
    session: aiohttp.ClientSession, port: int, path_qs: str, limit: aiohttp.ClientTimeout
) -> dict[str, object]:
    url = f"http://127.0.0.1:{port}{path_qs}"
    try:
        async with session.post(url, timeout=limit) as response:
            if response.status != 200:
                raise RuntimeError(f"answered HTTP {response.status}")
            answer = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise RuntimeError(f"unreachable: {exc or type(exc).__name__}") from None
    if not isinstance(answer, dict):
        raise RuntimeError("answered something other than a JSON object")
    return answer


def _signal(process: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
