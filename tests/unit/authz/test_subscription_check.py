"""The subscription flow through CheckPipeline and the wire response: sk-oai- keys from a key
file, MaaSAuthPolicy access, subscription selection, body-named models, forged identity
headers, and what reaches the model (X-MaaS-* headers, metadata for the rate limiter)."""

from __future__ import annotations

import json
import pathlib
from datetime import UTC, datetime

import pytest
from envoy.service.auth.v3.external_auth_pb2 import CheckResponse
from google.protobuf.json_format import MessageToDict

from maas_authz import responses
from maas_authz.api_key_store import ApiKeyFile, ApiKeyVerifier, parse_api_key_file
from maas_authz.api_keys import hash_key
from maas_authz.check import CheckPipeline
from maas_authz.decision import Allow, Decision, Deny
from maas_authz.identity import Identity
from maas_authz.model_path import ModelRef, OpenPath, PathRouting, PathTemplate
from maas_authz.subscription_check import SubscriptionFlow, token_groups
from maas_authz.subscription_file import parse_subscription_file
from maas_authz.subscriptions import SubscriptionCatalog
from maas_authz.tiers import DEFAULT_TIERS, parse_tier_document
from maas_common.clock import ManualClock
from maas_common.errors import BackendUnavailable, ConfigError
from tests.support.fakes import FakeAccessReviewer, FakeTokenReviewer

DEMO = pathlib.Path(__file__).resolve().parents[3] / "src" / "maas_demo" / "config"
BASIC = "sk-oai-demobasic_DemoBasicSecret1"
SMALL = "sk-oai-demosmall_DemoSmallSecret1"
REVOKED = "sk-oai-demorevoked_DemoRevokedSecret1"
TINY = ModelRef("llm", "tiny")
CHAT_BODY = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
DEMO_CATALOG = parse_subscription_file((DEMO / "subscriptions.yaml").read_text(), "demo")
DEMO_KEYS = parse_api_key_file((DEMO / "api-keys.yaml").read_text(), "demo keys")
MAPPING = parse_tier_document(DEFAULT_TIERS, "built-in tiers", "maas-default-gateway")
# a token identity in the subscription flow (mode `subscriptions`)
DANA = Identity("dana", "uid-d", ("demo-team", "system:authenticated", "demo-team"))
ERIN = Identity("erin", "uid-e", ("other-team",))
FREE = Identity("free-user", "uid-f", ("tier-free-users",))


def pipeline(
    *,
    mode: str = "both",
    catalog: SubscriptionCatalog = DEMO_CATALOG,
    keys: ApiKeyFile = DEMO_KEYS,
    clock: ManualClock | None = None,
    broken_catalog: bool = False,
) -> CheckPipeline:
    def current() -> SubscriptionCatalog:
        if broken_catalog:
            raise BackendUnavailable("kubernetes", "not_synced", "not listed yet")
        return catalog

    flow = SubscriptionFlow(
        catalog=current,
        keys=ApiKeyVerifier(lambda: keys, clock or ManualClock()),
        for_tokens=mode == "subscriptions",
        default_namespace="llm",
    )
    return CheckPipeline(
        routing=PathRouting(
            PathTemplate("/{namespace}/{model}"),
            (OpenPath("/v1/models"),),
            frozenset({"/v1/chat/completions", "/v1/completions"}),
        ),
        identities=FakeTokenReviewer({"dana-token": DANA, "erin-token": ERIN, "free": FREE}),
        tiers=lambda: MAPPING,
        access=FakeAccessReviewer({(FREE.username, TINY)}),
        subscriptions=flow,
        default_namespace="llm",
    )


async def check(
    path: str,
    token: str | None,
    *,
    body: str = "",
    headers: dict[str, str] | None = None,
    **setup: object,
) -> Decision:
    return await pipeline(**setup).decide(  # type: ignore[arg-type]
        path,
        f"Bearer {token}" if token else None,
        headers=headers or {},
        body=body.encode(),
    )


def allowed(decision: Decision) -> Allow:
    assert isinstance(decision, Allow), decision
    return decision


