"""What every scenario gets: sizes for the mode (quick or full), a work directory, processes."""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import Service, free_port

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


@dataclass(frozen=True)
class Sizes:
    rounds: int  # baseline and subject alternate this many times; medians are reported
    saturation_requests: int
    fixed_rate: float  # calls/s offered to one gRPC server for the latency figures
    fixed_seconds: float
    warmup_requests: int
    e2e_saturation_requests: int
    e2e_fixed_rate: float  # requests/s offered to Envoy for the end-to-end latency figures
    e2e_fixed_seconds: float
    identities: int  # scenario 5
    buckets: int
    concurrent_new_token: int  # scenario 2
    cold_checks: int

    @classmethod
    def quick(cls) -> Sizes:
        return cls(1, 3000, 500, 1.0, 300, 2000, 300, 1.0, 10_000, 10_000, 100, 5)

    @classmethod
    def full(cls) -> Sizes:
        return cls(5, 20_000, 1000, 5.0, 2000, 10_000, 300, 5.0, 100_000, 100_000, 100, 30)


@dataclass
class Context:
    quick: bool
    workdir: Path
    sizes: Sizes
    log: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr))
    _stack: ExitStack = field(default_factory=ExitStack)

    def path(self, name: str) -> Path:
        path = self.workdir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def service(
        self,
        name: str,
        argv: list[str],
        *,
        ready_url: str | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
    ) -> Service:
        """Starts a process that lives until the scenario's `services()` block ends."""
        service = Service(
            name, argv, self.path(f"logs/{name}.log"), ready_url=ready_url, port=port, env=env
        )
        service.start()
        self._stack.callback(service.stop)
        return service

    @contextmanager
    def services(self) -> Iterator[None]:
        with self._stack:
            yield
        self._stack = ExitStack()

    def noop_server(self, kind: str, *extra: str) -> tuple[Service, int]:
        """A do-nothing server (bench/noop_servers.py; `extra`: its options) on a free port."""
        port = free_port()
        argv = [PYTHON, "-m", "bench.noop_servers", kind, str(port), *extra]
        return self.service(f"noop-{kind}", argv, port=port), port


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
