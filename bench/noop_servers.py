"""The floors: do-nothing ext_authz and rate limit servers on bare grpc.aio.

Each answers every call with one response built at start-up, so what they cost is Python's gRPC
transport and nothing else. Run as `python -m bench.noop_servers {authz,ratelimit} PORT
[--metadata]`; prints `listening PORT` once it serves.

`--metadata` (authz only): the OK response carries what maas-authz's does for an allowed chat
completion (the x-maas-* headers, `authorization` removed, and dynamic metadata user, userid,
tier, model, model_namespace, model_name, request_id), so that Envoy in front of it builds the
same rate limit descriptors as with maas-authz; without metadata Envoy sends no rate limit call.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.rpc import code_pb2

from maas_common.event_loop import EventLoop, run


def _allowed_like_maas_authz() -> external_auth_pb2.CheckResponse:
    """A fixed answer shaped like maas-authz's for sk-demo-enterprise on llm/tiny (one request_id
    for every call: nothing downstream of a do-nothing server depends on it being unique)."""
    response = external_auth_pb2.CheckResponse()
    response.status.code = code_pb2.OK
    overwrite = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    for key, value in (
        ("x-maas-user", "demo-enterprise"),
        ("x-maas-tier", "enterprise"),
        ("x-maas-model", "llm/tiny"),
    ):
        response.ok_response.headers.add(
            header=base_pb2.HeaderValue(key=key, value=value), append_action=overwrite
        )
    response.ok_response.headers_to_remove.append("authorization")
    response.dynamic_metadata.update(
        {
            "request_id": "0123456789abcdef01234567",
            "user": "demo-enterprise",
            "userid": "demo-enterprise",
            "tier": "enterprise",
            "model": "llm/tiny",
            "model_namespace": "llm",
            "model_name": "tiny",
        }
    )
    return response


class NoopAuthorization(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self, metadata: bool = False) -> None:
        if metadata:
            self._ok = _allowed_like_maas_authz()
        else:
            self._ok = external_auth_pb2.CheckResponse()
            self._ok.status.code = code_pb2.OK

    async def Check(self, request: object, context: object) -> external_auth_pb2.CheckResponse:
        return self._ok


class NoopAccessLog(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """Envoy streams its access log to the authz cluster (envoy/gateway.yaml): read, dropped."""

    async def StreamAccessLogs(
        self, request_iterator: AsyncIterator[object], context: object
    ) -> als_pb2.StreamAccessLogsResponse:
        async for _ in request_iterator:
            pass
        return als_pb2.StreamAccessLogsResponse()


class NoopRateLimit(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    _OK = rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK)

    async def ShouldRateLimit(self, request: object, context: object) -> rls_pb2.RateLimitResponse:
        return self._OK


KINDS = ("authz", "ratelimit")


async def serve(kind: str, port: int, metadata: bool = False) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    if kind == "authz":
        servicer = NoopAuthorization(metadata)
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(servicer, server)
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(NoopAccessLog(), server)
    else:
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(NoopRateLimit(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"listening {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


# The floor runs on plain asyncio, as issue 6 defines it; `make bench ARGS="--noop-event-loop
# uvloop"` measures against a do-nothing server on uvloop instead (the servers' default loop).
EVENT_LOOP_ENV = "BENCH_NOOP_EVENT_LOOP"

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[2:] not in ([], ["--metadata"]) or len(args) < 2 or args[0] not in KINDS:
        sys.exit("usage: python -m bench.noop_servers {authz,ratelimit} PORT [--metadata]")
    loop: EventLoop = "uvloop" if os.environ.get(EVENT_LOOP_ENV) == "uvloop" else "asyncio"
    run(serve(args[0], int(args[1]), metadata=args[2:] == ["--metadata"]), loop)
