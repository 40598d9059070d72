"""maas-authz against a real kube-apiserver: TokenReview, tiers from groups, SubjectAccessReview."""

from __future__ import annotations

import asyncio
import pathlib
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from maas_authz.app import AuthzApp, build_app
from maas_authz.config import AuthzConfig
from maas_common.config import validate
from tests.support.authz_client import AuthzClient
from tests.support.kube_platform import FREE_NS, MODEL, MODEL_NS, PREMIUM_NS, Kube

pytestmark = pytest.mark.integration
MODEL_PATH = f"/{MODEL_NS}/{MODEL}/v1/chat/completions"

# The platform's default tiers minus `system:authenticated` on free, so that a ServiceAccount
# outside the tier namespaces has no tier: tiers come only from the implicit tier groups here.
TIERS = """\
- {name: free, level: 0, groups: [tier-free-users]}
- {name: premium, level: 1, groups: [tier-premium-users]}
- {name: enterprise, level: 2, groups: [tier-enterprise-users]}
"""


def _name(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


class Running:
    def __init__(self, app: AuthzApp, client: AuthzClient) -> None:
        self.app = app
        self.client = client

    def sample(self, name: str, labels: dict[str, str]) -> float:
        return self.app.registry.get_sample_value(name, labels) or 0.0


async def _start(
    kubeconfig: pathlib.Path, tmp_path: pathlib.Path, **identity_cache: Any
) -> tuple[AuthzApp, AuthzClient]:
    tiers = tmp_path / "tiers.yaml"
    tiers.write_text(TIERS)
    raw = {
        "server": {
            "grpc_addr": "127.0.0.1:0",
            "http_addr": "127.0.0.1:0",
            "admin_addr": "127.0.0.1:0",
        },
        "identity": {
            "source": "kubernetes",
            "cache": {"ttl": "600s", "negative_ttl": "1s", **identity_cache},
        },
        "access": {"source": "kubernetes"},
        "tiers": {"file": str(tiers)},
        "kubernetes": {"kubeconfig": str(kubeconfig), "timeout": "1s"},
    }
    config = validate(AuthzConfig, raw, "test config")
    app = await build_app(config, tmp_path, registry=CollectorRegistry())
    await app.runtime.start()
    return app, AuthzClient(f"127.0.0.1:{app.runtime.grpc_port}")


@pytest_asyncio.fixture
async def authz(authz_kubeconfig: pathlib.Path, tmp_path: pathlib.Path) -> AsyncIterator[Running]:
    app, client = await _start(authz_kubeconfig, tmp_path)
    yield Running(app, client)
    await client.close()
    await app.runtime.stop()


@pytest.mark.asyncio
async def test_premium_service_account_is_allowed_with_identity_headers(
    kube: Kube, authz: Running
) -> None:
    name = _name("alice")
    kube.service_account(PREMIUM_NS, name)
    token = kube.mint_token(PREMIUM_NS, name)

    result = await authz.client.check(MODEL_PATH, token, x_maas_user="mallory")

    assert result.http_status == 200
    assert result.headers == {
        "x-maas-user": name,
        "x-maas-tier": "premium",
        "x-maas-model": f"{MODEL_NS}/{MODEL}",
    }
    assert "authorization" in result.removed
    # counters are keyed by the full username, unique across namespaces
    assert result.metadata["user"] == f"system:serviceaccount:{PREMIUM_NS}:{name}"
    assert result.metadata["userid"] == name
    assert result.metadata["tier"] == "premium"


@pytest.mark.asyncio
async def test_free_tier_has_no_grant_on_the_model(kube: Kube, authz: Running) -> None:
    name = _name("bob")
    kube.service_account(FREE_NS, name)

    result = await authz.client.check(MODEL_PATH, kube.mint_token(FREE_NS, name))

    assert result.http_status == 403
    assert result.error_code == "model_access_denied"
    assert f"'{MODEL}'" in str(result.body)


@pytest.mark.asyncio
async def test_service_account_outside_tier_namespaces_has_no_tier(
    kube: Kube, authz: Running
) -> None:
    name = _name("carol")
    kube.service_account("maas-system", name)

    result = await authz.client.check(MODEL_PATH, kube.mint_token("maas-system", name))

    assert result.http_status == 403
    assert result.error_code == "no_tier"


@pytest.mark.asyncio
async def test_token_for_another_audience_is_unauthenticated(kube: Kube, authz: Running) -> None:
    name = _name("dave")
    kube.service_account(PREMIUM_NS, name)
    token = kube.mint_token(PREMIUM_NS, name, audiences=["some-other-audience"])

    result = await authz.client.check(MODEL_PATH, token)

    assert result.http_status == 401
    assert result.error_code == "invalid_token"
    assert 'error="invalid_token"' in result.headers["www-authenticate"]
    assert token not in str(result.body)


@pytest.mark.asyncio
async def test_garbage_token_is_unauthenticated(authz: Running) -> None:
    result = await authz.client.check(MODEL_PATH, "not-a-real-token")
    assert result.http_status == 401


@pytest.mark.asyncio
async def test_malformed_path_is_refused_without_any_kubernetes_call(
    kube: Kube, authz: Running
) -> None:
    name = _name("erin")
    kube.service_account(PREMIUM_NS, name)
    token = kube.mint_token(PREMIUM_NS, name)

    for path, status in [("/llm/%2e%2e/v1/x", 400), ("/LLM/tiny/v1", 400), ("/llm", 404)]:
        assert (await authz.client.check(path, token)).http_status == status

    calls = authz.sample(
        "maas_authz_kubernetes_request_duration_seconds_count", {"call": "tokenreview"}
    )
    assert calls == 0


@pytest.mark.asyncio
async def test_concurrent_checks_with_a_new_token_make_one_tokenreview(
    kube: Kube, authz: Running
) -> None:
    name = _name("frank")
    kube.service_account(PREMIUM_NS, name)
    token = kube.mint_token(PREMIUM_NS, name)

    results = await asyncio.gather(*(authz.client.check(MODEL_PATH, token) for _ in range(100)))

    assert {r.http_status for r in results} == {200}
    count = "maas_authz_kubernetes_request_duration_seconds_count"
    assert authz.sample(count, {"call": "tokenreview"}) == 1
    assert authz.sample(count, {"call": "subjectaccessreview"}) == 1


@pytest.mark.asyncio
async def test_deleted_service_account_is_rejected_once_its_cache_entry_expires(
    kube: Kube, authz_kubeconfig: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    app, client = await _start(authz_kubeconfig, tmp_path, ttl="1s")
    try:
        name = _name("grace")
        kube.service_account(PREMIUM_NS, name)
        token = kube.mint_token(PREMIUM_NS, name)
        assert (await client.check(MODEL_PATH, token)).http_status == 200

        kube.delete_service_account(PREMIUM_NS, name)
        # kube-apiserver 1.20 itself caches a successful token check for 10 s, so revocation
        # shows after that plus our 1 s TTL; poll rather than guess.
        deadline = time.monotonic() + 30
        status = 200
        while time.monotonic() < deadline:
            status = (await client.check(MODEL_PATH, token)).http_status
            if status == 401:
                break
            await asyncio.sleep(0.5)
        assert status == 401
    finally:
        await client.close()
        await app.runtime.stop()


@pytest.mark.asyncio
async def test_apiserver_outage_gives_503_keeps_cached_decisions_and_recovers(
    kube: Kube, authz: Running
) -> None:
    cached_name, new_name = _name("heidi"), _name("ivan")
    kube.service_account(PREMIUM_NS, cached_name)
    kube.service_account(PREMIUM_NS, new_name)
    cached_token = kube.mint_token(PREMIUM_NS, cached_name)
    new_token = kube.mint_token(PREMIUM_NS, new_name)
    assert (await authz.client.check(MODEL_PATH, cached_token)).http_status == 200

    kube.cluster.stop_apiserver()
    try:
        during = await authz.client.check(MODEL_PATH, new_token)
        cached = await authz.client.check(MODEL_PATH, cached_token)
    finally:
        kube.cluster.start_apiserver()

    assert during.http_status == 503
    assert during.error_code == "auth_backend_unavailable"
    assert during.headers["retry-after"] == "5"
    assert cached.http_status == 200
    errors = authz.sample(
        "maas_authz_kubernetes_errors_total", {"call": "tokenreview", "kind": "connect"}
    )
    assert errors >= 1

    after = await authz.client.check(MODEL_PATH, new_token)
    assert after.http_status == 200


@pytest.mark.asyncio
async def test_admin_purge_drops_a_users_cached_decisions_on_the_admin_port_only(
    kube: Kube, authz: Running
) -> None:
    name = _name("judy")
    username = kube.service_account(PREMIUM_NS, name)
    token = kube.mint_token(PREMIUM_NS, name)
    assert (await authz.client.check(MODEL_PATH, token)).http_status == 200

    runtime = authz.app.runtime
    async with aiohttp.ClientSession() as session:
        on_metrics_port = await session.post(
            f"http://127.0.0.1:{runtime.http_port}/admin/purge", params={"user": username}
        )
        assert on_metrics_port.status in (404, 405)  # not where metrics are scraped
        purged = await session.post(
            f"http://127.0.0.1:{runtime.admin_port}/admin/purge", params={"user": username}
        )
        assert purged.status == 200
        assert await purged.json() == {"identities": 1, "access_decisions": 1, "api_keys": 0}

    count = "maas_authz_kubernetes_request_duration_seconds_count"
    before = authz.sample(count, {"call": "tokenreview"})
    assert (await authz.client.check(MODEL_PATH, token)).http_status == 200
    assert authz.sample(count, {"call": "tokenreview"}) == before + 1  # asked the cluster again