def denied(decision: Decision, status: int, code: str) -> Deny:
    assert isinstance(decision, Deny), decision
    assert (decision.status, decision.code) == (status, code), decision
    return decision


def wire(decision: Decision, request_headers: tuple[str, ...] = ()) -> dict[str, object]:
    if isinstance(decision, Allow):
        data = responses.allowed_serialized(decision, request_headers, forward_authorization=False)
    else:
        data = responses.denied_serialized(decision)
    return MessageToDict(CheckResponse.FromString(data))


def headers_of(message: dict[str, object], part: str) -> dict[str, str]:
    section = message[part]
    assert isinstance(section, dict)
    return {h["header"]["key"]: h["header"]["value"] for h in section.get("headers", [])}


# --- API keys --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_key_runs_under_its_bound_subscription_with_a_body_named_model() -> None:
    allow = allowed(await check("/v1/chat/completions", BASIC, body=CHAT_BODY))
    assert allow.model == TINY and allow.subscription_flow and allow.tier is None
    assert allow.selection is not None
    assert allow.selection.subscription.qualified_name == "models-as-a-service/demo-basic"
    assert allow.key_id == "0b5c6f0e-demo-basic"
    assert allow.identity == Identity(
        "demo-oai", "0b5c6f0e-demo-basic", ("demo-team", "system:authenticated")
    )


@pytest.mark.asyncio
async def test_a_key_cannot_be_moved_to_another_subscription_by_the_header() -> None:
    allow = allowed(
        await check(
            "/llm/tiny/v1/chat/completions",
            SMALL,
            headers={"x-maas-subscription": "demo-basic"},
        )
    )
    assert allow.selection is not None and allow.selection.subscription.name == "demo-small"


@pytest.mark.asyncio
async def test_keys_are_refused_with_maas_apis_reasons() -> None:
    deny = denied(await check("/v1/models", REVOKED), 401, "invalid_api_key")
    assert deny.message == "key revoked or expired" and deny.plain
    unknown = "sk-oai-nobody_NoSuchSecret"
    assert denied(await check("/v1/models", unknown), 401, "invalid_api_key").message == (
        "key not found"
    )
    malformed = "sk-oai-no-underscore"
    assert denied(await check("/v1/models", malformed), 401, "invalid_api_key").message == (
        "invalid key format"
    )


