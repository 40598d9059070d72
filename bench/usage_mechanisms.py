"""Lua filter vs ext_proc for reading LLM usage, measured on the real Envoy.

    .venv/bin/python bench/usage_mechanisms.py [--quick] [--out PATH] [--skip-behaviour]

Starts, on free loopback ports, an upstream that answers like vLLM (SSE `chat.completion.chunk`
events, a final usage event only when the request asked for it, `data: [DONE]`; or one JSON
answer), then Envoy as a plain HTTP proxy to it (no ext_authz, no rate limit), one at a time:

  baseline       no usage reader
  lua            envoy/lua/usage.lua (the gateway's reader), unmodified
  ext_proc       a minimal grpc.aio ext_proc server (below) doing the response side of the same
                 job: response headers SEND, response body STREAMED, the same 4 KiB-tail scan for
                 the last "usage":{...}, returned as dynamic metadata `maas.usage` at end of
                 stream; failure_mode_allow false, message_timeout 200 ms
  lua-prefilter  usage.lua with a cheaper Scanner:feed (a proposal, CPU rows only)

Rows: `lua+inject` is the lua Envoy with clients that did not ask for usage (the filter injects
stream_options.include_usage and strips the usage event again).

Measures, with sequential requests from a raw-socket client: latency added to a streamed and to a
JSON answer (median, p99 of first byte, first event, last byte); CPU per token stream and per MB
of a bulk stream (utime+stime of Envoy and of the ext_proc server from /proc/<pid>/stat). Then
behaviour: both readers produce the same usage; resets are not charged; the Lua stripping
(chunk:setBytes in bodyChunks) reaches the client and keeps delivery incremental; local replies
(direct_response, and replies from a filter before / after the reader); a request body over
Envoy's 1 MiB buffer limit; what a client sees when the mechanism fails (Lua runtime errors;
ext_proc server stopped, killed mid-stream, too slow), with failure_mode_allow false and true.

Each Envoy: --disable-hot-restart --log-level warn --concurrency 1, and a JSON access log of
%DYNAMIC_METADATA(maas.usage)% per request (in all configurations, so its cost is the same):
that is how the script sees what each reader produced. The script runs itself as the upstream
(--role upstream) and the ext_proc server (--role extproc) in child processes, which die with it.
Prints tables; writes everything to .bench/usage_mechanisms.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
USAGE_LUA = REPO / "envoy" / "lua" / "usage.lua"
DEFAULT_OUT = REPO / ".bench" / "usage_mechanisms.json"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROMPT_TOKENS = 17
TAIL_BYTES = 4096  # as usage.lua's TAIL_BYTES
NS = "maas.usage"
CONFIGS = ("baseline", "lua", "ext_proc")

Json = dict[str, Any]


# =================================================================================================
# The upstream: a vLLM-shaped model server (raw asyncio HTTP/1.1, keep-alive).
#
# Request headers steer it (Envoy passes them on):
#   x-bench-events      content events in a stream (default 20)
#   x-bench-delay-ms    time between events (default 0)
#   x-bench-event-bytes pad each content event to about this size (default: a short token)
#   x-bench-json-bytes  size of a non-streaming answer (default 600)
#   x-bench-mode        "json": answer JSON even to a streaming request
#   x-bench-eol         "crlf": SSE lines end with \r\n (as sse-starlette does) instead of \n
#   x-bench-tail        "nonl": the final `data: [DONE]` is not followed by a blank line
#   x-bench-reset-after N: reset the connection after the Nth SSE event
# The usage event is sent only when the request asked for it (stream_options.include_usage),
# like vLLM; the answer says whether it did in `x-bench-saw-include-usage`.
# =================================================================================================


def _compact(obj: object) -> str:
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

    overhead = len(sse(_compact(_chunk(_delta({"content": ""})))))
    pad = max(0, event_bytes - overhead)
    words = ("lorem ipsum dolor sit amet " * (pad // 27 + 1))[:pad] if pad else ""
    out = [sse(_compact(_chunk(_delta({"role": "assistant", "content": ""}))))]
    for i in range(events):
        content = words if pad else f" tok{i}"
        out.append(sse(_compact(_chunk(_delta({"content": content})))))
    out.append(sse(_compact(_chunk(_delta({}, "length")))))
    if include_usage:
        out.append(sse(_compact(_chunk([], _usage(events)))))
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
    pad = max(0, size - len(_compact(answer)))
    answer["choices"][0]["message"]["content"] = ("lorem ipsum " * (pad // 12 + 1))[:pad]
    return _compact(answer).encode()


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


async def serve_upstream() -> None:
    upstream = Upstream()
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0, backlog=512)
    port = server.sockets[0].getsockname()[1]
    print(f"PORT {port}", flush=True)
    async with server:
        await server.serve_forever()


# =================================================================================================
# The ext_proc server: the same job as usage.lua's response side, as an honest minimal server.
# =================================================================================================

USAGE_KEY = re.compile(rb'"usage"\s*:\s*\{')
BRACES = re.compile(rb"[{}]")
NUMBERS = {
    name: re.compile(rb'"' + name.encode() + rb'"\s*:\s*(\d+)')
    for name in ("prompt_tokens", "completion_tokens", "total_tokens")
}


class Scanner:
    """usage.lua's Scanner in Python: feed chunks in order; keeps the last complete usage object.

    Like the Lua one, it keeps at most a 4 KiB tail between chunks, so a usage object split across
    chunks is found if it is shorter than that.
    """

    def __init__(self) -> None:
        self.tail = b""
        self.usage: dict[str, int] | None = None

    def feed(self, chunk: bytes) -> None:
        text = self.tail + chunk
        consumed = 0
        if b'"usage"' in text:
            position = 0
            while match := USAGE_KEY.search(text, position):
                end = _balanced_end(text, match.end() - 1)
                if end is None:
                    break  # incomplete: kept in the tail for the next chunk
                found = {}
                for name, pattern in NUMBERS.items():
                    number = pattern.search(text, match.end() - 1, end)
                    if number:
                        found[name] = int(number.group(1))
                if found:
                    self.usage = found
                consumed = position = end
        rest = text[consumed:]
        self.tail = rest[-TAIL_BYTES:] if len(rest) > TAIL_BYTES else rest


def _balanced_end(text: bytes, start: int) -> int | None:
    depth = 0
    for brace in BRACES.finditer(text, start):
        depth += 1 if brace.group() == b"{" else -1
        if depth == 0:
            return brace.end()
    return None


def usage_report(status: int, usage: dict[str, int] | None) -> Json:
    """usage.lua's M.outcome + report: the maas.usage fields for this answer."""
    if status >= 500:
        outcome = "upstream_error"
    elif status == 429:
        outcome = "rate_limited"
    elif status >= 400:
        outcome = "client_error"
    elif status >= 300 or not usage:
        outcome = "no_usage"
    else:
        outcome = "charged"
    if outcome != "charged" or usage is None:
        return {"outcome": outcome}
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens")
    total = usage.get("total_tokens")
    if prompt is None and completion is None:
        prompt = total
    if prompt is None and total is not None and completion is not None:
        prompt = max(0, total - completion)
    if completion is None and total is not None and prompt is not None:
        completion = max(0, total - prompt)
    prompt, completion = prompt or 0, completion or 0
    return {
        "outcome": outcome,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "charge_prompt": "prompt_tokens",
        "charge_completion": "completion_tokens",
    }


