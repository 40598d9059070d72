"""Scenarios 1 (Kubernetes half) and 2: maas-authz against a real kube-apiserver.

One etcd + kube-apiserver (tests/support/kube_cluster.py) serves both, holding what the platform
makes (tests/support/kube_platform.py, as for the integration tests): the tier namespaces, a model
namespace with an LLMInferenceService-style grant (verb `post` on llm/tiny for the premium tier's
group) and maas-authz's own ServiceAccount bound to system:auth-delegator. maas-authz runs with
identity source `kubernetes` (TokenReview, with the audience maas-api mints tokens for) and access
by SubjectAccessReview, both cached for an hour.

- Check, cache hit: one premium token, Checked once to fill both caches, then driven by h2load
  against the do-nothing ext_authz server (servers.compare). The Kubernetes calls counted on
  /metrics afterwards show that every Check after the first was answered from the caches.
- Check, cold path: Sizes.concurrent_new_token Checks at once with the same new token must make
  one TokenReview and one SubjectAccessReview, as counted by maas-authz's metrics and, as a
  witness, by kube-apiserver's apiserver_request_total. Then Sizes.cold_checks sequential Checks,
  each with a token of a new ServiceAccount (so that neither cache can answer), against the floor
  of any cold path: the same TokenReview then SubjectAccessReview made directly by a
  kubernetes_asyncio client (as maas-authz's is), with fresh tokens too, alternating with them.

Every token is minted before anything is timed. etcd's and kube-apiserver's logs:
<out>/work/logs/kube/.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from kubernetes_asyncio import client as kube_client
from kubernetes_asyncio import config as kube_config

from bench import servers
from bench.context import Context
from bench.load import grpc_frame
from bench.report import Figure, Floor
from tests.support import kube_platform
from tests.support.kube_cluster import KubeCluster, find_apiserver_binary
from tests.support.kube_platform import AUDIENCE, MODEL, MODEL_NS, PREMIUM_NS, Kube

CACHE_TTL = "3600s"  # both caches, and the tokens' lifetime: far longer than a full run
CHANNELS = 4  # gRPC connections that concurrent Checks are spread over
TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"  # noqa: S105 - a path
ACCESS_REVIEWS = "/apis/authorization.k8s.io/v1/subjectaccessreviews"
KUBE_CALLS = "maas_authz_kubernetes_request_duration_seconds_count"
# maas-authz's `call` label -> kube-apiserver's `resource` label
CALLS = {"tokenreview": "tokenreviews", "subjectaccessreview": "subjectaccessreviews"}


def new_user_token(kube: Kube, prefix: str) -> str:
    """The token of a new premium ServiceAccount: no cache knows the token or the user."""
    name = f"{prefix}-{secrets.token_hex(4)}"
    kube.service_account(PREMIUM_NS, name)
    return kube.mint_token(PREMIUM_NS, name)


def apiserver_reviews(kube: Kube) -> dict[str, float]:
    """TokenReviews and SubjectAccessReviews kube-apiserver has answered, by maas-authz call."""
    method, url, headers, _, _ = kube.api.param_serialize(
        "GET", "/metrics", auth_settings=["BearerToken"]
    )
    text = kube.api.call_api(method, url, header_params=headers).response.data.decode()
    total = servers.samples_total
    return {
        call: total(text, "apiserver_request_total", resource=resource, verb="POST")
        for call, resource in CALLS.items()
    }


def _platform(kube: Kube, ctx: Context) -> Path:
    """What the platform creates; returns maas-authz's kubeconfig (system:auth-delegator only)."""
    kube_platform.create_platform(kube)
    return kube_platform.authz_kubeconfig(kube, ctx.path("kube/maas-authz.kubeconfig"))


def _authz_config(ctx: Context, kubeconfig: Path) -> Path:
    config = ctx.path("kube/authz.yaml")
    config.write_text(
        "# maas-authz against the benchmark's kube-apiserver; default (platform) tiers\n"
        "identity:\n"
        "  source: kubernetes\n"
        f"  audiences: [{AUDIENCE}]\n"
        f"  cache: {{ttl: {CACHE_TTL}}}\n"
        "access:\n"
        "  source: kubernetes\n"
        f"  cache: {{ttl: {CACHE_TTL}}}\n"
        "kubernetes:\n"
        f"  kubeconfig: {kubeconfig}\n"
        "  timeout: 5s  # a loaded 2-core machine must not turn a slow review into a 503\n"
    )
    return config