@pytest.mark.asyncio
async def test_an_expired_key_is_refused_from_its_expiry_on() -> None:
    key = "sk-oai-soon_SoonSecret"
    keys = parse_api_key_file(
        f"""
api_keys:
  - id: k1
    username: u
    key_hash: {hash_key(key)}
    user_groups: [demo-team]
    expires_at: 2030-01-01T00:00:00Z
    subscription: demo-basic
""",
        "keys",
    )
    before = datetime(2029, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()
    clock = ManualClock(wall=before)
    assert isinstance(await check("/v1/models", key, keys=keys, clock=clock), Allow)
    clock.advance(1)
    deny = denied(await check("/v1/models", key, keys=keys, clock=clock), 401, "invalid_api_key")
    assert deny.message == "key revoked or expired"


def test_a_key_file_that_holds_a_key_instead_of_its_hash_fails_naming_the_row() -> None:
    with pytest.raises(ConfigError) as raised:
        parse_api_key_file(
            f"api_keys:\n  - {{id: a, username: u, key_hash: {BASIC}}}\n", "keys.yaml"
        )
    assert raised.value.key == "api_keys[0].key_hash"
    assert "not the key" in raised.value.problem
    with pytest.raises(ConfigError) as raised:
        parse_api_key_file(
            "api_keys:\n  - {id: a, username: u, key_hash: " + "a" * 64 + ", "
            "expires_at: '2030-01-01T00:00:00'}\n",
            "keys.yaml",
        )
    assert raised.value.key == "api_keys[0].expires_at"


# --- access and selection --------------------------------------------------------------------


@pytest.mark.asyncio
async def test_tokens_in_subscription_mode_choose_with_the_header_and_get_upstreams_codes() -> None:
    # two subscriptions include tiny for demo-team: the header must choose
    several = denied(
        await check("/llm/tiny/v1/completions", "dana-token", mode="subscriptions"),
        403,
        "multiple_subscriptions",
    )
    assert "X-MaaS-Subscription" in several.message and several.plain
    allow = allowed(
        await check(
            "/llm/tiny/v1/completions",
            "dana-token",
            mode="subscriptions",
            headers={"x-maas-subscription": "demo-small"},
        )
    )
    assert allow.selection is not None and allow.selection.subscription.name == "demo-small"
    # system:authenticated first, each group once, as upstream's X-MaaS-Group
    assert allow.identity is not None
    assert allow.identity.groups == ("system:authenticated", "demo-team")
    unknown = denied(
        await check(
            "/llm/tiny/v1/completions",
            "dana-token",
            mode="subscriptions",
            headers={"x-maas-subscription": "gold"},
        ),
        403,
        "not_found",
    )
    assert unknown.message == "requested subscription not found"
    no_access = denied(
        await check("/llm/tiny/v1/completions", "erin-token", mode="subscriptions"),
        403,
        "unauthorized",
    )
    assert no_access.message == "Access denied"


@pytest.mark.asyncio
async def test_in_mode_both_other_credentials_keep_the_tier_flow() -> None:
    allow = allowed(await check("/v1/chat/completions", "free", body=CHAT_BODY))
    assert not allow.subscription_flow and allow.tier is not None and allow.tier.name == "free"
    assert allow.model == TINY  # the body's model in models.default_namespace
    # and the tier flow's own denials keep their form
    deny = denied(await check("/llm/tiny/v1/chat/completions", "erin-token"), 403, "no_tier")
    assert not deny.plain


@pytest.mark.asyncio
async def test_models_listing_is_authenticated_but_needs_no_subscription() -> None:
    allow = allowed(await check("/v1/models", BASIC))
    assert allow.model is None and allow.selection is None and allow.subscription_flow
    # the subscription it names still goes upstream (maas-api filters its listing by it)
    added = headers_of(wire(allow, ("x-maas-subscription",)), "okResponse")
    assert added["x-maas-subscription"] == "demo-basic"
    token = allowed(
        await check(
            "/v1/models",
            "dana-token",
            mode="subscriptions",
            headers={"x-maas-subscription": "demo-small"},
        )
    )
    assert headers_of(wire(token), "okResponse")["x-maas-subscription"] == "demo-small"
    bare = allowed(await check("/v1/models", "dana-token", mode="subscriptions"))
    assert "x-maas-subscription" not in headers_of(wire(bare), "okResponse")


@pytest.mark.asyncio
async def test_a_subscription_list_not_yet_synced_answers_503() -> None:
    deny = denied(
        await check("/llm/tiny/v1/completions", BASIC, broken_catalog=True),
        503,
        "auth_backend_unavailable",
    )
    assert deny.retry_after is not None


# --- what the client sends -------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("header", ["x-maas-username", "x-maas-group"])
async def test_client_identity_headers_are_refused_before_anything_else(header: str) -> None:
    deny = denied(
        await check("/llm/tiny/v1/completions", BASIC, headers={header: "admin"}),
        403,
        "identity_header_forbidden",
    )
    assert header in deny.message
    # before the key is looked up: a forger learns nothing of whether the key was good
    unknown = "sk-oai-nobody_NoSuchSecret"
    denied(await check("/v1/models", unknown, headers={header: "x"}), 403, deny.code)
    # in mode `subscriptions`, before authentication of any credential
    denied(
        await check("/v1/models", None, headers={header: "x"}, mode="subscriptions"),
        403,
        deny.code,
    )
    # in mode `both` the tier flow keeps its behaviour: allowed, the header stripped
    allow = allowed(await check("/llm/tiny/v1/completions", "free", headers={header: "x"}))
    message = wire(allow, (header,))
    assert header in message["okResponse"]["headersToRemove"]  # type: ignore[index]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ("", 400, "missing_model"),
        ("{not json", 400, "invalid_request_body"),
        ("[1, 2]", 400, "invalid_request_body"),
        ('{"messages": []}', 400, "missing_model"),
        ('{"model": 7}', 400, "missing_model"),
        ('{"model": "Tiny/../x"}', 400, "invalid_model_name"),
        ('{"model": "tiny", "model": "big"}', 400, "invalid_request_body"),
        ('{"model": "big"}', 404, "model_not_found"),
    ],
)
async def test_a_body_without_a_known_model_gets_a_clear_4xx(
    body: str, status: int, code: str
) -> None:
    deny = denied(await check("/v1/chat/completions", BASIC, body=body), status, code)
    assert deny.message