async def serve_extproc(port: int, stall_after: int, stall_ms: float) -> None:
    import grpc  # noqa: PLC0415  (only the ext_proc child needs grpc)
    from envoy.service.ext_proc.v3 import (  # noqa: PLC0415
        external_processor_pb2 as pb,
    )
    from envoy.service.ext_proc.v3 import (  # noqa: PLC0415
        external_processor_pb2_grpc as pb_grpc,
    )
    from google.protobuf import struct_pb2  # noqa: PLC0415

    def metadata(fields: Json) -> Any:
        struct = struct_pb2.Struct()
        struct.update({NS: fields})
        return struct

    class Processor(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
        async def Process(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            status = 0
            scanner = Scanner()
            chunks = 0
            async for request in requests:
                kind = request.WhichOneof("request")
                if kind == "response_headers":
                    for header in request.response_headers.headers.headers:
                        if header.key == ":status":
                            status = int(header.raw_value.decode() or header.value or 0)
                    done = status >= 300 or request.response_headers.end_of_stream
                    # as the Lua: "incomplete" until the body has ended
                    report = usage_report(status, None) if done else {"outcome": "incomplete"}
                    yield pb.ProcessingResponse(
                        response_headers=pb.HeadersResponse(), dynamic_metadata=metadata(report)
                    )
                elif kind == "response_body":
                    chunks += 1
                    if stall_after and chunks == stall_after:
                        await asyncio.sleep(stall_ms / 1000)
                    body = request.response_body
                    scanner.feed(body.body)
                    if body.end_of_stream and status < 300:
                        yield pb.ProcessingResponse(
                            response_body=pb.BodyResponse(),
                            dynamic_metadata=metadata(usage_report(status, scanner.usage)),
                        )
                    else:
                        yield pb.ProcessingResponse(response_body=pb.BodyResponse())
                elif kind == "request_headers":
                    yield pb.ProcessingResponse(request_headers=pb.HeadersResponse())
                elif kind == "request_body":
                    yield pb.ProcessingResponse(request_body=pb.BodyResponse())
                elif kind == "request_trailers":
                    yield pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
                elif kind == "response_trailers":
                    yield pb.ProcessingResponse(response_trailers=pb.TrailersResponse())

    server = grpc.aio.server()
    pb_grpc.add_ExternalProcessorServicer_to_server(Processor(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"PORT {bound}", flush=True)
    await server.wait_for_termination()


# =================================================================================================
# Child processes (the upstream, the ext_proc server, Envoy), cleaned up at exit.
# =================================================================================================


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Children:
    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: list[str], log_path: Path, port_line: bool) -> subprocess.Popen[bytes]:
        log = log_path.open("ab")
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE if port_line else log,
            stderr=log,
            preexec_fn=_die_with_parent,  # noqa: PLW1509  (no threads here; a prctl only)
        )
        log.close()
        self.procs.append(proc)
        return proc

    def role(self, role: str, name: str, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
        argv = [sys.executable, str(Path(__file__).resolve()), "--role", role, *extra]
        proc = self.spawn(argv, self.logs / f"{name}.log", port_line=True)
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if not line.startswith("PORT "):
            self.stop(proc)
            raise RuntimeError(f"{name} did not start; see {self.logs / (name + '.log')}")
        return proc, int(line.split()[1])

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self.procs)):
            self.stop(proc)


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def http_get(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310  (loopback)
        return str(response.read().decode())


# =================================================================================================
# Envoy
# =================================================================================================


def lua_filter(script: Path) -> Json:
    return {
        "name": "envoy.filters.http.lua",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"filename": str(script)},
        },
    }


LOCAL_REPLIES = {
    "/local401": "direct_response 401 (router)",
    "/local429": "direct_response 429 (router)",
    "/before403": "filter before the reader, 403 (as ext_authz)",
    "/after429": "filter after the reader, 429 (as the rate limit filter)",
}


def responder(path: str, status: int) -> Json:
    """A Lua filter that answers `path` itself: a local reply from that place in the chain."""
    body = _compact({"error": {"message": f"local reply {status}", "code": status}})
    code = (
        "function envoy_on_request(handle)\n"
        f'  if handle:headers():get(":path") == "{path}" then\n'
        f'    handle:respond({{[":status"] = "{status}"}}, \'{body}\')\n'
        "  end\n"
        "end\n"
    )
    return {
        "name": f"responder{status}",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": code},
        },
    }


EXT_PROC_FILTER: Json = {
    "name": "envoy.filters.http.ext_proc",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": "ext_proc"}},
        "failure_mode_allow": False,
        "allow_mode_override": False,
        "message_timeout": "0.2s",
        "processing_mode": {
            "request_header_mode": "SKIP",
            "response_header_mode": "SEND",
            "request_body_mode": "NONE",
            "response_body_mode": "STREAMED",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        },
        # ext_proc may only write dynamic metadata into namespaces listed here
        "metadata_options": {"receiving_namespaces": {"untyped": [NS]}},
    },
}


def _cluster(name: str, port: int, http2: bool) -> Json:
    cluster: Json = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": port}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3"
                ".HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


