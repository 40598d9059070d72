"""Scenario 5, memory: RSS with `Sizes.identities` cached identities, `Sizes.buckets` buckets.

Every RSS figure is paired with the same process before it holds anything (idle, after warm-up
calls), so the ratio shows what the data costs; bytes per entry, (loaded - idle) / entries, is a
figure of its own. Issue 6's floors (<= 300 MB with 100k of each) apply to the loaded RSS itself,
and only at 100k: quick mode measures 10k and checks no floor.

Buckets: a real maas-ratelimit process (memory store) on loopback. Warm-up calls for a tier
without limits store nothing (its `maas_ratelimit_buckets` gauge must still read 0); then idle RSS,
then an admission for each of N distinct users (tier enterprise, model llm/tiny, a request id and
a token reservation: Envoy's admission descriptor) over gRPC, from a grpc.aio client with many
calls in flight over a few channels (h2load sends one body only). Each user gets a requests and a
tokens bucket; the gauge must then read exactly 2 x N before RSS is read.
- One call carries USERS_PER_CALL users' descriptors. Envoy sends one per request, but the server
  then spends ~400 us of CPU per call, which for 100k users is most of a minute on one core (the
  server is the bottleneck; more client processes would not help). Several descriptors in a call
  go through the same limiter and store and leave the same buckets; only per-call work, which
  leaves nothing behind, is shared.
- MEMORY_LIMITS has day-long windows because the memory store drops a bucket once it has refilled:
  under BENCH_LIMITS (10^9 per second) that is 1 ms after the call, under the platform's defaults
  (enterprise: 50 requests per 2m) 2.4 s after it. "100k live buckets" thus means 100k users
  active within such a span; what a bucket costs does not depend on the limit values.

Identities: the real path needs one TokenReview per new token, i.e. 100k ServiceAccount tokens
minted by an API server, and 100k TokenReviews and SubjectAccessReviews answered by it, which the
tests' throwaway kube-apiserver cannot do in the time a benchmark has. So a child process
(bench/memory_probe.py) builds maas-authz with `maas_authz.app.build_app` and the default
configuration, replacing only the Kubernetes transport with an in-process fake that answers as
kube-apiserver does; review parsing, both caches (default sizes and TTLs) and CheckPipeline are the
server's own. It runs one Check per distinct ~970-byte JWT-shaped token through `pipeline.decide`,
reads its own VmRSS before and after, and checks that both caches hold one entry per user. A real
maas-authz (static keys, idle) is started as well, to show the probe idles like a server.

Redis store: the buckets live in Redis, not in maas-ratelimit. Its figure is Redis's `used_memory`
before and after as many users are admitted through the real RateLimiter and RedisBucketStore
(from `maas_ratelimit.app.build_app`) in this process, USERS_PER_REDIS_CALL users per limiter call:
no gRPC, the store is what holds the data. DBSIZE must then be 2 x N. No floor applies to it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import grpc
import redis.asyncio as aioredis
from envoy.service.ratelimit.v3 import rls_pb2

from bench.context import PYTHON, REPO, Context
from bench.report import Figure, Floor
from bench.servers import DEMO_CONFIG, RLS_PATH, metric_total, start_authz, start_ratelimit
from maas_ratelimit.app import build_app as build_ratelimit
from maas_ratelimit.config import RateLimitConfig
from maas_ratelimit.descriptors import Descriptor
from tests.support.redis_server import RedisServer

MB = 1e6
FLOOR_ENTRIES = 100_000  # issue 6: <= 300 MB with 100k of each
FLOOR_MB = 300.0
TIER_NAMESPACE = "maas-default-gateway-tier-enterprise"
LIMITS_PER_USER = 2

MEMORY_LIMITS = """\
# Day-long windows: one call leaves each bucket short for minutes, so none is dropped as full
# before the RSS is read (see bench/memory.py).
domain: maas
limits:
  - {name: enterprise-requests, tier: enterprise, kind: requests, limit: 100, window: 1d}
  - {name: enterprise-tokens, tier: enterprise, kind: tokens, limit: 100000, window: 1d}
"""
RESERVATION = {"reserve_prompt": "200", "reserve_completion": "300"}
# Users per ShouldRateLimit call (one descriptor each) and per limiter call on Redis: Envoy sends
# one admission descriptor per request, but the server's per-call overhead would then take most
# of a minute for 100k users; the buckets left behind are the same (see the module docstring).
USERS_PER_CALL = 4
USERS_PER_REDIS_CALL = 16


def user(n: int) -> str:
    return f"system:serviceaccount:{TIER_NAMESPACE}:user-{n}"


def admission_entries(tier: str, username: str) -> dict[str, str]:
    """Envoy's admission descriptor: tier, user, model, request id (from ext_authz), reservation."""
    entries = {"tier": tier, "user": username, "model": "llm/tiny"}
    return entries | {"request_id": secrets.token_hex(12), **RESERVATION}