@pytest.mark.asyncio
async def test_a_nested_model_field_is_not_the_model() -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "x", "model": "tiny"}]})
    denied(await check("/v1/chat/completions", BASIC, body=body), 400, "missing_model")


# --- on the wire -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_model_gets_the_x_maas_headers_and_the_limiter_the_terms() -> None:
    allow = await check("/v1/chat/completions", BASIC, body=CHAT_BODY)
    message = wire(allow, ("x-maas-subscription", "x-maas-tier", "content-type"))
    added = headers_of(message, "okResponse")
    assert added["x-maas-username"] == "demo-oai"
    assert json.loads(added["x-maas-group"]) == ["demo-team", "system:authenticated"]
    assert added["x-maas-subscription"] == "demo-basic"
    assert added["x-gateway-model-name"] == "tiny"
    assert added["x-maas-model"] == "llm/tiny"
    removed = message["okResponse"]["headersToRemove"]  # type: ignore[index]
    assert "x-maas-tier" in removed and "authorization" in removed
    assert "x-maas-subscription" not in removed  # ours overwrites it
    metadata = message["dynamicMetadata"]
    assert isinstance(metadata, dict)
    assert metadata["user"] == "demo-oai" and metadata["model"] == "llm/tiny"
    assert metadata["subscription"] == "models-as-a-service/demo-basic"
    assert metadata["token_limits"] == "2000/60,20000/3600"
    assert metadata["billing_rate"] == "0.000002"
    assert metadata["key_id"] == "0b5c6f0e-demo-basic"
    assert "tier" not in metadata
    assert len(metadata["request_id"]) == 24


@pytest.mark.asyncio
async def test_a_subscription_denial_reads_as_upstreams() -> None:
    deny = await check("/llm/tiny/v1/completions", "erin-token", mode="subscriptions")
    message = wire(deny)
    answer = message["deniedResponse"]
    assert isinstance(answer, dict)
    assert answer["status"] == {"code": "Forbidden"}
    assert answer["body"] == "Access denied"
    got = headers_of(message, "deniedResponse")
    assert got["x-ext-auth-reason"] == "unauthorized"
    assert got["content-type"].startswith("text/plain")


def test_token_groups_put_system_authenticated_first_once() -> None:
    assert token_groups(()) == ("system:authenticated",)
    assert token_groups(("a", "system:authenticated", "b", "a")) == (
        "system:authenticated",
        "a",
        "b",
    )


def test_a_broken_subscription_file_names_the_object_and_the_field() -> None:
    text = (DEMO / "subscriptions.yaml").read_text().replace("window: 1m", "window: 1d", 1)
    with pytest.raises(ConfigError) as raised:
        parse_subscription_file(text, "subs.yaml")
    assert raised.value.source == "subs.yaml"
    assert "MaaSSubscription models-as-a-service/demo-basic" in raised.value.key
    assert "tokenRateLimits" in raised.value.key
    with pytest.raises(ConfigError) as raised:
        parse_subscription_file("kind: ConfigMap\napiVersion: v1\n", "subs.yaml")
    assert raised.value.key == "document 1: kind"


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["both", "subscriptions"])
async def test_a_body_is_read_only_once_the_caller_is_known(mode: str) -> None:
    # no credentials, or bad ones: 401 before the body is even parsed
    assert denied(
        await check("/v1/chat/completions", None, body="{", mode=mode), 401, "missing_token"
    )
    unknown = "sk-oai-nobody_NoSuchSecret"
    denied(
        await check("/v1/chat/completions", unknown, body="{", mode=mode), 401, "invalid_api_key"
    )
    denied(await check("/v1/chat/completions", "nobody", body="{", mode=mode), 401, "invalid_token")
