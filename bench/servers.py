"""Scenarios 1 and 3: one gRPC server against its do-nothing floor, driven by h2load directly.

Each round (`Sizes.rounds`) starts a fresh baseline and a fresh subject process, warms both up, and
measures each in turn (the first one alternating) so that drift on a shared machine hits both:
throughput at saturation (and the server's CPU per call over that run) and latency at a fixed
offered load. Medians over the rounds are reported. Fresh processes, because a process keeps its
pace for its lifetime (where its threads landed, its memory layout): on this 2-vCPU VM one
do-nothing process answers 7.6k calls/s round after round and the next 8.5k, so one pair of
processes per scenario let a single unlucky start move a ratio by 15 points.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.service.ratelimit.v3 import rls_pb2

from bench.context import PYTHON, REPO, Context, median
from bench.load import GRPC_HEADERS, Load, LoadResult, grpc_frame, run_h2load
from bench.procs import Service, free_port, http_get
from bench.report import Figure, Floor

CHECK_PATH = "/envoy.service.auth.v3.Authorization/Check"
RLS_PATH = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
DEMO_CONFIG = REPO / "src" / "maas_demo" / "config"
MODEL_PATH = "/llm/tiny/v1/chat/completions"
DEMO_API_KEY = "sk-oai-demobasic_DemoBasicSecret1"  # src/maas_demo/config/api-keys.yaml


def check_request(token: str, path: str = MODEL_PATH) -> external_auth_pb2.CheckRequest:
    """A CheckRequest as Envoy sends it for a chat completion (headers of a typical SDK)."""
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method = "POST"
    http.path = path
    http.host = "maas.example.com"
    http.scheme = "https"
    http.protocol = "HTTP/1.1"
    http.id = "8312519741238467201"
    http.headers.update(
        {
            ":authority": "maas.example.com",
            ":method": "POST",
            ":path": path,
            ":scheme": "https",
            "authorization": f"Bearer {token}",
            "content-type": "application/json",
            "content-length": "161",
            "accept": "application/json",
            "user-agent": "OpenAI/Python 1.99.0",
            "x-stainless-lang": "python",
            "x-forwarded-proto": "https",
            "x-request-id": "5c3b8e0e-6f0c-4a8e-9d57-3f7c2b7a1e41",
        }
    )
    source = request.attributes.source.address.socket_address
    source.address, source.port_value = "10.128.2.17", 51234
    return request


def admission_request(tier: str, user: str, model: str) -> rls_pb2.RateLimitRequest:
    """What Envoy sends before a request (envoy/gateway.yaml): one descriptor from maas-authz's
    metadata and the usage reader's reservation. h2load sends the same bytes every time, so every
    call carries one request id; the stores only remember ids of refused or charged requests, and
    these calls are all admitted."""
    descriptor = ratelimit_pb2.RateLimitDescriptor()
    for key, value in (
        ("tier", tier),
        ("user", user),
        ("model", model),
        ("request_id", "6f1c2a9e4b7d8c0e5a3f2b1d"),
        ("reserve_prompt", "42"),
        ("reserve_completion", "256"),
    ):
        descriptor.entries.add(key=key, value=value)
    return rls_pb2.RateLimitRequest(domain="maas", descriptors=[descriptor], hits_addend=1)


@dataclass
class Side:
    """One server of a pair: the process, where to call, and a check that it answered right."""

    name: str
    service: Service
    port: int  # gRPC
    http_port: int = 0  # /metrics; 0: none (the do-nothing servers)
    verify: Callable[[int], str | None] = lambda _sent: None  # error text, or None


@dataclass
class Runs:
    saturation: list[LoadResult] = field(default_factory=list)
    fixed: list[LoadResult] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)

    def rps(self) -> float:
        return median([r.rps for r in self.saturation])

    def cpu(self) -> float:
        return median(self.cpu_us)

    def p50(self) -> float:
        return median([r.p50_ms for r in self.fixed])

    def p99(self) -> float:
        return median([r.p99_ms for r in self.fixed])

    def loadgen(self) -> float:
        return max(r.loadgen_cpu for r in self.saturation)

    def sent(self) -> int:
        return sum(r.requests for r in (*self.saturation, *self.fixed))

    def extend(self, other: Runs) -> None:
        self.saturation += other.saturation
        self.fixed += other.fixed
        self.cpu_us += other.cpu_us

    def saturate(self, side: Side, url: str, load: Load, body: bytes) -> None:
        """One saturation run against `side`: its throughput, and its server's CPU per call."""
        before = side.service.cpu()
        result = run_h2load(url, load, body=body, headers=GRPC_HEADERS)
        self.cpu_us.append((side.service.cpu() - before) / result.succeeded * 1e6)
        self.saturation.append(result)


