"""A vLLM-shaped model server: raw asyncio HTTP/1.1, keep-alive.

Request headers steer it (Envoy passes them on):
  x-bench-events      content events in a stream (default 20)
  x-bench-delay-ms    time between events (default 0)
  x-bench-event-bytes pad each content event to about this size (default: a short token)
  x-bench-json-bytes  size of a non-streaming answer (default 600)
  x-bench-mode        "json": answer JSON even to a streaming request
  x-bench-eol         "crlf": SSE lines end with CRLF (as sse-starlette does) instead of \n
  x-bench-tail        "nonl": the final `data: [DONE]` is not followed by a blank line
  x-bench-reset-after N: reset the connection after the Nth SSE event
The usage event is sent only when the request asked for it (stream_options.include_usage),
like vLLM; the answer says whether it did in `x-bench-saw-include-usage`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json

from bench.usage.constants import (
    PROMPT_TOKENS,
    Json,
)


def compact_json(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _usage(completion: int) -> Json:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "total_tokens": PROMPT_TOKENS + completion,
        "completion_tokens": completion,
    }


def _chunk(choices: list[Json], usage: Json | None = None) -> Json:
    chunk: Json = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1730000000,
        "model": "bench",
        "choices": choices,
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def _delta(delta: Json, finish: str | None = None) -> list[Json]:
    return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]


def build_stream(
    events: int, event_bytes: int, include_usage: bool, eol: str, tail: str
) -> list[bytes]:
    """The SSE events of one answer, each framed as one HTTP/1.1 chunk."""

    def sse(data: str, last: bool = False) -> bytes:
        ending = eol if last and tail == "nonl" else eol + eol
        return f"data: {data}{ending}".encode()

    overhead = len(sse(compact_json(_chunk(_delta({"content": ""})))))
    pad = max(0, event_bytes - overhead)
    words = ("lorem ipsum dolor sit amet " * (pad // 27 + 1))[:pad] if pad else ""
    out = [sse(compact_json(_chunk(_delta({"role": "assistant", "content": ""}))))]
    for i in range(events):
        content = words if pad else f" tok{i}"
        out.append(sse(compact_json(_chunk(_delta({"content": content})))))
    out.append(sse(compact_json(_chunk(_delta({}, "length")))))
    if include_usage:
        out.append(sse(compact_json(_chunk([], _usage(events)))))
    out.append(sse("[DONE]", last=True))
    return [b"%x\r\n%s\r\n" % (len(event), event) for event in out]


def build_json(size: int) -> bytes:
    completion = max(1, size // 4)
    answer: Json = {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1730000000,
        "model": "bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "", "tool_calls": []},
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
            }
        ],
        "usage": {**_usage(completion), "prompt_tokens_details": None},
        "prompt_logprobs": None,
    }
    pad = max(0, size - len(compact_json(answer)))
    answer["choices"][0]["message"]["content"] = ("lorem ipsum " * (pad // 12 + 1))[:pad]
    return compact_json(answer).encode()


async def _read_request(
    reader: asyncio.StreamReader,
) -> tuple[str, dict[str, str], bytes] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    target = lines[0].split(" ")[1]
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
    body = b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                break
            parts.append((await reader.readexactly(size + 2))[:-2])
        body = b"".join(parts)
    return target, headers, body


class Upstream:
    def __init__(self) -> None:
        self._streams: dict[tuple[int, int, bool, str, str], list[bytes]] = {}
        self._json: dict[int, bytes] = {}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                _, headers, body = request
                await self._answer(writer, headers, body)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _answer(
        self, writer: asyncio.StreamWriter, headers: dict[str, str], body: bytes
    ) -> None:
        try:
            parsed = json.loads(body) if body else {}
        except ValueError:
            parsed = {}
        stream = bool(parsed.get("stream"))
        options = parsed.get("stream_options") or {}
        include_usage = bool(options.get("include_usage"))
        saw = b"x-bench-saw-include-usage: " + (b"true" if include_usage else b"false") + b"\r\n"
        if not stream or headers.get("x-bench-mode") == "json":
            size = int(headers.get("x-bench-json-bytes", "600"))
            answer = self._json.get(size) or self._json.setdefault(size, build_json(size))
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                + saw
                + b"content-length: %d\r\n\r\n" % len(answer)
                + answer
            )
            await writer.drain()
            return
        key = (
            int(headers.get("x-bench-events", "20")),
            int(headers.get("x-bench-event-bytes", "0")),
            include_usage,
            "\r\n" if headers.get("x-bench-eol") == "crlf" else "\n",
            headers.get("x-bench-tail", ""),
        )
        events = self._streams.get(key) or self._streams.setdefault(key, build_stream(*key))
        delay = float(headers.get("x-bench-delay-ms", "0")) / 1000
        reset_after = int(headers.get("x-bench-reset-after", "0"))
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            + saw
            + b"transfer-encoding: chunked\r\n\r\n"
        )
        loop = asyncio.get_running_loop()
        start = loop.time()
        for index, event in enumerate(events):
            if delay and index:
                # absolute schedule: the upstream's duration does not drift with timer slack
                await asyncio.sleep(max(0.0, start + index * delay - loop.time()))
            writer.write(event)
            await writer.drain()
            if index + 1 == reset_after:
                writer.transport.abort()  # the connection dies mid-body, as a crashed model would
                raise ConnectionResetError("reset on request")
        writer.write(b"0\r\n\r\n")
        await writer.drain()


async def serve_upstream(port: int) -> None:
    upstream = Upstream()
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", port, backlog=512)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description="the usage bench's vLLM-shaped upstream")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_upstream(args.port))


if __name__ == "__main__":
    main()