def envoy_config(
    filters: list[Json], upstream_port: int, extproc_port: int | None, access_log: Path
) -> Json:
    def local(path: str, status: int, message: str) -> Json:
        body = _compact({"error": {"message": message, "code": status}})
        return {
            "match": {"path": path},
            "direct_response": {"status": status, "body": {"inline_string": body}},
        }

    hcm: Json = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
        ".v3.HttpConnectionManager",
        "stat_prefix": "bench",
        "route_config": {
            "name": "bench",
            "virtual_hosts": [
                {
                    "name": "bench",
                    "domains": ["*"],
                    "routes": [
                        local("/local401", 401, "denied"),
                        local("/local429", 429, "rate limited"),
                        {
                            "match": {"prefix": "/"},
                            "route": {"cluster": "upstream", "timeout": "0s"},
                        },
                    ],
                }
            ],
        },
        "http_filters": [
            *filters,
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
        "access_log": [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3"
                    ".FileAccessLog",
                    "path": str(access_log),
                    "log_format": {
                        "json_format": {
                            "id": "%REQ(X-BENCH-ID)%",
                            "status": "%RESPONSE_CODE%",
                            "flags": "%RESPONSE_FLAGS%",
                            "details": "%RESPONSE_CODE_DETAILS%",
                            "usage": f"%DYNAMIC_METADATA({NS})%",
                        }
                    },
                },
            }
        ],
    }
    clusters = [_cluster("upstream", upstream_port, http2=False)]
    if extproc_port is not None:
        clusters.append(_cluster("ext_proc", extproc_port, http2=True))
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "bench",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        },
    }


@dataclass
class Envoy:
    proc: subprocess.Popen[bytes]
    admin: int
    port: int
    access_log: Path
    log: Path

    def stats(self, pattern: str = r"^http\.bench\.(lua|ext_proc)\.") -> dict[str, int]:
        query = urllib.parse.quote(pattern)
        text = http_get(f"http://127.0.0.1:{self.admin}/stats?filter={query}")
        out: dict[str, int] = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                out[name] = int(value)
        return out

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def log_lines(self, needle: str) -> list[str]:
        return [
            line for line in self.log.read_text(errors="replace").splitlines() if needle in line
        ]

    def entries(self) -> dict[str, Json]:
        if not self.access_log.exists():
            return {}
        out: dict[str, Json] = {}
        for line in self.access_log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                out[str(entry.get("id"))] = entry
        return out

    def entry(self, request_id: str, wait: float = 2.0) -> Json | None:
        deadline = time.monotonic() + wait
        while True:
            found = self.entries().get(request_id)
            if found is not None or time.monotonic() > deadline:
                return found
            time.sleep(0.02)


def start_envoy(
    children: Children,
    work: Path,
    name: str,
    filters: list[Json],
    upstream_port: int,
    *,
    extproc_port: int | None = None,
) -> Envoy:
    from maas_demo.envoy import find_envoy  # noqa: PLC0415  (the project's binary lookup)

    directory = work / name
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "envoy.yaml"  # JSON is YAML
    access_log = directory / "access.log"
    config.write_text(json.dumps(envoy_config(filters, upstream_port, extproc_port, access_log)))
    admin_path = directory / "admin.address"
    admin_path.unlink(missing_ok=True)
    argv = [
        str(find_envoy()),
        "-c", str(config),
        "--disable-hot-restart",
        "--log-level", "warn",
        "--concurrency", "1",
        "--admin-address-path", str(admin_path),
        "--file-flush-interval-msec", "50",
    ]  # fmt: skip
    proc = children.spawn(argv, directory / "envoy.log", port_line=False)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"envoy {name} exited; see {directory / 'envoy.log'}")
        if admin_path.exists() and admin_path.read_text().strip():
            admin = int(admin_path.read_text().strip().rsplit(":", 1)[1])
            with contextlib.suppress(OSError):
                if http_get(f"http://127.0.0.1:{admin}/ready").strip() == "LIVE":
                    listeners = json.loads(
                        http_get(f"http://127.0.0.1:{admin}/listeners?format=json")
                    )
                    status = listeners["listener_statuses"][0]
                    port = int(status["local_address"]["socket_address"]["port_value"])
                    return Envoy(proc, admin, port, access_log, directory / "envoy.log")
        time.sleep(0.02)
    children.stop(proc)
    raise RuntimeError(f"envoy {name} not ready")


# =================================================================================================
# The client: raw asyncio HTTP/1.1 with keep-alive, timing first byte, first body byte, last byte.
# =================================================================================================


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
    return _compact(body).encode()


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


# =================================================================================================
# Measurements
# =================================================================================================


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def dist(values: list[float]) -> Json:
    ms = [v * 1000 for v in values] or [math.nan]
    return {
        "n": len(values),
        "p50_ms": statistics.median(ms),
        "p99_ms": pct(ms, 0.99),
        "mean_ms": statistics.fmean(ms),
        "min_ms": min(ms),
    }


@dataclass
class Params:
    rounds: int  # each configuration is started once per round; rounds interleave configurations
    stream_requests: int  # per row per round
    stream_events: int
    stream_delay_ms: float
    json_requests: int
    json_bytes: int
    bulk_mb: int
    bulk_event_bytes: int
    bulk_requests: int
    cpu_only_requests: int  # token streams for the rows measured for CPU only
    warmup: int


def stream_headers(events: int, delay_ms: float, event_bytes: int = 0) -> dict[str, str]:
    headers = {"x-bench-events": str(events), "x-bench-delay-ms": str(delay_ms)}
    if event_bytes:
        headers["x-bench-event-bytes"] = str(event_bytes)
    return headers


@dataclass
class Row:
    name: str
    config: str  # which Envoy serves it
    body: bytes  # what the client sends
    latency: bool  # measured for latency; else for CPU only


def prefilter_lua(work: Path) -> Path:
    """usage.lua with a cheaper Scanner:feed, measured for CPU only (a proposal, not the product).

    When the text holds no `"usage"` at all (almost every chunk), a plain string.find says so
    without the Lua pattern scan, and only the last 6 bytes (a possibly split `"usage"` key) are
    kept instead of a 4 KiB tail that every later chunk would scan again.
    """
    source = USAGE_LUA.read_text()
    anchor = "function Scanner:feed(chunk)\n  local text = self.tail .. chunk\n"
    if source.count(anchor) != 1:
        raise RuntimeError("usage.lua's Scanner:feed changed; update prefilter_lua()")
    patched = source.replace(
        anchor,
        anchor
        + "  if not text:find('\"usage\"', 1, true) then -- bench: the proposed fast path\n"
        + "    self.tail = text:sub(-6)\n"
        + "    return\n"
        + "  end\n",
    )
    path = work / "usage-prefilter.lua"
    path.write_text(patched)
    return path


