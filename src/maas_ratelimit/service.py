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
from typing import Literal

import grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from maas_common.clock import Clock, SystemClock
from maas_common.errors import BackendUnavailable
from maas_common.logs import LogThrottle
from maas_common.server import Undecodable, register_serialized_unary
from maas_ratelimit import responses
from maas_ratelimit.descriptors import CHARGE, Descriptor, effective_hits
from maas_ratelimit.limiter import RateLimiter, UnknownDomain, Verdict, request_id_of
from maas_ratelimit.metrics import RateLimitMetrics, WireLabels
from maas_ratelimit.store import ChargeStatus
from maas_ratelimit.usage_ledger import UsageLedger

log = logging.getLogger(__name__)
SERVICE_NAME = rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name
FailureMode = Literal["open", "closed"]


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


def _peeks(descriptor: Descriptor) -> bool:
    """Check-only and about admission: an after-response report (outcome, charge) with hits 0
    is a report, never a peek."""
    return descriptor.check_only and descriptor.outcome is None and descriptor.charge_kind is None


class RateLimitService(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    def __init__(
        self,
        limiter: RateLimiter,
        metrics: RateLimitMetrics,
        *,
        failure_mode: FailureMode,
        clock: Clock | None = None,
        ledger: UsageLedger | None = None,
    ) -> None:
        self._limiter = limiter
        self._ledger = ledger
        self._clock = clock or SystemClock()
        self._metrics = metrics
        self._failure_mode = failure_mode
        self._failure_log = LogThrottle(clock or SystemClock(), seconds=5.0)
        self._undecodable_log = LogThrottle(clock or SystemClock(), seconds=5.0)
        self._call_seconds = metrics.call_seconds.child()
        self._labels = WireLabels(limiter.table)

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
            verdict = await self._limiter.decide(request.domain, descriptors)
            # every descriptor a check-only admission (hits_addend 0): a peek, which consumes
            # nothing and gets every limit's state in its metadata; counted apart from decisions
            if descriptors and descriptors[0].check_only and all(map(_peeks, descriptors)):
                self._metrics.answers.inc("peek")
                return responses.encode(verdict, peek=True)
            self._record(verdict)
            charges = verdict.charges
            # charged once per request id (the store said so): on the ledger's journal before
            # the answer goes back
            if self._ledger is not None and charges and charges[0].status is ChargeStatus.APPLIED:
                self._ledger.record(
                    descriptors,
                    charges,
                    request_id_of(descriptors),
                    round(self._clock.wall() * 1000),
                )
            return responses.encode(verdict)
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
        self._failure_log.log(  # one line per 5 s, not one per request
            log,
            logging.WARNING,
            "rate limit store failed, failing %s: %s",
            self._failure_mode,
            exc,
            extra={"backend": exc.backend, "kind": exc.kind},
        )
        if any(CHARGE in (e.key for e in d.entries) for d in request.descriptors):
            self._metrics.skipped.inc("store_unavailable")
        if self._failure_mode == "open":
            self._metrics.answers.inc("failure_open")
            return bytes(responses.allow_all(len(request.descriptors)).SerializeToString())
        self._metrics.answers.inc("unavailable")
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"rate limit store unavailable: {exc}")
        raise AssertionError("unreachable")  # abort() raises

    def _record(self, verdict: Verdict) -> None:
        metrics = self._metrics
        metrics.answers.inc("over_limit" if verdict.over_limit else "ok")
        decisions = metrics.decisions
        # every label value that came from a descriptor goes through `labels` (bounded)
        labels = self._labels
        labels.reset_if(self._limiter.table())
        tier_of, model_of, of_limit = labels.tier, labels.model, labels.of_limit
        for descriptor in verdict.descriptors:
            for state in descriptor.limits:
                decisions.inc(state.result, *of_limit(state.limit))
        for charge in verdict.charges:
            if charge.status is ChargeStatus.APPLIED:
                tier, model = tier_of(charge.tier), model_of(charge.model)
                metrics.charged.inc(tier, model, charge.kind, amount=charge.tokens)
                if charge.billing_rate is not None:
                    metrics.charge_cost(tier, model, charge.tokens, charge.billing_rate)
            else:
                metrics.skipped.inc(charge.status.value)
        for tier, outcome in verdict.outcomes:
            metrics.reported.inc(tier_of(tier), labels.outcome(outcome))
        for tier, model, tokens in verdict.reserved:
            metrics.reserved.inc(tier_of(tier), model_of(model), amount=tokens)
        for tier, model, tokens in verdict.refunded:
            metrics.refunded.inc(tier_of(tier), model_of(model), amount=tokens)
        for reason in verdict.ignored:
            metrics.ignored.inc(reason)
