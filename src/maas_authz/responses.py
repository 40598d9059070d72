"""Decision -> envoy.service.auth.v3.CheckResponse. The one place that knows the wire format."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.auth.v3.external_auth_pb2 import CheckResponse
from google.rpc import code_pb2

from maas_authz.decision import Allow, Deny, QuotaReply

USER_HEADER = "x-maas-user"
TIER_HEADER = "x-maas-tier"
MODEL_HEADER = "x-maas-model"
REASON_HEADER = "x-maas-auth-reason"
# the subscription flow's headers, as upstream MaaS sets them for maas-api and the models
USERNAME_HEADER = "x-maas-username"
GROUP_HEADER = "x-maas-group"  # a JSON array
SUBSCRIPTION_HEADER = "x-maas-subscription"
GATEWAY_MODEL_HEADER = "x-gateway-model-name"
UPSTREAM_REASON_HEADER = "x-ext-auth-reason"
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
_APPEND = HeaderValueOption.APPEND_IF_EXISTS_OR_ADD


def _header(key: str, value: str) -> HeaderValueOption:
    return HeaderValueOption(header=HeaderValue(key=key, value=value), append_action=_OVERWRITE)


def error_body(status: int, code: str, message: str) -> str:
    """The OpenAI error shape, so OpenAI SDKs show the message."""
    return json.dumps(
        {"error": {"message": message, "type": _ERROR_TYPES.get(status, "error"), "code": code}}
    )


class _Responses:
    """Serialized responses by what decides them, bounded: the oldest entry goes first.

    Building a CheckResponse field by field (and its Struct through the Python helpers) costs
    ~10 µs, and the same few answers repeat. The gRPC method sends bytes: a denial as cached,
    an allowed answer as the cached bytes followed by its own request id (bytes are immutable:
    nothing one request gets can change what another gets).
    """

    def __init__(self, max_entries: int) -> None:
        self._max_entries = max_entries
        self._entries: dict[Hashable, _Entry] = {}

    def get(self, key: Hashable, build: Callable[[], _Entry]) -> _Entry:
        entry = self._entries.get(key)
        if entry is None:
            entry = build()
            if len(self._entries) >= self._max_entries:
                del self._entries[next(iter(self._entries))]
            self._entries[key] = entry
        return entry


@dataclass(frozen=True, slots=True)
class _Entry:
    data: bytes  # a serialized CheckResponse
    ours: frozenset[str] = frozenset()  # the headers it sets (allowed responses)


_DENIED = _Responses(max_entries=1024)
_ALLOWED = _Responses(max_entries=16384)


def denied(deny: Deny) -> CheckResponse:
    return CheckResponse.FromString(denied_serialized(deny))


def denied_serialized(deny: Deny) -> bytes:
    """denied(deny), serialized: what the gRPC method sends."""
    return _DENIED.get(deny, lambda: _Entry(_build_denied(deny))).data


def _build_denied(deny: Deny) -> bytes:
    response = CheckResponse()
    response.status.code = (
        code_pb2.UNAUTHENTICATED if deny.status == 401 else code_pb2.PERMISSION_DENIED
    )
    out = response.denied_response
    out.status.code = deny.status
    headers = [
        _header("content-type", "text/plain; charset=utf-8" if deny.plain else "application/json"),
        _header(REASON_HEADER, deny.code),
    ]
    if deny.plain:
        headers.append(_header(UPSTREAM_REASON_HEADER, deny.code))
    if deny.status == 401:
        challenge = 'Bearer realm="maas"'
        if deny.token_presented:
            # RFC 6750 §3: say the token was the problem; the description never quotes the token.
            challenge += f', error="invalid_token", error_description="{deny.code}"'
        headers.append(_header("www-authenticate", challenge))
    if deny.retry_after is not None:
        headers.append(_header("retry-after", str(deny.retry_after)))
    out.headers.extend(headers)
    out.body = deny.message if deny.plain else error_body(deny.status, deny.code, deny.message)
    # for the access log (the operator's decisions view), under names no rate limit reads:
    # a denied request must never be counted or charged
    metadata = {"reason": deny.code}
    if deny.user:
        metadata["log_user"] = deny.user
    if deny.tier:
        metadata["log_tier"] = deny.tier
    response.dynamic_metadata.update(metadata)
    data: bytes = response.SerializeToString()
    return data


def quota_serialized(reply: QuotaReply) -> bytes:
    """A /v1/quota answer: a 200 that Envoy sends as a local reply (the denied_response form),
    so nothing after maas-authz runs: no rate limit is taken, no model called."""
    response = CheckResponse()
    response.status.code = code_pb2.PERMISSION_DENIED  # "not for the upstream", not an error
    out = response.denied_response
    out.status.code = 200
    out.headers.extend(
        [
            _header("content-type", "application/json"),
            _header("cache-control", "no-store"),
            *(_header(key, value) for key, value in reply.headers),
        ]
    )
    out.body = json.dumps(reply.body)
    response.dynamic_metadata.update(reply.metadata)
    data: bytes = response.SerializeToString()
    return data


def new_request_id() -> str:
    """96 random bits from the OS CSPRNG (what secrets.token_hex(12) reads), as 24 hex digits."""
    return os.urandom(12).hex()


def _request_id_field() -> bytes:
    """The serialized CheckResponse fragment `dynamic_metadata {request_id: <24 characters>}`,
    less the 24 characters: with them appended, parsed after a cached response, it adds the
    entry to that response's metadata (protobuf merges a message field that comes twice)."""
    placeholder = "0" * len(new_request_id())
    response = CheckResponse()
    response.dynamic_metadata.fields["request_id"].string_value = placeholder
    data: bytes = response.SerializeToString()
    head, found, tail = data.rpartition(placeholder.encode())
    assert found and not tail
    return head