def admission(tier: str, usernames: Sequence[str]) -> rls_pb2.RateLimitRequest:
    """One call carrying the admission descriptors of `usernames`' requests."""
    request = rls_pb2.RateLimitRequest(domain="maas", hits_addend=1)
    for username in usernames:
        descriptor = request.descriptors.add()
        for key, value in admission_entries(tier, username).items():
            descriptor.entries.add(key=key, value=value)
    return request


def _batches(names: Iterable[str], size: int) -> Iterator[list[str]]:
    remaining = iter(names)
    while batch := list(itertools.islice(remaining, size)):
        yield batch


async def _admit_all(
    port: int, tier: str, users: Iterable[str], *, channels: int = 4, in_flight: int = 128
) -> tuple[int, int]:
    """ShouldRateLimit for every user, USERS_PER_CALL a call, `in_flight` calls at a time.

    Returns (calls, calls not answered OK).
    """
    opened = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(channels)]
    methods = [channel.unary_unary(RLS_PATH) for channel in opened]  # bytes in, bytes out
    todo = _batches(users, USERS_PER_CALL)
    counts = {"calls": 0, "refused": 0}

    async def caller(method: Any) -> None:
        for batch in todo:  # shared: each user is taken by exactly one caller
            body = admission(tier, batch).SerializeToString()
            answer = rls_pb2.RateLimitResponse.FromString(await method(body, timeout=60))
            counts["calls"] += 1
            if answer.overall_code != rls_pb2.RateLimitResponse.OK:
                counts["refused"] += 1

    try:
        await asyncio.gather(*(caller(methods[i % channels]) for i in range(in_flight)))
    finally:
        for channel in opened:
            await channel.close()
    return counts["calls"], counts["refused"]


def _admit(port: int, tier: str, users: Iterable[str]) -> None:
    calls, refused = asyncio.run(_admit_all(port, tier, users))
    if refused:
        raise RuntimeError(f"{refused} of {calls} admission calls were not answered OK")


@dataclass(frozen=True)
class Measured:
    """One process's memory before and after it holds `entries` things."""

    idle: float  # bytes
    loaded: float
    entries: int
    seconds: float  # to load them

    @property
    def per_entry(self) -> float:
        return (self.loaded - self.idle) / self.entries


def _figures(
    scenario: str,
    what: str,
    entry: str,
    measured: Measured,
    baseline_name: str,
    *,
    unit: str = "RSS",
    checked: bool = True,
) -> list[Figure]:
    """`unit` loaded vs idle (the floor applies to it at 100k entries), and bytes per `entry`."""
    floor, note = None, ""
    if checked and measured.entries >= FLOOR_ENTRIES:
        floor = Floor("<=", FLOOR_MB)
    elif checked:
        note = f"floor (<= {FLOOR_MB:g} MB) applies at {FLOOR_ENTRIES:,}: full mode"
    return [
        Figure(scenario, f"{unit} with {what}", "MB", measured.loaded / MB, measured.idle / MB,
               baseline_name, floor, on_ratio=False, note=note),
        Figure(scenario, f"bytes per {entry}", "B", measured.per_entry,
               note=f"(loaded - idle) / {measured.entries:,}; loaded in {measured.seconds:.1f}s"),
    ]  # fmt: skip


def buckets(ctx: Context) -> list[Figure]:
    users = ctx.sizes.buckets
    with ctx.services():
        side = start_ratelimit(ctx, "maas-ratelimit (memory, buckets)", "memory", MEMORY_LIMITS)
        server, grpc_port, http_port = side.service, side.port, side.http_port
        _admit(grpc_port, "free", (f"warm-up-{n}" for n in range(500)))  # no limits: no buckets
        held = metric_total(http_port, "maas_ratelimit_buckets")
        if held != 0:
            raise RuntimeError(f"{held:g} buckets held after the warm-up, expected none")
        time.sleep(0.5)
        idle = server.rss()
        started = time.monotonic()
        _admit(grpc_port, "enterprise", (user(n) for n in range(users)))
        seconds = time.monotonic() - started
        held = metric_total(http_port, "maas_ratelimit_buckets")
        if held != LIMITS_PER_USER * users:
            raise RuntimeError(
                f"maas_ratelimit_buckets = {held:g}, expected {LIMITS_PER_USER * users}"
            )
        loaded = server.rss()
    ctx.log(
        f"buckets: {users:,} users in {seconds:.1f}s ({users / seconds:,.0f} users/s, "
        f"{USERS_PER_CALL} a call), RSS {idle / MB:.0f} -> {loaded / MB:.0f} MB"
    )
    measured = Measured(idle, loaded, round(held), seconds)
    return _figures(
        "Memory, maas-ratelimit (memory store)",
        f"{round(held):,} live buckets ({users:,} users)",
        "bucket",
        measured,
        "same process, idle",
    )


