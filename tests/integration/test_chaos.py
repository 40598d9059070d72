"""Faults under load through the real Envoy, each a bounded run that stops by itself and prints
the number of requests sent and how each ended, per client and phase:

- kube-apiserver stopped and started again: requests whose token and access decision are
  cached keep being served; only uncached tokens fail, with 503 auth_backend_unavailable; after
  the restart they work again, maas-authz never restarted.
- PostgreSQL (maas-api's API keys) stopped and started again: keys seen recently are served
  from the cache (stale_if_error), keys first used during the outage get 503
  auth_backend_unavailable; after the restart all work.
- SIGTERM of each server during a rolling restart: two replicas behind Envoy, which health-
  checks them over grpc.health.v1; the stopped one keeps serving for server.shutdown_delay while
  not ready, then drains. No request fails, in flight or after, and every answered request is
  charged exactly once (a usage record in one replica's ledger).

Redis stopped under load (both failure modes) is tests/e2e/test_topologies.py; SIGKILL of a
worker is tests/integration/test_authz_workers.py; PostgreSQL stopped under the ledger is
tests/e2e/test_ledger.py.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import pathlib
import secrets
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from maas_authz.api_keys import hash_key
from maas_demo.processes import free_port
from maas_demo.stack import Child, LocalStack, Ports, wait_until_ready
from tests.e2e.conftest import demo_authz_config, http, wait_for
from tests.support.kube_platform import MODEL, MODEL_NS, PREMIUM_NS, Kube
from tests.support.load import Load, Outcome, Request, between, report, tally
from tests.support.postgres_server import (
    PostgresServer,
    api_keys_section,
    insert_key,
    maas_api_database,
)
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.integration
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
MODEL_PATH = f"/{MODEL_NS}/{MODEL}/v1/chat/completions"
# limits nobody reaches in these runs: a fault must not hide behind a 429
LIMITS = {
    "domain": "maas",
    "limits": [
        {"name": f"{tier}-{kind}", "tier": tier, "kind": kind, "limit": 10_000_000, "window": "1m"}
        for tier in ("free", "premium", "enterprise")
        for kind in ("requests", "tokens")
    ],
}
TIERS = """\
- {name: free, level: 0, groups: [tier-free-users]}
- {name: premium, level: 1, groups: [tier-premium-users]}
- {name: enterprise, level: 2, groups: [tier-enterprise-users]}
"""


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


class Tokens:
    """Tokens used once each (so never cached), minted before the fault; running out is a
    test failure, not a silent reuse."""

    def __init__(self, tokens: list[str]) -> None:
        self._tokens = iter(tokens)
        self._lock = threading.Lock()
        self.exhausted = False

    def next(self) -> str:
        with self._lock:
            try:
                return next(self._tokens)
            except StopIteration:
                self.exhausted = True
                raise


def _limits_config(work: pathlib.Path) -> pathlib.Path:
    (work / "limits.yaml").write_text(yaml.safe_dump(LIMITS))
    (work / "ratelimit.yaml").write_text(yaml.safe_dump({"limits": {"file": "limits.yaml"}}))
    return work / "ratelimit.yaml"


def _started_stack(work: pathlib.Path, authz: dict[str, Any]) -> LocalStack:
    """Envoy, both servers and the demo model with this authz config and limits nobody reaches."""
    (work / "authz.yaml").write_text(yaml.safe_dump(authz))
    stack = LocalStack(
        work / "stack",
        Ports.free(),
        authz_config=work / "authz.yaml",
        ratelimit_config=_limits_config(work),
    )
    stack.start()
    return stack


def _only(outcomes: list[Outcome], *labels: str) -> bool:
    return all(o.label in labels for o in outcomes)


# ---------------------------------------------------------------- kube-apiserver


@pytest.fixture
def kube_stack(
    kube: Kube, authz_kubeconfig: pathlib.Path, tmp_path: pathlib.Path
) -> Iterator[LocalStack]:
    (tmp_path / "tiers.yaml").write_text(TIERS)
    authz = {
        "identity": {"source": "kubernetes", "cache": {"ttl": "600s", "negative_ttl": "1s"}},
        "access": {"source": "kubernetes"},
        "tiers": {"file": str(tmp_path / "tiers.yaml")},
        # the shipped bound (k8s/base): under half of Envoy's ext_authz timeout (1 s)
        "kubernetes": {"kubeconfig": str(authz_kubeconfig), "timeout": "400ms"},
    }
    stack = _started_stack(tmp_path, authz)
    try:
        yield stack
    finally:
        stack.stop()


def test_kube_apiserver_stopped_under_load_fails_only_uncached_tokens(
    kube: Kube, kube_stack: LocalStack
) -> None:
    name = f"chaos-{secrets.token_hex(3)}"
    kube.service_account(PREMIUM_NS, name)
    # a bound token has no jti here (kube-apiserver 1.20): tokens minted in the same second
    # are the same token unless their lifetimes differ
    minted = [kube.mint_token(PREMIUM_NS, name, seconds=3600 + n) for n in range(253)]
    assert len(set(minted)) == len(minted)
    cached, fresh = minted[:3], Tokens(minted[3:])
    cycle = itertools.cycle(cached)

    def cached_request() -> Request:
        return MODEL_PATH, bearer(next(cycle)), CHAT

    def fresh_request() -> Request:
        return MODEL_PATH, bearer(fresh.next()), CHAT

    authz = kube_stack.child("authz")
    pid = authz.process.pid if authz.process else None
    load = Load("127.0.0.1", kube_stack.ports.envoy, {"cached": cached_request})
    with load:
        time.sleep(1.0)  # the cached tokens' reviews are in the cache now
        fresh_load = Load(
            "127.0.0.1", kube_stack.ports.envoy, {"uncached": fresh_request}, pause=0.05
        )
        with fresh_load:
            time.sleep(1.0)
            stopping = fresh_load.mark("stopping")
            kube.cluster.stop_apiserver()  # SIGTERM: it serves on while it shuts down
            down = fresh_load.mark("down")
            time.sleep(3.0)
            starting = fresh_load.mark("starting")
            kube.cluster.start_apiserver()  # back when its /readyz says so
            up = fresh_load.mark("up")
            time.sleep(3.0)
            fresh_load.mark("stop")
        load.mark("stop")
    assert not fresh.exhausted, "the test's token pool ran out: mint more"
    fresh_load.mark("settled")
    fresh_load.marks["settled"] = up + 1.5
    load.marks.update({k: v for k, v in fresh_load.marks.items() if k not in ("start", "stop")})
    phases = {
        "before": ("start", "stopping"),
        "stopping": ("stopping", "down"),
        "down": ("down", "starting"),
        "starting": ("starting", "up"),
        "recovering": ("up", "settled"),
        "after": ("settled", "stop"),
    }
    print(report("kube-apiserver stopped 3 s (cached tokens)", load, phases))
    print(report("kube-apiserver stopped 3 s (uncached tokens)", fresh_load, phases))

    # cached: not one request failed, before, during or after
    assert load.sent() > 100 and tally(load.of()) == {"200": load.sent()}
    uncached = fresh_load.of()
    # answered before the apiserver began to stop (one sent just before may meet its shutdown)
    before = [o for o in uncached if o.ended < stopping]
    during = between(uncached, down, starting)
    after = between(uncached, up + 1.5, fresh_load.marks["stop"])
    assert before and _only(before, "200")
    assert during and _only(during, "503 auth_backend_unavailable"), tally(during)
    # no other answer at any time: served, or the documented 503
    assert _only(uncached, "200", "503 auth_backend_unavailable"), tally(uncached)
    assert after and _only(after, "200"), tally(after)
    refused = next(o for o in during if o.status == 503)
    assert b"auth_backend_unavailable" in refused.body
    assert authz.alive() and authz.process is not None and authz.process.pid == pid


# ---------------------------------------------------------------- PostgreSQL (API keys)

USERS = 40  # keys used before the outage (cached) and keys first used during it


@pytest.fixture
def keys_stack(tmp_path: pathlib.Path) -> Iterator[tuple[LocalStack, PostgresServer, list[str]]]:
    database = maas_api_database()
    keys = []
    for n in range(3 * USERS):
        key = f"sk-oai-chaos{n}_{secrets.token_hex(8)}"
        insert_key(database, key_id=f"id-chaos{n}", username=f"chaos{n}",
                   key_hash=hash_key(key) or "", groups=["demo-team"],
                   subscription="demo-basic")  # fmt: skip
        keys.append(key)
    authz: dict[str, Any] = demo_authz_config()
    authz["api_keys"] = api_keys_section(database)
    stack = _started_stack(tmp_path, authz)
    try:
        yield stack, database, keys
    finally:
        stack.stop()
        database.cleanup()


def test_postgresql_stopped_under_load_serves_cached_keys_and_refuses_new_ones_with_503(
    keys_stack: tuple[LocalStack, PostgresServer, list[str]],
) -> None:
    stack, database, keys = keys_stack
    seen, unseen = keys[:USERS], Tokens(keys[USERS:])
    cycle = itertools.cycle(seen)

    def seen_request() -> Request:
        return "/v1/chat/completions", bearer(next(cycle)), {"model": "tiny", **CHAT}

    def unseen_request() -> Request:
        return "/v1/chat/completions", bearer(unseen.next()), {"model": "tiny", **CHAT}

    load = Load("127.0.0.1", stack.ports.envoy, {"seen": seen_request})
    with load:
        assert wait_for(lambda: len(load.of()) >= 2 * USERS, timeout=10)
        new = Load("127.0.0.1", stack.ports.envoy, {"new": unseen_request}, pause=0.1)
        load.mark("down")
        database.stop()
        time.sleep(1.5)  # past the cache's ttl: every lookup goes to the stopped database
        with new:
            time.sleep(2.0)
            new.mark("stop")
        database.start()
        load.mark("up")
        time.sleep(3.0)
        load.mark("stop")
    # the keys first used during the outage, now with the database back
    with Load("127.0.0.1", stack.ports.envoy, {"new": unseen_request}, pause=0.05) as late:
        time.sleep(1.0)
        late.mark("stop")
    assert not unseen.exhausted, "the test's key pool ran out: insert more"
    print(report("PostgreSQL stopped (keys seen before)", load,
                 {"before": ("start", "down"), "outage": ("down", "up"),
                  "after": ("up", "stop")}))  # fmt: skip
    print(report("PostgreSQL stopped (keys first used during it)", new,
                 {"outage": ("start", "stop")}))  # fmt: skip
    print(report("PostgreSQL back (keys never used before)", late, {"after": ("start", "stop")}))

    # every key seen before the outage is served from the cache throughout
    assert load.sent() > 4 * USERS and tally(load.of()) == {"200": load.sent()}
    # a key first used while the database is down: 503 with the code the docs name, none lost
    assert new.sent() > 5 and tally(new.of()) == {"503 auth_backend_unavailable": new.sent()}
    # the database back: they work, no restart
    assert late.sent() > 5 and tally(late.of()) == {"200": late.sent()}


# ---------------------------------------------------------------- SIGTERM, rolling restart

SHUTDOWN_DELAY = 1.5  # > Envoy's health check interval x unhealthy threshold, with a margin
HEALTH_CHECK = {
    "timeout": "0.5s",
    "interval": "0.2s",
    "no_traffic_interval": "0.2s",
    "unhealthy_threshold": 1,
    "healthy_threshold": 1,
    "grpc_health_check": {},
}
CLUSTERS = {"authz": "maas_authz", "ratelimit": "maas_ratelimit"}


def _two_replicas(ports: dict[str, int]) -> Any:
    """Envoy's edit: a second endpoint in both servers' clusters, and health checks over
    grpc.health.v1 (what Kubernetes' endpoints do for a mesh: a server not ready gets no new
    calls); never panic-routing to an unhealthy host."""

    def edit(rendered: str) -> str:
        config = yaml.safe_load(rendered)
        for cluster in config["static_resources"]["clusters"]:
            server = next((s for s, c in CLUSTERS.items() if c == cluster["name"]), None)
            if server is None:
                continue
            endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
            endpoints.append(
                {"endpoint": {"address": {"socket_address": {
                    "address": "127.0.0.1", "port_value": ports[server]}}}}
            )  # fmt: skip
            cluster["health_checks"] = [HEALTH_CHECK]
            cluster["common_lb_config"] = {"healthy_panic_threshold": {"value": 0}}
        return str(yaml.safe_dump(config, sort_keys=False))

    return edit


def _replica_argv(argv: list[str], replacements: dict[str, str]) -> list[str]:
    out = list(argv)
    for flag, value in replacements.items():
        out[out.index(flag) + 1] = value
    return out


def _ratelimit_config(work: pathlib.Path, name: str, redis_url: str) -> pathlib.Path:
    config = {
        "server": {"shutdown_delay": f"{SHUTDOWN_DELAY}s", "drain_timeout": "5s"},
        "limits": {"file": "limits.yaml"},
        "store": {"type": "redis", "failure_mode": "closed", "redis": {"url": redis_url}},
        "ledger": {"url": f"sqlite:///{work / name}.db", "spool_dir": f"{name}-journal",
                   "flush_interval": "100ms"},
    }  # fmt: skip
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _records(database: pathlib.Path) -> list[tuple[str, int]]:
    with contextlib.closing(sqlite3.connect(database)) as db:
        return list(db.execute("SELECT request_id, total_tokens FROM usage_records"))


def _envoy_healthy(stack: LocalStack, cluster: str) -> int:
    clusters = http(f"http://127.0.0.1:{stack.ports.envoy_admin}/clusters", method="GET")
    lines = clusters.body.decode().splitlines()
    return sum(
        1
        for line in lines
        if line.startswith(f"{cluster}::") and line.endswith("health_flags::healthy")
    )


@pytest.mark.parametrize("server", ["authz", "ratelimit"])
def test_sigterm_in_a_rolling_restart_fails_no_request_and_loses_no_charge(
    server: str, tmp_path: pathlib.Path
) -> None:
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    (tmp_path / "limits.yaml").write_text(yaml.safe_dump(LIMITS))
    authz = demo_authz_config()
    authz["server"] = {"shutdown_delay": f"{SHUTDOWN_DELAY}s", "drain_timeout": "5s"}
    (tmp_path / "authz.yaml").write_text(yaml.safe_dump(authz))
    second = {"authz": free_port(), "ratelimit": free_port()}
    stack = LocalStack(
        tmp_path / "stack",
        Ports.free(),
        authz_config=tmp_path / "authz.yaml",
        ratelimit_config=_ratelimit_config(tmp_path, "ratelimit-a", redis.url),
        envoy_config_edit=_two_replicas(second),
    )
    replicas: list[Child] = []
    try:
        stack.start()
        for name, http_port in (("authz", free_port()), ("ratelimit", free_port())):
            first = stack.child(name)
            flags = {"--grpc-addr": f"127.0.0.1:{second[name]}",
                     "--http-addr": f"127.0.0.1:{http_port}"}  # fmt: skip
            if name == "authz":
                flags["--admin-api-addr"] = f"127.0.0.1:{free_port()}"
            else:
                flags["--config"] = str(_ratelimit_config(tmp_path, "ratelimit-b", redis.url))
            replica = Child(f"{name}-b", _replica_argv(first.argv, flags),
                            tmp_path / f"{name}-b.log", echo=False)  # fmt: skip
            replicas.append(replica)
            replica.start()
            wait_until_ready(replica, f"http://127.0.0.1:{http_port}/readyz", 30)
        for cluster in CLUSTERS.values():
            assert wait_for(lambda c=cluster: _envoy_healthy(stack, c) == 2, timeout=10), cluster

        keys = itertools.cycle(["sk-demo-premium", "sk-demo-enterprise"])

        def chat() -> Request:
            return MODEL_PATH, bearer(next(keys)), CHAT

        stopped = stack.child(server)
        assert stopped.process is not None
        clients = {f"client{n}": chat for n in range(4)}
        with Load("127.0.0.1", stack.ports.envoy, clients) as load:
            time.sleep(2.0)
            sigterm = load.mark("sigterm")
            stopped.process.send_signal(signal.SIGTERM)
            assert wait_for(lambda: _envoy_healthy(stack, CLUSTERS[server]) == 1, timeout=5)
            load.mark("unhealthy")
            stopped.process.wait(SHUTDOWN_DELAY + 10)
            load.mark("exited")
            time.sleep(2.0)
            load.mark("stop")
        outcomes = load.of()
        in_flight = [o for o in outcomes if o.started < sigterm < o.ended]
        phases = {
            "before": ("start", "sigterm"),
            "to unhealthy": ("sigterm", "unhealthy"),
            "draining": ("unhealthy", "exited"),
            "after": ("exited", "stop"),
        }
        print(report(f"SIGTERM of one of two maas-{server} replicas", load, phases))
        print(f"  in flight at the SIGTERM: {len(in_flight)}  {tally(in_flight)}")

        assert stopped.process.returncode == 0, stopped.log_tail()
        assert "stopped" in stopped.log_tail()
        assert in_flight and tally(in_flight) == {"200": len(in_flight)}
        assert load.sent() > 200 and tally(outcomes) == {"200": load.sent()}
        after = between(outcomes, load.marks["exited"], load.marks["stop"])
        assert len(after) > 20  # the other replica carried on alone

        # every answer charged once: one usage record per response, in one replica's ledger
        # (the stopped replica shipped its journal while draining)
        answered = {json.loads(o.body)["id"]: json.loads(o.body)["usage"]["total_tokens"]
                    for o in outcomes}  # fmt: skip
        assert len(answered) == len(outcomes)
        databases = [tmp_path / "ratelimit-a.db", tmp_path / "ratelimit-b.db"]

        def records() -> list[tuple[str, int]]:
            return [r for db in databases for r in _records(db)]

        assert wait_for(lambda: len(records()) >= len(outcomes), timeout=10)
        rows = records()
        assert len(rows) == len(outcomes) == len({request_id for request_id, _ in rows})
        assert sum(tokens for _, tokens in rows) == sum(answered.values())
        print(f"  usage records: {len(rows)} for {len(outcomes)} answers, "
              f"{sum(answered.values())} tokens")  # fmt: skip
    finally:
        for replica in replicas:
            replica.stop()
        stack.stop()
        redis.cleanup()