@dataclass
class Sample:
    """Sequential requests through one Envoy: client timings and the CPU the processes used."""

    results: list[Result]
    bytes: int
    wall_s: float
    envoy_cpu_s: float
    extproc_cpu_s: float
    extproc_msgs: int

    @property
    def failed(self) -> int:
        return sum(1 for r in self.results if not (r.complete and r.status == 200))


async def run_requests(
    envoy: Envoy,
    extproc: subprocess.Popen[bytes] | None,
    body: bytes,
    headers: dict[str, str],
    count: int,
    *,
    warmup: int,
) -> Sample:
    client = Client(envoy.port)
    try:
        for _ in range(warmup):
            await client.request("/v1/chat/completions", body, headers, keep_body=False)
        stats = envoy.stats()
        envoy_cpu = envoy.cpu()
        extproc_cpu = cpu_seconds(extproc.pid) if extproc else 0.0
        wall = time.perf_counter()
        results = [
            await client.request("/v1/chat/completions", body, headers, keep_body=False)
            for _ in range(count)
        ]
        wall = time.perf_counter() - wall
        envoy_cpu = envoy.cpu() - envoy_cpu
        extproc_cpu = (cpu_seconds(extproc.pid) - extproc_cpu) if extproc else 0.0
    finally:
        await client.close()
    sent = envoy.stats().get("http.bench.ext_proc.stream_msgs_sent", 0)
    return Sample(
        results=results,
        bytes=sum(r.nbytes for r in results),
        wall_s=wall,
        envoy_cpu_s=envoy_cpu,
        extproc_cpu_s=extproc_cpu,
        extproc_msgs=sent - stats.get("http.bench.ext_proc.stream_msgs_sent", 0),
    )


def cpu_row(samples: list[Sample]) -> Json:
    requests = sum(len(s.results) for s in samples)
    mb = sum(s.bytes for s in samples) / (1 << 20)
    envoy_s = sum(s.envoy_cpu_s for s in samples)
    extproc_s = sum(s.extproc_cpu_s for s in samples)
    return {
        "requests": requests,
        "failed": sum(s.failed for s in samples),
        "mb": mb,
        "wall_s": sum(s.wall_s for s in samples),
        "mb_per_s": mb / sum(s.wall_s for s in samples),
        "envoy_us_per_mb": envoy_s * 1e6 / mb,
        "extproc_us_per_mb": extproc_s * 1e6 / mb,
        "total_us_per_mb": (envoy_s + extproc_s) * 1e6 / mb,
        "envoy_us_per_request": envoy_s * 1e6 / requests,
        "extproc_us_per_request": extproc_s * 1e6 / requests,
        "total_us_per_request": (envoy_s + extproc_s) * 1e6 / requests,
        "extproc_msgs_per_request": sum(s.extproc_msgs for s in samples) / requests,
    }


def latency_table(results: dict[str, list[Result]]) -> Json:
    table: Json = {}
    for row, values in results.items():
        ok = [r for r in values if r.complete and r.status == 200]
        table[row] = {
            "failed": len(values) - len(ok),
            "first_byte": dist([r.first_byte for r in ok]),
            "first_event": dist([r.first_body for r in ok]),
            "last_byte": dist([r.last_byte for r in ok]),
        }
    base = table["baseline"]
    for row in table.values():
        for metric in ("first_byte", "first_event", "last_byte"):
            for q in ("p50_ms", "p99_ms"):
                row[metric][f"added_{q}"] = row[metric][q] - base[metric][q]
    return table


def with_extra(table: Json) -> Json:
    base = table["baseline"]
    for row in table.values():
        row["extra_us_per_mb"] = row["total_us_per_mb"] - base["total_us_per_mb"]
        row["extra_us_per_request"] = row["total_us_per_request"] - base["total_us_per_request"]
    return table


async def measure(children: Children, work: Path, upstream: int, p: Params) -> Json:
    small = stream_headers(p.stream_events, p.stream_delay_ms)
    bulk_events = p.bulk_mb * (1 << 20) // p.bulk_event_bytes
    bulk = stream_headers(bulk_events, 0, event_bytes=p.bulk_event_bytes)
    json_headers = {"x-bench-json-bytes": str(p.json_bytes)}
    asked = chat_body(stream=True, include_usage=True)
    rows = [
        Row("baseline", "baseline", asked, latency=True),
        Row("lua", "lua", asked, latency=True),
        Row("lua+inject", "lua", chat_body(stream=True), latency=True),
        Row("lua-prefilter", "lua-prefilter", asked, latency=False),
        Row("ext_proc", "ext_proc", asked, latency=True),
    ]
    filters: dict[str, list[Json]] = {
        "baseline": [],
        "lua": [lua_filter(USAGE_LUA)],
        "lua-prefilter": [lua_filter(prefilter_lua(work))],
        "ext_proc": [EXT_PROC_FILTER],
    }
    streamed: dict[str, list[Result]] = {r.name: [] for r in rows if r.latency}
    answered: dict[str, list[Result]] = {c: [] for c in ("baseline", "lua", "ext_proc")}
    stream_cpu: dict[str, list[Sample]] = {r.name: [] for r in rows}
    bulk_cpu: dict[str, list[Sample]] = {r.name: [] for r in rows}
    usage_seen: dict[str, Json] = {}
    for round_ in range(p.rounds):
        for config, config_filters in filters.items():
            extproc, extproc_port = None, None
            if config == "ext_proc":
                extproc, extproc_port = children.role("extproc", "extproc")
            envoy = start_envoy(
                children,
                work,
                f"perf-{config}",
                config_filters,
                upstream,
                extproc_port=extproc_port,
            )
            try:
                for row in (r for r in rows if r.config == config):
                    # one tagged request: the access log shows the usage this reader produced
                    tag = f"check-{row.name}"
                    await one_request(envoy.port, row.body, {**small, "x-bench-id": tag})
                    usage_seen[row.name] = (envoy.entry(tag) or {}).get("usage") or {}
                    count = p.stream_requests if row.latency else p.cpu_only_requests
                    print(f"  round {round_ + 1}: {row.name}: {count} token streams", flush=True)
                    sample = await run_requests(
                        envoy, extproc, row.body, small, count, warmup=p.warmup
                    )
                    stream_cpu[row.name].append(sample)
                    if row.latency:
                        streamed[row.name] += sample.results
                    print(f"  round {round_ + 1}: {row.name}: {p.bulk_requests} bulk", flush=True)
                    bulk_cpu[row.name].append(
                        await run_requests(
                            envoy, extproc, row.body, bulk, p.bulk_requests, warmup=1
                        )
                    )
                if config in answered:
                    print(f"  round {round_ + 1}: {config}: {p.json_requests} JSON", flush=True)
                    sample = await run_requests(
                        envoy, extproc, chat_body(stream=False), json_headers, p.json_requests,
                        warmup=p.warmup,
                    )  # fmt: skip
                    answered[config] += sample.results
            finally:
                children.stop(envoy.proc)
                if extproc is not None:
                    children.stop(extproc)
    return {
        "latency_stream": latency_table(streamed),
        "latency_json": latency_table(answered),
        "cpu_stream": with_extra({name: cpu_row(s) for name, s in stream_cpu.items()}),
        "cpu_bulk": with_extra({name: cpu_row(s) for name, s in bulk_cpu.items()}),
        "usage_metadata_seen": usage_seen,
    }


