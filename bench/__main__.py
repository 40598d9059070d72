"""`make bench [ARGS=--quick]`: the policy plane measured against its own floor.

    .venv/bin/python -m bench [--quick] [--only NAME ...] [--out DIR]

Every figure is paired with a baseline measured in the same run on the same machine and reported
as a ratio; floors from issue 6 are checked and shown, but a missed floor does not fail the run
(benchmarks are not tests). Prints a table; writes bench.json and bench.png into the output
directory (default .bench/latest) and prints their paths. Processes' logs: <out>/work/logs/.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import servers
from bench.context import REPO, Context, Sizes
from bench.end_to_end import end_to_end
from bench.kubernetes import check_kubernetes
from bench.load import find_h2load
from bench.memory import memory
from bench.noop_servers import EVENT_LOOP_ENV
from bench.report import Figure, table, write_chart, write_json
from maas_authz.api_keys import hash_key
from tests.support.postgres_server import gateway_dsn, insert_key, maas_api_database
from tests.support.redis_server import RedisServer

Scenario = Callable[[Context], list[Figure]]


def _ratelimit_memory(ctx: Context) -> list[Figure]:
    return servers.should_rate_limit(ctx, None)


def _ratelimit_redis(ctx: Context) -> list[Figure]:
    with RedisServer(ctx.path("redis")) as redis:
        return servers.should_rate_limit(ctx, redis.url)


def _check_api_key(ctx: Context) -> list[Figure]:
    figures = servers.check_api_key(ctx)
    database = maas_api_database()
    try:
        insert_key(
            database,
            key_id="bench",
            username="demo-oai",
            key_hash=hash_key(servers.DEMO_API_KEY) or "",
            groups=["demo-team", "system:authenticated"],
            subscription="demo-basic",
        )
        return figures + servers.check_api_key(ctx, gateway_dsn(database))
    finally:
        database.cleanup()


SCENARIOS: dict[str, Scenario] = {
    "check-static": servers.check_static_key,
    "check-api-key": _check_api_key,
    "check-workers": servers.check_workers,
    "kubernetes": check_kubernetes,
    "ratelimit-memory": _ratelimit_memory,
    "ratelimit-redis": _ratelimit_redis,
    "end-to-end": end_to_end,
    "memory": memory,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small runs, under a minute")
    parser.add_argument("--only", nargs="+", choices=sorted(SCENARIOS), help="run only these")
    parser.add_argument("--out", type=Path, default=REPO / ".bench" / "latest")
    parser.add_argument(
        "--noop-event-loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop of the do-nothing servers (default asyncio: the floor as issue 6 "
        "defines it; our servers run on uvloop unless configured otherwise)",
    )
    args = parser.parse_args(argv)
    os.environ[EVENT_LOOP_ENV] = args.noop_event_loop  # the do-nothing servers read it

    find_h2load()  # fail before starting anything
    out: Path = args.out.resolve()  # scenarios hand paths to processes in other directories
    shutil.rmtree(out / "work", ignore_errors=True)
    (out / "work").mkdir(parents=True, exist_ok=True)
    ctx = Context(
        quick=args.quick,
        workdir=out / "work",
        sizes=Sizes.quick() if args.quick else Sizes.full(),
    )
    started = time.monotonic()
    figures: list[Figure] = []
    failed: list[str] = []
    counts: dict[str, int] = {}
    for name in args.only or list(SCENARIOS):
        ctx.log(f"== {name}")
        try:
            produced = SCENARIOS[name](ctx)
        except Exception as exc:  # one broken scenario must not hide the others' figures
            ctx.log(f"{name} FAILED: {exc}")
            failed.append(name)
            continue
        counts[name] = len(produced)
        figures += produced
    elapsed = time.monotonic() - started

    print(table(figures))
    missed = [f for f in figures if f.met is False]
    print(
        f"\n{len(figures)} figures in {elapsed:.0f}s ({'quick' if args.quick else 'full'} mode); "
        f"floors missed: {len(missed)}; scenarios failed: {', '.join(failed) or 'none'}; "
        f"do-nothing servers on {args.noop_event_loop}"
    )
    json_path, png_path = out / "bench.json", out / "bench.png"
    mode = "quick" if args.quick else "full"
    write_json(
        json_path,
        figures,
        {
            "mode": mode,
            "seconds": elapsed,
            "noop_event_loop": args.noop_event_loop,
            "scenarios": counts,
            "failed": failed,
        },
    )
    write_chart(png_path, figures)
    print(f"wrote {json_path}\nwrote {png_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
