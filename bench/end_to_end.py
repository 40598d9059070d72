"""Scenario 4: end to end through the real Envoy, one layer of the policy plane at a time.

Three gateways run side by side in front of the same fast upstream, and h2load (HTTP/1.1, like
the OpenAI SDKs; one request in flight per connection) sends each the same chat completion:

- plain Envoy: envoy/gateway.yaml with only the router left (same listener, route, cluster);
- Envoy + do-nothing servers: envoy/gateway.yaml as it is (ext_authz, the Lua usage filter, rate
  limit with the after-response charge and outcome calls, router) in front of the do-nothing
  servers of bench/noop_servers.py; the ext_authz one answers with maas-authz's metadata
  (`--metadata`), so Envoy makes the same rate limit calls as with our stack (without it Envoy
  would skip them);
- full stack: the same gateway in front of maas-authz (the demo's static keys) and
  maas-ratelimit (memory store, BENCH_LIMITS: nothing refused, every bucket really used).

The upstream is an Envoy answering every request with a fixed chat completion that reports its
usage (12 prompt + 20 completion tokens), so the Lua filter finds it and the full stack charges
it. Every Envoy runs with --concurrency 1 and each server as one process (its default), so the
figures are per core of each; CPU per request counts every process on the request path (the
gateway Envoy and its servers, not the upstream nor h2load) at saturation.

The layers alternate (`Sizes.rounds` times) so that drift on a shared machine hits all three;
each round measures throughput at saturation and latency at a fixed offered load, paced requests
spread evenly over time (h2load's clients started 1/rate apart). Medians over the rounds are
reported. The key figure is the latency each layer adds to plain Envoy: the full stack's added
p99 against what the do-nothing servers add (issue 6: at most 1.3x). Afterwards the run is
checked: every answer 2xx; Envoy's counters show each request authorized, admitted by the RLS
and the RLS called again after the response, with rate limit errors (Envoy's 100 ms timeout) under
1% of requests (their count is in a note); for the full stack, maas-ratelimit's metrics show
tokens reserved on admission and the usage charged for every response.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.context import Context, median
from bench.load import Load, LoadResult, run_h2load
from bench.procs import Service, free_port, http_get
from bench.report import Figure, Floor
from bench.servers import (
    BENCH_LIMITS,
    DEMO_CONFIG,
    MODEL_PATH,
    Runs,
    Side,
    metric_total,
    start_authz,
    start_ratelimit,
)
from bench.servers import (
    noop as start_noop,
)
from maas_demo.envoy import find_envoy
from maas_demo.stack import Ports
from maas_demo.stack import gateway_config as stack_gateway_config

SCENARIO_NOOP = "E2E, Envoy + do-nothing servers"
SCENARIO_FULL = "E2E, Envoy + maas-authz + maas-ratelimit"
SCENARIO_LEDGER = "E2E, the same stack + the usage ledger (SQLite)"
SCENARIO_NOOP_ONE_HOP = "E2E, Envoy + a do-nothing ext_authz server (one hop)"
SCENARIO_ONE_HOP = "E2E, one hop: Envoy + maas-authz limiting inline"
PLAIN = "plain Envoy"
NOOP = "Envoy + do-nothing servers"
NOOP_ONE_HOP = "Envoy + do-nothing ext_authz (1 hop)"
FULL = "Envoy + maas-authz + maas-ratelimit"
LEDGER = "the same + usage ledger"
ONE_HOP = "one hop: maas-authz inline"

SATURATION_CLIENTS = 8  # connections, one request in flight on each
PACED_RPS_PER_CLIENT = 50.0  # at most, so that a slow answer seldom delays the next paced one

MAX_TOKENS = 20
# What an OpenAI SDK sends for a short chat completion; max_tokens makes the Lua filter reserve.
REQUEST_BODY = json.dumps(
    {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Say hello in five words."}],
        "max_tokens": MAX_TOKENS,
    },
    separators=(",", ":"),
).encode()
REQUEST_HEADERS = (
    "authorization: Bearer sk-demo-enterprise",
    "content-type: application/json",
    "accept: application/json",
    "user-agent: OpenAI/Python 1.99.0",
)
USAGE = {"prompt_tokens": 12, "completion_tokens": 20, "total_tokens": 32}
COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "tiny",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello there, how are you?"},
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
    },
    separators=(",", ":"),
)

Json = dict[str, Any]
HCM = "envoy.filters.network.http_connection_manager"
ROUTER = "envoy.filters.http.router"


def upstream_config(port: int, admin_port: int) -> Json:
    """An Envoy that answers every request with COMPLETION, after reading the whole request body
    (the buffer filter: a direct_response sent before the body ends closes the connection)."""
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
        ".v3.HttpConnectionManager",
        "stat_prefix": "upstream",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "upstream",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "direct_response": {
                                "status": 200,
                                "body": {"inline_string": COMPLETION},
                            },
                        }
                    ],
                    "response_headers_to_add": [
                        {"header": {"key": "content-type", "value": "application/json"}}
                    ],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.buffer",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                    "max_request_bytes": 1 << 20,
                },
            },
            {
                "name": ROUTER,
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    return {
        "admin": _address(admin_port),
        "static_resources": {
            "listeners": [
                {
                    "name": "upstream",
                    **_address(port),
                    "filter_chains": [{"filters": [{"name": HCM, "typed_config": hcm}]}],
                }
            ]
        },
    }


def _address(port: int) -> Json:
    return {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}


def gateway_config(
    port: int, admin_port: int, backend: int, authz: int, ratelimit: int, *, one_hop: bool = False
) -> str:
    """envoy/gateway.yaml (or gateway-one-hop.yaml) as the local stack renders it."""
    ports = Ports(
        envoy=port, envoy_admin=admin_port, authz_grpc=authz, ratelimit_grpc=ratelimit,
        backend=backend,
    )  # fmt: skip
    return stack_gateway_config(ports, "one-hop" if one_hop else "two-hop")


def plain_config(port: int, admin_port: int, backend: int) -> Json:
    """envoy/gateway.yaml with only the router: the same listener, route and backend cluster."""
    config: Json = yaml.safe_load(gateway_config(port, admin_port, backend, 1, 1))
    resources = config["static_resources"]
    for listener in resources["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                if network_filter["name"] == HCM:
                    hcm = network_filter["typed_config"]
                    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] == ROUTER]
    resources["clusters"] = [c for c in resources["clusters"] if c["name"] == "model_backend"]
    return config


def envoy_stats(admin_port: int) -> dict[str, int]:
    """Envoy's counters and gauges (`/stats`, text), by name."""
    stats: dict[str, int] = {}
    for line in http_get(f"http://127.0.0.1:{admin_port}/stats").splitlines():
        name, _, value = line.partition(": ")
        if value.isdigit():
            stats[name] = int(value)
    return stats