# =================================================================================================
# Behaviour: correctness, stripping, incremental delivery, local replies, failures
# =================================================================================================


@dataclass
class Check:
    config: str
    name: str
    ok: bool
    observed: Json


class Behaviour:
    def __init__(self, children: Children, work: Path, upstream: int) -> None:
        self.children = children
        self.work = work
        self.upstream = upstream
        self.checks: list[Check] = []
        self.failures: list[Json] = []
        self.local: list[Json] = []
        self.counter = 0

    def check(self, config: str, name: str, ok: bool, observed: Json) -> None:
        self.checks.append(Check(config, name, bool(ok), observed))
        print(f"  [{'ok' if ok else 'NO'}] {config}: {name}", flush=True)

    async def call(
        self,
        envoy: Envoy,
        body: bytes,
        headers: dict[str, str] | None = None,
        path: str = "/v1/chat/completions",
        limit_s: float = 10.0,
    ) -> tuple[Result, Json | None]:
        self.counter += 1
        request_id = f"b-{self.counter}"
        tagged = {**(headers or {}), "x-bench-id": request_id}
        result = await one_request(envoy.port, body, tagged, path, limit_s)
        return result, envoy.entry(request_id)

    async def run(self) -> None:
        await self.readers_agree()
        await self.lua_stripping()
        await self.local_replies()
        await self.large_requests()
        await self.lua_failures()
        await self.extproc_failures(fail_open=False)
        await self.extproc_failures(fail_open=True)

    async def readers_agree(self) -> None:
        """Both readers put the same maas.usage into metadata, streaming and not."""
        for config in ("lua", "ext_proc"):
            extproc, extproc_port = (None, None)
            if config == "ext_proc":
                extproc, extproc_port = self.children.role("extproc", "extproc")
                filters = [EXT_PROC_FILTER]
            else:
                filters = [lua_filter(USAGE_LUA)]
            envoy = start_envoy(
                self.children,
                self.work,
                f"agree-{config}",
                filters,
                self.upstream,
                extproc_port=extproc_port,
            )
            try:
                cases = {
                    "streamed, include_usage asked": (
                        chat_body(True, True), stream_headers(30, 0), 30),
                    "JSON answer (8 KB)": (
                        chat_body(False), {"x-bench-json-bytes": "8192"}, 8192 // 4),
                    "streamed, 256 KiB events (usage after 2 MB)": (
                        chat_body(True, True), stream_headers(8, 0, 1 << 18), 8),
                }  # fmt: skip
                for name, (body, headers, completion) in cases.items():
                    result, entry = await self.call(envoy, body, headers)
                    usage = (entry or {}).get("usage") or {}
                    self.check(
                        config,
                        f"usage read: {name}",
                        result.complete
                        and usage.get("outcome") == "charged"
                        and usage.get("prompt_tokens") == PROMPT_TOKENS
                        and usage.get("completion_tokens") == completion,
                        {"response": result.summary(), "maas.usage": usage},
                    )
                # the upstream connection resets mid-body: nothing may be charged
                reset = {**stream_headers(30, 2), "x-bench-reset-after": "10"}
                result, entry = await self.call(envoy, chat_body(True, True), reset)
                usage = (entry or {}).get("usage") or {}
                self.check(
                    config,
                    "upstream reset mid-stream: stream cut, outcome incomplete, nothing charged",
                    not result.complete
                    and usage.get("outcome") == "incomplete"
                    and "prompt_tokens" not in usage,
                    {"response": result.summary(), "maas.usage": usage},
                )
                # incremental delivery through the reader (50 events, 20 ms apart: ~1 s)
                body = chat_body(True, True)
                result, _ = await self.call(envoy, body, stream_headers(50, 20))
                self.incremental(config, "streamed incrementally (include_usage asked)", result)
            finally:
                self.children.stop(envoy.proc)
                if extproc is not None:
                    self.children.stop(extproc)

    def incremental(self, config: str, name: str, result: Result) -> None:
        times = result.chunk_times
        half = times[len(times) // 2] if times else math.nan
        self.check(
            config,
            name,
            result.complete and result.first_body < 0.2 and 0.3 < half < result.last_byte - 0.2,
            {
                "first_event_ms": round(result.first_body * 1000, 1),
                "middle_chunk_ms": round(half * 1000, 1),
                "last_byte_ms": round(result.last_byte * 1000, 1),
                "chunks_received": len(times),
                "upstream_duration_ms": 51 * 20,
            },
        )

    async def lua_stripping(self) -> None:
        """chunk:setBytes() in bodyChunks(): the injected usage event is removed, incrementally."""
        envoy = start_envoy(
            self.children, self.work, "strip", [lua_filter(USAGE_LUA)], self.upstream
        )
        plain = start_envoy(self.children, self.work, "strip-baseline", [], self.upstream)
        try:
            not_asked = chat_body(True)
            result, entry = await self.call(envoy, not_asked, stream_headers(30, 0))
            reference, _ = await self.call(plain, not_asked, stream_headers(30, 0))
            usage = (entry or {}).get("usage") or {}
            self.check(
                "lua",
                "include_usage injected, usage event stripped (setBytes reaches the client)",
                result.headers.get("x-bench-saw-include-usage") == "true"
                and result.complete
                and b'"usage"' not in result.body
                and result.body == reference.body
                and usage.get("outcome") == "charged"
                and usage.get("completion_tokens") == 30,
                {
                    "upstream_saw_include_usage": result.headers.get("x-bench-saw-include-usage"),
                    "client_body_equals_baseline_without_usage": result.body == reference.body,
                    "response": result.summary(reference),
                    "maas.usage": usage,
                },
            )
            result, _ = await self.call(envoy, not_asked, stream_headers(50, 20))
            self.incremental("lua", "streamed incrementally while stripping", result)

            # the SseFilter's limits: what a client gets when the answer is not \n\n-framed SSE
            edges = {
                "stripping: SSE with CRLF line ends (sse-starlette's default)": {
                    **stream_headers(10, 0), "x-bench-eol": "crlf"},
                "stripping: a 200 JSON answer to a streaming request": {"x-bench-mode": "json"},
                "stripping: an unterminated last event reaches the client": {
                    **stream_headers(10, 0), "x-bench-tail": "nonl"},
            }  # fmt: skip
            for name, headers in edges.items():
                result, entry = await self.call(envoy, not_asked, headers)
                reference, _ = await self.call(plain, chat_body(True), headers)
                usage = (entry or {}).get("usage") or {}
                self.check(
                    "lua",
                    name,
                    result.complete and result.body.rstrip() == reference.body.rstrip(),
                    {
                        "response": result.summary(reference),
                        "baseline_bytes_without_usage": reference.nbytes,
                        "maas.usage": usage,
                    },
                )
        finally:
            self.children.stop(envoy.proc)
            self.children.stop(plain.proc)

    async def local_replies(self) -> None:
        """Does the reader run on local replies? A direct_response at the router (as Envoy answers
        a route with no backend), and replies from a filter before the reader (as ext_authz's
        401/403) and after it (as the rate limit filter's 429)."""
        for config in CONFIGS:
            extproc, extproc_port = (None, None)
            reader: list[Json] = []
            if config == "ext_proc":
                extproc, extproc_port = self.children.role("extproc", "extproc")
                reader = [EXT_PROC_FILTER]
            elif config == "lua":
                reader = [lua_filter(USAGE_LUA)]
            filters = [responder("/before403", 403), *reader, responder("/after429", 429)]
            envoy = start_envoy(
                self.children,
                self.work,
                f"local-{config}",
                filters,
                self.upstream,
                extproc_port=extproc_port,
            )
            try:
                for path, reply_from in LOCAL_REPLIES.items():
                    before = envoy.stats()
                    result, entry = await self.call(envoy, chat_body(False), path=path)
                    after = envoy.stats()
                    delta = {
                        k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k)
                    }
                    usage = (entry or {}).get("usage")
                    started = delta.get("http.bench.ext_proc.streams_started", 0)
                    ran = bool(usage) if config == "lua" else started > 0
                    self.local.append(
                        {
                            "config": config,
                            "path": path,
                            "reply_from": reply_from,
                            "status": result.status,
                            "body": result.body.decode(errors="replace")[:80],
                            "reader_ran": ran if config != "baseline" else None,
                            "maas.usage": usage,
                            "stats_delta": delta,
                        }
                    )
                    print(f"  local reply {path} via {config}: {result.status}, ran={ran}")
            finally:
                self.children.stop(envoy.proc)
                if extproc is not None:
                    self.children.stop(extproc)

    async def large_requests(self) -> None:
        """A request body over Envoy's default buffer limit (1 MiB per connection): a long prompt
        or an inline image. Lua's envoy_on_request reads the whole body with handle:body()."""
        for config in CONFIGS:
            extproc, extproc_port = (None, None)
            filters: list[Json] = []
            if config == "ext_proc":
                extproc, extproc_port = self.children.role("extproc", "extproc")
                filters = [EXT_PROC_FILTER]
            elif config == "lua":
                filters = [lua_filter(USAGE_LUA)]
            envoy = start_envoy(
                self.children,
                self.work,
                f"large-{config}",
                filters,
                self.upstream,
                extproc_port=extproc_port,
            )
            try:
                for stream in (False, True):
                    body: Json = {
                        "model": "bench",
                        "messages": [{"role": "user", "content": "lorem ipsum " * 100_000}],
                        "stream": stream,
                    }
                    raw = _compact(body).encode()
                    result, entry = await self.call(envoy, raw, stream_headers(10, 0))
                    self.check(
                        config,
                        f"a {len(raw) / 1e6:.1f} MB {'streaming' if stream else 'JSON'} request "
                        "is served",
                        result.complete and result.status == 200,
                        {
                            "response": result.summary(),
                            "details": (entry or {}).get("details"),
                            "maas.usage": (entry or {}).get("usage"),
                        },
                    )
            finally:
                self.children.stop(envoy.proc)
                if extproc is not None:
                    self.children.stop(extproc)

    def failure(self, mechanism: str, case: str, request: str, result: Result, extra: Json) -> None:
        row = {"mechanism": mechanism, "case": case, "request": request, **result.summary()}
        row.update(extra)
        self.failures.append(row)
        print(
            f"  {mechanism}: {case}: {request}: status {result.status}, "
            f"complete={result.complete}, bytes={result.nbytes}, done={row['done_event']}",
            flush=True,
        )

    async def lua_failures(self) -> None:
        source = USAGE_LUA.read_text()
        # where error("boom") goes: right after the line that matches
        broken = {
            "error() at the start of envoy_on_response": r"function envoy_on_response\(handle\)\n",
            "error() at the start of envoy_on_request": r"function envoy_on_request\(handle\)\n",
            "error() in the bodyChunks() loop (first chunk)": (
                r"for chunk in handle:bodyChunks\(\) do\n"
            ),
        }
        requests = {
            "streamed (usage asked)": (chat_body(True, True), stream_headers(30, 5)),
            "streamed (usage injected)": (chat_body(True), stream_headers(30, 5)),
            "JSON": (chat_body(False), {"x-bench-json-bytes": "4096"}),
        }
        for index, (case, after) in enumerate(broken.items()):
            patched, n = re.subn(after, lambda m: m.group(0) + '  error("boom")\n', source)
            if n != 1:
                raise RuntimeError(f"usage.lua changed: {after!r} matched {n} times")
            script = self.work / f"usage-broken-{index}.lua"
            script.write_text(patched)
            envoy = start_envoy(
                self.children, self.work, f"lua-broken-{index}", [lua_filter(script)], self.upstream
            )
            try:
                for request, (body, headers) in requests.items():
                    errors = envoy.stats().get("http.bench.lua.errors", 0)
                    result, entry = await self.call(envoy, body, headers)
                    errors = envoy.stats().get("http.bench.lua.errors", 0) - errors
                    self.failure(
                        "lua",
                        case,
                        request,
                        result,
                        {"maas.usage": (entry or {}).get("usage"), "lua_errors": errors},
                    )
                logged = envoy.log_lines("boom")
                self.failures[-1]["envoy_log"] = logged[0][-160:] if logged else None
            finally:
                self.children.stop(envoy.proc)

    async def extproc_failures(self, fail_open: bool) -> None:
        mechanism = "ext_proc (failure_mode_allow: true)" if fail_open else "ext_proc"
        config = json.loads(json.dumps(EXT_PROC_FILTER))
        config["typed_config"]["failure_mode_allow"] = fail_open
        name = "fail-open" if fail_open else "fail-closed"
        body = chat_body(True, True)

        def extra(entry: Json | None, envoy: Envoy) -> Json:
            stats = {k.rsplit(".", 1)[1]: v for k, v in envoy.stats().items() if v}
            return {
                "maas.usage": (entry or {}).get("usage"),
                "details": (entry or {}).get("details"),
                "flags": (entry or {}).get("flags"),
                "ext_proc_stats": {k: v for k, v in stats.items() if "fail" in k or "timeout" in k},
            }

        # the server stops (before the request), then comes back on the same port
        extproc, port = self.children.role("extproc", "extproc")
        envoy = start_envoy(
            self.children,
            self.work,
            f"extproc-down-{name}",
            [config],
            self.upstream,
            extproc_port=port,
        )
        try:
            if not fail_open:
                result, entry = await self.call(envoy, body, stream_headers(10, 0))
                self.failure(mechanism, "server up (reference)", "streamed", result,
                             extra(entry, envoy))  # fmt: skip
            self.children.stop(extproc)
            cases = {
                "streamed": (body, stream_headers(10, 0), "/v1/chat/completions"),
                "JSON": (chat_body(False), {}, "/v1/chat/completions"),
                "local reply 401 (as an ext_authz denial)": (chat_body(False), {}, "/local401"),
            }
            for request, (request_body, headers, path) in cases.items():
                result, entry = await self.call(envoy, request_body, headers, path=path)
                self.failure(mechanism, "server stopped", request, result, extra(entry, envoy))
            if not fail_open:
                extproc, _ = self.children.role("extproc", "extproc", "--port", str(port))
                await asyncio.sleep(0.3)
                result, entry = await self.call(envoy, body, stream_headers(10, 0))
                self.failure(mechanism, "server restarted on the same port", "streamed", result,
                             extra(entry, envoy))  # fmt: skip
        finally:
            self.children.stop(envoy.proc)
            self.children.stop(extproc)

        # the server dies in the middle of a streamed answer
        extproc, port = self.children.role("extproc", "extproc")
        envoy = start_envoy(
            self.children,
            self.work,
            f"extproc-crash-{name}",
            [config],
            self.upstream,
            extproc_port=port,
        )
        try:
            call = asyncio.create_task(self.call(envoy, body, stream_headers(100, 20)))
            await asyncio.sleep(0.5)
            self.children.stop(extproc, signal.SIGKILL)
            result, entry = await call
            self.failure(mechanism, "server killed 0.5 s into a 2 s stream", "streamed", result,
                         extra(entry, envoy))  # fmt: skip
        finally:
            self.children.stop(envoy.proc)
            self.children.stop(extproc)

        # the server is slower than message_timeout (200 ms) once, on the 5th body chunk
        extproc, port = self.children.role(
            "extproc", "extproc", "--stall-after", "5", "--stall-ms", "400"
        )
        envoy = start_envoy(
            self.children,
            self.work,
            f"extproc-stall-{name}",
            [config],
            self.upstream,
            extproc_port=port,
        )
        try:
            result, entry = await self.call(envoy, body, stream_headers(30, 5))
            self.failure(
                mechanism,
                "server 400 ms late on one body chunk (message_timeout 200 ms)",
                "streamed",
                result,
                extra(entry, envoy),
            )
        finally:
            self.children.stop(envoy.proc)
            self.children.stop(extproc)


# =================================================================================================
# Report
# =================================================================================================


def _fmt(value: float) -> str:
    return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"


def _cell(d: Json, q: str) -> str:
    return f"{_fmt(d[q + '_ms'])} ({d['added_' + q + '_ms']:+.2f})"


def _latency_rows(table: Json, metrics: list[str]) -> list[str]:
    titles = [f"{m.replace('_', ' ')} {q}" for m in metrics for q in ("p50", "p99")]
    lines = ["| row | " + " | ".join(titles) + " | failed |", "|---|" + "---:|" * (len(titles) + 1)]
    for row, values in table.items():
        cells = [_cell(values[m], q) for m in metrics for q in ("p50", "p99")]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {values['failed']} |")
    return lines


def _show(value: object) -> str:
    """maas.usage, short: `charged 17+30` (prompt+completion), `incomplete`, `injected`, or -."""
    if not isinstance(value, dict) or not value:
        return "-"
    parts = [str(value.get("outcome", "(no outcome)"))]
    if "prompt_tokens" in value:
        parts.append(f"{value['prompt_tokens']}+{value.get('completion_tokens')}")
    if value.get("injected") == "true":
        parts.append("(injected)")
    return " ".join(parts)


def render(report: Json) -> str:
    p = report["params"]
    out = [
        f"Streamed latency, ms (added vs baseline): {p['stream_events']} events "
        f"{p['stream_delay_ms']:g} ms apart, {p['rounds'] * p['stream_requests']} sequential "
        "requests per row",
        *_latency_rows(report["latency_stream"], ["first_byte", "first_event", "last_byte"]),
        "",
        f"JSON latency, ms (added vs baseline): {p['json_bytes']} B answer, "
        f"{p['rounds'] * p['json_requests']} sequential requests per row",
        *_latency_rows(report["latency_json"], ["first_byte", "last_byte"]),
        "",
        f"CPU per token stream ({p['stream_events']} events, ~200 B each, "
        f"{p['stream_delay_ms']:g} ms apart), µs of CPU per request",
        "| row | Envoy | ext_proc server | total | extra vs baseline | extra per MB "
        "| ext_proc msgs/request | requests | failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row, c in report["cpu_stream"].items():
        out.append(
            f"| {row} | {c['envoy_us_per_request']:.0f} | {c['extproc_us_per_request']:.0f} "
            f"| {c['total_us_per_request']:.0f} | {c['extra_us_per_request']:+.0f} "
            f"| {c['extra_us_per_mb']:+.0f} | {c['extproc_msgs_per_request']:.1f} "
            f"| {c['requests']} | {c['failed']} |"
        )
    out += [
        "",
        f"CPU per MB, bulk: {p['bulk_mb']} MB streamed in {p['bulk_event_bytes'] // 1024} KiB "
        f"events, no delay, {p['rounds'] * p['bulk_requests']} requests per row",
        "| row | MB/s | Envoy µs/MB | ext_proc µs/MB | total µs/MB | extra vs baseline µs/MB "
        "| ext_proc msgs/request | failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row, c in report["cpu_bulk"].items():
        out.append(
            f"| {row} | {c['mb_per_s']:.0f} | {c['envoy_us_per_mb']:.0f} "
            f"| {c['extproc_us_per_mb']:.0f} | {c['total_us_per_mb']:.0f} "
            f"| {c['extra_us_per_mb']:+.0f} | {c['extproc_msgs_per_request']:.1f} "
            f"| {c['failed']} |"
        )
    out += [
        "",
        "maas.usage each reader produced (one tagged request per row; prompt+completion):",
        *(f"- {row}: {_show(usage)}" for row, usage in report["usage_metadata_seen"].items()),
    ]
    if report.get("local_replies"):
        out += [
            "",
            "Local replies:",
            "| config | local reply | status seen | reader ran | maas.usage |",
            "|---|---|---:|---|---|",
        ]
        for row in report["local_replies"]:
            out.append(
                f"| {row['config']} | {row['reply_from']} | {row['status']} "
                f"| {row['reader_ran']} "
                f"| {_show(row['maas.usage'])} |"
            )
    if report.get("failures"):
        out += [
            "",
            "When the mechanism fails:",
            "| mechanism | case | request | status | body | bytes | [DONE] | maas.usage |",
            "|---|---|---|---:|---|---:|---|---|",
        ]
        for row in report["failures"]:
            out.append(
                f"| {row['mechanism']} | {row['case']} | {row['request']} | {row['status']} "
                f"| {'complete' if row['complete'] else 'CUT'} | {row['bytes']} "
                f"| {'yes' if row['done_event'] else 'no'} | {_show(row.get('maas.usage'))} |"
            )
    if report.get("checks"):
        out += ["", "Checks:"]
        out += [
            f"- [{'ok' if c['ok'] else 'NO'}] {c['config']}: {c['name']}" for c in report["checks"]
        ]
    # a blank line between a title and its table or list: the output pastes into Markdown
    spaced: list[str] = []
    for line in out:
        after_title = spaced and spaced[-1] and not spaced[-1].startswith(("|", "- "))
        if after_title and line.startswith(("|", "- ")):
            spaced.append("")
        spaced.append(line)
    return "\n".join(spaced)


def loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def machine() -> Json:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    from maas_demo.envoy import find_envoy  # noqa: PLC0415

    version = subprocess.run(
        [str(find_envoy()), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    tracked = subprocess.run(
        ["git", "diff", "--quiet", "HEAD", "--", str(USAGE_LUA)], cwd=REPO, check=False
    ).returncode
    return {
        "usage_lua_sha256": hashlib.sha256(USAGE_LUA.read_bytes()).hexdigest(),
        "usage_lua_as_committed": tracked == 0,
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "loadavg": loadavg(),
        "python": platform.python_version(),
        "envoy": version.rsplit(" ", 1)[-1],
        "kernel": platform.release(),
    }


async def bench(args: argparse.Namespace) -> Json:
    params = (
        Params(
            rounds=1, stream_requests=25, stream_events=50, stream_delay_ms=2, json_requests=100,
            json_bytes=4096, bulk_mb=20, bulk_event_bytes=16384, bulk_requests=2,
            cpu_only_requests=15, warmup=3,
        )
        if args.quick
        else Params(
            rounds=2, stream_requests=100, stream_events=100, stream_delay_ms=2,
            json_requests=300, json_bytes=4096, bulk_mb=20, bulk_event_bytes=16384,
            bulk_requests=5, cpu_only_requests=40, warmup=10,
        )
    )  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="usage-bench-"))
    children = Children(work)
    report: Json = {"machine": machine(), "params": asdict(params), "work_dir": str(work)}
    started = time.monotonic()
    try:
        _, upstream = children.role("upstream", "upstream")
        print(f"work dir {work}; upstream on {upstream}", flush=True)
        behaviour = Behaviour(children, work, upstream)
        if not args.skip_behaviour:
            print("behaviour:", flush=True)
            await behaviour.run()
        print("performance:", flush=True)
        report.update(await measure(children, work, upstream, params))
        report["checks"] = [asdict(c) for c in behaviour.checks]
        report["failures"] = behaviour.failures
        report["local_replies"] = behaviour.local
    finally:
        children.stop_all()
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    report["machine"]["loadavg_end"] = loadavg()
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer requests (under a minute)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON")
    parser.add_argument("--skip-behaviour", action="store_true", help="performance only")
    parser.add_argument(
        "--keep-work", action="store_true", help="keep the work dir (Envoy configs and logs)"
    )
    parser.add_argument("--role", choices=("upstream", "extproc"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--stall-after", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--stall-ms", type=float, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "upstream":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_upstream())
        return
    if args.role == "extproc":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_extproc(args.port, args.stall_after, args.stall_ms))
        return
    # SIGTERM → SystemExit, so the finally blocks stop every child
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report = asyncio.run(bench(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print()
    print(render(report))
    print()
    print(f"machine: {report['machine']}")
    print(f"elapsed {report['elapsed_s']} s; JSON written to {args.out}")


if __name__ == "__main__":
    main()
