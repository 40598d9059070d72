"""Unit tests for maas_common.server.ServerRuntime: ports, probes, metrics, health, drain."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import grpc
import pytest
import pytest_asyncio
from aiohttp import web
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry, Counter

from maas_common.errors import ConfigError
from maas_common.server import GrpcService, Readiness, ServerRuntime

AUTHORIZATION = "envoy.service.auth.v3.Authorization"
HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"


class HeldAuthorization(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """Check() waits until released, so a test decides when an RPC finishes."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()
        self.finished = 0

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        self.entered.set()
        await self.release.wait()
        self.finished += 1
        return external_auth_pb2.CheckResponse()


class Stack:
    """A runtime with one service, a fresh metrics registry and recorded close callbacks."""

    def __init__(self, **overrides: Any) -> None:
        self.servicer = HeldAuthorization()
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "maas_test_requests", "Requests seen by the test", registry=self.registry
        )
        self.closed: list[str] = []
        options: dict[str, Any] = {
            "name": "test-server",
            "grpc_addr": "127.0.0.1:0",
            "http_addr": "127.0.0.1:0",
            "services": [GrpcService(AUTHORIZATION, self._register)],
            "registry": self.registry,
            "drain_timeout": 30.0,
        }
        options.update(overrides)
        self.runtime = ServerRuntime(**options)

    def _register(self, server: grpc.aio.Server) -> None:
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(self.servicer, server)

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.runtime.grpc_port}"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.runtime.http_port}{path}"


@pytest_asyncio.fixture
async def stack() -> AsyncIterator[Stack]:
    stack = Stack()
    await stack.runtime.start()
    try:
        yield stack
    finally:
        stack.servicer.release.set()
        await stack.runtime.stop()


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as response:
        return response.status, await response.json()


async def port_is_closed(port: int) -> bool:
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


