"""A throwaway redis-server on a loopback port, for tests (Debian's ``redis-server`` package).

No persistence (``--save "" --appendonly no``): a restart starts empty, as after a crash. The
server runs in its own process group; :meth:`RedisServer.stop` terminates it and
:meth:`RedisServer.start` brings it back on the same port, so a client's URL stays valid across
a kill-and-restart. Live servers are stopped at interpreter exit.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import tempfile

from maas_demo.processes import (
    LiveSet,
    free_port,
    spawn_logged,
    stop_process_group,
    wait_until_ready,
)

__all__ = ["RedisServer", "find_redis_server"]

_STOP_GRACE = 10.0  # seconds redis-server gets to exit after SIGTERM, before SIGKILL
_LOG_TAIL_LINES = 30  # lines of the log quoted in error messages


def find_redis_server(binary: str = "redis-server") -> str | None:
    """The path of the redis-server binary, or None if it is not installed."""
    found = shutil.which(binary)
    if found is None and os.access(binary, os.X_OK):
        found = binary
    return found


def _ping(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


_LIVE: LiveSet[RedisServer] = LiveSet("cleanup")  # servers still running are cleaned up at exit


class RedisServer:
    """redis-server on 127.0.0.1; ``port=0`` picks a free port at the first start."""

    def __init__(
        self,
        workdir: pathlib.Path | None = None,
        *,
        port: int = 0,
        binary: str = "redis-server",
        ready_timeout: float = 20.0,
    ) -> None:
        self.binary = binary
        self.port = port
        self.ready_timeout = ready_timeout
        self._own_workdir = workdir is None
        self.workdir = pathlib.Path(workdir or tempfile.mkdtemp(prefix="maas-redis-")).resolve()
        self.log_file = self.workdir / "redis-server.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("call start() first")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start (or restart, on the same port); block until it answers PING, or raise."""
        if self.running:
            return
        binary = find_redis_server(self.binary)
        if binary is None:
            raise RuntimeError(
                f"{self.binary!r} not found: install Debian's redis-server package "
                "(apt-get install redis-server)"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        # A port picked here may be taken before redis-server binds it: pick again, but only
        # at the first start (a restart must keep its port).
        attempts = 3 if not self.port else 1
        for attempt in range(attempts):
            if not self.port or attempt:
                self.port = free_port()
            try:
                self._spawn(binary)
                self._wait_ready()
                return
            except RuntimeError as exc:
                self.stop()
                if attempt + 1 == attempts or "Address already in use" not in str(exc):
                    raise

    def stop(self) -> None:
        """SIGTERM (SIGKILL if it does not exit) and wait. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            # The whole group, in case the leader is gone but something it started is not.
            stop_process_group(proc, grace=_STOP_GRACE)
        _LIVE.discard(self)

    def cleanup(self) -> None:
        """Stop, and remove the working directory if this object created it."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _spawn(self, binary: str) -> None:
        args = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--daemonize", "no",
        ]  # fmt: skip
        self._proc = spawn_logged(args, self.log_file, cwd=self.workdir)
        _LIVE.add(self)

    def _wait_ready(self) -> None:
        assert self._proc is not None
        wait_until_ready(
            self._proc,
            lambda: _ping(self.port),
            name="redis-server",
            log_file=self.log_file,
            timeout=self.ready_timeout,
            interval=0.02,
            not_ready=lambda: (
                f"on port {self.port} not answering PING after {self.ready_timeout:.0f}s"
            ),
            log_lines=_LOG_TAIL_LINES,
        )
