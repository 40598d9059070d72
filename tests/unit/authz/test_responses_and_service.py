"""Decision -> CheckResponse, and the gRPC Check adapter called directly (context=None)."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from envoy.config.core.v3.base_pb2 import HeaderValueOption
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse
from google.protobuf.json_format import MessageToDict
from google.rpc import code_pb2
from prometheus_client import CollectorRegistry

from maas_authz import responses
from maas_authz.check import CheckLimits, CheckPipeline
from maas_authz.decision import Allow, Deny
from maas_authz.identity import Identity
from maas_authz.metrics import AuthzMetrics
from maas_authz.model_path import ModelRef, OpenPath, PathRouting, PathTemplate
from maas_authz.service import AuthorizationService
from maas_authz.tiers import DEFAULT_TIERS, Tier, parse_tier_document
from maas_common.errors import BackendUnavailable
from tests.support.fakes import FakeAccessReviewer, FakeTokenReviewer

OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
CHAT = "/llm/tiny/v1/chat/completions"
TINY = ModelRef("llm", "tiny")
TOKEN = "alice-secret-token-123"
ALICE = Identity(
    "system:serviceaccount:maas-default-gateway-tier-premium:alice",
    "uid-a",
    ("system:serviceaccounts:maas-default-gateway-tier-premium", "system:authenticated"),
)
PREMIUM = Tier("premium", 1, frozenset({"tier-premium-users"}))
MAPPING = parse_tier_document(DEFAULT_TIERS, "built-in tiers", "maas-default-gateway")


# --- helpers ------------------------------------------------------------------------------------


def ok_headers(response: CheckResponse) -> dict[str, str]:
    out = {}
    for option in response.ok_response.headers:
        assert option.append_action == OVERWRITE, option
        assert option.header.key not in out
        out[option.header.key] = option.header.value
    return out


def denied_headers(response: CheckResponse) -> dict[str, str]:
    out = {}
    for option in response.denied_response.headers:
        assert option.append_action == OVERWRITE, option
        out[option.header.key] = option.header.value
    return out


def body_of(response: CheckResponse) -> dict[str, Any]:
    body = json.loads(response.denied_response.body)
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "code"}
    return error


def metadata(response: CheckResponse) -> dict[str, Any]:
    """The dynamic metadata without its request_id, after checking that one is there."""
    found = dict(MessageToDict(response.dynamic_metadata))
    request_id = found.pop("request_id")
    assert isinstance(request_id, str) and len(request_id) == 24
    int(request_id, 16)
    return found


# --- responses.allowed --------------------------------------------------------------------------


def test_allowed_sets_identity_headers_with_overwrite() -> None:
    response = responses.allowed(Allow(ALICE, PREMIUM, TINY), [], forward_authorization=False)
    assert response.status.code == code_pb2.OK
    assert response.HasField("ok_response")
    assert ok_headers(response) == {
        "x-maas-user": "alice",
        "x-maas-tier": "premium",
        "x-maas-model": "llm/tiny",
    }


def test_allowed_removes_client_identity_headers_but_not_ours() -> None:
    sent = [
        "x-maas-group",
        "x-maas-user",
        "x-maas-tier",
        "x-maas-model",
        "x-maas-username",
        "content-type",
        "authorization",
    ]
    response = responses.allowed(Allow(ALICE, PREMIUM, TINY), sent, forward_authorization=False)
    removed = list(response.ok_response.headers_to_remove)
    assert "x-maas-group" in removed
    assert "x-maas-username" in removed
    for ours in ("x-maas-user", "x-maas-tier", "x-maas-model"):
        assert ours not in removed  # replaced by OVERWRITE instead
    assert "content-type" not in removed
    assert removed.count("authorization") == 1


def test_allowed_without_identity_removes_every_client_identity_header() -> None:
    sent = ["x-maas-user", "x-maas-tier", "x-maas-model", "x-maas-group"]
    response = responses.allowed(Allow(None, None, None), sent, forward_authorization=True)
    assert ok_headers(response) == {}
    assert sorted(response.ok_response.headers_to_remove) == sorted(sent)
    assert metadata(response) == {}


def test_unauthenticated_open_path_keeps_the_clients_authorization() -> None:
    # not authenticated by us: the credentials belong to the service behind the path
    sent = ["authorization", "x-maas-user"]
    response = responses.allowed(Allow(None, None, None), sent, forward_authorization=False)
    assert list(response.ok_response.headers_to_remove) == ["x-maas-user"]


def test_allowed_on_an_open_path_removes_the_client_model_header() -> None:
    response = responses.allowed(
        Allow(ALICE, PREMIUM, None), ["x-maas-model"], forward_authorization=True
    )
    assert "x-maas-model" not in ok_headers(response)
    assert list(response.ok_response.headers_to_remove) == ["x-maas-model"]


def test_authorization_is_removed_unless_forwarded() -> None:
    kept = responses.allowed(
        Allow(ALICE, PREMIUM, TINY), ["authorization"], forward_authorization=True
    )
    assert "authorization" not in kept.ok_response.headers_to_remove
    dropped = responses.allowed(Allow(ALICE, PREMIUM, TINY), [], forward_authorization=False)
    assert "authorization" in dropped.ok_response.headers_to_remove


def test_every_allowed_response_carries_a_fresh_request_id() -> None:
    allow = Allow(ALICE, PREMIUM, TINY)
    answers = [responses.allowed(allow, [], forward_authorization=False) for _ in range(100)]
    ids = {MessageToDict(answer.dynamic_metadata)["request_id"] for answer in answers}
    assert len(ids) == 100


def test_allowed_dynamic_metadata() -> None:
    response = responses.allowed(Allow(ALICE, PREMIUM, TINY), [], forward_authorization=False)
    assert metadata(response) == {
        "user": ALICE.username,
        "userid": "alice",
        "tier": "premium",
        "model": "llm/tiny",
        "model_namespace": "llm",
        "model_name": "tiny",
    }


def test_allowed_metadata_on_an_open_path_has_no_model() -> None:
    response = responses.allowed(Allow(ALICE, PREMIUM, None), [], forward_authorization=False)
    assert metadata(response) == {"user": ALICE.username, "userid": "alice", "tier": "premium"}


# --- responses.denied ---------------------------------------------------------------------------


def test_401_without_a_token_has_the_bare_challenge() -> None:
    response = responses.denied(Deny(401, "missing_token", "missing Authorization header"))
    assert response.status.code == code_pb2.UNAUTHENTICATED
    assert response.denied_response.status.code == 401
    headers = denied_headers(response)
    assert headers["www-authenticate"] == 'Bearer realm="maas"'
    assert headers["content-type"] == "application/json"
    assert headers["x-maas-auth-reason"] == "missing_token"
    assert body_of(response) == {
        "message": "missing Authorization header",
        "type": "authentication_error",
        "code": "missing_token",
    }


def test_401_with_a_token_says_invalid_token() -> None:
    response = responses.denied(Deny(401, "invalid_token", "not valid", token_presented=True))
    challenge = denied_headers(response)["www-authenticate"]
    assert challenge.startswith('Bearer realm="maas", ')
    assert 'error="invalid_token"' in challenge


@pytest.mark.parametrize(
    ("status", "grpc_code", "error_type"),
    [
        (400, code_pb2.PERMISSION_DENIED, "invalid_request_error"),
        (403, code_pb2.PERMISSION_DENIED, "permission_error"),
        (404, code_pb2.PERMISSION_DENIED, "not_found_error"),
        (500, code_pb2.PERMISSION_DENIED, "internal_error"),
        (503, code_pb2.PERMISSION_DENIED, "service_unavailable_error"),
    ],
)
def test_other_denials(status: int, grpc_code: int, error_type: str) -> None:
    response = responses.denied(Deny(status, "some_code", "what is wrong"))
    assert response.status.code == grpc_code
    assert response.denied_response.status.code == status
    headers = denied_headers(response)
    assert "www-authenticate" not in headers
    assert "retry-after" not in headers
    assert body_of(response) == {
        "message": "what is wrong",
        "type": error_type,
        "code": "some_code",
    }


def test_503_carries_retry_after() -> None:
    response = responses.denied(Deny(503, "auth_backend_unavailable", "retry", retry_after=7))
    assert denied_headers(response)["retry-after"] == "7"


def test_error_body_escapes_the_message_as_json() -> None:
    body = json.loads(responses.error_body(400, "c", 'quote " and \\ and \n'))
    assert body["error"]["message"] == 'quote " and \\ and \n'


# --- the gRPC adapter ---------------------------------------------------------------------------


class Service:
    def __init__(self, *, forward_authorization: bool = False) -> None:
        self.registry = CollectorRegistry()
        self.identities = FakeTokenReviewer({TOKEN: ALICE})
        self.access = FakeAccessReviewer({(ALICE.username, TINY)})
        pipeline = CheckPipeline(
            routing=PathRouting(PathTemplate("/{namespace}/{model}"), (OpenPath("/v1/models"),)),
            identities=self.identities,
            tiers=lambda: MAPPING,
            access=self.access,
            limits=CheckLimits(retry_after_seconds=9),
        )
        self.service = AuthorizationService(
            pipeline, AuthzMetrics(self.registry), forward_authorization=forward_authorization
        )

    async def check(self, path: str, headers: dict[str, str]) -> CheckResponse:
        request = CheckRequest()
        request.attributes.request.http.path = path
        request.attributes.request.http.method = "POST"
        for key, value in headers.items():
            request.attributes.request.http.headers[key] = value
        response: CheckResponse = await self.service.Check(request, None)
        return response

    def decisions(self, result: str, reason: str, tier: str) -> float | None:
        return self.registry.get_sample_value(
            "maas_authz_decisions_total", {"result": result, "reason": reason, "tier": tier}
        )

    def checks_observed(self) -> float | None:
        return self.registry.get_sample_value("maas_authz_check_duration_seconds_count")


@pytest.mark.asyncio
async def test_check_allows_and_counts() -> None:
    svc = Service()
    response = await svc.check(
        CHAT, {"authorization": f"Bearer {TOKEN}", "x-maas-group": "admins", "x-maas-user": "root"}
    )
    assert response.status.code == code_pb2.OK
    assert ok_headers(response) == {
        "x-maas-user": "alice",
        "x-maas-tier": "premium",
        "x-maas-model": "llm/tiny",
    }
    assert sorted(response.ok_response.headers_to_remove) == ["authorization", "x-maas-group"]
    assert metadata(response)["model"] == "llm/tiny"
    assert svc.decisions("allowed", "ok", "premium") == 1.0
    assert svc.checks_observed() == 1.0


@pytest.mark.asyncio
async def test_check_forwards_authorization_when_configured() -> None:
    svc = Service(forward_authorization=True)
    response = await svc.check(CHAT, {"authorization": f"Bearer {TOKEN}"})
    assert response.status.code == code_pb2.OK
    assert "authorization" not in response.ok_response.headers_to_remove


@pytest.mark.asyncio
async def test_check_401_for_an_invalid_token_never_echoes_it() -> None:
    svc = Service()
    bad_token = "forged-token-XYZ-987"
    response = await svc.check(CHAT, {"authorization": f"Bearer {bad_token}"})
    assert response.status.code == code_pb2.UNAUTHENTICATED
    assert response.denied_response.status.code == 401
    headers = denied_headers(response)
    assert headers["www-authenticate"].startswith('Bearer realm="maas", error="invalid_token"')
    assert body_of(response)["code"] == "invalid_token"
    assert body_of(response)["type"] == "authentication_error"
    assert bad_token not in response.SerializeToString().decode("utf-8", "replace")
    assert svc.decisions("denied", "invalid_token", "") == 1.0


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "authorization",
    [f"Basic {TOKEN}", f"Bearer {TOKEN} {TOKEN}", f"Bearer {TOKEN},x", f"Bearer {TOKEN * 500}"],
)
async def test_check_401_for_unusable_headers_never_echoes_the_token(authorization: str) -> None:
    svc = Service()
    response = await svc.check(CHAT, {"authorization": authorization})
    assert response.denied_response.status.code == 401
    assert TOKEN not in response.denied_response.body
    assert TOKEN not in str(response)
    assert denied_headers(response)["www-authenticate"].startswith('Bearer realm="maas"')
    assert svc.identities.calls == 0


@pytest.mark.asyncio
async def test_check_401_without_authorization() -> None:
    svc = Service()
    response = await svc.check(CHAT, {})
    assert response.denied_response.status.code == 401
    assert denied_headers(response)["www-authenticate"] == 'Bearer realm="maas"'
    assert body_of(response)["code"] == "missing_token"
    assert svc.decisions("denied", "missing_token", "") == 1.0


@pytest.mark.asyncio
async def test_check_403_for_another_model_is_counted_with_the_tier() -> None:
    svc = Service()
    response = await svc.check("/llm/big/v1/chat/completions", {"authorization": f"Bearer {TOKEN}"})
    assert response.status.code == code_pb2.PERMISSION_DENIED
    assert response.denied_response.status.code == 403
    error = body_of(response)
    assert error["code"] == "model_access_denied"
    assert error["type"] == "permission_error"
    assert "'big'" in error["message"]
    assert svc.decisions("denied", "model_access_denied", "premium") == 1.0


@pytest.mark.asyncio
async def test_check_404_for_a_path_without_a_model() -> None:
    svc = Service()
    response = await svc.check("/llm", {"authorization": f"Bearer {TOKEN}"})
    assert response.denied_response.status.code == 404
    assert body_of(response)["type"] == "not_found_error"
    assert svc.identities.calls == 0


@pytest.mark.asyncio
async def test_check_503_carries_retry_after_then_recovers() -> None:
    svc = Service()
    svc.access.error = BackendUnavailable("kubernetes", "timeout", "slow")
    response = await svc.check(CHAT, {"authorization": f"Bearer {TOKEN}"})
    assert response.denied_response.status.code == 503
    assert denied_headers(response)["retry-after"] == "9"
    assert body_of(response)["type"] == "service_unavailable_error"
    assert svc.decisions("denied", "auth_backend_unavailable", "premium") == 1.0

    svc.access.error = None
    response = await svc.check(CHAT, {"authorization": f"Bearer {TOKEN}"})
    assert response.status.code == code_pb2.OK


@pytest.mark.asyncio
async def test_check_open_path_has_no_model_header() -> None:
    svc = Service()
    response = await svc.check("/v1/models", {"authorization": f"Bearer {TOKEN}"})
    assert response.status.code == code_pb2.OK
    assert ok_headers(response) == {"x-maas-user": "alice", "x-maas-tier": "premium"}
    assert svc.access.calls == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("error", [RuntimeError("bug"), KeyError("x"), ValueError("bad")])
async def test_an_exception_in_the_pipeline_becomes_a_500_deny(
    error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    svc = Service()
    svc.identities.error = error
    with caplog.at_level(logging.ERROR, logger="maas_authz.service"):
        response = await svc.check(CHAT + "?key=query-secret", {"authorization": f"Bearer {TOKEN}"})
    assert response.status.code == code_pb2.PERMISSION_DENIED
    assert response.denied_response.status.code == 500
    assert body_of(response) == {
        "message": "the authorization server failed; this is a bug, retry",
        "type": "internal_error",
        "code": "internal_error",
    }
    assert denied_headers(response)["x-maas-auth-reason"] == "internal_error"
    assert svc.decisions("denied", "internal_error", "") == 1.0
    assert svc.decisions("allowed", "ok", "premium") is None
    assert svc.checks_observed() == 1.0
    records = [r for r in caplog.records if r.name == "maas_authz.service"]
    assert len(records) == 1
    assert records[0].path == CHAT  # type: ignore[attr-defined]
    assert TOKEN not in caplog.text


@pytest.mark.asyncio
async def test_the_service_keeps_working_after_an_exception() -> None:
    svc = Service()
    svc.identities.error = RuntimeError("bug")
    assert (
        await svc.check(CHAT, {"authorization": f"Bearer {TOKEN}"})
    ).denied_response.status.code == 500
    svc.identities.error = None
    response = await svc.check(CHAT, {"authorization": f"Bearer {TOKEN}"})
    assert response.status.code == code_pb2.OK
    assert svc.decisions("denied", "internal_error", "") == 1.0
    assert svc.decisions("allowed", "ok", "premium") == 1.0
    assert svc.checks_observed() == 2.0


# --- cached response parts ----------------------------------------------------------------------


def test_allowed_responses_built_from_one_cached_entry_are_independent() -> None:
    allow = Allow(ALICE, PREMIUM, TINY)
    first = responses.allowed(allow, ["x-maas-group"], forward_authorization=False)
    first.ok_response.headers_to_remove.append("changed")
    first.dynamic_metadata.fields["tier"].string_value = "changed"
    second = responses.allowed(allow, [], forward_authorization=False)
    assert list(second.ok_response.headers_to_remove) == ["authorization"]
    assert metadata(second)["tier"] == "premium"
    assert metadata(first)["tier"] == "changed"  # (and first still has its own request id)


def test_the_clients_identity_headers_come_before_authorization() -> None:
    response = responses.allowed(
        Allow(ALICE, PREMIUM, TINY), ["x-maas-b", "host", "x-maas-a"], forward_authorization=False
    )
    assert list(response.ok_response.headers_to_remove) == ["x-maas-b", "x-maas-a", "authorization"]


def test_the_response_caches_are_bounded() -> None:
    cache = responses._Responses(max_entries=2)
    built: list[str] = []

    def build(name: str) -> responses._Entry:
        built.append(name)
        return responses._Entry(name.encode())

    for name in ("a", "b", "a", "c", "a", "b"):
        assert cache.get(name, lambda name=name: build(name)).data == name.encode()
    # "a" was built, kept, then pushed out by "c" (the oldest goes first); "b" likewise
    assert built == ["a", "b", "c", "a", "b"]


def test_denied_responses_are_cached_and_independent() -> None:
    deny = Deny(401, "invalid_token", "not valid", token_presented=True)
    first = responses.denied(deny)
    first.denied_response.body = "changed"
    second = responses.denied(deny)
    assert body_of(second)["code"] == "invalid_token"
    assert second == responses.denied(Deny(401, "invalid_token", "not valid", token_presented=True))
