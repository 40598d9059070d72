"""The gRPC adapter: envoy.service.auth.v3.Authorization/Check -> CheckPipeline -> CheckResponse.

It never raises to Envoy: any unexpected error becomes a 500 deny with a log line, so a bug in one
request can neither crash the server nor let a request through.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from maas_authz import responses
from maas_authz.access_log import flat_struct
from maas_authz.check import CheckPipeline
from maas_authz.decision import Allow, Deny
from maas_authz.metrics import AuthzMetrics
from maas_authz.one_hop import USAGE, InlineLimits, Refused
from maas_authz.quota import QuotaEndpoint
from maas_common.clock import SystemClock
from maas_common.logs import LogThrottle
from maas_common.server import Undecodable, register_serialized_unary

log = logging.getLogger(__name__)

SERVICE_NAME = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name
_INTERNAL = Deny(500, "internal_error", "the authorization server failed; this is a bug, retry")
# what a call that is not a CheckRequest gets (Envoy never sends one: a client on the port did)
_UNDECODABLE = Deny(400, "invalid_check_request", "the call is not a valid CheckRequest")


class AuthorizationService(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(
        self,
        pipeline: CheckPipeline,
        metrics: AuthzMetrics,
        *,
        forward_authorization: bool,
        quota: QuotaEndpoint | None = None,
        limits: InlineLimits | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._limits = limits  # the one-hop topology: rate limits admitted here (one_hop.py)
        self._quota = quota  # GET /v1/quota, answered here (quota.py)
        self._metrics = metrics
        self._forward_authorization = forward_authorization
        self._undecodable_log = LogThrottle(SystemClock(), seconds=5.0)

    def register(self, server: grpc.aio.Server) -> None:
        # the method sends check_serialized's bytes (responses.py assembles them from cached
        # parts)
        register_serialized_unary(
            server,
            SERVICE_NAME,
            "Check",
            self.check_serialized,
            external_auth_pb2.CheckRequest.FromString,
        )

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        """The answer as a message; the gRPC method sends check_serialized's bytes."""
        return external_auth_pb2.CheckResponse.FromString(
            await self.check_serialized(request, context)
        )

    async def check_serialized(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> bytes:
        started = time.perf_counter()
        if type(request) is Undecodable:  # not a CheckRequest at all: never from Envoy
            return self._undecodable(request)
        http = request.attributes.request.http
        headers = http.headers
        try:
            # the body only comes where Envoy sends it (the body routes' with_request_body)
            body = http.raw_body or (
                http.body.encode("utf-8", "surrogatepass") if http.body else b""
            )
            quota = self._quota
            if quota is not None and quota.handles(http.path):
                response = await self._quota_answer(quota, http.method, http.path, headers)
            else:
                decision = await self._pipeline.decide(
                    http.path, headers.get("authorization"), headers=headers, body=body
                )
                if isinstance(decision, Allow):
                    limits = self._limits
                    if limits is not None and decision.identity is not None:
                        response = await self._admitted(limits, decision, request)
                    else:
                        response = responses.allowed_serialized(
                            decision, headers, forward_authorization=self._forward_authorization
                        )
                    # maas-authz's own decision; a rate limit's refusal is counted as
                    # maas-ratelimit counts it, in both topologies
                    self._metrics.decision("allowed", "ok", _scope(decision))
                else:
                    response = responses.denied_serialized(decision)
                    self._metrics.decision("denied", decision.code, decision.tier)
        except Exception:
            log.exception(
                "Check failed unexpectedly; denying",
                extra={"path": http.path.split("?", 1)[0][:200]},
            )
            response = responses.denied_serialized(_INTERNAL)
            self._metrics.decision("denied", _INTERNAL.code, "")
        self._metrics.check_seconds.observe(time.perf_counter() - started)
        return response

    async def _admitted(
        self,
        limits: InlineLimits,
        allow: Allow,
        request: external_auth_pb2.CheckRequest,
    ) -> bytes:
        """One hop: the request limits and the token reservation, then the answer."""
        request_id = responses.new_request_id()
        authz = responses.allowed_metadata(allow)
        authz["request_id"] = request_id
        # what the Lua usage reader, before ext_authz, estimated (metadata_context_namespaces)
        context = request.attributes.metadata_context.filter_metadata
        usage = flat_struct(context[USAGE]) if USAGE in context else {}
        admission = await limits.admit(authz, usage)
        if isinstance(admission, Refused):
            return admission.response
        data = responses.allowed_serialized(
            allow,
            request.attributes.request.http.headers,
            forward_authorization=self._forward_authorization,
            request_id=request_id,
        )
        return responses.with_response_headers(data, admission.headers)

    def _undecodable(self, request: Undecodable) -> bytes:
        self._undecodable_log.log(  # a line per 5 s, not one per call
            log, logging.WARNING, "denied a call that is not a CheckRequest: %s", request.problem
        )
        self._metrics.decision("denied", _UNDECODABLE.code, "")
        return responses.denied_serialized(_UNDECODABLE)

    async def _quota_answer(
        self, quota: QuotaEndpoint, method: str, path: str, headers: Mapping[str, str]
    ) -> bytes:
        reply = await quota.answer(method, path, headers.get("authorization"), headers)
        if isinstance(reply, Deny):
            self._metrics.decision("denied", reply.code, reply.tier)
            return responses.denied_serialized(reply)
        scope = reply.metadata.get("log_tier") or reply.metadata.get("log_subscription", "")
        self._metrics.decision("allowed", "quota", scope)
        return responses.quota_serialized(reply)


def _scope(allow: Allow) -> str:
    """The `tier` label: the tier, or in the subscription flow the subscription (namespace/name;
    bounded by the objects in the cluster, never by what a client sends)."""
    if allow.selection is not None:
        return allow.selection.subscription.qualified_name
    return allow.tier.name if allow.tier else ""
