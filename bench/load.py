"""Driving load with h2load (Debian's nghttp2-client) and reading what it saw.

h2load speaks HTTP/2 with prior knowledge, so it drives a gRPC server directly with a pre-encoded,
length-prefixed message, at a fraction of the CPU a Python client would need; it also drives
Envoy's HTTP listener. Its own CPU time is measured (wait4 rusage) and reported with every run, so
a table can show that the load generator was not the bottleneck. Latency percentiles come from
its per-request log (`--log-file`), since its summary gives only min/mean/max.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import Message


class LoadGeneratorMissing(RuntimeError):
    pass


def find_h2load() -> str:
    path = shutil.which("h2load")
    if path is None:
        raise LoadGeneratorMissing(
            "h2load not found: install Debian's nghttp2-client (scripts/install-test-packages.sh)"
        )
    return path


def grpc_frame(message: Message) -> bytes:
    """One gRPC message on the wire: uncompressed flag, 4-byte big-endian length, the bytes."""
    data: bytes = message.SerializeToString()
    return b"\x00" + len(data).to_bytes(4, "big") + data


GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")


@dataclass(frozen=True)
class Load:
    """What to offer: `rate` None = saturation (as fast as `clients` x `streams` allow)."""

    requests: int
    clients: int = 4
    streams: int = 16  # concurrent streams per connection
    rate: float | None = None  # total requests per second, spread over the clients
    # With `rate`: connect the clients one after another, 1/rate apart (to whole ms, h2load's
    # resolution), so that their paced requests interleave; otherwise every client's pacing timer
    # fires at once and requests arrive in bursts of `clients`.
    stagger: bool = False


@dataclass(frozen=True)
class LoadResult:
    requests: int
    succeeded: int  # streams completed (for gRPC also a 200 with grpc-status != 0)
    status_2xx: int
    failed: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    loadgen_cpu: float  # h2load's CPU seconds / wall seconds (1.0 = one core busy)


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


_STATUS_2XX = re.compile(r"status codes: (\d+) 2xx")
_FINISHED = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed"
)


def run_h2load(
    url: str,
    load: Load,
    *,
    body: bytes | None = None,
    headers: tuple[str, ...] = (),
    h1: bool = False,
) -> LoadResult:
    """Runs h2load once; raises if it could not run or every request failed."""
    with tempfile.TemporaryDirectory(prefix="bench-h2load-") as tmp:
        log_file = Path(tmp) / "requests.log"
        argv = [
            find_h2load(),
            "-n", str(load.requests),
            "-c", str(load.clients),
            "-m", "1" if load.rate else str(load.streams),
            "-t", "1",
            f"--log-file={log_file}",
        ]  # fmt: skip
        if load.rate:
            # --rps is per client; h2load paces each connection's request starts
            argv.append(f"--rps={load.rate / load.clients:.3f}")
            if load.stagger:
                argv += ["-r", "1", f"--rate-period={max(1, round(1000 / load.rate))}ms"]
        if h1:
            argv.append("--h1")
        if body is not None:
            body_file = Path(tmp) / "body.bin"
            body_file.write_bytes(body)
            argv += ["-d", str(body_file)]
        for header in headers:
            argv += ["-H", header]
        argv.append(url)
        out_file = Path(tmp) / "out.txt"
        started = time.perf_counter()
        with out_file.open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        text = out_file.read_text(errors="replace")
        totals = _REQUESTS.search(text)
        finished = _FINISHED.search(text)
        if proc.returncode != 0 or totals is None or finished is None:
            command = " ".join(argv)
            raise RuntimeError(f"h2load failed ({proc.returncode}): {command}\n{text[-2000:]}")
        seconds = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
        durations = []
        for line in log_file.read_text().splitlines():
            fields = line.split("\t")
            if len(fields) == 3 and fields[1].startswith("2"):
                durations.append(int(fields[2]) / 1000.0)
        durations.sort()
        succeeded = int(totals.group(2))
        if succeeded == 0:
            raise RuntimeError(f"h2load: no request succeeded against {url}\n{text[-2000:]}")
        return LoadResult(
            requests=int(totals.group(1)),
            succeeded=succeeded,
            status_2xx=int(m.group(1)) if (m := _STATUS_2XX.search(text)) else 0,
            failed=int(totals.group(3)),
            seconds=seconds,
            rps=float(finished.group(3)),
            p50_ms=_percentile(durations, 0.50),
            p90_ms=_percentile(durations, 0.90),
            p99_ms=_percentile(durations, 0.99),
            max_ms=durations[-1] if durations else float("nan"),
            loadgen_cpu=(usage.ru_utime + usage.ru_stime) / wall,
        )