def _kube_calls(http_port: int) -> dict[str, float]:
    return {call: servers.metric_total(http_port, KUBE_CALLS, call=call) for call in CALLS}


def _allowed(response: external_auth_pb2.CheckResponse) -> bool:
    return bool(response.status.code == 0 and response.HasField("ok_response"))


class Checker:
    """Checks from here, as Envoy sends them, over a few grpc.aio channels."""

    def __init__(self, grpc_port: int) -> None:
        self._channels = [
            grpc.aio.insecure_channel(
                f"127.0.0.1:{grpc_port}",
                options=[("grpc.use_local_subchannel_pool", 1)],  # one connection per channel
            )
            for _ in range(CHANNELS)
        ]
        self._stubs = [external_auth_pb2_grpc.AuthorizationStub(c) for c in self._channels]

    async def check(self, token: str, channel: int = 0) -> bool:
        stub = self._stubs[channel % CHANNELS]
        response = await stub.Check(servers.check_request(token), timeout=30)
        return _allowed(response)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


class DirectReviews:
    """The floor of a cold Check: TokenReview then SubjectAccessReview, straight to the API server
    from kubernetes_asyncio with maas-authz's credentials, bodies as JSON like maas-authz's."""

    def __init__(self, api: Any) -> None:
        self._api = api

    @classmethod
    async def connect(cls, kubeconfig: Path) -> DirectReviews:
        configuration = kube_client.Configuration()
        await kube_config.load_kube_config(
            config_file=str(kubeconfig), client_configuration=configuration
        )
        return cls(kube_client.ApiClient(configuration))

    async def _create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self._api.call_api(
            path,
            "POST",
            header_params={"Content-Type": "application/json", "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=30,
        )
        async with response:
            payload = await response.read()
            if response.status // 100 != 2:
                raise RuntimeError(f"{path} answered HTTP {response.status}: {payload[:200]!r}")
        status: dict[str, Any] = json.loads(payload)["status"]
        return status

    async def allowed(self, token: str) -> bool:
        review = await self._create(
            TOKEN_REVIEWS,
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "spec": {"token": token, "audiences": [AUDIENCE]},
            },
        )
        if not review.get("authenticated"):
            return False
        user = review["user"]
        access = await self._create(
            ACCESS_REVIEWS,
            {
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SubjectAccessReview",
                "spec": {
                    "user": user["username"],
                    "uid": user.get("uid", ""),
                    "groups": user.get("groups", []),
                    "resourceAttributes": {
                        "group": "serving.kserve.io",
                        "resource": "llminferenceservices",
                        "verb": "post",
                        "namespace": MODEL_NS,
                        "name": MODEL,
                    },
                },
            },
        )
        return bool(access.get("allowed")) and not access.get("denied", False)

    async def close(self) -> None:
        await self._api.close()


async def _check_once(grpc_port: int, token: str) -> bool:
    checker = Checker(grpc_port)
    try:
        return await checker.check(token)
    finally:
        await checker.close()


