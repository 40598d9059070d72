"""`make bench-usage`: see the package's docstring."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from bench.usage import __doc__ as PACKAGE_DOC
from bench.usage.children import Children
from bench.usage.constants import (
    DEFAULT_OUT,
    Json,
)
from bench.usage.measure import Params, measure
from bench.usage.report import loadavg, machine, render


async def bench(args: argparse.Namespace) -> Json:
    params = (
        Params(
            rounds=1, stream_requests=25, stream_events=50, stream_delay_ms=2, json_requests=100,
            json_bytes=4096, bulk_mb=20, bulk_event_bytes=16384, bulk_requests=2,
            cpu_only_requests=15, warmup=3,
        )
        if args.quick
        else Params(
            rounds=2, stream_requests=100, stream_events=100, stream_delay_ms=2,
            json_requests=300, json_bytes=4096, bulk_mb=20, bulk_event_bytes=16384,
            bulk_requests=5, cpu_only_requests=40, warmup=10,
        )
    )  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="usage-bench-"))
    children = Children(work)
    report: Json = {"machine": machine(), "params": asdict(params), "work_dir": str(work)}
    started = time.monotonic()
    try:
        _, upstream = children.role("upstream", "upstream")
        print(f"work dir {work}; upstream on {upstream}", flush=True)
        print("performance:", flush=True)
        report.update(await measure(children, work, upstream, params))
    finally:
        children.stop_all()
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    report["machine"]["loadavg_end"] = loadavg()
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=(PACKAGE_DOC or "").split("\n\n")[0] or None)
    parser.add_argument("--quick", action="store_true", help="fewer requests (under a minute)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON")
    parser.add_argument(
        "--keep-work", action="store_true", help="keep the work dir (Envoy configs and logs)"
    )
    args = parser.parse_args()
    # SIGTERM → SystemExit, so the finally blocks stop every child
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report = asyncio.run(bench(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print()
    print(render(report))
    print()
    print(f"machine: {report['machine']}")
    print(f"elapsed {report['elapsed_s']} s; JSON written to {args.out}")


if __name__ == "__main__":
    main()