@dataclass
class Layer:
    name: str
    envoy: Service
    port: int
    admin_port: int
    servers: list[Service] = field(default_factory=list)
    verify: list[Callable[[int], str | None]] = field(default_factory=list)
    runs: Runs = field(default_factory=Runs)
    rls_errors: int = 0  # rate limit calls Envoy gave up on (timeouts), read by verify
    cpu_parts: dict[str, list[float]] = field(default_factory=dict)  # µs per request, by process

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{MODEL_PATH}"

    def cpu(self) -> dict[str, float]:
        """CPU seconds of each process on this layer's request path (Envoy and its servers)."""
        return {service.name: service.cpu() for service in (self.envoy, *self.servers)}

    def run(self, load: Load) -> LoadResult:
        result = run_h2load(self.url, load, body=REQUEST_BODY, headers=REQUEST_HEADERS, h1=True)
        if result.status_2xx != result.requests:
            raise RuntimeError(
                f"{self.name}: {result.status_2xx} of {result.requests} answers were 2xx "
                f"(logs: {self.envoy.log.parent})"
            )
        return result


def _run_envoy(
    ctx: Context, name: str, build: Callable[[int, int], Json | str]
) -> tuple[Service, int, int]:
    """An Envoy on free ports with the config `build(port, admin_port)` (a dict is written as
    JSON): the process, its listener port and its admin port."""
    port, admin_port = free_port(), free_port()
    config = build(port, admin_port)
    suffix = "yaml" if isinstance(config, str) else "json"
    path = ctx.path(f"envoy/{name}.{suffix}")
    path.write_text(config if isinstance(config, str) else json.dumps(config, indent=1))
    argv = [
        str(find_envoy()), "-c", str(path), "--disable-hot-restart", "--log-level", "warn",
        "--concurrency", "1",
    ]  # fmt: skip
    service = ctx.service(name, argv, ready_url=f"http://127.0.0.1:{admin_port}/ready")
    return service, port, admin_port