def identities(ctx: Context) -> list[Figure]:
    count = ctx.sizes.identities
    with ctx.services():
        real = start_authz(ctx, "maas-authz (static keys, idle)", str(DEMO_CONFIG / "authz.yaml"))
        time.sleep(0.5)
        real_idle = real.service.rss()
    with ctx.path("logs/memory-probe.log").open("w") as log:
        run = subprocess.run(
            [PYTHON, "-m", "bench.memory_probe", str(count)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            timeout=300,
            check=True,
        )
    result: dict[str, Any] = json.loads(run.stdout)
    reviews = result["kubernetes_calls"]
    if reviews.get("tokenreview") != count + result["warmup"]:
        raise RuntimeError(f"expected one TokenReview per distinct token, got {reviews}")
    held = min(result["identities"], result["access_decisions"])
    if result["identities"] != count or result["access_decisions"] != count:
        ctx.log(
            f"identities: caches hold {result['identities']:,} identities and "
            f"{result['access_decisions']:,} access decisions after {count:,} users "
            f"(max_entries {result['max_entries']})"
        )
    ctx.log(
        f"identities: {count:,} Checks in {result['seconds']:.1f}s, RSS "
        f"{result['idle_rss'] / MB:.0f} -> {result['loaded_rss'] / MB:.0f} MB; a real "
        f"maas-authz idles at {real_idle / MB:.0f} MB"
    )
    measured = Measured(result["idle_rss"], result["loaded_rss"], held, result["seconds"])
    note = (
        f"identities and access decisions, one each per user; ~{result['token_length']}-byte "
        f"tokens; a real maas-authz (static keys) idles at {real_idle / MB:.0f} MB"
    )
    rss, per_user = _figures(
        "Memory, maas-authz caches (in-process pipeline, fake Kubernetes transport)",
        f"{held:,} cached identities",
        "cached user (identity + access decision)",
        measured,
        "same process, idle",
    )
    return [rss, replace(per_user, note=f"{per_user.note}; {note}")]


async def _redis_load(url: str, limits_file: str, users: int) -> tuple[float, float, int, float]:
    config = RateLimitConfig.model_validate(
        {
            "limits": {"file": limits_file},
            # 2s, not 50ms, per operation: a shared benchmark machine may stall this process
            "store": {"type": "redis", "redis": {"url": url, "timeout": "2s"}},
        }
    )
    app = build_ratelimit(config, REPO)
    client = aioredis.Redis.from_url(url)
    try:
        before = float((await client.info("memory"))["used_memory"])
        todo = _batches((user(n) for n in range(users)), USERS_PER_REDIS_CALL)

        async def caller() -> None:
            for batch in todo:
                descriptors = [
                    Descriptor(admission_entries("enterprise", u), 1, False) for u in batch
                ]
                verdict = await app.limiter.decide("maas", descriptors)
                if verdict.over_limit:
                    raise RuntimeError(f"users {batch[0]}... were refused")

        started = time.monotonic()
        await asyncio.gather(*(caller() for _ in range(32)))
        seconds = time.monotonic() - started
        after = float((await client.info("memory"))["used_memory"])
        keys = int(await client.dbsize())
    finally:
        await client.aclose()
        await app.store.close()
    return before, after, keys, seconds


def redis_buckets(ctx: Context) -> list[Figure]:
    users = ctx.sizes.buckets
    limits = ctx.path("memory/limits.yaml")
    limits.write_text(MEMORY_LIMITS)
    with RedisServer(ctx.path("memory/redis")) as redis:
        before, after, keys, seconds = asyncio.run(_redis_load(redis.url, str(limits), users))
    if keys != LIMITS_PER_USER * users:
        raise RuntimeError(f"Redis holds {keys} keys, expected {LIMITS_PER_USER * users}")
    ctx.log(f"redis: {users:,} users in {seconds:.1f}s, used_memory {before / MB:.1f} -> "
            f"{after / MB:.1f} MB")  # fmt: skip
    measured = Measured(before, after, keys, seconds)
    return _figures(
        "Memory, Redis store (redis-server)",
        f"{keys:,} live buckets ({users:,} users)",
        "bucket",
        measured,
        "same Redis, empty",
        unit="used_memory",
        checked=False,
    )


def memory(ctx: Context) -> list[Figure]:
    """Scenario 5: buckets (memory store, then Redis), then cached identities."""
    return [*buckets(ctx), *redis_buckets(ctx), *identities(ctx)]