def _cache_hit(ctx: Context, kube: Kube, config: Path) -> list[Figure]:
    """Scenario 1, Kubernetes identities: every Check after each process's first is a hit in both
    caches (each round's maas-authz is a fresh process, so each makes one TokenReview and SAR)."""
    scenario = "Check, cache hit (Kubernetes)"
    kube.service_account(PREMIUM_NS, "bench-cached")
    token = kube.mint_token(PREMIUM_NS, "bench-cached")

    def start_subject() -> servers.Side:
        subject = servers.start_authz(ctx, "maas-authz (Kubernetes)", str(config))
        if not asyncio.run(_check_once(subject.port, token)):  # fills both caches
            raise RuntimeError(
                f"{scenario}: the premium token was not allowed on {MODEL_NS}/{MODEL}"
            )
        return subject

    processes: list[dict[str, float]] = []  # per subject process: its counts after its round

    def counts(subject: servers.Side) -> None:
        events = "maas_authz_cache_events_total"
        port = subject.http_port
        processes.append(
            {
                **_kube_calls(port),
                "checks": servers.metric_total(port, "maas_authz_decisions_total"),
                **{
                    f"{cache} {event}": servers.metric_total(port, events, cache=cache, event=event)
                    for cache in ("identity", "access")
                    for event in ("hit", "miss")
                },
            }
        )

    figures = servers.compare(
        ctx, scenario, lambda: servers.noop(ctx, "authz"), start_subject,
        method_path=servers.CHECK_PATH, body=grpc_frame(servers.check_request(token)),
        throughput_floor=0.8, cpu_floor=1.25, before_stop=counts,
    )  # fmt: skip

    def each(key: str) -> str:
        return ", ".join(f"{process[key]:,.0f}" for process in processes)

    note = (
        f"per maas-authz process ({len(processes)}, one a round), warm-up included: Checks "
        f"{each('checks')}; TokenReviews {each('tokenreview')}; SubjectAccessReviews "
        f"{each('subjectaccessreview')}; identity cache hits {each('identity hit')}, misses "
        f"{each('identity miss')}; access cache hits {each('access hit')}, misses "
        f"{each('access miss')} (both TTLs {CACHE_TTL})"
    )
    ctx.log(f"{scenario}: {note}")
    figures.append(
        Figure(scenario, "TokenReviews per process over its run (1: its first Check)", "calls",
               max(process["tokenreview"] for process in processes), floor=Floor("<=", 1),
               on_ratio=False, note=note)
    )  # fmt: skip
    return figures


@dataclass
class ColdTokens:
    concurrent: list[str]  # one per burst of Sizes.concurrent_new_token Checks
    checks: list[str]  # one per sequential cold Check, and one to warm up
    direct: list[str]  # one per direct TokenReview + SubjectAccessReview, and one to warm up


@dataclass
class ColdResults:
    per_token: dict[str, list[float]]  # call -> per new token, the most either side counted
    ours: dict[str, list[float]]  # call -> per new token, maas-authz's metrics
    witness: dict[str, list[float]]  # call -> per new token, kube-apiserver's metrics
    burst_ms: list[float]  # time for a burst's Checks to all be answered
    check_ms: list[float]
    direct_ms: list[float]
    cold_calls: dict[str, float]  # maas-authz's Kubernetes calls over the sequential Checks


async def _cold(
    ctx: Context, kube: Kube, subject: servers.Side, kubeconfig: Path, tokens: ColdTokens
) -> ColdResults:
    http_port = subject.http_port
    concurrent = ctx.sizes.concurrent_new_token
    results = ColdResults({c: [] for c in CALLS}, {c: [] for c in CALLS}, {c: [] for c in CALLS},
                          [], [], [], {})  # fmt: skip
    checker = Checker(subject.port)
    direct = await DirectReviews.connect(kubeconfig)
    try:
        await asyncio.gather(*(checker.check(tokens.checks[-1], n) for n in range(CHANNELS)))
        for token in tokens.concurrent:
            ours_before, witness_before = _kube_calls(http_port), apiserver_reviews(kube)
            started = time.perf_counter()
            answers = await asyncio.gather(*(checker.check(token, n) for n in range(concurrent)))
            results.burst_ms.append((time.perf_counter() - started) * 1e3)
            if not all(answers):
                denied = answers.count(False)
                raise RuntimeError(f"{denied} of {concurrent} Checks with a new token not allowed")
            await asyncio.sleep(0.2)  # kube-apiserver counts a request as its handler returns
            ours_after, witness_after = _kube_calls(http_port), apiserver_reviews(kube)
            for call in CALLS:
                ours = ours_after[call] - ours_before[call]
                witness = witness_after[call] - witness_before[call]
                results.ours[call].append(ours)
                results.witness[call].append(witness)
                results.per_token[call].append(max(ours, witness))

        if not await direct.allowed(tokens.direct[-1]):  # warm: one connection, its TLS
            raise RuntimeError("a direct TokenReview + SubjectAccessReview did not allow")
        before = _kube_calls(http_port)
        for check_token, direct_token in zip(tokens.checks[:-1], tokens.direct[:-1], strict=True):
            started = time.perf_counter()
            allowed = await direct.allowed(direct_token)
            results.direct_ms.append((time.perf_counter() - started) * 1e3)
            started = time.perf_counter()
            allowed = await checker.check(check_token) and allowed
            results.check_ms.append((time.perf_counter() - started) * 1e3)
            if not allowed:
                raise RuntimeError("a cold Check (or its direct floor) did not allow")
        after = _kube_calls(http_port)
        results.cold_calls = {call: after[call] - before[call] for call in CALLS}
    finally:
        await checker.close()
        await direct.close()
    return results


