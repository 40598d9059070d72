"""Unit tests for the demo OpenAI-compatible backend (src/maas_demo/backend.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from maas_demo.backend import build_app

CHAT = "/llm/tiny/v1/chat/completions"


@pytest_asyncio.fixture
async def client() -> AsyncIterator[TestClient[Any, Any]]:
    app = build_app([("llm", "tiny"), ("team-a", "other")])
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


def sse_events(raw: str) -> list[str]:
    """Splits an SSE body into its data payloads, checking the framing on the way."""
    assert raw.endswith("\n\n")
    events = []
    for block in raw.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        events.append(block.removeprefix("data: "))
    return events


async def stream_chunks(
    client: TestClient[Any, Any], path: str, body: dict[str, Any]
) -> list[dict[str, Any]]:
    resp = await client.post(path, json=body)
    assert resp.status == 200
    assert resp.content_type == "text/event-stream"
    events = sse_events(await resp.text())
    assert events[-1] == "[DONE]"
    assert "[DONE]" not in events[:-1]
    return [json.loads(e) for e in events[:-1]]


@pytest.mark.asyncio
async def test_chat_usage_arithmetic(client: TestClient[Any, Any]) -> None:
    body = {
        "model": "tiny",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello there world"},
        ],
        "max_tokens": 5,
    }
    resp = await client.post(CHAT, json=body)
    assert resp.status == 200
    data = await resp.json()
    assert data["object"] == "chat.completion"
    assert data["model"] == "tiny"
    # 2 + 3 words plus 4 per message.
    assert data["usage"] == {
        "prompt_tokens": 13,
        "total_tokens": 18,
        "completion_tokens": 5,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }
    message = data["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert message["content"] == "tiny tiny tiny tiny tiny"
    assert data["choices"][0]["finish_reason"] == "length"


@pytest.mark.asyncio
async def test_chat_default_and_capped_max_tokens(client: TestClient[Any, Any]) -> None:
    messages = [{"role": "user", "content": "hi"}]
    data = await (await client.post(CHAT, json={"messages": messages})).json()
    assert data["usage"]["completion_tokens"] == 16
    body = {"messages": messages, "max_tokens": 100_000}
    data = await (await client.post(CHAT, json=body)).json()
    assert data["usage"]["completion_tokens"] == 256
    assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + 256


@pytest.mark.asyncio
async def test_chat_stream_with_usage(client: TestClient[Any, Any]) -> None:
    body = {
        "messages": [{"role": "user", "content": "one two"}],
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = await stream_chunks(client, CHAT, body)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    contents = [c["choices"][0]["delta"].get("content") for c in chunks[1:4]]
    assert contents == ["tiny", " tiny", " tiny"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    last = chunks[-1]
    assert last["choices"] == []
    assert last["usage"] == {"prompt_tokens": 6, "total_tokens": 9, "completion_tokens": 3}
    assert all("usage" not in c for c in chunks[:-1])


@pytest.mark.asyncio
async def test_chat_stream_without_usage(client: TestClient[Any, Any]) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "stream": True}
    resp = await client.post(CHAT, json=body)
    raw = await resp.text()
    assert "usage" not in raw
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    # role chunk, 2 token chunks, finish chunk
    assert len(chunks) == 4
    assert all(c["choices"] for c in chunks)


@pytest.mark.asyncio
async def test_completions(client: TestClient[Any, Any]) -> None:
    path = "/team-a/other/v1/completions"
    data = await (await client.post(path, json={"prompt": "a b c", "max_tokens": 2})).json()
    assert data["object"] == "text_completion"
    assert data["model"] == "other"
    assert data["choices"][0]["text"] == "other other"
    assert data["usage"] == {
        "prompt_tokens": 3,
        "total_tokens": 5,
        "completion_tokens": 2,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }
    # A list of prompts gets one choice each; usage sums over them.
    data = await (await client.post(path, json={"prompt": ["a", "b c"], "max_tokens": 2})).json()
    assert [c["index"] for c in data["choices"]] == [0, 1]
    assert data["usage"]["prompt_tokens"] == 3
    assert data["usage"]["completion_tokens"] == 4
    assert data["usage"]["total_tokens"] == 7


@pytest.mark.asyncio
async def test_completions_stream_with_usage(client: TestClient[Any, Any]) -> None:
    body = {
        "prompt": "a b",
        "max_tokens": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = await stream_chunks(client, "/llm/tiny/v1/completions", body)
    assert all(c["object"] == "text_completion" for c in chunks)
    assert [c["choices"][0]["text"] for c in chunks[:2]] == ["tiny", " tiny"]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 2, "total_tokens": 4, "completion_tokens": 2}
    assert all("usage" not in c for c in chunks[:-1])


@pytest.mark.asyncio
async def test_embeddings(client: TestClient[Any, Any]) -> None:
    path = "/llm/tiny/v1/embeddings"
    data = await (await client.post(path, json={"input": ["hello world", "x"]})).json()
    assert data["object"] == "list"
    assert [d["index"] for d in data["data"]] == [0, 1]
    vectors = [d["embedding"] for d in data["data"]]
    assert all(len(v) == 8 and all(isinstance(f, float) for f in v) for v in vectors)
    assert vectors[0] != vectors[1]
    assert data["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    again = await (await client.post(path, json={"input": "hello world"})).json()
    assert again["data"][0]["embedding"] == vectors[0]
    assert again["usage"] == {"prompt_tokens": 2, "total_tokens": 2}


@pytest.mark.asyncio
async def test_models(client: TestClient[Any, Any]) -> None:
    data = await (await client.get("/v1/models")).json()
    assert data["object"] == "list"
    assert sorted(m["id"] for m in data["data"]) == ["other", "tiny"]
    data = await (await client.get("/llm/tiny/v1/models")).json()
    assert [m["id"] for m in data["data"]] == ["tiny"]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/llm/nope/v1/chat/completions"),
        ("GET", "/llm/nope/v1/models"),
        ("POST", "/llm/tiny/v1/unknown"),
        ("GET", "/nothing"),
    ],
)
async def test_not_found(client: TestClient[Any, Any], method: str, path: str) -> None:
    resp = await client.request(method, path, json={"messages": []})
    assert resp.status == 404
    error = (await resp.json())["error"]
    assert error["type"] == "not_found_error"
    assert error["code"] == 404
    assert isinstance(error["message"], str)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[1, 2]",
        b'{"messages": "hi"}',
        b'{"messages": [{"role": "user", "content": 5}]}',
        b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "3"}',
        b'{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}',
    ],
)
async def test_bad_request(client: TestClient[Any, Any], body: bytes) -> None:
    resp = await client.post(CHAT, data=body, headers={"content-type": "application/json"})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == 400


@pytest.mark.asyncio
async def test_request_recording(client: TestClient[Any, Any]) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    await client.post(CHAT, json=body, headers={"X-User": "alice"})
    await client.get("/llm/tiny/v1/models", headers={"Authorization": "Bearer t"})
    records = await (await client.get("/_demo/requests")).json()
    assert [(r["method"], r["path"]) for r in records] == [
        ("POST", CHAT),
        ("GET", "/llm/tiny/v1/models"),
    ]
    assert records[0]["headers"]["x-user"] == "alice"
    assert records[1]["headers"]["authorization"] == "Bearer t"
    assert (await client.delete("/_demo/requests")).status == 200
    assert await (await client.get("/_demo/requests")).json() == []


@pytest.mark.asyncio
async def test_request_recording_keeps_last_100(client: TestClient[Any, Any]) -> None:
    for i in range(105):
        await client.get("/v1/models", headers={"x-n": str(i)})
    records = await (await client.get("/_demo/requests")).json()
    assert len(records) == 100
    assert records[0]["headers"]["x-n"] == "5"
    assert records[-1]["headers"]["x-n"] == "104"


@pytest.mark.asyncio
async def test_fail_hook_500(client: TestClient[Any, Any]) -> None:
    body = {"messages": [{"role": "user", "content": "x"}]}
    resp = await client.post(CHAT, json=body, headers={"x-demo-fail": "500"})
    assert resp.status == 500
    error = (await resp.json())["error"]
    assert error["code"] == 500
    assert error["message"]


@pytest.mark.asyncio
async def test_fail_hook_reset(client: TestClient[Any, Any]) -> None:
    body = {"messages": [{"role": "user", "content": "x"}]}
    with pytest.raises(aiohttp.ClientError):
        await client.post(CHAT, json=body, headers={"x-demo-fail": "reset"})
    # The server keeps serving after the abort.
    assert (await client.post(CHAT, json=body)).status == 200


@pytest.mark.asyncio
async def test_healthz(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert await resp.text() == "ok"
