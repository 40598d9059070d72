"""The gRPC adapter for Envoy's access log stream (envoy.service.accesslog.v3.AccessLogService):
each HTTP entry becomes a Decision in the DecisionLog (decisions.py) and, in the one-hop
topology, the request's charge (one_hop.py). Envoy keeps one stream per worker thread open and
sends entries in batches; a malformed entry is skipped and counted."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC
from typing import Any

import grpc
from envoy.config.core.v3.base_pb2 import RequestMethod
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from maas_authz.decisions import AUTHZ_NAMESPACE, RATELIMIT_NAMESPACE, DecisionLog, decision_from
from maas_authz.one_hop import AUTHZ, USAGE, InlineLimits
from maas_common.clock import SystemClock
from maas_common.logs import LogThrottle
from maas_common.server import Undecodable, register_handlers, tolerant_decoder

log = logging.getLogger(__name__)
SERVICE_NAME = als_pb2.DESCRIPTOR.services_by_name["AccessLogService"].full_name


def flat_struct(struct: Any) -> dict[str, Any]:
    """A google.protobuf.Struct of scalars as a dict (nested values are left out): cheaper than
    json_format per entry, and all the servers' metadata is flat."""
    out: dict[str, Any] = {}
    for key, value in struct.fields.items():
        kind = value.WhichOneof("kind")
        if kind == "string_value":
            out[key] = value.string_value
        elif kind == "number_value":
            number = value.number_value
            out[key] = int(number) if number.is_integer() else number
        elif kind == "bool_value":
            out[key] = value.bool_value
    return out


class AccessLogService(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    def __init__(
        self,
        decisions: DecisionLog,
        on_entry: Callable[[str], None],
        *,
        charges: InlineLimits | None = None,
    ) -> None:
        self._decisions = decisions
        self._charges = charges  # the one-hop topology: entries carry the usage to charge
        self._on_entry = on_entry  # "recorded" or "skipped"
        self._streams: set[asyncio.Task[object]] = set()
        self._odd_log = LogThrottle(SystemClock(), seconds=5.0)  # a line per 5 s at most

    async def close(self) -> None:
        """Ends the open streams (they last as long as Envoy runs): called before the drain."""
        for task in list(self._streams):
            task.cancel()

    def register(self, server: grpc.aio.Server) -> None:
        # as the generated add_AccessLogServiceServicer_to_server, but a message that does not
        # decode reaches the handler (an Undecodable) instead of gRPC's UNKNOWN + a traceback
        stream = grpc.stream_unary_rpc_method_handler(
            self.StreamAccessLogs,
            request_deserializer=tolerant_decoder(als_pb2.StreamAccessLogsMessage.FromString),
            response_serializer=als_pb2.StreamAccessLogsResponse.SerializeToString,
        )
        register_handlers(server, SERVICE_NAME, {"StreamAccessLogs": stream})

    async def StreamAccessLogs(  # the gRPC method name
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext,
    ) -> als_pb2.StreamAccessLogsResponse:
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        try:
            await self._read(request_iterator, context)
        finally:
            self._streams.discard(task)
        return als_pb2.StreamAccessLogsResponse()

    async def _read(
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext,
    ) -> None:
        async for message in request_iterator:
            if type(message) is Undecodable:  # not from Envoy: the stream ends, precisely
                self._on_entry("skipped")
                self._note("ended a stream whose message does not decode: %s", message.problem)
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"not a StreamAccessLogsMessage: {message.problem}",
                )
            settling = []
            for entry in message.http_logs.log_entry:
                try:
                    charge = self._add(entry)
                except Exception as exc:  # one odd entry must not end Envoy's stream
                    self._note("skipped an access log entry that could not be read: %r", exc)
                    self._on_entry("skipped")
                else:
                    self._on_entry("recorded")
                    if charge is not None:
                        settling.append(charge)
            if settling:  # the message's charges together; the next message waits for them
                await asyncio.gather(*settling)

    def _note(self, message: str, detail: object) -> None:
        self._odd_log.log(log, logging.WARNING, message, detail)

    def _add(self, entry: Any) -> Coroutine[Any, Any, None] | None:
        """Records the entry; returns its charge to await (one hop), if it has one."""
        common, request, response = entry.common_properties, entry.request, entry.response
        metadata = common.metadata.filter_metadata
        authz = flat_struct(metadata[AUTHZ_NAMESPACE]) if AUTHZ_NAMESPACE in metadata else {}
        limited = RATELIMIT_NAMESPACE in metadata
        ratelimit = flat_struct(metadata[RATELIMIT_NAMESPACE]) if limited else {}
        start = common.start_time.ToDatetime(tzinfo=UTC) if common.HasField("start_time") else None
        duration = common.duration
        decisions = self._decisions
        decisions.add(
            decision_from(
                decisions.next_seq(),
                start=start,
                request_id=request.request_id,
                method=als_method(request.request_method),
                path=request.original_path or request.path,  # as the client sent it
                status=response.response_code.value,
                details=response.response_code_details,
                authz=authz,
                ratelimit=ratelimit,
                rate_limited_flag=common.response_flags.rate_limited,
                duration_ms=duration.seconds * 1000 + duration.nanos // 1_000_000,
            )
        )
        if self._charges is None or "user" not in authz:  # only admitted requests are charged
            return None
        usage = flat_struct(metadata[USAGE]) if USAGE in metadata else {}
        return self._charges.settle({AUTHZ: authz, USAGE: usage})


def als_method(value: int) -> str:
    """envoy.config.core.v3.RequestMethod's name ("GET"), or "" for METHOD_UNSPECIFIED."""
    name: str = RequestMethod.Name(value)
    return "" if name == "METHOD_UNSPECIFIED" else name
