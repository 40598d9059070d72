"""`maas-authz` / `python -m maas_authz`: the command line of the authorization server.

With `server.workers` > 1 the process started is a supervisor and the same command, started by it
with a worker environment, is a worker (see maas_common.workers).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry

from maas_authz.app import build_app, check_config, load_config
from maas_authz.config import AuthzConfig
from maas_common.config import validate
from maas_common.entrypoint import run_server_main
from maas_common.server import ServerRuntime
from maas_common.workers import Supervisor, SupervisorSettings, current_worker, run_worker_main

PROG = "maas-authz"
EXTRA_FLAGS = {
    "workers": ("--workers", "processes sharing the gRPC port; 1 = this process serves"),
    "admin_api_addr": ("--admin-api-addr", "HOST:PORT of the operator API and console, or off"),
    "ratelimit.target": ("--ratelimit-target", "maas-ratelimit's gRPC HOST:PORT, for quota"),
    "usage.url": ("--usage-url", "the usage ledger to read: sqlite:///FILE or postgresql://..."),
    "usage.password_file": ("--usage-password-file", "the ledger database's password, a file"),
}


async def _serve(config: AuthzConfig, base_dir: Path) -> None:
    if config.server.workers == 1:
        app = await build_app(config, base_dir)
        await app.runtime.run_until_signal()
        return
    await Supervisor(supervisor_settings(config, base_dir)).run_until_signal()


def supervisor_settings(config: AuthzConfig, base_dir: Path) -> SupervisorSettings:
    server = config.server
    # Workers serve HTTP (readiness for the supervisor) and, when the supervisor has one, the
    # admin listener on loopback ephemeral ports; the public addresses are the supervisor's.
    worker_server = server.model_copy(
        update={
            "http_addr": "127.0.0.1:0",
            "admin_addr": "127.0.0.1:0" if server.admin_addr else None,
        }
    )
    worker_config = config.model_copy(update={"server": worker_server})
    # the validated configuration, not the file: a restarted worker serves what the others do
    # even if the file changed since
    payload = json.dumps(
        {"base_dir": str(base_dir.absolute()), "config": worker_config.model_dump(mode="json")}
    )
    return SupervisorSettings(
        name=PROG,
        metric_prefix="maas_authz",
        workers=server.workers,
        command=[sys.executable, "-m", "maas_authz"],
        payload=payload,
        grpc_addr=server.grpc_addr,
        http_addr=server.http_addr,
        admin_addr=server.admin_addr,
        admin_fanout=["/admin/purge"],
        drain_timeout=server.drain_timeout,
        shutdown_delay=server.shutdown_delay,
    )


def _load_worker_payload(payload: str) -> tuple[AuthzConfig, Path]:
    data = json.loads(payload)
    config = validate(AuthzConfig, data["config"], "configuration from the supervisor")
    return config, Path(data["base_dir"])


async def _build_worker(config: AuthzConfig, base_dir: Path) -> ServerRuntime:
    # Metrics go to PROMETHEUS_MULTIPROC_DIR for the supervisor to sum. No process/platform
    # collectors here: they cannot be summed across processes (the supervisor has its own).
    app = await build_app(config, base_dir, registry=CollectorRegistry())
    return app.runtime


def main(argv: Sequence[str] | None = None) -> int:
    worker = current_worker()
    if worker is not None:
        return run_worker_main(
            prog=PROG,
            worker=worker,
            load=_load_worker_payload,
            server_section=lambda config: config.server,
            build=_build_worker,
        )
    return run_server_main(
        prog=PROG,
        description="Envoy external authorization server for Models as a Service",
        env_prefix="MAAS_AUTHZ",
        load=load_config,
        server_section=lambda config: config.server,
        check=check_config,
        serve=_serve,
        argv=argv,
        extra_flags=EXTRA_FLAGS,
    )