def _envoy(ctx: Context, name: str, service: str, build: Callable[[int, int], Json | str]) -> Layer:
    return Layer(name, *_run_envoy(ctx, service, build))


def _tolerance(sent: int) -> int:
    """Requests whose rate limit call may fail (Envoy's 100 ms timeout, then it goes on without
    an answer, as configured) before a run is refused: 1%, for a shared, busy machine."""
    return math.ceil(sent / 100)


def _gateway_checks(layer: Layer) -> Callable[[int], str | None]:
    """Envoy's own counters: each request authorized and admitted by the RLS, the RLS called again
    after each response (charge and outcome, one call), and rate limit errors (timeouts) rare."""

    def verify(sent: int) -> str | None:
        stats = envoy_stats(layer.admin_port)
        layer.rls_errors = stats.get("cluster.model_backend.ratelimit.error", 0)
        tolerance = _tolerance(sent)
        problems = []
        expected = {
            "http.maas_gateway.ext_authz.ok": sent,
            "cluster.model_backend.ratelimit.ok": sent - tolerance,
            "cluster.maas_ratelimit.upstream_rq_total": 2 * sent,
        }
        for name, least in expected.items():
            if stats.get(name, 0) < least:
                problems.append(f"{name} = {stats.get(name, 0)}, expected >= {least}")
        if stats.get("http.maas_gateway.ext_authz.error", 0):
            problems.append(f"ext_authz errors: {stats['http.maas_gateway.ext_authz.error']}")
        if layer.rls_errors > tolerance:
            problems.append(f"rate limit errors: {layer.rls_errors} of {sent} requests")
        return "; ".join(problems) or None

    return verify


def _one_hop_checks(layer: Layer) -> Callable[[int], str | None]:
    """Envoy's own counters, one hop: each request authorized, an access log entry for each
    (they carry the charges), no ext_authz errors."""

    def verify(sent: int) -> str | None:
        stats = envoy_stats(layer.admin_port)
        problems = []
        if stats.get("http.maas_gateway.ext_authz.ok", 0) < sent:
            problems.append(f"ext_authz.ok = {stats.get('http.maas_gateway.ext_authz.ok', 0)}")
        if stats.get("http.maas_gateway.ext_authz.error", 0):
            problems.append(f"ext_authz errors: {stats['http.maas_gateway.ext_authz.error']}")
        if "cluster.maas_ratelimit.upstream_rq_total" in stats:
            problems.append("a rate limit cluster in the one-hop gateway")
        return "; ".join(problems) or None

    return verify


