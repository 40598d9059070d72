"""Token reservations end to end: the Lua filter estimates each request's usage, maas-ratelimit
takes that estimate from the token bucket on admission, so concurrent requests see each other, and
settles it against the real usage after the response. With the demo backend streaming slowly
(`--token-delay-ms`), so that requests overlap.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from maas_demo.stack import LocalStack, Ports, Topology
from tests.e2e.conftest import (
    Gateway,
    HttpResult,
    charged,
    metrics,
    reported,
    stack_configs,
    wait_for,
)

pytestmark = pytest.mark.e2e
CHAT = "/llm/tiny/v1/chat/completions"
MODEL = "llm/tiny"
CREDIT = 100  # free tier: 100 tokens per hour, so refill (0.03 tokens/s) counts for nothing here
WINDOW = "1h"
TOKEN_DELAY_MS = 20  # per streamed token: 40 tokens take 0.8 s, long enough to overlap
K = 10  # concurrent requests

USERS = {  # key -> (username, group)
    "sk-res-burst": ("res-burst", "tier-free-users"),
    "sk-res-failed": ("res-failed", "tier-free-users"),
}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, topology: Topology) -> Iterator[Gateway]:
    work = tmp_path_factory.mktemp("reservations")
    limits = {
        "domain": "maas",
        # the tokens limit alone, so that it is the limit every answer reports
        "limits": [
            {"name": "free-tokens", "tier": "free", "kind": "tokens", "limit": CREDIT,
             "window": WINDOW},
        ],
    }  # fmt: skip
    stack = LocalStack(
        work / "stack",
        Ports.free(),
        topology=topology,
        backend_args=("--token-delay-ms", str(TOKEN_DELAY_MS)),
        **stack_configs(work, USERS, limits),
    )
    stack.start()
    yield Gateway(stack)
    stack.stop()


def chat(max_tokens: int = 40, stream: bool = True) -> dict[str, object]:
    body: dict[str, object] = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "tell me a long story please"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def reservation(body: dict[str, object]) -> int:
    """What envoy/lua/usage.lua reserves for this body (weights 1): ceil(bytes / 4) + max_tokens.
    The e2e client sends json.dumps(body), byte for byte."""
    max_tokens = body["max_tokens"]
    assert isinstance(max_tokens, int)
    return math.ceil(len(json.dumps(body).encode()) / 4) + max_tokens


def stream_usage(result: HttpResult) -> dict[str, int]:
    for line in result.body.decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            event = json.loads(line[6:])
            if event.get("usage"):
                return event["usage"]  # type: ignore[no-any-return]
    raise AssertionError("no usage event in the stream")


def tokens_metric(gateway: Gateway, name: str, **labels: str) -> float:
    return metrics(gateway).value(
        f"maas_ratelimit_tokens_{name}_total", model=MODEL, tier="free", **labels
    )


def tokens_left(gateway: Gateway, user: str) -> int:
    """The user's free-tokens credit, peeked at (consuming nothing) through the gateway's
    /v1/quota with the user's key: the same answer in both topologies."""
    key = next(key for key, (name, _) in USERS.items() if name == user)
    answer = gateway.request(f"/v1/quota?model={MODEL}", key, method="GET")
    assert answer.status == 200, answer.body
    body = answer.json()
    assert isinstance(body, dict)
    (limit,) = body["limits"]
    assert limit["description"] == f"free tier: {CREDIT} tokens per {WINDOW}"
    return int(limit["remaining"])


@dataclass
class Timed:
    result: HttpResult
    started: float
    finished: float


def burst(gateway: Gateway, key: str, body: dict[str, object], count: int) -> list[Timed]:
    """`count` identical requests, released at once from as many threads."""
    barrier = threading.Barrier(count)
    out: list[Timed | None] = [None] * count

    def one(index: int) -> None:
        barrier.wait()
        started = time.monotonic()
        result = gateway.request(CHAT, key, body)
        out[index] = Timed(result, started, time.monotonic())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert all(t is not None for t in out), "a request of the burst did not finish"
    return [t for t in out if t is not None]


def test_concurrent_requests_cannot_overshoot_the_credit(gateway: Gateway) -> None:
    key, user = "sk-res-burst", USERS["sk-res-burst"][0]
    body = chat(max_tokens=40)
    reserve = reservation(body)
    before = reported(gateway)
    charged_before = charged(gateway)

    timed = burst(gateway, key, body, K)

    admitted = [t for t in timed if t.result.status == 200]
    refused = [t for t in timed if t.result.status != 200]
    assert all(t.result.status == 429 for t in refused)
    for t in refused:
        error = t.result.json()["error"]  # type: ignore[index]
        assert error["type"] == "tokens"
    # every refusal came back while the admitted streams were still running: no usage had been
    # charged yet, so the bucket still held its whole credit (> 0) and the rule without
    # reservations (need 1, take 0) would have admitted all K of them
    first_done = min(t.finished for t in admitted)
    assert refused and all(t.finished < first_done for t in refused)
    # ... whereas with reservations, at most ceil(credit / reservation) + 1 are admitted
    assert 1 <= len(admitted) <= math.ceil(CREDIT / reserve) + 1
    assert len(admitted) == math.ceil(CREDIT / reserve)  # exactly, as nothing settled meanwhile

    # settlement: every after-response report has arrived (the refused ones' too)
    assert wait_for(lambda: reported(gateway) >= before + K), "after-response reports missing"
    used = [stream_usage(t.result)["total_tokens"] for t in admitted]
    assert all(u <= reserve for u in used)  # the estimate covered the real usage
    total = charged(gateway) - charged_before
    assert total == sum(used)  # exactly what the model reported
    # the bound: the credit plus one request's usage (the last one admitted with credit left)
    assert total <= CREDIT + max(used)
    # without reservations: K requests of the same usage, all admitted
    assert K * used[0] > CREDIT + max(used)

    # reserved on admission, what was not used given back; refused requests got nothing back
    assert tokens_metric(gateway, "reserved") == len(admitted) * reserve
    assert wait_for(lambda: tokens_metric(gateway, "refunded") == sum(reserve - u for u in used)), (
        tokens_metric(gateway, "refunded")
    )
    # the bucket holds exactly what the usage left (nothing refunded for the refused ones)
    assert tokens_left(gateway, user) == max(0, CREDIT - sum(used))


def test_a_failed_answer_gives_its_reservation_back(gateway: Gateway) -> None:
    key, user = "sk-res-failed", USERS["sk-res-failed"][0]
    body = chat(max_tokens=40, stream=False)
    reserve = reservation(body)
    refunded_before = tokens_metric(gateway, "refunded")
    before = reported(gateway)

    failed = gateway.request(CHAT, key, body, x_demo_fail="500")
    assert failed.status == 500
    # while the request ran, its reservation was taken: the answer's headers say so
    assert failed.headers["x-ratelimit-remaining"] == str(CREDIT - reserve)
    assert wait_for(lambda: reported(gateway) >= before + 1)
    assert wait_for(lambda: tokens_metric(gateway, "refunded") == refunded_before + reserve)
    assert tokens_left(gateway, user) == CREDIT  # all of it back, nothing charged

    # the same request answered: charged its usage only
    ok = gateway.request(CHAT, key, body)
    assert ok.status == 200
    assert ok.headers["x-ratelimit-remaining"] == str(CREDIT - reserve)
    usage = ok.json()["usage"]  # type: ignore[index]
    assert wait_for(lambda: tokens_left(gateway, user) == CREDIT - usage["total_tokens"])
