"""`make soak`: mixed traffic through the real Envoy for a long while, watching memory and file
descriptors of every process of the stack (docs/operations.md, "Soak").

    python -m bench.soak [--minutes 10] [--rate 60] [--sample 30] [--topology one-hop]

The demo stack (Envoy, maas-authz, maas-ratelimit on the memory store, the demo model; with
`--topology one-hop`, maas-authz limiting inline instead of maas-ratelimit) on free ports, and
a paced mix of requests: allowed (premium, enterprise, subscription keys), denied (no key, a
wrong key, a key without access), streamed answers (with and without
`include_usage`), and over-limit ones (the free tier's 5 requests per 2 minutes are spent in the
first seconds). Every `--sample` seconds: RSS and open file descriptors per process. At the end:
the answers by status, and each process's growth from the first sample after the warm-up (90 s;
the request id window is 1 minute here, see REQUEST_ID_TTL) to the last. Exit status 1 when a
process grew by more than 10 % of RSS or 10 descriptors (not a test: a machine's noise can show
here; read the figures).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
import yaml

from maas_demo.stack import CONFIG_DIR, TOPOLOGIES, LocalStack, Ports

CHAT = "/llm/tiny/v1/chat/completions"
# maas-ratelimit remembers each request id for store.request_id_ttl (de-duplication of retried
# charges; 10 min by default, about 9 MB at 60/s): the soak sets 1 min, so that this window fills
# during the warm-up and any growth after it is something else
REQUEST_ID_TTL = "1m"
WARMUP_SECONDS = 90
RSS_GROWTH = 0.10
FD_GROWTH = 10


@dataclass(frozen=True)
class Kind:
    name: str
    key: str | None
    path: str
    body: dict[str, object]


def _chat(max_tokens: int, **extra: object) -> dict[str, object]:
    messages = [{"role": "user", "content": "hello there"}]
    return {"model": "tiny", "messages": messages, "max_tokens": max_tokens, **extra}


MIX = [
    (30, Kind("allowed", "sk-demo-enterprise", CHAT, _chat(8))),
    (15, Kind("allowed", "sk-demo-premium", CHAT, _chat(8))),
    (10, Kind("allowed", "sk-oai-demobasic_DemoBasicSecret1", "/v1/chat/completions", _chat(8))),
    (15, Kind("streamed", "sk-demo-enterprise", CHAT, _chat(16, stream=True))),
    (
        5,
        Kind(
            "streamed",
            "sk-demo-premium",
            CHAT,
            _chat(16, stream=True, stream_options={"include_usage": True}),
        ),
    ),
    (10, Kind("over limit", "sk-demo-free", CHAT, _chat(4))),
    (5, Kind("denied", None, CHAT, _chat(4))),
    (5, Kind("denied", "sk-demo-wrong", CHAT, _chat(4))),
    (5, Kind("denied", "sk-demo-noaccess", CHAT, _chat(4))),
]


@dataclass
class Sample:
    at: float
    rss_kib: dict[str, int]
    fds: dict[str, int]


@dataclass
class Soak:
    answers: Counter[tuple[str, str]] = field(default_factory=Counter)
    samples: list[Sample] = field(default_factory=list)


def _rss_kib(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def sample(stack: LocalStack, started: float) -> Sample:
    pids = {c.name: c.process.pid for c in stack.children if c.process is not None}
    return Sample(
        time.monotonic() - started,
        {name: _rss_kib(pid) for name, pid in pids.items()},
        {name: _fds(pid) for name, pid in pids.items()},
    )


async def one(session: aiohttp.ClientSession, url: str, kind: Kind, soak: Soak) -> None:
    headers = {"Authorization": f"Bearer {kind.key}"} if kind.key else {}
    try:
        async with session.post(url + kind.path, json=kind.body, headers=headers) as answer:
            await answer.read()
            soak.answers[(kind.name, str(answer.status))] += 1
    except (aiohttp.ClientError, TimeoutError) as error:
        soak.answers[(kind.name, type(error).__name__)] += 1


async def traffic(stack: LocalStack, seconds: float, rate: float, every: float) -> Soak:
    soak = Soak()
    weights = [w for w, _ in MIX]
    kinds = [k for _, k in MIX]
    chooser = random.Random(7)
    started = time.monotonic()
    next_sample = started
    timeout = aiohttp.ClientTimeout(total=30)
    pending: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(timeout=timeout) as session:
        sent = 0
        while (now := time.monotonic()) < started + seconds:
            if now >= next_sample:
                soak.samples.append(sample(stack, started))
                print(_sample_line(soak.samples[-1]), flush=True)
                next_sample += every
            kind = chooser.choices(kinds, weights)[0]
            task = asyncio.create_task(one(session, stack.gateway_url, kind, soak))
            pending.add(task)
            task.add_done_callback(pending.discard)
            sent += 1
            await asyncio.sleep(max(0.0, started + sent / rate - time.monotonic()))
        await asyncio.gather(*pending)
    soak.samples.append(sample(stack, started))
    print(_sample_line(soak.samples[-1]), flush=True)
    return soak


def _sample_line(s: Sample) -> str:
    parts = [f"{name} {s.rss_kib[name] / 1024:.1f} MB/{s.fds[name]} fd" for name in s.rss_kib]
    return f"{s.at:7.0f} s  " + "  ".join(parts)


def report(soak: Soak) -> bool:
    print("\nanswers:")
    for (kind, status), count in sorted(soak.answers.items()):
        print(f"  {kind:<11} {status:<22} {count}")
    baseline = next((s for s in soak.samples if s.at >= WARMUP_SECONDS), soak.samples[0])
    last = soak.samples[-1]
    flat = True
    print(f"\ngrowth from {baseline.at:.0f} s to {last.at:.0f} s:")
    for name in last.rss_kib:
        rss0, rss1 = baseline.rss_kib[name], last.rss_kib[name]
        fd0, fd1 = baseline.fds[name], last.fds[name]
        growth = (rss1 - rss0) / rss0 if rss0 else 0.0
        ok = growth <= RSS_GROWTH and fd1 - fd0 <= FD_GROWTH
        flat &= ok
        print(
            f"  {name:<10} RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MB ({growth:+.1%}), "
            f"fds {fd0} -> {fd1}  {'flat' if ok else 'GREW'}"
        )
    return flat


def raise_limits(stack: LocalStack) -> None:
    """Premium and enterprise limits out of the way, so that most allowed requests reach the
    model (the free tier keeps its 5 per 2 minutes: the over-limit part of the mix). Through the
    limits file's hot reload, on the stack's own copy of the demo config."""
    path = stack.workdir / "config" / "limits.yaml"
    limits = yaml.safe_load(path.read_text())
    for limit in limits["limits"]:
        if limit["tier"] in ("premium", "enterprise"):
            limit["limit"] = 10**6 if limit["kind"] == "requests" else 10**9
    path.write_text(yaml.safe_dump(limits))
    time.sleep(3.0)  # the demo's reload_interval is 2 s


def ratelimit_config(workdir: pathlib.Path) -> pathlib.Path:
    """The demo's ratelimit.yaml with the soak's request id window; its files are the stack's
    own copies (LocalStack copies the demo config into workdir/config at start)."""
    config = yaml.safe_load((CONFIG_DIR / "ratelimit.yaml").read_text())
    config["store"]["request_id_ttl"] = REQUEST_ID_TTL
    config["limits"]["file"] = str(workdir / "config" / "limits.yaml")
    config["ledger"]["url"] = f"sqlite:///{workdir / 'ledger.db'}"
    config["ledger"]["spool_dir"] = str(workdir / "ledger-journal")
    path = workdir / "soak-ratelimit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=60.0, help="requests per second")
    parser.add_argument("--sample", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--topology", choices=TOPOLOGIES, default="two-hop")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="maas-soak-") as work:
        workdir = pathlib.Path(work)
        stack = LocalStack(
            workdir,
            Ports.free(),
            ratelimit_config=ratelimit_config(workdir),
            topology=args.topology,
        )
        stack.start()
        try:
            raise_limits(stack)
            print(
                f"soak: {args.minutes} min at {args.rate}/s through {stack.gateway_url} "
                f"({args.topology})"
            )
            soak = asyncio.run(traffic(stack, args.minutes * 60, args.rate, args.sample))
            dead = stack.dead_child()
            if dead is not None:
                print(f"{dead.name} died:\n{dead.log_tail()}", file=sys.stderr)
                return 1
        finally:
            stack.stop()
    return 0 if report(soak) else 1


if __name__ == "__main__":
    sys.exit(main())
