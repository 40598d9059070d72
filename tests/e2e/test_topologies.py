"""What the rate limits promise, in both topologies, through the real Envoy on a real Redis: the
same 429 (status, headers, body), shadow limits that count and refuse nothing, and each store
failure mode while Redis is stopped, then enforcement again once it is back.

The two-server topology fails as Envoy's rate limit filter is configured (failure_mode_deny
false in envoy/gateway.yaml: maas-ratelimit's UNAVAILABLE still lets the request through); the
one-hop topology has no such filter, so maas-authz applies the failure mode itself: open lets the
request through, closed answers 503 with Retry-After (docs/operations.md, failure table).
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import yaml

from maas_demo.stack import TOPOLOGIES, LocalStack, Ports, Topology
from tests.e2e.conftest import Gateway, metrics, stack_configs
from tests.support.redis_server import RedisServer
from tests.support.refusals import free_requests_refusal_body, free_requests_refusal_headers

pytestmark = pytest.mark.e2e
CHAT = "/llm/tiny/v1/chat/completions"
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
USERS = {  # key -> (username, group)
    "sk-top-free": ("top-free", "tier-free-users"),
    "sk-top-premium": ("top-premium", "tier-premium-users"),
    "sk-top-outage": ("top-outage", "tier-free-users"),
}
LIMITS = {
    "domain": "maas",
    "limits": [
        {"name": "free-requests", "tier": "free", "kind": "requests", "limit": 5, "window": "2m"},
        {"name": "premium-requests", "tier": "premium", "kind": "requests", "limit": 1000,
         "window": "1m"},
        {"name": "premium-trial", "tier": "premium", "kind": "requests", "limit": 2,
         "window": "1h", "shadow": True},
    ],
}  # fmt: skip
# the 429's headers, in order, less those of the connection (date, server, length, close)
REFUSAL_HEADERS = [
    "retry-after", "x-maas-ratelimit-limit", "content-type",
    "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
    "x-envoy-ratelimited", "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset",
]  # fmt: skip


@dataclass
class Rig:
    gateway: Gateway
    redis: RedisServer
    topology: Topology
    failure_mode: str


@pytest.fixture(
    scope="module",
    params=[(t, mode) for t in TOPOLOGIES for mode in ("open", "closed")],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def rig(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Rig]:
    topology, failure_mode = request.param
    work: pathlib.Path = tmp_path_factory.mktemp(f"topology-{topology}-{failure_mode}")
    redis = RedisServer(work / "redis")
    redis.start()
    configs = stack_configs(work, USERS, LIMITS)
    ratelimit = yaml.safe_load(configs["ratelimit_config"].read_text())
    ratelimit["store"] = {
        "type": "redis",
        "failure_mode": failure_mode,
        "redis": {"url": redis.url, "timeout": "100ms", "connect_timeout": "100ms"},
    }
    configs["ratelimit_config"].write_text(yaml.safe_dump(ratelimit))
    stack = LocalStack(work / "stack", Ports.free(), topology=topology, **configs)
    try:
        stack.start()
        yield Rig(Gateway(stack), redis, topology, failure_mode)
    finally:
        stack.stop()
        redis.cleanup()


def test_the_sixth_free_request_gets_the_same_429_in_both_topologies(rig: Rig) -> None:
    statuses = [rig.gateway.request(CHAT, "sk-top-free", BODY).status for _ in range(5)]
    assert statuses == [200] * 5
    sixth = rig.gateway.request(CHAT, "sk-top-free", BODY)
    assert sixth.status == 429
    retry_after = sixth.headers["retry-after"]
    names = [
        n for n in sixth.headers if n not in ("date", "server", "content-length", "connection")
    ]
    assert names == REFUSAL_HEADERS
    for name, value in free_requests_refusal_headers(retry_after):
        assert sixth.headers[name] == value
    assert sixth.headers["x-envoy-ratelimited"] == "true"
    assert sixth.headers["x-ratelimit-limit"] == "5"  # a 2 m window has no Envoy unit
    assert sixth.headers["x-ratelimit-remaining"] == "0"
    assert sixth.json() == free_requests_refusal_body(retry_after)


def test_a_shadow_limit_counts_and_refuses_nothing(rig: Rig) -> None:
    statuses = [rig.gateway.request(CHAT, "sk-top-premium", BODY).status for _ in range(4)]
    assert statuses == [200] * 4  # the shadow limit is 2 an hour
    counted = metrics(rig.gateway).value(
        "maas_ratelimit_decisions_total", limit="premium-trial", result="shadow_limited",
        tier="premium",
    )  # fmt: skip
    assert counted == 2


def test_redis_stopped_the_failure_mode_then_limits_again(rig: Rig) -> None:
    gateway = rig.gateway
    assert gateway.request(CHAT, "sk-top-outage", BODY).status == 200
    rig.redis.stop()
    try:
        during = [gateway.request(CHAT, "sk-top-outage", BODY) for _ in range(8)]
    finally:
        rig.redis.start()  # the same port: the stores reconnect
    answers = metrics(gateway)
    if rig.failure_mode == "closed" and rig.topology == "one-hop":
        assert {r.status for r in during} == {503}
        assert {r.json()["error"]["code"] for r in during} == {"ratelimit_unavailable"}  # type: ignore[index]
        assert {int(r.headers["retry-after"]) for r in during} == {5}
        assert answers.value("maas_ratelimit_calls_total", answer="unavailable") >= 8
    else:
        # failing open (and in two hops, Envoy's rate limit filter fails open whatever
        # maas-ratelimit answers): more than the 5 requests the limit allows get through
        assert {r.status for r in during} == {200}
        answer = "failure_open" if rig.failure_mode == "open" else "unavailable"
        assert answers.value("maas_ratelimit_calls_total", answer=answer) >= 8
    # Redis is back, empty (it kept nothing): the limit holds again, from zero
    after = [gateway.request(CHAT, "sk-top-outage", BODY).status for _ in range(6)]
    assert after == [200] * 5 + [429]