def compare(
    ctx: Context,
    scenario: str,
    start_baseline: Callable[[], Side],
    start_subject: Callable[[], Side],
    *,
    method_path: str,
    body: bytes,
    throughput_floor: float | None,
    cpu_floor: float | None = None,
    before_stop: Callable[[Side], None] = lambda _subject: None,
    baseline_body: bytes | None = None,
) -> list[Figure]:
    """The subject against the baseline, each started afresh every round by its `start_*`;
    `before_stop` sees each subject process after its round (e.g. to read its metrics). The
    baseline gets `baseline_body` where given, else the same `body`."""
    sizes = ctx.sizes
    base, ours = Runs(), Runs()
    warm = Load(sizes.warmup_requests)
    saturate = Load(sizes.saturation_requests)
    fixed = Load(round(sizes.fixed_rate * sizes.fixed_seconds), rate=sizes.fixed_rate)
    baseline_name = ""
    for index in range(sizes.rounds):
        baseline, subject = start_baseline(), start_subject()
        baseline_name = baseline.name
        pairs = [(baseline, Runs()), (subject, Runs())]
        for side, runs in pairs if index % 2 == 0 else pairs[::-1]:
            url = _url(side, method_path)
            sent = baseline_body if side is baseline and baseline_body is not None else body
            warmed_up = run_h2load(url, warm, body=sent, headers=GRPC_HEADERS).requests
            runs.saturate(side, url, saturate, sent)
            runs.fixed.append(run_h2load(url, fixed, body=sent, headers=GRPC_HEADERS))
            problem = side.verify(runs.sent() + warmed_up)
            if problem:
                raise RuntimeError(f"{scenario}: {side.name} did not answer as expected: {problem}")
        before_stop(subject)
        for (side, runs), total in zip(pairs, (base, ours), strict=True):
            side.service.stop()
            total.extend(runs)
    pairs_rps = zip(ours.saturation, base.saturation, strict=True)
    ctx.log(
        f"{scenario}: {ours.rps():,.0f} vs {base.rps():,.0f} calls/s, "
        f"{ours.cpu():.0f} vs {base.cpu():.0f} µs CPU/call; rounds (ours/baseline calls/s): "
        + ", ".join(f"{o.rps:,.0f}/{b.rps:,.0f}" for o, b in pairs_rps)
    )
    note = f"h2load used at most {max(ours.loadgen(), base.loadgen()):.0%} of a core"
    rate = f"at {sizes.fixed_rate:g}/s"
    return [
        Figure(scenario, "throughput at saturation", "calls/s", ours.rps(), base.rps(),
               baseline_name, Floor(">=", throughput_floor) if throughput_floor else None,
               note=note),
        Figure(scenario, "server CPU per call", "µs", ours.cpu(), base.cpu(), baseline_name,
               Floor("<=", cpu_floor) if cpu_floor else None),
        Figure(scenario, f"p50 {rate}", "ms", ours.p50(), base.p50(), baseline_name),
        Figure(scenario, f"p99 {rate}", "ms", ours.p99(), base.p99(), baseline_name),
    ]  # fmt: skip


def _url(side: Side, method_path: str) -> str:
    return f"http://127.0.0.1:{side.port}{method_path}"


def metric_total(http_port: int, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels` (from a server's /metrics)."""
    return samples_total(http_get(f"http://127.0.0.1:{http_port}/metrics"), name, **labels)


def samples_total(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`, in Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):  # also skips # HELP / # TYPE lines
            continue
        series, _, value = line.rpartition(" ")
        if series.split("{", 1)[0] != name:
            continue
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


def _addrs(grpc_port: int, http_port: int) -> list[str]:
    return ["--grpc-addr", f"127.0.0.1:{grpc_port}", "--http-addr", f"127.0.0.1:{http_port}"]


