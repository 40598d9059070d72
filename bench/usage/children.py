"""The processes of one usage-bench run (upstream, ext_proc servers, Envoys), as bench.procs
Services: started in their own process groups, all stopped at the end."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.procs import Service, free_port
from bench.usage.constants import REPO


class Children:
    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.services: list[Service] = []

    def launch(self, name: str, argv: Sequence[str]) -> Service:
        """A process whose readiness the caller checks itself (Envoy: its admin address file)."""
        service = Service(name, argv, self.logs / f"{name}.log").launch()
        self.services.append(service)
        return service

    def role(self, role: str, name: str, *extra: str, port: int = 0) -> tuple[Service, int]:
        """`python -m bench.usage.<role>` on `port` (a free one by default), once it listens."""
        port = port or free_port()
        argv = [sys.executable, "-m", f"bench.usage.{role}", "--port", str(port), *extra]
        # the repository on the path: the child imports bench.usage as this process does
        env = {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        }
        service = Service(name, argv, self.logs / f"{name}.log", port=port, env=env)
        self.services.append(service)
        try:
            service.start(timeout=30)
        except RuntimeError:
            self.services.remove(service)
            raise
        return service, port

    def stop(self, service: Service, sig: int = signal.SIGTERM) -> None:
        if sig == signal.SIGKILL and service.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(service.pid, signal.SIGKILL)
        service.stop(timeout=5)
        if service in self.services:
            self.services.remove(service)

    def stop_all(self) -> None:
        for service in list(reversed(self.services)):
            self.stop(service)
