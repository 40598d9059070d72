"""The worker side: a process started by a :class:`~maas_common.workers.supervisor.Supervisor`.

A worker learns who it is from its environment (:func:`current_worker`), reads its payload, builds
the whole server, binds the gRPC port with SO_REUSEPORT, reports its private HTTP and admin ports,
and serves until SIGTERM/SIGINT, or until its supervisor is gone (it polls its parent pid, so it
never keeps serving on its own after the supervisor was killed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from maas_common import event_loop
from maas_common.errors import ConfigError
from maas_common.logs import setup_logging
from maas_common.server import ServerRuntime
from maas_common.settings import ServerSection
from maas_common.workers.handoff import (
    PAYLOAD_FILE,
    SUPERVISOR_PID_ENV,
    WORKER_DIR_ENV,
    WORKER_INDEX_ENV,
    error_path,
    report_path,
    write_json,
)

C = TypeVar("C")
log = logging.getLogger(__name__)

ORPHAN_CHECK_INTERVAL = 1.0  # seconds between a worker's checks that its supervisor lives


@dataclass(frozen=True)
class WorkerEnvironment:
    """What a worker process learns from its environment: who it is and where to report."""

    index: int
    run_dir: Path
    supervisor_pid: int

    def payload(self) -> str:
        return (self.run_dir / PAYLOAD_FILE).read_text(encoding="utf-8")

    def report_serving(self, http_port: int, admin_port: int) -> None:
        write_json(
            report_path(self.run_dir, self.index),
            {"pid": os.getpid(), "http_port": http_port, "admin_port": admin_port},
        )

    def report_config_error(self, error: ConfigError) -> bool:
        """Leave the error for the supervisor, which exits with it; False if that failed."""
        try:
            write_json(
                error_path(self.run_dir, self.index),
                {"source": error.source, "key": error.key, "problem": error.problem},
            )
        except OSError:
            return False
        return True


def current_worker(environ: Mapping[str, str] | None = None) -> WorkerEnvironment | None:
    """This process's worker environment, or None when it was not started by a supervisor."""
    env = os.environ if environ is None else environ
    index = env.get(WORKER_INDEX_ENV)
    if index is None:
        return None
    return WorkerEnvironment(int(index), Path(env[WORKER_DIR_ENV]), int(env[SUPERVISOR_PID_ENV]))


def run_worker_main(
    *,
    prog: str,
    worker: WorkerEnvironment,
    load: Callable[[str], tuple[C, Path]],
    server_section: Callable[[C], ServerSection],
    build: Callable[[C, Path], Awaitable[ServerRuntime]],
) -> int:
    """The `main()` of a worker: `load` turns the payload into (config, base_dir), `build` makes
    the server; it serves with SO_REUSEPORT until SIGTERM/SIGINT or until the supervisor is gone.

    Exit status as for a single server: 0 after a clean stop, 2 for a configuration problem (left
    for the supervisor to report), 1 for anything unexpected.
    """
    try:
        config, base_dir = load(worker.payload())
        server = server_section(config)
        setup_logging(server.log_level, server.log_format)
        _tag_log_records(worker.index)
        event_loop.run(_serve_worker(worker, build, config, base_dir), server.event_loop)
    except ConfigError as exc:
        if not worker.report_config_error(exc):
            print(f"{prog}: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    except Exception:
        log.exception("%s worker %d stopped by an unexpected error", prog, worker.index)
        return 1
    return 0


def _tag_log_records(index: int) -> None:
    """Every log line of a worker says which worker wrote it (`worker=N`)."""

    def tag(record: logging.LogRecord) -> bool:
        record.worker = index
        return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(tag)


async def _serve_worker(
    worker: WorkerEnvironment,
    build: Callable[[C, Path], Awaitable[ServerRuntime]],
    config: C,
    base_dir: Path,
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    orphan_watch = asyncio.create_task(_stop_when_orphaned(worker.supervisor_pid, stop))
    try:
        runtime = await build(config, base_dir)
        runtime.reuse_port = True
        if stop.is_set():  # told to stop while building: release what was opened, serve nothing
            await runtime.stop()
            return
        await runtime.start()
        try:
            worker.report_serving(runtime.http_port, runtime.admin_port)
            await stop.wait()
            log.info("%s worker %d stopping", runtime.name, worker.index)
        finally:
            await runtime.stop()
    finally:
        orphan_watch.cancel()


async def _stop_when_orphaned(supervisor_pid: int, stop: asyncio.Event) -> None:
    while not stop.is_set():
        if os.getppid() != supervisor_pid:
            log.warning("the supervisor (pid %d) is gone; stopping", supervisor_pid)
            stop.set()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), ORPHAN_CHECK_INTERVAL)