def _tail(values: list[float]) -> tuple[str, float]:
    """p99 when there are enough values to have one, else the slowest."""
    ordered = sorted(values)
    if len(ordered) >= 100:
        return "p99", ordered[math.ceil(0.99 * len(ordered)) - 1]
    return "max", ordered[-1]


def _cold_path(ctx: Context, kube: Kube, subject: servers.Side, kubeconfig: Path) -> list[Figure]:
    """Scenario 2: coalescing of concurrent misses, and the latency of a cold Check."""
    scenario = "Check, cold path (Kubernetes)"
    bursts = 2 if ctx.quick else 5
    cold = ctx.sizes.cold_checks
    tokens = ColdTokens(
        concurrent=[new_user_token(kube, "bench-burst") for _ in range(bursts)],
        checks=[new_user_token(kube, "bench-cold") for _ in range(cold + 1)],
        direct=[new_user_token(kube, "bench-direct") for _ in range(cold + 1)],
    )
    results = asyncio.run(_cold(ctx, kube, subject, kubeconfig, tokens))
    if any(results.cold_calls[call] < cold for call in CALLS):
        raise RuntimeError(
            f"{scenario}: {cold} Checks with new tokens made only {results.cold_calls} "
            "Kubernetes calls: a cache answered, they were not cold"
        )
    n = ctx.sizes.concurrent_new_token
    figures = []
    for call, label in (("tokenreview", "TokenReviews"), ("subjectaccessreview", "SARs")):
        ours = ", ".join(f"{v:g}" for v in results.ours[call])
        witness = ", ".join(f"{v:g}" for v in results.witness[call])
        note = (
            f"{label} per new token over {bursts} tokens, by maas-authz's metrics: {ours}; "
            f"by kube-apiserver's apiserver_request_total: {witness}"
        )
        if call == "tokenreview":
            note += (
                f"; all {n} Checks answered in "
                f"{statistics.median(results.burst_ms):.0f} ms (median over the tokens)"
            )
        figures.append(
            Figure(scenario, f"{label} per new token ({n} concurrent Checks)", "calls",
                   max(results.per_token[call]), floor=Floor("==", 1), on_ratio=False, note=note)
        )  # fmt: skip
    base_name = "direct TokenReview + SAR (kubernetes_asyncio)"
    tail, ours_tail = _tail(results.check_ms)
    _, base_tail = _tail(results.direct_ms)
    ours_p50, base_p50 = statistics.median(results.check_ms), statistics.median(results.direct_ms)
    ctx.log(
        f"{scenario}: cold Check p50 {ours_p50:.2f} ms vs {base_p50:.2f} ms direct; "
        f"bursts {results.ours} (ours), {results.witness} (kube-apiserver)"
    )
    figures += [
        Figure(scenario, f"cold Check p50 ({cold} new tokens)", "ms", ours_p50, base_p50,
               base_name),
        Figure(scenario, f"cold Check {tail} ({cold} new tokens)", "ms", ours_tail, base_tail,
               base_name),
    ]  # fmt: skip
    return figures


def check_kubernetes(ctx: Context) -> list[Figure]:
    """Scenarios 1 (Kubernetes identities) and 2, on one kube-apiserver started for both."""
    binary = find_apiserver_binary()
    if binary is None:
        raise RuntimeError("no kube-apiserver: run scripts/provision-kube-apiserver.sh")
    cluster = KubeCluster(ctx.path("kube"), binary)
    cluster.log_dir = ctx.path("logs/kube")
    cluster.etcd_log = cluster.log_dir / "etcd.log"
    cluster.apiserver_log = cluster.log_dir / "kube-apiserver.log"
    with cluster, ctx.services():
        kube = Kube.connect(cluster)
        try:
            kubeconfig = _platform(kube, ctx)
            config = _authz_config(ctx, kubeconfig)
            figures = _cache_hit(ctx, kube, config)
            subject = servers.start_authz(ctx, "maas-authz (Kubernetes, cold)", str(config))
            figures += _cold_path(ctx, kube, subject, kubeconfig)
        finally:
            kube.close()
    return figures