def _at_least(http_port: int, name: str, **labels: str) -> Callable[[int], str | None]:
    def verify(sent: int) -> str | None:
        got = metric_total(http_port, name, **labels)
        return None if got >= sent else f"{name}{labels} = {got:g}, expected >= {sent}"

    return verify


def start_authz(
    ctx: Context,
    name: str,
    config: str,
    env: dict[str, str] | None = None,
    extra_args: tuple[str, ...] = (),
) -> Side:
    """maas-authz on free ports with `config` (a path), logs at warning level like production."""
    grpc_port, http_port = free_port(), free_port()
    # the operator API is off: these scenarios measure Check (and it cannot run with workers)
    argv = [PYTHON, "-m", "maas_authz", "--config", config, *_addrs(grpc_port, http_port),
            "--admin-api-addr", "off",
            *extra_args]  # fmt: skip
    service = ctx.service(
        name,
        argv,
        ready_url=f"http://127.0.0.1:{http_port}/readyz",
        env={"MAAS_AUTHZ_LOG_LEVEL": "warning", **(env or {})},
    )
    verify = _at_least(http_port, "maas_authz_decisions_total", result="allowed")
    return Side(name, service, grpc_port, http_port, verify)


BENCH_LIMITS = """\
# Limits high enough that every benchmark call is admitted and every bucket is really used.
domain: maas
limits:
  - {name: requests, tier: enterprise, kind: requests, limit: 1000000000, window: 1s}
  - {name: tokens, tier: enterprise, kind: tokens, limit: 1000000000, window: 1s}
"""


def start_ratelimit(
    ctx: Context, name: str, store: str, limits: str = BENCH_LIMITS, *, ledger: str | None = None
) -> Side:
    """maas-ratelimit on free ports with the limits file `limits` (default BENCH_LIMITS) and
    `store` (`memory` or a Redis URL); with `ledger` (a URL), the usage ledger too."""
    limits_file = ctx.path(f"ratelimit/{name}.limits.yaml")
    limits_file.write_text(limits)
    store_yaml = (
        "store:\n  type: memory\n"
        if store == "memory"
        else f"store:\n  type: redis\n  redis:\n    url: {store}\n"
    )
    config = ctx.path(f"ratelimit/{name}.yaml")
    # a JSON string is a YAML string: the file name may hold spaces and parentheses
    ledger_yaml = ""
    if ledger is not None:
        journal = ctx.path(f"ratelimit/{name}.journal")
        ledger_yaml = (
            f"ledger:\n  url: {json.dumps(ledger)}\n  spool_dir: {json.dumps(str(journal))}\n"
        )
    config.write_text(f"limits:\n  file: {json.dumps(str(limits_file))}\n{store_yaml}{ledger_yaml}")
    grpc_port, http_port = free_port(), free_port()
    argv = [PYTHON, "-m", "maas_ratelimit", "--config", str(config), *_addrs(grpc_port, http_port)]
    service = ctx.service(
        name,
        argv,
        ready_url=f"http://127.0.0.1:{http_port}/readyz",
        env={"MAAS_RATELIMIT_LOG_LEVEL": "warning"},
    )
    verify = _at_least(http_port, "maas_ratelimit_calls_total", answer="ok")
    return Side(name, service, grpc_port, http_port, verify)


def noop(ctx: Context, kind: str, *extra: str) -> Side:
    service, port = ctx.noop_server(kind, *extra)
    return Side(f"do-nothing {kind} server", service, port)


def check_static_key(ctx: Context) -> list[Figure]:
    """Scenario 1 (static keys): Check with a demo API key vs a do-nothing ext_authz server."""
    config = str(DEMO_CONFIG / "authz.yaml")
    with ctx.services():
        return compare(
            ctx, "Check, static key", lambda: noop(ctx, "authz"),
            lambda: start_authz(ctx, "maas-authz (static keys)", config), method_path=CHECK_PATH,
            body=grpc_frame(check_request("sk-demo-enterprise")), throughput_floor=0.8,
            cpu_floor=1.25,
        )  # fmt: skip


