"""Running a gRPC server with its HTTP side: reflection, health, metrics, readiness and drain.

Both servers are assembled from this: the server-specific code hands over its gRPC services, its
metrics registry and its background tasks, and this module does the rest the same way for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from maas_common.config import parse_address
from maas_common.errors import ConfigError
from maas_common.tls import HttpCertificates, TlsSection, grpc_credentials

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GrpcService:
    """One gRPC service to serve: its full name (for reflection/health) and how to register it."""

    full_name: str
    register: Callable[[grpc.aio.Server], None]


class Undecodable:
    """What a request that is not a message of the method's type decodes to (register_
    serialized_unary's handlers get it instead of the message): the handler answers with a
    precise refusal. gRPC's own answer to a deserializer that raises is UNKNOWN, with a
    traceback logged per call, which a hostile client could use to flood the logs."""

    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        self.problem = problem


def tolerant_decoder(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """`parse`, answering Undecodable instead of raising for bytes that are not its message."""

    def decode(raw: bytes) -> Any:
        try:
            return parse(raw)
        except DecodeError as exc:
            return Undecodable(str(exc)[:200])

    return decode


def register_serialized_unary(
    server: grpc.aio.Server,
    service_name: str,
    method: str,
    handler: Callable[[Any, grpc.aio.ServicerContext], Awaitable[bytes]],
    request_deserializer: Callable[[bytes], Any],
) -> None:
    """Serves a unary method whose handler returns its response already serialized (as the
    generated add_...Servicer_to_server would, with the response serializer left out): the hot
    paths assemble their answers from cached bytes, and no message is built only to be
    serialized again. Reflection still describes the method from the real descriptors. A
    request that does not decode reaches the handler as an Undecodable."""
    handlers = {
        method: grpc.unary_unary_rpc_method_handler(
            handler,
            request_deserializer=tolerant_decoder(request_deserializer),
            response_serializer=_as_is,
        )
    }
    register_handlers(server, service_name, handlers)


def register_handlers(
    server: grpc.aio.Server, service_name: str, handlers: dict[str, grpc.RpcMethodHandler]
) -> None:
    """A service's method handlers, served (and known to reflection's registered methods)."""
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_name, handlers),))
    server.add_registered_method_handlers(service_name, handlers)


def _as_is(response: bytes) -> bytes:
    return response


@dataclass
class Readiness:
    """Per-component readiness; the server is ready when every component is."""

    components: dict[str, tuple[bool, str]] = field(default_factory=dict)

    def set(self, component: str, ready: bool, detail: str = "") -> None:
        self.components[component] = (ready, detail)

    @property
    def ready(self) -> bool:
        return all(ok for ok, _ in self.components.values())

    def snapshot(self) -> dict[str, dict[str, object]]:
        return {
            name: {"ready": ok, "detail": detail} for name, (ok, detail) in self.components.items()
        }


ReadinessReport = Callable[[], tuple[bool, dict[str, object]]]  # (ready, the /readyz JSON)


@dataclass(frozen=True)
class HttpSite:
    """One more HTTP listener of the server's own (e.g. maas-authz's operator API)."""

    addr: str
    routes: Sequence[web.RouteDef]
    setting: str  # the configuration key of `addr`, for a listen error
    tls: TlsSection | None = None


def probe_routes(registry: CollectorRegistry, readiness: ReadinessReport) -> list[web.RouteDef]:
    """/metrics (the registry, as Prometheus text), /healthz and /readyz (200 or 503)."""

    async def metrics(_request: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest, registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        ready, body = readiness()
        return web.json_response(body, status=200 if ready else 503)

    return [web.get("/metrics", metrics), web.get("/healthz", healthz), web.get("/readyz", readyz)]


async def serve_http(
    addr: str,
    routes: Sequence[web.RouteDef],
    setting: str,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[web.AppRunner, int]:
    """An aiohttp site for `routes` on `addr`; the port it got (useful with port 0)."""
    app = web.Application()
    app.add_routes(list(routes))
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    host, port = parse_address(addr)
    try:
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(setting, "", f"cannot listen on {addr}: {exc.strerror or exc}") from None
    return runner, runner.addresses[0][1] if runner.addresses else port


class ServerRuntime:
    def __init__(
        self,
        *,
        name: str,
        grpc_addr: str,
        http_addr: str,
        services: Sequence[GrpcService],
        registry: CollectorRegistry,
        drain_timeout: float,
        shutdown_delay: float = 0.0,
        background: Sequence[Callable[[], Coroutine[Any, Any, None]]] = (),
        on_close: Sequence[Callable[[], Awaitable[None]]] = (),
        http_routes: Sequence[web.RouteDef] = (),
        admin_addr: str | None = None,
        admin_routes: Sequence[web.RouteDef] = (),
        grpc_options: Sequence[tuple[str, Any]] = (),
        reuse_port: bool = False,
        sites: Sequence[HttpSite] = (),
        on_drain: Sequence[Callable[[], Awaitable[None]]] = (),
        grpc_tls: TlsSection | None = None,
    ) -> None:
        self.name = name
        self._grpc_tls = grpc_tls
        self.readiness = Readiness()
        self._grpc_addr = grpc_addr
        self._http_addr = http_addr
        self._services = services
        self._registry = registry
        self._drain_timeout = drain_timeout
        self._shutdown_delay = shutdown_delay
        self._background = background
        self._on_close = on_close
        self._http_routes = http_routes
        # Operations that change state (cache purges) listen apart from /metrics, by default on
        # loopback only: whoever may scrape metrics may not thereby purge caches.
        # the admin listener (purge) is the first of the extra sites when there is one
        admin = (
            [HttpSite(admin_addr, admin_routes, "server.admin_addr")]
            if admin_addr and admin_routes
            else []
        )
        self._has_admin = bool(admin)
        self._sites = [*admin, *sites]
        # run first on stop: end streams that never finish by themselves (Envoy's access log,
        # live decision readers), so the drain waits only for real calls
        self._on_drain = on_drain
        self._site_runners: list[web.AppRunner] = []
        self.site_ports: list[int] = []
        # SO_REUSEPORT off: a second server on a busy port must fail loudly, not share it silently.
        # Only the worker processes of one supervisor (maas_common.workers) turn it on, to share
        # one port; the supervisor has checked that port was free first. Read at start().
        self.reuse_port = reuse_port
        self._grpc_options = list(grpc_options)
        self._grpc: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._http: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.grpc_port = 0
        self.http_port = 0

    async def start(self) -> None:
        self.readiness.set("startup", False, "starting")
        options = [("grpc.so_reuseport", 1 if self.reuse_port else 0), *self._grpc_options]
        server = grpc.aio.server(options=options)
        for service in self._services:
            service.register(server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = [s.full_name for s in self._services]
        reflection.enable_server_reflection(
            [
                *names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        try:
            if self._grpc_tls is None:
                self.grpc_port = server.add_insecure_port(self._grpc_addr)
            else:
                credentials = grpc_credentials(self._grpc_tls)
                self.grpc_port = server.add_secure_port(self._grpc_addr, credentials)
        except RuntimeError as exc:
            raise ConfigError(
                "--grpc-addr", "", f"cannot listen on {self._grpc_addr}: {exc}"
            ) from None
        if self.grpc_port == 0:
            raise ConfigError("--grpc-addr", "", f"cannot listen on {self._grpc_addr}")
        await server.start()
        self._grpc = server

        routes = [*probe_routes(self._registry, self._readiness_report), *self._http_routes]
        try:
            self._http, self.http_port = await serve_http(self._http_addr, routes, "--http-addr")
            for site in self._sites:
                context = None
                if site.tls is not None:
                    certificates = HttpCertificates(site.tls)
                    context = certificates.context
                    self._background = [*self._background, certificates.watch]
                runner, port = await serve_http(site.addr, site.routes, site.setting, context)
                self._site_runners.append(runner)
                self.site_ports.append(port)
        except ConfigError:
            await self._close_http()
            await server.stop(None)
            raise

        self._tasks = [asyncio.create_task(make()) for make in self._background]
        for task in self._tasks:
            task.add_done_callback(self._background_done)
        for full_name in ["", *names]:
            await self._health.set(full_name, health_pb2.HealthCheckResponse.SERVING)
        self.readiness.set("startup", True)
        log.info(
            "%s serving",
            self.name,
            extra={
                "grpc_addr": self._grpc_addr,
                "grpc_port": self.grpc_port,
                "http_addr": self._http_addr,
                "http_port": self.http_port,
            },
        )

    def _background_done(self, task: asyncio.Task[None]) -> None:
        # background tasks (file watchers) run until cancelled; anything else is a failure
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "%s: background task %s failed",
                self.name,
                task.get_name(),
                exc_info=task.exception(),
            )
            self.readiness.set(f"background:{task.get_name()}", False, "failed")

    async def stop(self) -> None:
        """Drain: report not-ready, keep serving for shutdown_delay (the load balancer moves
        away), let in-flight calls finish (up to drain_timeout), then close."""
        self.readiness.set("shutdown", False, "draining")
        await self._health.enter_graceful_shutdown()
        if self._grpc is not None and self._shutdown_delay > 0:
            log.info("%s not ready, still serving for %.1fs", self.name, self._shutdown_delay)
            await asyncio.sleep(self._shutdown_delay)
        for drain in self._on_drain:
            try:
                await drain()
            except Exception:
                log.exception("error while draining")
        if self._grpc is not None:
            log.info("%s draining in-flight calls (up to %.1fs)", self.name, self._drain_timeout)
            await self._grpc.stop(self._drain_timeout)
            self._grpc = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for close in self._on_close:
            try:
                await close()
            except Exception:
                log.exception("error while closing")
        await self._close_http()
        log.info("%s stopped", self.name)

    @property
    def admin_port(self) -> int:
        """The admin listener's port (0: none, or not started)."""
        return self.site_ports[0] if self._has_admin and self.site_ports else 0

    async def _close_http(self) -> None:
        for runner in (*self._site_runners, self._http):
            if runner is not None:
                await runner.cleanup()
        self._http = None
        self._site_runners = []

    async def run_until_signal(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        try:
            await stop.wait()
            log.info("%s received a stop signal", self.name)
        finally:
            await self.stop()

    def _readiness_report(self) -> tuple[bool, dict[str, object]]:
        ready = self.readiness.ready
        return ready, {"ready": ready, "components": self.readiness.snapshot()}