async def health_status(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(response.status)


# --- readiness bookkeeping ------------------------------------------------------------------


def test_readiness_needs_every_component_ready() -> None:
    readiness = Readiness()
    assert readiness.ready  # nothing registered, nothing to wait for
    readiness.set("kube", True)
    readiness.set("cache", False, "warming up")
    assert not readiness.ready
    assert readiness.snapshot() == {
        "kube": {"ready": True, "detail": ""},
        "cache": {"ready": False, "detail": "warming up"},
    }
    readiness.set("cache", True)
    assert readiness.ready


# --- start and the HTTP side ----------------------------------------------------------------


@pytest.mark.asyncio
async def test_start_on_port_zero_fills_in_the_bound_ports(stack: Stack) -> None:
    assert stack.runtime.grpc_port > 0
    assert stack.runtime.http_port > 0
    assert stack.runtime.grpc_port != stack.runtime.http_port
    assert not await port_is_closed(stack.runtime.grpc_port)
    assert not await port_is_closed(stack.runtime.http_port)


@pytest.mark.asyncio
async def test_healthz_answers_ok(stack: Stack, http: aiohttp.ClientSession) -> None:
    assert await get_json(http, stack.url("/healthz")) == (200, {"status": "ok"})


@pytest.mark.asyncio
async def test_readyz_is_200_with_components_once_started(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    status, body = await get_json(http, stack.url("/readyz"))
    assert status == 200
    assert body == {"ready": True, "components": {"startup": {"ready": True, "detail": ""}}}


@pytest.mark.asyncio
async def test_readyz_is_503_while_a_component_is_not_ready(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    stack.runtime.readiness.set("kube", False, "no answer from the API server")
    status, body = await get_json(http, stack.url("/readyz"))
    assert status == 503
    assert body["ready"] is False
    assert body["components"]["kube"] == {
        "ready": False,
        "detail": "no answer from the API server",
    }


@pytest.mark.asyncio
async def test_metrics_serves_the_given_registry_as_prometheus_text(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    stack.requests.inc(3)
    async with http.get(stack.url("/metrics")) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    assert "# TYPE maas_test_requests_total counter" in text
    assert "maas_test_requests_total 3.0" in text.splitlines()
    # Only the given registry: the process-wide default collectors are not mixed in.
    assert "process_cpu_seconds_total" not in text
    assert "python_info" not in text


@pytest.mark.asyncio
async def test_extra_http_routes_are_served(http: aiohttp.ClientSession) -> None:
    async def hello(_request: web.Request) -> web.Response:
        return web.json_response({"hello": "world"})

    stack = Stack(http_routes=[web.get("/debug/hello", hello)])
    await stack.runtime.start()
    try:
        assert await get_json(http, stack.url("/debug/hello")) == (200, {"hello": "world"})
    finally:
        await stack.runtime.stop()


# --- the gRPC side --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_grpc_health_reports_serving_overall_and_per_service(stack: Stack) -> None:
    async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
        assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        assert await health_status(channel, AUTHORIZATION) == (
            health_pb2.HealthCheckResponse.SERVING
        )
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            await health_status(channel, "no.such.Service")
        assert excinfo.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.asyncio
async def test_reflection_lists_the_services(stack: Stack) -> None:
    async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        call = stub.ServerReflectionInfo(iter([request]), timeout=5)
        responses = [response async for response in call]
    assert len(responses) == 1
    names = {service.name for service in responses[0].list_services_response.service}
    assert names == {AUTHORIZATION, HEALTH, REFLECTION}


@pytest.mark.asyncio
async def test_the_registered_service_answers(stack: Stack) -> None:
    async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        response = await stub.Check(external_auth_pb2.CheckRequest(), timeout=5)
    assert response == external_auth_pb2.CheckResponse()
    assert stack.servicer.finished == 1


# --- stop and drain -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_after_stop_readiness_is_false_and_both_ports_are_closed() -> None:
    stack = Stack()
    await stack.runtime.start()
    grpc_port, http_port = stack.runtime.grpc_port, stack.runtime.http_port
    await stack.runtime.stop()
    assert not stack.runtime.readiness.ready
    assert stack.runtime.readiness.snapshot()["shutdown"] == {"ready": False, "detail": "draining"}
    assert await port_is_closed(grpc_port)
    assert await port_is_closed(http_port)


@pytest.mark.asyncio
async def test_a_second_runtime_on_a_busy_grpc_port_is_a_config_error(stack: Stack) -> None:
    busy = f"127.0.0.1:{stack.runtime.grpc_port}"
    second = Stack(grpc_addr=busy)
    with pytest.raises(ConfigError) as excinfo:
        await second.runtime.start()
    assert excinfo.value.source == "--grpc-addr"
    assert str(excinfo.value).startswith(f"--grpc-addr: cannot listen on {busy}")
    # The first server is unaffected.
    async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
        assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.asyncio
async def test_a_busy_http_port_is_a_config_error_and_frees_the_grpc_port(stack: Stack) -> None:
    busy = f"127.0.0.1:{stack.runtime.http_port}"
    second = Stack(http_addr=busy)
    with pytest.raises(ConfigError) as excinfo:
        await second.runtime.start()
    assert excinfo.value.source == "--http-addr"
    assert str(excinfo.value).startswith(f"--http-addr: cannot listen on {busy}: ")
    assert "address already in use" in str(excinfo.value)
    assert second.runtime.grpc_port > 0
    assert await port_is_closed(second.runtime.grpc_port)


@pytest.mark.asyncio
async def test_an_in_flight_call_completes_during_drain_while_new_calls_are_refused(
    http: aiohttp.ClientSession,
) -> None:
    stack = Stack()
    await stack.runtime.start()
    stack.servicer.release.clear()
    async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        in_flight = asyncio.ensure_future(stub.Check(external_auth_pb2.CheckRequest(), timeout=30))
        await stack.servicer.entered.wait()

        stopping = asyncio.create_task(stack.runtime.stop())
        async with asyncio.timeout(10):  # a safety net, not a wait: each loop is one RPC
            while True:
                try:
                    await health_status(channel)
                except grpc.aio.AioRpcError as exc:
                    # A call racing the shutdown is cancelled; once the listener is gone, refused.
                    assert exc.code() in {grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE}
                    break
        # New calls are refused, yet the old one is still running and /readyz says draining.
        assert not in_flight.done()
        assert not stopping.done()
        status, body = await get_json(http, stack.url("/readyz"))
        assert status == 503
        assert body["components"]["shutdown"] == {"ready": False, "detail": "draining"}

        stack.servicer.release.set()
        response = await in_flight
        assert response == external_auth_pb2.CheckResponse()
        async with asyncio.timeout(10):
            await stopping  # returns once drained, long before drain_timeout
    assert stack.servicer.finished == 1


@pytest.mark.asyncio
async def test_during_the_shutdown_delay_new_calls_are_served_while_health_says_not_serving(
    http: aiohttp.ClientSession,
) -> None:
    stack = Stack(shutdown_delay=3.0)
    await stack.runtime.start()
    port = stack.runtime.grpc_port
    async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        stopping = asyncio.create_task(stack.runtime.stop())
        async with asyncio.timeout(10):
            while await health_status(channel) != health_pb2.HealthCheckResponse.NOT_SERVING:
                await asyncio.sleep(0.01)
        status, body = await get_json(http, stack.url("/readyz"))
        assert status == 503
        assert body["components"]["shutdown"] == {"ready": False, "detail": "draining"}
        # not ready, yet still serving: a load balancer moving away fails nothing meanwhile
        for _ in range(3):
            await stub.Check(external_auth_pb2.CheckRequest(), timeout=5)
        assert stack.servicer.finished == 3
        assert not stopping.done()
        async with asyncio.timeout(20):
            await stopping  # then the drain, as without a delay
    assert await port_is_closed(port)


@pytest.mark.asyncio
async def test_background_tasks_run_and_are_cancelled_on_stop() -> None:
    started = asyncio.Event()
    outcome: list[str] = []

    async def background() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise

    stack = Stack(background=[background])
    await stack.runtime.start()
    async with asyncio.timeout(10):
        await started.wait()
    await stack.runtime.stop()
    assert outcome == ["cancelled"]


@pytest.mark.asyncio
async def test_on_close_callbacks_all_run_even_when_one_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    closed: list[str] = []

    def closer(name: str, fail: bool = False) -> Callable[[], Awaitable[None]]:
        async def close() -> None:
            closed.append(name)
            if fail:
                raise RuntimeError(f"{name} failed")

        return close

    stack = Stack(on_close=[closer("first", fail=True), closer("second")])
    await stack.runtime.start()
    await stack.runtime.stop()
    assert closed == ["first", "second"]
    assert "error while closing" in caplog.text
    assert "RuntimeError: first failed" in caplog.text
