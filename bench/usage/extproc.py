"""The ext_proc server: the same job as usage.lua's response side, as an honest minimal server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

from bench.usage.constants import (
    NS,
    TAIL_BYTES,
    Json,
)

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
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description="the usage bench's ext_proc usage reader")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--stall-after", type=int, default=0, help="be late on this body chunk")
    parser.add_argument("--stall-ms", type=float, default=0, help="by this much")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_extproc(args.port, args.stall_after, args.stall_ms))


if __name__ == "__main__":
    main()