def _charged(http_port: int) -> Callable[[int], str | None]:
    """maas-ratelimit reserved tokens on admission and charged every response's usage (as the
    upstream reported it)."""

    def verify(sent: int) -> str | None:
        problems = []
        charged = metric_total(http_port, "maas_ratelimit_usage_responses_total", outcome="charged")
        least = sent - _tolerance(sent)
        if charged < least:
            problems.append(f"usage responses charged = {charged:g}, expected >= {least}")
        for metric, per_request in (
            ("maas_ratelimit_tokens_charged_total", USAGE["total_tokens"]),
            # the Lua filter's estimate: ceil(body bytes / 4) + max_tokens
            ("maas_ratelimit_tokens_reserved_total", -(-len(REQUEST_BODY) // 4) + MAX_TOKENS),
        ):
            tokens = metric_total(http_port, metric)
            if tokens < least * per_request:
                problems.append(f"{metric} = {tokens:g}, expected >= {least * per_request}")
        return "; ".join(problems) or None

    return verify


def _layers(ctx: Context) -> list[Layer]:
    """Starts the upstream and the three gateways (all stopped when ctx.services() ends)."""
    _, up_port, _ = _run_envoy(ctx, "envoy-upstream", upstream_config)

    plain = _envoy(
        ctx, PLAIN, "envoy-plain", lambda port, admin: plain_config(port, admin, up_port)
    )

    noop_layer = _gateway(
        ctx, NOOP, "envoy-noop", up_port,
        authz=start_noop(ctx, "authz", "--metadata"), ratelimit=start_noop(ctx, "ratelimit"),
    )  # fmt: skip

    authz = start_authz(ctx, "maas-authz", str(DEMO_CONFIG / "authz.yaml"))
    ratelimit = start_ratelimit(ctx, "maas-ratelimit", "memory")
    full = _gateway(ctx, FULL, "envoy-full", up_port, authz=authz, ratelimit=ratelimit)
    full.verify += [authz.verify, ratelimit.verify, _charged(ratelimit.http_port)]

    # the same stack with the usage ledger: every charged response journaled and written to
    # SQLite (the embedded default) in batches, off the request path
    ledger_file = ctx.path("ratelimit/ledger.db")
    ledger_authz = start_authz(ctx, "maas-authz (ledger)", str(DEMO_CONFIG / "authz.yaml"))
    ledger_ratelimit = start_ratelimit(
        ctx, "maas-ratelimit (ledger)", "memory", ledger=f"sqlite:///{ledger_file}"
    )
    with_ledger = _gateway(
        ctx, LEDGER, "envoy-ledger", up_port, authz=ledger_authz, ratelimit=ledger_ratelimit
    )
    with_ledger.verify += [
        ledger_authz.verify,
        ledger_ratelimit.verify,
        _charged(ledger_ratelimit.http_port),
        _recorded(ledger_ratelimit.http_port, ledger_file),
    ]
    # one hop: the do-nothing floor of that architecture (ext_authz and the access log stream
    # to one do-nothing server), and maas-authz limiting inline (the same limits, memory store)
    noop_one_hop = _one_hop_gateway(
        ctx, NOOP_ONE_HOP, "envoy-noop-one-hop", up_port,
        authz=start_noop(ctx, "authz", "--metadata"),
    )  # fmt: skip
    inline = start_authz(ctx, "maas-authz (one hop)", str(_one_hop_authz_config(ctx)))
    one_hop = _one_hop_gateway(ctx, ONE_HOP, "envoy-one-hop", up_port, authz=inline)
    one_hop.verify += [inline.verify, _charged(inline.http_port)]
    return [plain, noop_layer, full, with_ledger, noop_one_hop, one_hop]


def _one_hop_authz_config(ctx: Context) -> Path:
    """The demo's maas-authz with ratelimit.mode inline on BENCH_LIMITS (memory store), as
    maas-ratelimit runs them in the two-hop layer."""
    limits_file = ctx.path("authz/one-hop.limits.yaml")
    limits_file.write_text(BENCH_LIMITS)
    authz = yaml.safe_load((DEMO_CONFIG / "authz.yaml").read_text())
    static = authz["identity"]["static"]
    static["keys_file"] = str(DEMO_CONFIG / static["keys_file"])
    for section in ("tiers", "subscriptions", "api_keys"):
        authz[section]["file"] = str(DEMO_CONFIG / authz[section]["file"])
    authz["admin"]["auth"]["keys_file"] = str(DEMO_CONFIG / authz["admin"]["auth"]["keys_file"])
    authz.pop("usage", None)
    authz["ratelimit"] = {
        "mode": "inline",
        "limits": {"file": str(limits_file)},
        "store": {"type": "memory"},
    }
    path = ctx.path("authz/one-hop.yaml")
    path.write_text(yaml.safe_dump(authz))
    return path


def _one_hop_gateway(ctx: Context, name: str, service: str, up_port: int, *, authz: Side) -> Layer:
    """envoy/gateway-one-hop.yaml in front of `authz` alone, checked by its own counters."""
    layer = _envoy(
        ctx,
        name,
        service,
        lambda port, admin: gateway_config(port, admin, up_port, authz.port, 1, one_hop=True),
    )
    layer.servers = [authz.service]
    layer.verify = [_one_hop_checks(layer)]
    return layer


def _recorded(http_port: int, database: Path) -> Callable[[int], str | None]:
    """The ledger holds a record for every charged response, once the journal is shipped."""

    def verify(sent: int) -> str | None:
        deadline = time.monotonic() + 30
        while metric_total(http_port, "maas_ratelimit_ledger_pending_records") and (
            time.monotonic() < deadline
        ):
            time.sleep(0.2)
        charged = metric_total(http_port, "maas_ratelimit_usage_responses_total", outcome="charged")
        with sqlite3.connect(database) as connection:
            (rows,) = connection.execute("SELECT count(*) FROM usage_records").fetchone()
        if rows != charged:
            return f"the ledger holds {rows} records for {charged:g} charged responses"
        return None

    return verify


def _gateway(
    ctx: Context, name: str, service: str, up_port: int, *, authz: Side, ratelimit: Side
) -> Layer:
    """A gateway Envoy in front of `authz` and `ratelimit`, checked by its own counters."""
    layer = _envoy(
        ctx,
        name,
        service,
        lambda port, admin: gateway_config(port, admin, up_port, authz.port, ratelimit.port),
    )
    layer.servers = [authz.service, ratelimit.service]
    layer.verify = [_gateway_checks(layer)]
    return layer


def end_to_end(ctx: Context) -> list[Figure]:
    """Scenario 4: plain Envoy, Envoy + do-nothing servers, Envoy + our stack."""
    sizes = ctx.sizes
    rate = sizes.e2e_fixed_rate
    warm = Load(sizes.warmup_requests, clients=SATURATION_CLIENTS, streams=1)
    saturate = Load(sizes.e2e_saturation_requests, clients=SATURATION_CLIENTS, streams=1)
    paced_clients = max(1, math.ceil(rate / PACED_RPS_PER_CLIENT))
    fixed = Load(
        round(rate * sizes.e2e_fixed_seconds),
        clients=paced_clients,
        streams=1,
        rate=rate,
        stagger=True,
    )
    with ctx.services():
        layers = _layers(ctx)
        for layer in layers:
            layer.run(warm)
        for _ in range(sizes.rounds):
            for layer in layers:
                before = layer.cpu()
                result = layer.run(saturate)
                after = layer.cpu()
                for name, seconds in after.items():
                    us = (seconds - before[name]) / result.requests * 1e6
                    layer.cpu_parts.setdefault(name, []).append(us)
                total = sum(after.values()) - sum(before.values())
                layer.runs.cpu_us.append(total / result.requests * 1e6)
                layer.runs.saturation.append(result)
                layer.runs.fixed.append(layer.run(fixed))
        for layer in layers:
            sent = layer.runs.sent() + warm.requests
            for verify in layer.verify:
                problem = verify(sent)
                if problem:
                    raise RuntimeError(
                        f"end to end: {layer.name} did not work as expected: {problem}"
                    )
    plain, noop, full, ledger, noop_one, one = (layer.runs for layer in layers)
    timeouts = f"do-nothing {layers[1].rls_errors}, ours {layers[2].rls_errors}"
    for layer in layers:
        r = layer.runs
        parts = ", ".join(f"{name} {median(us):.0f}" for name, us in layer.cpu_parts.items())
        ctx.log(
            f"end to end: {layer.name}: {r.rps():,.0f} req/s, {r.cpu():.0f} µs CPU/req "
            f"({parts}); at {rate:g}/s p50 {r.p50():.2f} ms, p99 {r.p99():.2f} ms"
        )
    at = f"at {rate:g}/s"
    loadgen = max(r.loadgen() for r in (plain, noop, full, ledger, noop_one, one))
    note_load = (
        f"h2load --h1, {SATURATION_CLIENTS} connections, one request in flight on each; it used "
        f"at most {loadgen:.0%} of a core"
    )
    note_cpu = (
        "CPU time of the gateway Envoy and its servers per request, at saturation "
        "(upstream and h2load excluded)"
    )
    note_added = (
        f"latency added to plain Envoy ({plain.p50():.2f} ms p50, {plain.p99():.2f} ms p99); "
        f"paced over {paced_clients} connections, {rate * sizes.e2e_fixed_seconds:.0f} requests "
        f"per round, median of {sizes.rounds}; rate limit calls Envoy gave up on (100 ms "
        f"timeout, then it goes on): {timeouts}"
    )
    note_one_hop = (
        "maas-authz authenticates, authorizes, admits and reserves in Check and charges from "
        "the access log stream; the do-nothing two-hop stack makes three calls per request"
    )
    return [
        Figure(SCENARIO_NOOP, "throughput at saturation", "req/s", noop.rps(), plain.rps(), PLAIN,
               note=note_load),
        Figure(SCENARIO_NOOP, f"p50 {at}", "ms", noop.p50(), plain.p50(), PLAIN),
        Figure(SCENARIO_NOOP, f"p99 {at}", "ms", noop.p99(), plain.p99(), PLAIN),
        Figure(SCENARIO_NOOP, "CPU per request, request path", "µs", noop.cpu(), plain.cpu(),
               PLAIN, note=note_cpu),
        Figure(SCENARIO_FULL, "throughput at saturation", "req/s", full.rps(), plain.rps(), PLAIN),
        Figure(SCENARIO_FULL, f"p50 {at}", "ms", full.p50(), plain.p50(), PLAIN),
        Figure(SCENARIO_FULL, f"p99 {at}", "ms", full.p99(), plain.p99(), PLAIN),
        Figure(SCENARIO_FULL, f"added p50 {at}", "ms", full.p50() - plain.p50(),
               noop.p50() - plain.p50(), f"{NOOP}, added", note=note_added),
        Figure(SCENARIO_FULL, f"added p99 {at}", "ms", full.p99() - plain.p99(),
               noop.p99() - plain.p99(), f"{NOOP}, added", Floor("<=", 1.3)),
        Figure(SCENARIO_FULL, "CPU per request, request path", "µs", full.cpu(), noop.cpu(),
               NOOP),
        Figure(SCENARIO_LEDGER, "throughput at saturation", "req/s", ledger.rps(), full.rps(),
               FULL, Floor(">=", 0.9), note="the ledger's cost on the hot path (issue 18)"),
        Figure(SCENARIO_LEDGER, f"p99 {at}", "ms", ledger.p99(), full.p99(), FULL),
        Figure(SCENARIO_LEDGER, "CPU per request, request path", "µs", ledger.cpu(), full.cpu(),
               FULL),
        Figure(SCENARIO_NOOP_ONE_HOP, "throughput at saturation", "req/s", noop_one.rps(),
               noop.rps(), NOOP),
        Figure(SCENARIO_NOOP_ONE_HOP, "CPU per request, request path", "µs", noop_one.cpu(),
               noop.cpu(), NOOP),
        # issue 19: the whole policy plane in one hop against an empty copy of the peers'
        # two-hop architecture (goal >= 1.0), and against the empty one-hop floor (stretch 0.9)
        Figure(SCENARIO_ONE_HOP, "throughput at saturation", "req/s", one.rps(), noop.rps(),
               NOOP, Floor(">=", 1.0), note=note_one_hop),
        Figure(SCENARIO_ONE_HOP, "throughput at saturation", "req/s", one.rps(), noop_one.rps(),
               NOOP_ONE_HOP, Floor(">=", 0.9)),
        Figure(SCENARIO_ONE_HOP, "throughput at saturation", "req/s", one.rps(), full.rps(),
               FULL),
        Figure(SCENARIO_ONE_HOP, "CPU per request, request path", "µs", one.cpu(), noop.cpu(),
               NOOP),
        Figure(SCENARIO_ONE_HOP, f"p99 {at}", "ms", one.p99(), full.p99(), FULL),
        Figure(SCENARIO_ONE_HOP, f"added p99 {at}", "ms", one.p99() - plain.p99(),
               noop.p99() - plain.p99(), f"{NOOP}, added"),
        Figure(SCENARIO_ONE_HOP, f"added p99 {at}", "ms", one.p99() - plain.p99(),
               full.p99() - plain.p99(), f"{FULL}, added"),
    ]  # fmt: skip