_REQUEST_ID_FIELD = _request_id_field()


def allowed(
    allow: Allow, request_header_names: Collection[str], *, forward_authorization: bool
) -> CheckResponse:
    return CheckResponse.FromString(
        allowed_serialized(allow, request_header_names, forward_authorization=forward_authorization)
    )


def allowed_serialized(
    allow: Allow,
    request_header_names: Collection[str],
    *,
    forward_authorization: bool,
    request_id: str | None = None,
) -> bytes:
    """allowed(...), serialized: what the gRPC method sends, without building the message.
    `request_id`: one made already (new_request_id), else a new one."""
    identity, tier, model = allow.identity, allow.tier, allow.model
    # An open path without authentication was not ours to authenticate: its credentials are for
    # the service behind it (e.g. maas-api), so they pass untouched.
    drop_authorization = not forward_authorization and identity is not None
    key = (
        identity.username if identity is not None else None,
        tier.name if tier is not None else None,
        model.namespace if model is not None else None,
        model.name if model is not None else None,
        drop_authorization,
        _subscription_key(allow) if allow.subscription_flow else None,
    )
    entry = _ALLOWED.get(key, lambda: _build_allowed(allow, drop_authorization))
    # A per-request id no client can choose: the rate limiter keys charge de-duplication and
    # "never charge a refused request" on it (a client-supplied x-request-id could be replayed).
    data = entry.data + _REQUEST_ID_FIELD + (request_id or new_request_id()).encode()
    # Never trust identity headers from the client: drop every x-maas-* it sent that we do not
    # overwrite ourselves (ours are set with OVERWRITE, which replaces the client's values).
    # One substring search over all the names first: most requests send no x-maas-* at all.
    if IDENTITY_HEADER_PREFIX in "\n".join(request_header_names):
        ours = entry.ours
        to_remove = [
            name
            for name in request_header_names
            if name.startswith(IDENTITY_HEADER_PREFIX) and name not in ours
        ]
        if to_remove:
            response = CheckResponse.FromString(data)
            removed = response.ok_response.headers_to_remove
            if drop_authorization:  # the client's headers first, as ever, then authorization
                del removed[:]
                to_remove.append("authorization")
            removed.extend(to_remove)
            data = response.SerializeToString()
    return data


def _subscription_key(allow: Allow) -> Hashable:
    """What else the subscription flow's response is built from (the terms, not the objects:
    a rebuilt catalog with the same terms reuses the entry)."""
    identity = allow.identity
    groups = identity.groups if identity is not None else ()
    selection = allow.selection
    if selection is None:
        return (groups, allow.key_id, allow.named_subscription)
    return (groups, allow.key_id, selection.terms)


