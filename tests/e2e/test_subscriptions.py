"""MaaS's subscription flow through the real Envoy (authorization.mode both, as `make demo`):
sk-oai- API keys, MaaSAuthPolicy access, the subscription's token limits, body-named models,
upstream's denials, and what the model receives; the demo's tier keys beside it, unchanged."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from maas_authz.api_keys import hash_key
from maas_demo.stack import CONFIG_DIR, LocalStack, Ports, Topology
from tests.e2e.conftest import Gateway, HttpResult, demo_authz_config, seconds_until, wait_for

pytestmark = pytest.mark.e2e

BASIC = "sk-oai-demobasic_DemoBasicSecret1"  # demo-basic: 2000 tokens a minute
SMALL = "sk-oai-demosmall_DemoSmallSecret1"  # demo-small: 10 tokens a minute
REVOKED = "sk-oai-demorevoked_DemoRevokedSecret1"
OUTSIDER = "sk-oai-outsider_OutsiderSecret1"  # a valid key, no MaaSAuthPolicy names its groups
UNBOUND = "sk-oai-unbound_UnboundSecret1"  # bound to a subscription that does not exist
TO_REVOKE = "sk-oai-revokeme_RevokeMeSecret1"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}
SMALL_LIMIT = "models-as-a-service/demo-small/tokens-0"


def key_row(key: str, username: str, groups: list[str], subscription: str) -> dict[str, Any]:
    return {
        "id": f"id-{username}",
        "username": username,
        "key_hash": hash_key(key),
        "user_groups": groups,
        "subscription": subscription,
    }


class Stack(Gateway):
    def __init__(self, stack: LocalStack, keys_file: pathlib.Path) -> None:
        super().__init__(stack)
        self.keys_file = keys_file

    def chat(self, key: str | None, body: object = CHAT, **headers: str) -> HttpResult:
        return self.request("/v1/chat/completions", key, body, **headers)

    def set_status(self, key: str, status: str) -> None:
        data = yaml.safe_load(self.keys_file.read_text())
        for row in data["api_keys"]:
            if row["key_hash"] == hash_key(key):
                row["status"] = status
        self.keys_file.write_text(yaml.safe_dump(data))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, topology: Topology) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("subscriptions")
    keys = yaml.safe_load((CONFIG_DIR / "api-keys.yaml").read_text())
    keys["api_keys"] += [
        key_row(OUTSIDER, "outsider", ["other-team"], "demo-basic"),
        key_row(UNBOUND, "unbound", ["demo-team"], "gold"),
        key_row(TO_REVOKE, "leaver", ["demo-team"], "demo-basic"),
    ]
    keys_file = work / "api-keys.yaml"
    keys_file.write_text(yaml.safe_dump(keys))
    authz = demo_authz_config()
    authz["api_keys"]["file"] = str(keys_file)
    (work / "authz.yaml").write_text(yaml.safe_dump(authz))
    local = LocalStack(
        work / "run", Ports.free(), authz_config=work / "authz.yaml", topology=topology
    )
    local.start()
    try:
        yield Stack(local, keys_file)
    finally:
        local.stop()


def reason(result: HttpResult) -> tuple[int, str | None, str]:
    return result.status, result.headers.get("x-ext-auth-reason"), result.body.decode()


def test_a_key_chats_by_body_model_and_the_model_sees_the_x_maas_headers(stack: Stack) -> None:
    stack.clear_backend()
    result = stack.chat(BASIC, x_maas_subscription="demo-small")  # a key's binding wins
    assert result.status == 200, result.body
    assert result.json()["usage"]["completion_tokens"] == 3  # type: ignore[index]
    [seen] = stack.backend_saw()
    assert seen["path"] == "/v1/chat/completions"
    headers = seen["headers"]
    assert isinstance(headers, dict)
    assert headers["x-maas-username"] == "demo-oai"
    assert json.loads(headers["x-maas-group"]) == ["demo-team", "system:authenticated"]
    assert headers["x-maas-subscription"] == "demo-basic"
    assert headers["x-gateway-model-name"] == "tiny"
    assert headers["x-maas-model"] == "llm/tiny"
    assert "authorization" not in headers and "x-maas-tier" not in headers


def test_without_credentials_401_and_with_a_bad_key_upstreams_reason(stack: Stack) -> None:
    assert stack.chat(None).status == 401
    status, code, body = reason(stack.chat(REVOKED))
    assert (status, code, body) == (401, "invalid_api_key", "key revoked or expired")
    assert reason(stack.chat("sk-oai-nobody_Nothing1"))[2] == "key not found"


def test_groups_no_policy_names_get_403_access_denied(stack: Stack) -> None:
    assert reason(stack.chat(OUTSIDER)) == (403, "unauthorized", "Access denied")


def test_a_key_bound_to_an_unknown_subscription_gets_403(stack: Stack) -> None:
    assert reason(stack.chat(UNBOUND)) == (403, "not_found", "requested subscription not found")


@pytest.mark.parametrize("header", ["x_maas_username", "x_maas_group"])
def test_forged_identity_headers_get_403(stack: Stack, header: str) -> None:
    stack.clear_backend()
    status, code, _ = reason(stack.chat(BASIC, **{header: "cluster-admins"}))
    assert (status, code) == (403, "identity_header_forbidden")
    assert stack.backend_saw() == []


def test_a_body_without_a_known_model_gets_a_clear_4xx(stack: Stack) -> None:
    result = stack.chat(BASIC, {"messages": []})
    assert result.status == 400
    assert result.json()["error"]["code"] == "missing_model"  # type: ignore[index]
    result = stack.chat(BASIC, {"model": "gpt-5", "messages": []})
    assert reason(result)[:2] == (404, "model_not_found")
    too_big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 1_100_000}]}
    assert stack.chat(BASIC, too_big).status == 413  # beyond the body the check may read


def test_the_subscription_token_limit_refuses_and_v1_models_stays_open(stack: Stack) -> None:
    answers = [stack.chat(SMALL, {**CHAT, "max_tokens": 4}) for _ in range(6)]
    statuses = [a.status for a in answers]
    assert statuses[0] == 200 and 429 in statuses, statuses
    refused = answers[statuses.index(429)]
    assert refused.headers["x-maas-ratelimit-limit"] == SMALL_LIMIT
    error = refused.json()["error"]  # type: ignore[index]
    assert "subscription models-as-a-service/demo-small: 10 tokens per 1m" in error["message"]
    # the listing is never token-limited
    assert [stack.request("/v1/models", SMALL, method="GET").status for _ in range(5)] == [200] * 5
    # other subscriptions and the tier flow have their own buckets
    assert stack.chat(BASIC).status == 200
    assert stack.chat("sk-demo-premium").status == 200


def test_the_tier_flows_keys_keep_working_on_both_kinds_of_route(stack: Stack) -> None:
    stack.clear_backend()
    assert stack.chat("sk-demo-enterprise").status == 200
    assert stack.request("/llm/tiny/v1/chat/completions", "sk-demo-enterprise", CHAT).status == 200
    for seen in stack.backend_saw():
        headers = seen["headers"]
        assert isinstance(headers, dict)
        assert headers["x-maas-tier"] == "enterprise" and "x-maas-username" not in headers


def test_a_revoked_key_is_refused_within_2_seconds(stack: Stack) -> None:
    assert stack.chat(TO_REVOKE).status == 200
    stack.set_status(TO_REVOKE, "revoked")
    took = seconds_until(lambda: stack.chat(TO_REVOKE).status == 401)
    assert took <= 2.0, f"refused after {took:.2f}s"
    stack.set_status(TO_REVOKE, "active")
    assert wait_for(lambda: stack.chat(TO_REVOKE).status == 200, timeout=5.0)
