"""Rate limits through the real Envoy, with descriptors built from maas-authz's metadata."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from maas_demo.stack import LocalStack, Ports, Topology
from tests.e2e.conftest import Gateway, http
from tests.support.refusals import free_requests_refusal_body, free_requests_refusal_headers

pytestmark = pytest.mark.e2e
CHAT = "/llm/tiny/v1/chat/completions"
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
GRPCURL = str(pathlib.Path(sys.executable).parent / "grpcurl")


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, topology: Topology) -> Iterator[Gateway]:
    """A stack of its own, so that its counters start at zero (the default platform limits), in
    each topology."""
    stack = LocalStack(tmp_path_factory.mktemp("limited"), Ports.free(), topology=topology)
    stack.start()
    yield Gateway(stack)
    stack.stop()


@pytest.fixture(scope="module")
def two_hop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The two-server topology alone: maas-ratelimit's own port."""
    stack = LocalStack(tmp_path_factory.mktemp("two-hop"), Ports.free())
    stack.start()
    yield Gateway(stack)
    stack.stop()


def test_sixth_free_request_within_two_minutes_gets_429_with_retry_after(
    limited: Gateway,
) -> None:
    statuses = [limited.request(CHAT, "sk-demo-free", BODY).status for _ in range(5)]
    assert statuses == [200] * 5

    sixth = limited.request(CHAT, "sk-demo-free", BODY)

    assert sixth.status == 429
    # token bucket: one request comes back every 2m / 5 = 24 s
    assert 1 <= int(sixth.headers["retry-after"]) <= 24
    for name, value in free_requests_refusal_headers(sixth.headers["retry-after"]):
        assert sixth.headers[name] == value
    assert sixth.json() == free_requests_refusal_body(sixth.headers["retry-after"])
    assert sixth.headers["x-ratelimit-remaining"] == "0"


def test_spoofed_identity_headers_do_not_escape_the_limit(limited: Gateway) -> None:
    # runs after the free user is limited: claiming another user or tier changes nothing,
    # because the descriptors come from ext_authz metadata, not from request headers
    for spoof in (
        {"x_maas_user": "someone-else"},
        {"x_maas_tier": "enterprise"},
        {"x_request_id": "11111111-2222-3333-4444-555555555555"},
    ):
        assert limited.request(CHAT, "sk-demo-free", BODY, **spoof).status == 429


def test_premium_user_is_not_limited_at_the_free_limit(limited: Gateway) -> None:
    statuses = [limited.request(CHAT, "sk-demo-premium", BODY).status for _ in range(10)]
    assert statuses == [200] * 10
    last = limited.request(CHAT, "sk-demo-premium", BODY)
    assert last.headers["x-ratelimit-limit"].startswith("20")
    assert last.headers["x-ratelimit-remaining"] == "9"


def test_denied_requests_consume_nothing(limited: Gateway) -> None:
    # the no-access user is refused by maas-authz (403) before any rate limit is asked
    for _ in range(8):
        assert limited.request(CHAT, "sk-demo-noaccess", BODY).status == 403
    metrics = http(
        f"http://127.0.0.1:{limited.stack.limiter_http_port}/metrics", method="GET"
    ).body.decode()
    assert (
        'maas_ratelimit_decisions_total{limit="free-requests",result="allowed",tier="free"} 5.0'
        in metrics
    )
    assert (
        'maas_ratelimit_decisions_total{limit="free-requests",result="limited",tier="free"}'
        in metrics
    )
    assert "demo-free" not in metrics  # no user in any label


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=30, check=False
    )


def test_grpcurl_lists_describes_and_shows_over_limit(two_hop: Gateway) -> None:
    address = f"127.0.0.1:{two_hop.stack.ports.ratelimit_grpc}"

    listed = grpcurl(address, "list")
    assert listed.returncode == 0, listed.stderr
    assert "envoy.service.ratelimit.v3.RateLimitService" in listed.stdout.split()

    described = grpcurl(address, "describe", "envoy.service.ratelimit.v3.RateLimitService")
    assert "rpc ShouldRateLimit ( .envoy.service.ratelimit.v3.RateLimitRequest )" in (
        described.stdout
    )

    # 6 hits at once against "free: 5 requests per 2m" for a user nobody has used
    answer = should_rate_limit(address, "grpcurl", hits=6)
    assert answer["overall_code"] == "OVER_LIMIT"
    assert answer["statuses"][0]["current_limit"]["name"] == "free tier: 5 requests per 2m"


def should_rate_limit(address: str, user: str, *, hits: int) -> dict[str, Any]:
    """ShouldRateLimit through grpcurl: one free-tier descriptor for `user`; the JSON answer."""
    request = {
        "domain": "maas",
        "descriptors": [
            {
                "entries": [{"key": "tier", "value": "free"}, {"key": "user", "value": user}],
                "hits_addend": hits,
            }
        ],
    }
    called = grpcurl(
        "-d", json.dumps(request), address,
        "envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
    )  # fmt: skip
    assert called.returncode == 0, called.stderr
    answer: dict[str, Any] = json.loads(called.stdout)
    return answer


def test_grpcurl_peeks_without_consuming(two_hop: Gateway) -> None:
    address = f"127.0.0.1:{two_hop.stack.ports.ratelimit_grpc}"
    for _ in range(2):  # the second sees as much as the first: nothing was taken
        answer = should_rate_limit(address, "x", hits=0)
        limits = answer["dynamic_metadata"]["limits"]  # grpcurl: proto names
        assert [x["name"] for x in limits] == ["free-requests", "free-tokens"]
        assert [x["remaining"] for x in limits] == [5, 100]
