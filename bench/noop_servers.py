"""The floors: do-nothing ext_authz and rate limit servers on bare grpc.aio.

Each answers every call with one response built at start-up, so what they cost is Python's gRPC
transport and nothing else. Run as `python -m bench.noop_servers {authz,ratelimit} PORT`; prints
`listening PORT` once it serves.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.rpc import code_pb2


class NoopAuthorization(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    _OK = external_auth_pb2.CheckResponse()
    _OK.status.code = code_pb2.OK

    async def Check(self, request: object, context: object) -> external_auth_pb2.CheckResponse:
        return self._OK


class NoopRateLimit(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    _OK = rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK)

    async def ShouldRateLimit(self, request: object, context: object) -> rls_pb2.RateLimitResponse:
        return self._OK


async def serve(kind: str, port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    if kind == "authz":
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(NoopAuthorization(), server)
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


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("authz", "ratelimit"):
        sys.exit("usage: python -m bench.noop_servers {authz,ratelimit} PORT")
    asyncio.run(serve(sys.argv[1], int(sys.argv[2])))
