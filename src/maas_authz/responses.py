"""Decision -> envoy.service.auth.v3.CheckResponse. The one place that knows the wire format."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.auth.v3.external_auth_pb2 import CheckResponse
from google.rpc import code_pb2

from maas_authz.decision import Allow, Deny

USER_HEADER = "x-maas-user"
TIER_HEADER = "x-maas-tier"
MODEL_HEADER = "x-maas-model"
REASON_HEADER = "x-maas-auth-reason"
OWN_HEADERS = frozenset({USER_HEADER, TIER_HEADER, MODEL_HEADER})
IDENTITY_HEADER_PREFIX = "x-maas-"

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    500: "internal_error",
    503: "service_unavailable_error",
}
_OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def _header(key: str, value: str) -> HeaderValueOption:
    return HeaderValueOption(header=HeaderValue(key=key, value=value), append_action=_OVERWRITE)


def error_body(status: int, code: str, message: str) -> str:
    """The OpenAI error shape, so OpenAI SDKs show the message."""
    return json.dumps(
        {"error": {"message": message, "type": _ERROR_TYPES.get(status, "error"), "code": code}}
    )


def denied(deny: Deny) -> CheckResponse:
    response = CheckResponse()
    response.status.code = (
        code_pb2.UNAUTHENTICATED if deny.status == 401 else code_pb2.PERMISSION_DENIED
    )
    out = response.denied_response
    out.status.code = deny.status
    headers = [
        _header("content-type", "application/json"),
        _header(REASON_HEADER, deny.code),
    ]
    if deny.status == 401:
        challenge = 'Bearer realm="maas"'
        if deny.token_presented:
            # RFC 6750 §3: say the token was the problem; the description never quotes the token.
            challenge += f', error="invalid_token", error_description="{deny.code}"'
        headers.append(_header("www-authenticate", challenge))
    if deny.retry_after is not None:
        headers.append(_header("retry-after", str(deny.retry_after)))
    out.headers.extend(headers)
    out.body = error_body(deny.status, deny.code, deny.message)
    return response


def allowed(
    allow: Allow, request_header_names: Iterable[str], *, forward_authorization: bool
) -> CheckResponse:
    response = CheckResponse()
    response.status.code = code_pb2.OK
    ok = response.ok_response
    # A per-request id no client can choose: the rate limiter keys charge de-duplication and
    # "never charge a refused request" on it (a client-supplied x-request-id could be replayed).
    metadata: dict[str, str] = {"request_id": secrets.token_hex(12)}
    headers: list[HeaderValueOption] = []
    if allow.identity is not None:
        headers.append(_header(USER_HEADER, allow.identity.userid))
        # `user` keys the rate-limit counters, so it must be unique: the full username. The short
        # userid (a ServiceAccount's name, as Authorino handed on) repeats across namespaces, and
        # anyone able to name a ServiceAccount like another user's would share that user's quota.
        metadata["user"] = allow.identity.username
        metadata["userid"] = allow.identity.userid
    if allow.tier is not None:
        headers.append(_header(TIER_HEADER, allow.tier.name))
        metadata["tier"] = allow.tier.name
    if allow.model is not None:
        headers.append(_header(MODEL_HEADER, str(allow.model)))
        metadata["model"] = str(allow.model)
        metadata["model_namespace"] = allow.model.namespace
        metadata["model_name"] = allow.model.name
    ok.headers.extend(headers)
    # Never trust identity headers from the client: drop every x-maas-* it sent that we do not
    # overwrite ourselves (ours are set with OVERWRITE, which replaces the client's values).
    ours = {h.header.key for h in headers}
    to_remove = [
        name
        for name in request_header_names
        if name.startswith(IDENTITY_HEADER_PREFIX) and name not in ours
    ]
    # An open path without authentication was not ours to authenticate: its credentials are for
    # the service behind it (e.g. maas-api), so they pass untouched.
    if not forward_authorization and allow.identity is not None:
        to_remove.append("authorization")
    ok.headers_to_remove.extend(to_remove)
    response.dynamic_metadata.update(metadata)
    return response