def _subscription_parts(allow: Allow) -> tuple[list[HeaderValueOption], dict[str, str]]:
    """The X-MaaS-* headers and the metadata the subscription flow adds."""
    identity = allow.identity
    assert identity is not None
    headers = [
        _header(USERNAME_HEADER, identity.username),
        _header(GROUP_HEADER, json.dumps(list(identity.groups), separators=(",", ":"))),
    ]
    metadata: dict[str, str] = {}
    if allow.key_id:
        metadata["key_id"] = allow.key_id
    if allow.selection is not None:
        headers.append(_header(SUBSCRIPTION_HEADER, allow.selection.subscription.name))
        metadata.update(allow.selection.terms)
    elif allow.named_subscription:
        headers.append(_header(SUBSCRIPTION_HEADER, allow.named_subscription))
    if allow.model is not None:
        headers.append(_header(GATEWAY_MODEL_HEADER, allow.model.name))
    return headers, metadata


def _build_allowed(allow: Allow, drop_authorization: bool) -> _Entry:
    """Everything of an allowed response but the request id and the client's x-maas-* headers."""
    response = CheckResponse()
    response.status.code = code_pb2.OK
    ok = response.ok_response
    ok.SetInParent()  # present even when it sets no header
    headers: list[HeaderValueOption] = []
    if allow.identity is not None:
        headers.append(_header(USER_HEADER, allow.identity.userid))
    if allow.tier is not None:
        headers.append(_header(TIER_HEADER, allow.tier.name))
    if allow.model is not None:
        headers.append(_header(MODEL_HEADER, str(allow.model)))
    if allow.subscription_flow and allow.identity is not None:
        headers += _subscription_parts(allow)[0]
    ok.headers.extend(headers)
    if drop_authorization:
        ok.headers_to_remove.append("authorization")
    response.dynamic_metadata.update(allowed_metadata(allow))
    return _Entry(response.SerializeToString(), frozenset(h.header.key for h in headers))


def allowed_metadata(allow: Allow) -> dict[str, str]:
    """The dynamic metadata of an allowed response (less the request id): what the rate limits
    read (envoy/gateway.yaml's rate_limits; in the one-hop topology, one_hop.py)."""
    metadata: dict[str, str] = {}
    if allow.identity is not None:
        # `user` keys the rate-limit counters, so it must be unique: the full username. The short
        # userid (a ServiceAccount's name, as Authorino handed on) repeats across namespaces, and
        # anyone able to name a ServiceAccount like another user's would share that user's quota.
        metadata["user"] = allow.identity.username
        metadata["userid"] = allow.identity.userid
    if allow.tier is not None:
        metadata["tier"] = allow.tier.name
    if allow.model is not None:
        metadata["model"] = str(allow.model)
        metadata["model_namespace"] = allow.model.namespace
        metadata["model_name"] = allow.model.name
    if allow.subscription_flow and allow.identity is not None:
        metadata.update(_subscription_parts(allow)[1])
    return metadata


def with_response_headers(data: bytes, headers: Sequence[tuple[str, str]]) -> bytes:
    """An allowed response's bytes with headers for the client's response added (as Envoy's
    rate limit filter adds its own: appended)."""
    if not headers:
        return data
    extra = CheckResponse()
    extra.ok_response.response_headers_to_add.extend(
        HeaderValueOption(header=HeaderValue(key=key, value=value), append_action=_APPEND)
        for key, value in headers
    )
    # a message field that comes twice is merged: the ok_response gains these headers
    more: bytes = extra.SerializeToString()
    return data + more


def limited_serialized(
    headers: Sequence[tuple[str, str]], body: bytes, metadata: Mapping[str, Any]
) -> bytes:
    """A 429 of the one-hop topology's rate limits: the status, headers and body Envoy's rate
    limit filter sends in the two-server topology, and the refusal for the access log."""
    response = CheckResponse()
    response.status.code = code_pb2.RESOURCE_EXHAUSTED
    out = response.denied_response
    out.status.code = 429
    out.headers.extend(
        HeaderValueOption(header=HeaderValue(key=key, value=value), append_action=_APPEND)
        for key, value in headers
    )
    out.body = body.decode()
    response.dynamic_metadata.update(metadata)
    data: bytes = response.SerializeToString()
    return data
