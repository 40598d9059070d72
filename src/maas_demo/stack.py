"""The local stack: Envoy + maas-authz + maas-ratelimit + the demo model, as child processes.

Used by `make demo` (in the foreground, logs echoed with a prefix) and by the end-to-end tests
(on free ports, logs in files). Synchronous on purpose: it only starts, watches and stops processes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import yaml

from maas_demo import processes
from maas_demo.envoy import (
    GATEWAY_TEMPLATE,
    ONE_HOP_TEMPLATE,
    USAGE_LUA,
    find_envoy,
    render_gateway,
)
from maas_demo.processes import free_port, log_tail

CONFIG_DIR = Path(__file__).resolve().parent / "config"
DEMO_AUTHZ_CONFIG = CONFIG_DIR / "authz.yaml"
DEMO_RATELIMIT_CONFIG = CONFIG_DIR / "ratelimit.yaml"


@dataclass
class Ports:
    envoy: int = 8080
    envoy_admin: int = 9901
    authz_grpc: int = 50051
    authz_http: int = 8081
    ratelimit_grpc: int = 50052
    ratelimit_http: int = 8082
    backend: int = 8000
    authz_admin: int = 8090
    envoy_host: str = "127.0.0.1"

    @classmethod
    def free(cls) -> Ports:
        return cls(
            envoy=free_port(),
            envoy_admin=free_port(),
            authz_grpc=free_port(),
            authz_http=free_port(),
            ratelimit_grpc=free_port(),
            ratelimit_http=free_port(),
            backend=free_port(),
            authz_admin=free_port(),
        )


class StackError(RuntimeError):
    pass


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    echo: bool
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None
    _pump_thread: threading.Thread | None = None

    def start(self) -> None:
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            start_new_session=True,  # Ctrl-C goes to us; we stop the children in order
        )
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()

    def _pump(self) -> None:
        assert self.process is not None and self.process.stdout is not None and self._log
        with self._log, self.process.stdout:
            for line in self.process.stdout:
                self._log.write(line)
                self._log.flush()
                if self.echo:
                    sys.stdout.write(f"[{self.name}] {line.decode('utf-8', 'replace')}")
                    sys.stdout.flush()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._pump_thread is not None:
            self._pump_thread.join(timeout=5)
        return self.process.returncode

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)


Topology = Literal["two-hop", "one-hop"]
TOPOLOGIES: tuple[Topology, ...] = ("two-hop", "one-hop")


def gateway_config(ports: Ports, topology: Topology = "two-hop") -> str:
    """envoy/gateway.yaml (or gateway-one-hop.yaml) rendered for these ports (Envoy, maas-authz,
    maas-ratelimit, model)."""
    return render_gateway(
        {
            "ENVOY_HOST": ports.envoy_host,
            "ENVOY_PORT": ports.envoy,
            "ENVOY_ADMIN_PORT": ports.envoy_admin,
            "AUTHZ_GRPC_PORT": ports.authz_grpc,
            "RATELIMIT_GRPC_PORT": ports.ratelimit_grpc,
            "USAGE_LUA": str(USAGE_LUA),
            "BACKEND_PORT": ports.backend,
        },
        ONE_HOP_TEMPLATE if topology == "one-hop" else GATEWAY_TEMPLATE,
    )


def _absolute(base: Path, value: str) -> str:
    return value if Path(value).is_absolute() else str(base / value)


def inline_authz_config(authz_config: Path, ratelimit_config: Path) -> Path:
    """The one-hop topology's maas-authz configuration, written beside `authz_config`: that one,
    with maas-ratelimit's limits, store and ledger (paths made absolute) under ratelimit.mode
    inline. Same policy, same limits, one server."""
    authz: dict[str, Any] = yaml.safe_load(authz_config.read_text()) or {}
    limiter: dict[str, Any] = yaml.safe_load(ratelimit_config.read_text()) or {}
    base = ratelimit_config.resolve().parent
    section = {
        key: value
        for key, value in (authz.get("ratelimit") or {}).items()
        if key not in ("target", "tls")  # maas-ratelimit's address: there is none
    }
    section["mode"] = "inline"
    limits = dict(limiter.get("limits") or {})
    if limits.get("file"):
        limits["file"] = _absolute(base, limits["file"])
    section["limits"] = limits
    if limiter.get("store"):
        section["store"] = limiter["store"]
    ledger = limiter.get("ledger")
    if ledger:
        ledger = dict(ledger)
        url = ledger["url"]
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            ledger["url"] = "sqlite:///" + _absolute(base, url.removeprefix("sqlite:///"))
        for key in ("spool_dir", "password_file"):
            if ledger.get(key):
                ledger[key] = _absolute(base, ledger[key])
        section["ledger"] = ledger
    authz["ratelimit"] = section
    out = authz_config.with_name(f"{authz_config.stem}.one-hop.yaml")
    out.write_text(yaml.safe_dump(authz, sort_keys=False))
    return out


def wait_until_ready(child: Child, url: str, timeout: float) -> None:
    """Poll `url` until it answers 200; fail early, with the log tail, if the child exits."""
    assert child.process is not None
    processes.wait_until_ready(
        child.process,
        lambda: processes.http_ok(url),
        name=child.name,
        log_file=child.log_path,
        timeout=timeout,
        interval=0.05,
        not_ready=lambda: f"not ready after {timeout}s",
        log_lines=30,
        error=StackError,
    )


class LocalStack:
    def __init__(
        self,
        workdir: Path,
        ports: Ports | None = None,
        *,
        authz_config: Path = DEMO_AUTHZ_CONFIG,
        ratelimit_config: Path = DEMO_RATELIMIT_CONFIG,
        echo: bool = False,
        backend_args: tuple[str, ...] = (),
        authz_env: dict[str, str] | None = None,
        external_backend: bool = False,
        envoy_config_edit: Callable[[str], str] | None = None,
        topology: Topology = "two-hop",
    ) -> None:
        self.workdir = workdir
        # one-hop: maas-authz limits inline (envoy/gateway-one-hop.yaml), no maas-ratelimit
        self.topology = topology
        # a change to the rendered Envoy config (e.g. TLS to the servers), for tests
        self.envoy_config_edit = envoy_config_edit
        self.ports = ports or Ports()
        self.authz_config = authz_config
        self.ratelimit_config = ratelimit_config
        self.echo = echo
        self.backend_args = backend_args
        self.authz_env = authz_env or {}
        # True: a model server already listens on ports.backend (e.g. a real vLLM)
        self.external_backend = external_backend
        self.children: list[Child] = []

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.envoy}"

    @property
    def limiter_http_port(self) -> int:
        """The HTTP port (/metrics) of the process that runs the rate limits."""
        return self.ports.authz_http if self.topology == "one-hop" else self.ports.ratelimit_http

    def _own_config(self) -> None:
        """The demo's own configuration is copied afresh into the workdir at every start and run
        from there: policy edits from the operator console change those copies, never the
        package (and the next start begins from the package again)."""
        copies = self.workdir / "config"
        shutil.rmtree(copies, ignore_errors=True)
        shutil.copytree(CONFIG_DIR, copies)
        if self.authz_config == DEMO_AUTHZ_CONFIG:
            self.authz_config = copies / DEMO_AUTHZ_CONFIG.name
        if self.ratelimit_config == DEMO_RATELIMIT_CONFIG:
            self.ratelimit_config = copies / DEMO_RATELIMIT_CONFIG.name

    def start(self, timeout: float = 60.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._own_config()
        p = self.ports
        envoy_config = self.workdir / "envoy.yaml"
        rendered = gateway_config(p, self.topology)
        if self.envoy_config_edit is not None:
            rendered = self.envoy_config_edit(rendered)
        envoy_config.write_text(rendered)
        one_hop = self.topology == "one-hop"
        authz_config = (
            inline_authz_config(self.authz_config, self.ratelimit_config)
            if one_hop
            else self.authz_config
        )
        to_ratelimit = [] if one_hop else ["--ratelimit-target", f"127.0.0.1:{p.ratelimit_grpc}"]
        python = sys.executable
        plan = [
            (
                "backend",
                [python, "-m", "maas_demo.backend", "--addr", f"127.0.0.1:{p.backend}",
                 *self.backend_args],
                {},
                f"http://127.0.0.1:{p.backend}/healthz",
            ),
            (
                "authz",
                [python, "-m", "maas_authz", "--config", str(authz_config),
                 "--grpc-addr", f"127.0.0.1:{p.authz_grpc}",
                 "--http-addr", f"127.0.0.1:{p.authz_http}",
                 "--admin-api-addr", f"127.0.0.1:{p.authz_admin}",
                 *to_ratelimit],
                self.authz_env,
                f"http://127.0.0.1:{p.authz_http}/readyz",
            ),
            (
                "ratelimit",
                [python, "-m", "maas_ratelimit", "--config", str(self.ratelimit_config),
                 "--grpc-addr", f"127.0.0.1:{p.ratelimit_grpc}",
                 "--http-addr", f"127.0.0.1:{p.ratelimit_http}"],
                {},
                f"http://127.0.0.1:{p.ratelimit_http}/readyz",
            ),
            (
                "envoy",
                [str(find_envoy()), "-c", str(envoy_config), "--disable-hot-restart",
                 "--log-level", "warn"],
                {},
                f"http://127.0.0.1:{p.envoy_admin}/ready",
            ),
        ]  # fmt: skip
        if self.external_backend:
            plan = [step for step in plan if step[0] != "backend"]
        if one_hop:
            plan = [step for step in plan if step[0] != "ratelimit"]
        try:
            for name, argv, env, ready_url in plan:
                child = Child(name, argv, self.workdir / f"{name}.log", self.echo, env)
                self.children.append(child)
                child.start()
                wait_until_ready(child, ready_url, timeout)
        except BaseException:
            self.stop()
            raise

    def dead_child(self) -> Child | None:
        return next((c for c in self.children if not c.alive()), None)

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def keep_metrics(self) -> None:
        """Each running server's last /metrics, kept beside its log (NAME.metrics): what it
        counted is still there to read after the stack is gone (the tests check its labels)."""
        for name, port in (
            ("authz", self.ports.authz_http),
            ("ratelimit", self.ports.ratelimit_http),
        ):
            child = next((c for c in self.children if c.name == name and c.alive()), None)
            if child is None:
                continue
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/metrics", timeout=2
                ) as answer:
                    (self.workdir / f"{name}.metrics").write_bytes(answer.read())
            except OSError:
                continue  # best effort: a server that cannot answer has nothing to keep

    def stop(self) -> None:
        self.keep_metrics()
        # front to back: Envoy stops taking requests before the servers behind it go away
        for child in reversed(self.children):
            child.stop()
        self.children = []

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