def check_api_key(ctx: Context, postgres_dsn: str | None = None) -> list[Figure]:
    """An sk-oai- API key in the subscription flow (MaaSAuthPolicy, MaaSSubscription) vs a static
    key in the tier flow, on the same server: from the key file, and with `postgres_dsn` from
    maas-api's table behind the 1 s verdict cache (a cache hit but once a second). The subscription
    flow must cost no more (the ratio is ours/static)."""
    config = str(DEMO_CONFIG / "authz.yaml")
    scenario, subject = "Check, sk-oai- key (key file) vs static key", config
    if postgres_dsn is not None:
        scenario = "Check, sk-oai- key (PostgreSQL, cached) vs static key"
        subject = str(_postgres_authz_config(ctx, postgres_dsn))
    with ctx.services():
        return compare(
            ctx, scenario,
            lambda: start_authz(ctx, "maas-authz, static key", config),
            lambda: start_authz(ctx, "maas-authz, sk-oai- key", subject), method_path=CHECK_PATH,
            body=grpc_frame(check_request(DEMO_API_KEY)),
            baseline_body=grpc_frame(check_request("sk-demo-enterprise")),
            throughput_floor=0.95, cpu_floor=1.05,
        )  # fmt: skip


def _postgres_authz_config(ctx: Context, dsn: str) -> Path:
    """The demo config with its files made absolute and the API keys read from `dsn`."""
    authz = yaml.safe_load((DEMO_CONFIG / "authz.yaml").read_text())
    static = authz["identity"]["static"]
    static["keys_file"] = str(DEMO_CONFIG / static["keys_file"])
    for section in ("tiers", "subscriptions"):
        authz[section]["file"] = str(DEMO_CONFIG / authz[section]["file"])
    authz["api_keys"] = {"source": "postgresql", "postgresql": {"dsn": dsn}}
    path = ctx.path("authz-postgres.yaml")
    path.write_text(yaml.safe_dump(authz))
    return path


def should_rate_limit(ctx: Context, redis_url: str | None) -> list[Figure]:
    """Scenario 3: admission on the memory store (or Redis) vs a do-nothing RLS server."""
    store = redis_url or "memory"
    label = "Redis" if redis_url else "memory"
    body = grpc_frame(admission_request("enterprise", "system:serviceaccount:a:b", "llm/tiny"))
    with ctx.services():
        return compare(
            ctx, f"ShouldRateLimit, {label} store", lambda: noop(ctx, "ratelimit"),
            lambda: start_ratelimit(ctx, f"maas-ratelimit ({label})", store),
            method_path=RLS_PATH, body=body, throughput_floor=0.6 if redis_url else 0.8,
        )  # fmt: skip


def check_workers(ctx: Context) -> list[Figure]:
    """maas-authz --workers N (SO_REUSEPORT) against one process: how throughput scales.

    N = 2, and the machine's core count when larger. h2load opens 8 connections, since the kernel
    spreads connections (not calls) over the workers' sockets. On a 2-core machine h2load and the
    workers share the cores, so this shows the mechanism works rather than the scaling a larger
    node would see.
    """
    counts = sorted({2, os.cpu_count() or 2})
    body = grpc_frame(check_request("sk-demo-enterprise"))
    load = Load(ctx.sizes.saturation_requests, clients=8)
    config = str(DEMO_CONFIG / "authz.yaml")
    figures: list[Figure] = []
    with ctx.services():
        sides = [start_authz(ctx, "maas-authz (1 process)", config)] + [
            start_authz(ctx, f"maas-authz ({n} workers)", config, extra_args=("--workers", str(n)))
            for n in counts
        ]
        runs = {side.name: Runs() for side in sides}
        for side in sides:
            run_h2load(_url(side, CHECK_PATH), Load(ctx.sizes.warmup_requests, clients=8),
                       body=body, headers=GRPC_HEADERS)  # fmt: skip
        for _ in range(ctx.sizes.rounds):
            for side in sides:
                runs[side.name].saturate(side, _url(side, CHECK_PATH), load, body)
        base = runs[sides[0].name]
        loadgen = max(r.loadgen() for r in runs.values())
        for side in sides[1:]:
            ours = runs[side.name]
            figures += [
                Figure("Check, static key, SO_REUSEPORT workers", f"throughput, {side.name}",
                       "calls/s", ours.rps(), base.rps(), sides[0].name,
                       note=f"{os.cpu_count()} cores shared with h2load "
                       f"(at most {loadgen:.0%} of a core)"),
                Figure("Check, static key, SO_REUSEPORT workers", f"CPU per call, {side.name}",
                       "µs", ours.cpu(), base.cpu(), sides[0].name),
            ]  # fmt: skip
    return figures
