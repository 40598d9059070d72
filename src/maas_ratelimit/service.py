"""The gRPC adapter: RateLimitService/ShouldRateLimit -> RateLimiter -> RateLimitResponse.

A call whose descriptors are all check-only admissions (hits_addend 0, no charge, no outcome) is
a peek: nothing is consumed and the answer lists every limit that applies (responses.py);
maas-authz peeks for /v1/quota.

Failure policy, decided here: a store that cannot answer either fails open (allow, count it) or
fails closed with gRPC UNAVAILABLE, so that Envoy's `failure_mode_deny` decides — the same
contract Limitador has. A domain this server does not serve is INVALID_ARGUMENT, loudly, rather
than silently unlimited.
"""

from __future__ import annotations

import logging
import time

import grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from maas_common.clock import SystemClock
from maas_common.errors import BackendUnavailable
from maas_common.logs import LogThrottle
from maas_common.server import Undecodable, register_serialized_unary
from maas_ratelimit import responses
from maas_ratelimit.accounting import LimitAccounting, is_peek
from maas_ratelimit.descriptors import CHARGE, Descriptor, effective_hits
from maas_ratelimit.limiter import UnknownDomain

log = logging.getLogger(__name__)
SERVICE_NAME = rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name


def to_descriptors(request: rls_pb2.RateLimitRequest) -> list[Descriptor]:
    out = []
    request_hits = request.hits_addend
    for descriptor in request.descriptors:
        own = descriptor.hits_addend.value if descriptor.HasField("hits_addend") else None
        hits, check_only = effective_hits(own, request_hits)
        entries = {}
        for entry in descriptor.entries:  # a loop, not a comprehension: no extra frame
            entries[entry.key] = entry.value
        out.append(Descriptor(entries, hits, check_only))
    return out


class RateLimitService(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    def __init__(self, accounting: LimitAccounting) -> None:
        self._accounting = accounting
        self._metrics = accounting.metrics
        self._undecodable_log = LogThrottle(SystemClock(), seconds=5.0)
        self._call_seconds = accounting.metrics.call_seconds.child()

    def register(self, server: grpc.aio.Server) -> None:
        # the method sends should_rate_limit_serialized's bytes (responses.encode)
        register_serialized_unary(
            server,
            SERVICE_NAME,
            "ShouldRateLimit",
            self.should_rate_limit_serialized,
            rls_pb2.RateLimitRequest.FromString,
        )

    async def ShouldRateLimit(  # the gRPC method name
        self, request: rls_pb2.RateLimitRequest, context: grpc.aio.ServicerContext
    ) -> rls_pb2.RateLimitResponse:
        """The answer as a message; the gRPC method sends should_rate_limit_serialized's bytes."""
        return rls_pb2.RateLimitResponse.FromString(
            await self.should_rate_limit_serialized(request, context)
        )

    async def should_rate_limit_serialized(
        self, request: rls_pb2.RateLimitRequest, context: grpc.aio.ServicerContext
    ) -> bytes:
        started = time.perf_counter()
        if type(request) is Undecodable:  # not a RateLimitRequest at all: never from Envoy
            self._metrics.answers.inc("invalid_request")
            self._undecodable_log.log(  # a line per 5 s, not one per call
                log, logging.WARNING, "refused a call that is not a RateLimitRequest: %s",
                request.problem,
            )  # fmt: skip
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"not a RateLimitRequest: {request.problem}"
            )
        try:
            descriptors = to_descriptors(request)
            accounting = self._accounting
            # a peek consumes nothing and gets every limit's state in its metadata
            if is_peek(descriptors):
                verdict = await accounting.peek(request.domain, descriptors)
                return responses.encode(verdict, peek=True)
            return responses.encode(await accounting.decide(request.domain, descriptors))
        except UnknownDomain as exc:
            self._metrics.answers.inc("error")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # abort() raises; this says so to the reader and the type checker
        except BackendUnavailable as exc:
            return await self._store_failed(exc, request, context)
        except Exception:
            log.exception("ShouldRateLimit failed unexpectedly")
            self._metrics.answers.inc("error")
            await context.abort(grpc.StatusCode.INTERNAL, "rate limit decision failed")
            raise
        finally:
            self._call_seconds.observe(time.perf_counter() - started)

    async def _store_failed(
        self,
        exc: BackendUnavailable,
        request: rls_pb2.RateLimitRequest,
        context: grpc.aio.ServicerContext,
    ) -> bytes:
        charges = any(CHARGE in (e.key for e in d.entries) for d in request.descriptors)
        if self._accounting.store_failed(exc, charges=charges) == "open":
            return bytes(responses.allow_all(len(request.descriptors)).SerializeToString())
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"rate limit store unavailable: {exc}")
        raise AssertionError("unreachable")  # abort() raises
