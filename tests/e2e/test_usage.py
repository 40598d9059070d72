"""Token usage charged end to end: Envoy's Lua filter reads the usage, the rate limit filter sends
it after the response, maas-ratelimit debits the token bucket. With the demo backend."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from maas_demo.stack import LocalStack, Ports, Topology
from tests.e2e.conftest import (
    Gateway,
    HttpResult,
    charged,
    http,
    metrics,
    settled,
    stack_configs,
    wait_for,
)

pytestmark = pytest.mark.e2e
CHAT = "/llm/tiny/v1/chat/completions"
EMBED = "/llm/tiny/v1/embeddings"
TOKEN_WINDOW_S = 10  # 100 tokens per 10 s: refill is quick enough to test, slow enough to count

USERS = {  # key -> (username, group)
    "sk-free-plain": ("free-plain", "tier-free-users"),
    "sk-free-stream": ("free-stream", "tier-free-users"),
    "sk-free-usage": ("free-usage", "tier-free-users"),
    "sk-free-refill": ("free-refill", "tier-free-users"),
    "sk-free-errors": ("free-errors", "tier-free-users"),
    "sk-free-embed": ("free-embed", "tier-free-users"),
    "sk-premium": ("premium", "tier-premium-users"),
}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, topology: Topology) -> Iterator[Gateway]:
    work = tmp_path_factory.mktemp("usage")
    limits = {
        "domain": "maas",
        "limits": [
            {"name": "free-requests", "tier": "free", "kind": "requests", "limit": 1000,
             "window": "2m"},
            {"name": "free-tokens", "tier": "free", "kind": "tokens", "limit": 100,
             "window": f"{TOKEN_WINDOW_S}s"},
            {"name": "premium-tokens", "tier": "premium", "kind": "tokens", "limit": 50000,
             "window": "1m"},
        ],
    }  # fmt: skip
    stack = LocalStack(
        work / "stack", Ports.free(), topology=topology, **stack_configs(work, USERS, limits)
    )
    stack.start()
    yield Gateway(stack)
    stack.stop()


def chat(
    stream: bool, include_usage: bool | None = None, max_tokens: int = 40
) -> dict[str, object]:
    body: dict[str, object] = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "tell me a long story please"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }
    if include_usage is not None:
        body["stream_options"] = {"include_usage": include_usage}
    return body


def sse_events(result: HttpResult) -> list[str]:
    return [line[6:] for line in result.body.decode().splitlines() if line.startswith("data: ")]


def usage_of(result: HttpResult, stream: bool) -> dict[str, int] | None:
    if not stream:
        usage = result.json()["usage"]  # type: ignore[index]
        return usage  # type: ignore[no-any-return]
    for event in sse_events(result):
        if event != "[DONE]" and "usage" in json.loads(event):
            return json.loads(event)["usage"]  # type: ignore[no-any-return]
    return None


@pytest.mark.parametrize(
    ("key", "stream", "include_usage"),
    [
        ("sk-free-plain", False, None),
        ("sk-free-usage", True, True),
        ("sk-free-stream", True, None),  # never asked for usage: charged all the same
    ],
)
def test_free_user_is_refused_once_the_counted_usage_crosses_100(
    gateway: Gateway, key: str, stream: bool, include_usage: bool | None
) -> None:
    before = charged(gateway)
    used: list[int] = []
    started = time.monotonic()
    for _ in range(10):
        result = settled(gateway, CHAT, key, chat(stream, include_usage))
        if result.status == 429:
            break
        assert result.status == 200
        if stream and include_usage is None:
            # the usage event the gateway asked for is not shown to a client that did not ask
            assert all("usage" not in json.loads(e) for e in sse_events(result) if e != "[DONE]")
            # the deterministic demo model reports, for the same request, this usage
            direct = http(
                f"http://127.0.0.1:{gateway.stack.ports.backend}{CHAT}",
                body=chat(True, include_usage=True),
            )
            reference = usage_of(direct, stream=True)
            assert reference is not None
            used.append(reference["total_tokens"])
        else:
            usage = usage_of(result, stream)
            assert usage is not None
            used.append(usage["total_tokens"])
    else:
        pytest.fail("never refused")
    elapsed = time.monotonic() - started
    refused = result

    total_charged = charged(gateway) - before
    assert total_charged == sum(used)  # exactly what the model reported, nothing more
    # refused only after the usage crossed 100 (plus what refilled meanwhile), not before
    refill = elapsed * 100 / TOKEN_WINDOW_S
    assert total_charged >= 100
    per_request = total_charged / len(used)
    assert total_charged - per_request < 100 + refill + 1
    error = refused.json()["error"]  # type: ignore[index]
    assert error["type"] == "tokens"
    assert error["message"].startswith("rate limit exceeded: free tier: 100 tokens per 10s")
    assert int(refused.headers["retry-after"]) >= 1


def test_premium_user_is_not_limited_at_that_volume(gateway: Gateway) -> None:
    for _ in range(8):
        assert settled(gateway, CHAT, "sk-premium", chat(False)).status == 200


def test_the_token_bucket_refills_with_time(gateway: Gateway) -> None:
    key = "sk-free-refill"
    while settled(gateway, CHAT, key, chat(False, max_tokens=60)).status == 200:
        pass
    refused = settled(gateway, CHAT, key, chat(False, max_tokens=1))
    assert refused.status == 429
    wait = int(refused.headers["retry-after"])
    assert 1 <= wait <= TOKEN_WINDOW_S * 2
    time.sleep(wait)
    assert settled(gateway, CHAT, key, chat(False, max_tokens=1)).status == 200


def test_refused_and_failed_requests_are_not_charged(gateway: Gateway) -> None:
    key = "sk-free-errors"
    before = charged(gateway)
    m0 = metrics(gateway)

    failed = settled(gateway, CHAT, key, chat(False), x_demo_fail="500")
    assert failed.status == 500
    reset = settled(gateway, CHAT, key, chat(False), x_demo_fail="reset")
    assert reset.status in (502, 503)
    bad = settled(gateway, CHAT, key, chat(False), x_demo_fail="400")
    assert bad.status == 400

    def counted(outcome: str) -> float:
        return metrics(gateway).value(
            "maas_ratelimit_usage_responses_total", outcome=outcome, tier="free"
        ) - m0.value("maas_ratelimit_usage_responses_total", outcome=outcome, tier="free")

    assert wait_for(lambda: counted("upstream_error") == 2 and counted("client_error") == 1)
    assert charged(gateway) == before


def test_requests_refused_with_429_are_not_charged(gateway: Gateway) -> None:
    key = "sk-free-plain"  # limited by the first test; still in debt
    result = gateway.request(CHAT, key, chat(False))
    assert result.status == 429
    before = charged(gateway)
    assert wait_for(
        lambda: (
            metrics(gateway).value(
                "maas_ratelimit_usage_responses_total", outcome="rate_limited", tier="free"
            )
            >= 1
        )
    )
    assert charged(gateway) == before


def test_embeddings_are_charged(gateway: Gateway) -> None:
    before = charged(gateway)
    result = gateway.request(
        EMBED, "sk-free-embed", {"model": "tiny", "input": "four words right here"}
    )
    assert result.status == 200
    usage = result.json()["usage"]  # type: ignore[index]
    assert wait_for(lambda: charged(gateway) - before == usage["total_tokens"])


def test_usage_headers_from_the_backend_win_over_the_body(gateway: Gateway) -> None:
    # the demo backend, asked to, also reports usage in x-usage-* headers at 10x the body's
    # values: what is charged shows which one the gateway trusted
    before = charged(gateway)
    result = settled(
        gateway, CHAT, "sk-free-embed", chat(False, max_tokens=2), x_demo_usage_headers="x-usage-"
    )
    assert result.status == 200
    body_usage = result.json()["usage"]  # type: ignore[index]
    assert int(result.headers["x-usage-total-tokens"]) == 10 * body_usage["total_tokens"]
    assert charged(gateway) - before == 10 * body_usage["total_tokens"]
