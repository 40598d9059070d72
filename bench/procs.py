"""Processes under measurement: started and stopped by maas_demo.processes (as the demo and the
tests start theirs), and read here for CPU time and memory."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from maas_demo.processes import (
    free_port,
    http_ok,
    log_tail,
    spawn_logged,
    stop_process_group,
    wait_until_ready,
)

__all__ = ["Service", "cpu_seconds", "free_port", "http_get", "process_tree", "rss_bytes"]

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _parents() -> dict[int, list[int]]:
    """pid -> child pids, from /proc/*/stat (no /proc/<pid>/task/*/children on every kernel)."""
    out: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            out.setdefault(ppid, []).append(int(stat.parent.name))
    return out


def process_tree(pid: int) -> list[int]:
    """`pid` and every live descendant (worker processes are counted with their supervisor)."""
    children = _parents()
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` and its live descendants, all threads included."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` and its live descendants."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{member}/statm").read_text().split()[1]) * PAGE
    return total


def http_get(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback
        return str(response.read().decode())


class Service:
    """A server process for the duration of a benchmark; output goes to `log`."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        *,
        ready_url: str | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        self.ready_url = ready_url
        self.port = port
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def launch(self) -> Service:
        """Starts the process without waiting for it to serve (the caller knows how to tell)."""
        self.process = spawn_logged(
            self.argv, self.log, env={**os.environ, **(self.env or {})}, banner=self.name
        )
        return self

    def start(self, timeout: float = 60.0) -> Service:
        self.launch()
        assert self.process is not None
        try:
            wait_until_ready(
                self.process,
                self._serving,
                name=self.name,
                log_file=self.log,
                timeout=timeout,
                interval=0.05,
                not_ready=lambda: f"not serving after {timeout}s",
                exited_note=" at start-up",
                log_lines=30,
            )
        except RuntimeError:
            self.stop()
            raise
        return self

    def _serving(self) -> bool:
        if self.ready_url is not None:
            return http_ok(self.ready_url)
        assert self.port is not None
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1):
            return True
        return False

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def tail(self, lines: int = 30) -> str:
        return log_tail(self.log, lines)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (the server drains), then SIGKILL for its whole process group."""
        if self.process is not None:
            stop_process_group(self.process, grace=timeout)

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
