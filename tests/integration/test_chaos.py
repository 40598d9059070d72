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

import itertools
import pathlib
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from maas_authz.api_keys import hash_key
from maas_demo.stack import LocalStack, Ports
from tests.e2e.conftest import demo_authz_config, wait_for
from tests.support.kube_platform import MODEL, MODEL_NS, PREMIUM_NS, Kube
from tests.support.load import Load, Outcome, Request, between, report, tally
from tests.support.postgres_server import (
    PostgresServer,
    gateway_dsn,
    insert_key,
    maas_api_database,
)

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
    (tmp_path / "authz.yaml").write_text(yaml.safe_dump(authz))
    stack = LocalStack(
        tmp_path / "stack",
        Ports.free(),
        authz_config=tmp_path / "authz.yaml",
        ratelimit_config=_limits_config(tmp_path),
    )
    stack.start()
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
    before = between(uncached, fresh_load.marks["start"], stopping)
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
    authz["api_keys"] = {
        "source": "postgresql",
        "postgresql": {"dsn": gateway_dsn(database), "timeout": "300ms",
                       "connect_timeout": "300ms", "max_connections": 4},
        "cache": {"ttl": "1s", "negative_ttl": "1s", "stale_if_error": "60s"},
    }  # fmt: skip
    (tmp_path / "authz.yaml").write_text(yaml.safe_dump(authz))
    stack = LocalStack(
        tmp_path / "stack",
        Ports.free(),
        authz_config=tmp_path / "authz.yaml",
        ratelimit_config=_limits_config(tmp_path),
    )
    stack.start()
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
