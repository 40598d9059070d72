"""The client: raw asyncio HTTP/1.1 with keep-alive, timing the first byte, the first body byte
and the last byte."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.usage.constants import (
    Json,
)
from bench.usage.upstream import compact_json


@dataclass
class Result:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    complete: bool = False  # the body ended as its framing says (not cut)
    error: str | None = None
    first_byte: float = math.nan  # seconds from sending the request
    first_body: float = math.nan
    last_byte: float = math.nan
    nbytes: int = 0
    chunk_times: list[float] = field(default_factory=list)

    def summary(self, expected: Result | None = None) -> Json:
        out: Json = {
            "status": self.status,
            "complete": self.complete,
            "bytes": self.nbytes,
            "events": self.body.count(b"data: "),
            "usage_event": b'"usage"' in self.body and b"text/event-stream" in self.ctype(),
            "done_event": b"data: [DONE]" in self.body,
            "body_start": self.body[:100].decode(errors="replace"),
        }
        if expected is not None:
            out["expected_bytes"] = expected.nbytes
        if self.error:
            out["error"] = self.error
        return out

    def ctype(self) -> bytes:
        return self.headers.get("content-type", "").encode()


async def one_request(
    port: int,
    body: bytes,
    headers: dict[str, str],
    path: str = "/v1/chat/completions",
    limit_s: float = 10.0,
) -> Result:
    """One request on its own connection."""
    client = Client(port)
    try:
        return await client.request(path, body, headers, limit_s=limit_s)
    finally:
        await client.close()


def chat_body(stream: bool, include_usage: bool | None = None) -> bytes:
    body: Json = {
        "model": "bench",
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 100,
        "stream": stream,
    }
    if include_usage is not None:
        body["stream_options"] = {"include_usage": include_usage}
    return compact_json(body).encode()


class Client:
    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.reader = self.writer = None

    async def request(
        self,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        keep_body: bool = True,
        limit_s: float = 30.0,
    ) -> Result:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = self.reader, self.writer
        assert reader is not None
        lines = [f"POST {path} HTTP/1.1", "host: bench", "content-type: application/json"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        lines.append(f"content-length: {len(body)}")
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
        result = Result()
        parts: list[bytes] = []
        start = time.perf_counter()

        def got(data: bytes) -> None:
            now = time.perf_counter() - start
            if not result.nbytes:
                result.first_body = now
            result.nbytes += len(data)
            result.chunk_times.append(now)
            if keep_body:
                parts.append(data)

        try:
            writer.write(raw)
            async with asyncio.timeout(limit_s):
                head = await reader.readuntil(b"\r\n\r\n")
                result.first_byte = time.perf_counter() - start
                status_line, *header_lines = head.decode("latin-1").split("\r\n")
                result.status = int(status_line.split(" ")[1])
                for line in header_lines:
                    if line:
                        key, _, value = line.partition(":")
                        result.headers[key.strip().lower()] = value.strip()
                await _read_body(reader, result.headers, got)
                result.complete = True
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, ValueError) as error:
            result.error = f"{type(error).__name__}: {error}"[:200]
        result.last_byte = time.perf_counter() - start
        result.body = b"".join(parts)
        if not result.complete or result.headers.get("connection", "").lower() == "close":
            await self.close()
        return result


async def _read_body(
    reader: asyncio.StreamReader, headers: dict[str, str], got: Callable[[bytes], None]
) -> None:
    """Reads a response body as its framing says; raises IncompleteReadError when it is cut."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return
            got((await reader.readexactly(size + 2))[:-2])
    elif "content-length" in headers:
        remaining = int(headers["content-length"])
        while remaining:
            data = await reader.read(min(remaining, 1 << 16))
            if not data:
                raise asyncio.IncompleteReadError(b"", remaining)
            remaining -= len(data)
            got(data)
    else:
        while data := await reader.read(1 << 16):
            got(data)
