"""Through the real Envoy: the answers clients get, and what the model backend receives."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import Gateway, http

pytestmark = pytest.mark.e2e
CHAT = "/llm/tiny/v1/chat/completions"
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}


def test_allowed_request_reaches_the_model_with_identity_headers_and_no_spoofs(
    gateway: Gateway,
) -> None:
    gateway.clear_backend()
    result = gateway.request(
        CHAT,
        "sk-demo-free",
        BODY,
        x_maas_user="mallory",
        x_maas_tier="enterprise",
        x_maas_group="cluster-admins",
    )

    assert result.status == 200
    assert result.json()["usage"]["completion_tokens"] == 3  # type: ignore[index]
    [seen] = gateway.backend_saw()
    headers = seen["headers"]
    assert isinstance(headers, dict)
    assert headers["x-maas-user"] == "demo-free"
    assert headers["x-maas-tier"] == "free"
    assert headers["x-maas-model"] == "llm/tiny"
    assert "x-maas-group" not in headers
    assert "authorization" not in headers


def test_premium_key_gets_premium_tier(gateway: Gateway) -> None:
    gateway.clear_backend()
    assert gateway.request(CHAT, "sk-demo-premium", BODY).status == 200
    [seen] = gateway.backend_saw()
    assert seen["headers"]["x-maas-tier"] == "premium"  # type: ignore[index]


@pytest.mark.parametrize(
    ("key", "code"),
    [(None, "missing_token"), ("sk-not-a-key", "invalid_token")],
)
def test_unauthenticated_gets_401_with_challenge_and_openai_error(
    gateway: Gateway, key: str | None, code: str
) -> None:
    result = gateway.request(CHAT, key, BODY)

    assert result.status == 401
    assert result.headers["www-authenticate"].startswith("Bearer")
    assert result.headers["content-type"] == "application/json"
    error = result.json()["error"]  # type: ignore[index]
    assert error["code"] == code
    assert error["type"] == "authentication_error"
    assert "sk-not-a-key" not in result.body.decode()


def test_authenticated_user_without_access_gets_403_naming_the_model(gateway: Gateway) -> None:
    result = gateway.request(CHAT, "sk-demo-noaccess", BODY)

    assert result.status == 403
    error = result.json()["error"]  # type: ignore[index]
    assert error["code"] == "model_access_denied"
    assert "'tiny'" in error["message"] and "'llm'" in error["message"]


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/nothing-here", 404, "model_not_found"),
        ("/llm%2Ftiny/v1/chat/completions", 400, "invalid_path"),
        ("/llm//tiny/v1/chat/completions", 400, "invalid_path"),
        ("/LLM/tiny/v1/chat/completions", 400, "invalid_model_path"),
    ],
)
def test_paths_that_name_no_valid_model_are_refused(
    gateway: Gateway, path: str, status: int, code: str
) -> None:
    gateway.clear_backend()
    result = gateway.request(path, "sk-demo-premium", BODY)

    assert result.status == status
    assert result.json()["error"]["code"] == code  # type: ignore[index]
    assert gateway.backend_saw() == []


def test_dot_segments_are_resolved_by_envoy_before_the_check(gateway: Gateway) -> None:
    # Envoy normalizes /other/x/../../llm/tiny to /llm/tiny: the check sees the model actually
    # routed to, so dot segments cannot point the check at one model and the route at another.
    gateway.clear_backend()
    result = gateway.request("/other/x/../../llm/tiny/v1/chat/completions", "sk-demo-free", BODY)
    assert result.status == 200
    [seen] = gateway.backend_saw()
    assert seen["path"] == "/v1/chat/completions"  # the route strips /llm/tiny, as KServe


def test_open_path_needs_a_key_but_no_model_grant(gateway: Gateway) -> None:
    assert gateway.request("/v1/models", "sk-demo-noaccess", method="GET").status == 200
    assert gateway.request("/v1/models", None, method="GET").status == 401


def test_streaming_passes_through(gateway: Gateway) -> None:
    body = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
    result = gateway.request(CHAT, "sk-demo-premium", body)

    assert result.status == 200
    events = [line for line in result.body.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert '"usage"' in events[-2]


# every x-maas-* name a client might try, in the casings and spellings a proxy could pass
SPOOFED = {
    "x-maas-user": "mallory",
    "X-MAAS-TIER": "mallory",
    "X-Maas-Model": "mallory/mallory",
    "x-maas-userid": "mallory",
    "x-maas-request-id": "mallory",
    "x-maas-ratelimit-limit": "mallory",
    "x-maas-anything-else": "mallory",
    "x-maas-": "mallory",
}
TIER_FLOW_HEADERS = {"x-maas-user", "x-maas-tier", "x-maas-model"}
SUBSCRIPTION_FLOW_HEADERS = {
    "x-maas-username",
    "x-maas-group",
    "x-maas-subscription",
    "x-maas-user",
    "x-maas-model",
}


@pytest.mark.parametrize(
    ("key", "ours"),
    [
        ("sk-demo-free", TIER_FLOW_HEADERS),
        ("sk-oai-demosmall_DemoSmallSecret1", SUBSCRIPTION_FLOW_HEADERS),
    ],
    ids=["tier flow", "subscription flow"],
)
def test_no_client_x_maas_header_reaches_the_model(
    gateway: Gateway, key: str, ours: set[str]
) -> None:
    gateway.clear_backend()
    body = {**BODY, "max_tokens": 1}
    headers = {**SPOOFED, "Authorization": f"Bearer {key}"}
    result = http(gateway.stack.gateway_url + CHAT, body=body, headers=headers)
    assert result.status == 200, result.body
    [seen] = gateway.backend_saw()
    received = {k.lower(): v for k, v in seen["headers"].items()}  # type: ignore[union-attr]
    maas = {name for name in received if name.startswith("x-maas-")}
    # only the gateway's own identity headers arrive, and none carries a value the client sent
    assert maas <= ours, maas - ours
    assert TIER_FLOW_HEADERS - {"x-maas-tier"} <= maas
    assert all("mallory" not in received[name] for name in maas), received
    assert "authorization" not in received
