"""The operator API against the real kube-apiserver, with the RBAC the manifests ship: admin
credentials by TokenReview + SubjectAccessReview on gatewayadmin (ClusterRoles
maas-gateway-admin / -viewer), tier edits applied to the tier-to-group-mapping ConfigMap (the
base's Role), subscription edits by server-side apply (the subscriptions component's role).
Also peeks against real maas-ratelimit processes, on the memory store and on a real Redis."""

from __future__ import annotations

import asyncio
import pathlib
import secrets
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import yaml
from kubernetes import client
from prometheus_client import CollectorRegistry

from maas_authz.app import AuthzApp, build_app
from maas_authz.config import AuthzConfig
from maas_authz.quota import RateLimitPeeker
from maas_common.config import validate
from tests.integration.conftest import SUB_NS
from tests.integration.test_ratelimit_processes import redis, start_server  # noqa: F401 (a fixture)
from tests.support.kube_platform import AUTHZ_NS, Kube
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.integration
REPO = pathlib.Path(__file__).resolve().parents[2]
BASE_AUTHZ = REPO / "k8s" / "base" / "authz.yaml"
SUBSCRIPTION_RBAC = REPO / "k8s" / "components" / "subscriptions" / "rbac.yaml"
TIERS = "- {name: free, level: 0, groups: [tier-free-users]}\n"
CONFIGMAP = "tier-to-group-mapping"


def _name(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def _shipped(path: pathlib.Path, kind: str, name: str) -> dict[str, Any]:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc["kind"] == kind and doc["metadata"]["name"] == name:
            doc["metadata"].pop("namespace", None)
            for subject in doc.get("subjects", []):
                subject["namespace"] = AUTHZ_NS  # the test's maas-authz (maas-api in the manifests)
            return dict(doc)
    raise AssertionError(f"{path} has no {kind} {name}")


def _create(create: Any, *args: Any) -> None:
    try:
        create(*args)
    except client.ApiException as exc:
        if exc.status != 409:
            raise


@pytest.fixture(scope="module")
def shipped_rbac(kube: Kube, authz_kubeconfig: pathlib.Path, crds: Any) -> None:
    """The operator ClusterRoles, the tier mapping Role (in the test's namespace) and the
    subscriptions component's read and edit roles, as the manifests ship them."""
    rbac = kube.rbac
    for name in ("maas-gateway-admin", "maas-gateway-viewer"):
        _create(rbac.create_cluster_role, _shipped(BASE_AUTHZ, "ClusterRole", name))
    role = _shipped(BASE_AUTHZ, "Role", "maas-authz-tier-mapping-edit")
    _create(rbac.create_namespaced_role, AUTHZ_NS, role)
    _create(
        rbac.create_namespaced_role_binding,
        AUTHZ_NS,
        _shipped(BASE_AUTHZ, "RoleBinding", "maas-authz-tier-mapping-edit"),
    )
    for name in ("maas-authz-subscriptions", "maas-authz-subscriptions-edit"):
        _create(rbac.create_cluster_role, _shipped(SUBSCRIPTION_RBAC, "ClusterRole", name))
        _create(
            rbac.create_cluster_role_binding,
            _shipped(SUBSCRIPTION_RBAC, "ClusterRoleBinding", name),
        )


def _operator(kube: Kube, role: str | None) -> tuple[str, str]:
    """(username, token) of a new ServiceAccount bound to ClusterRole `role` (None: nothing)."""
    name = _name("operator")
    username = kube.service_account(AUTHZ_NS, name)
    if role is not None:
        kube.rbac.create_cluster_role_binding(
            client.V1ClusterRoleBinding(
                metadata=client.V1ObjectMeta(name=f"{name}-{role}"),
                role_ref=client.V1RoleRef(
                    api_group="rbac.authorization.k8s.io", kind="ClusterRole", name=role
                ),
                subjects=[
                    client.RbacV1Subject(kind="ServiceAccount", name=name, namespace=AUTHZ_NS)
                ],
            )
        )
    return username, kube.mint_token(AUTHZ_NS, name)


class Operator:
    def __init__(self, app: AuthzApp, session: aiohttp.ClientSession) -> None:
        self.app = app
        self.session = session
        self.url = f"http://127.0.0.1:{app.runtime.site_ports[0]}"

    async def call(
        self, method: str, path: str, token: str, **kw: Any
    ) -> tuple[int, dict[str, Any]]:
        headers = {"Authorization": f"Bearer {token}", **kw.pop("headers", {})}
        async with self.session.request(method, self.url + path, headers=headers, **kw) as r:
            return r.status, await r.json()


@pytest_asyncio.fixture
async def operator(
    kube: Kube, authz_kubeconfig: pathlib.Path, shipped_rbac: None, tmp_path: pathlib.Path
) -> AsyncIterator[Operator]:
    _create(
        kube.core.create_namespaced_config_map,
        AUTHZ_NS,
        client.V1ConfigMap(metadata=client.V1ObjectMeta(name=CONFIGMAP), data={"tiers": TIERS}),
    )
    kube.core.patch_namespaced_config_map(CONFIGMAP, AUTHZ_NS, {"data": {"tiers": TIERS}})
    (tmp_path / "tiers.yaml").write_text(TIERS)  # the mounted copy (no kubelet here)
    raw = {
        "server": {
            "grpc_addr": "127.0.0.1:0",
            "http_addr": "127.0.0.1:0",
            "admin_api_addr": "127.0.0.1:0",
        },
        "identity": {"source": "kubernetes", "audiences": []},
        "access": {"source": "kubernetes"},
        "tiers": {
            "file": str(tmp_path / "tiers.yaml"),
            "configmap": {"namespace": AUTHZ_NS, "name": CONFIGMAP, "key": "tiers"},
        },
        "authorization": {"mode": "both"},
        "subscriptions": {"source": "kubernetes"},
        "api_keys": {"source": "file", "file": str(_empty_keys(tmp_path))},
        "kubernetes": {"kubeconfig": str(authz_kubeconfig), "timeout": "2s"},
        "admin": {"auth": {"source": "kubernetes"}},
    }
    config = validate(AuthzConfig, raw, "test config")
    app = await build_app(config, tmp_path, registry=CollectorRegistry())
    await app.runtime.start()
    async with aiohttp.ClientSession() as session:
        # ready: the subscription objects are listed (a stop during the first list is not what
        # these tests are about)
        ready = f"http://127.0.0.1:{app.runtime.http_port}/readyz"
        for _ in range(100):
            async with session.get(ready) as response:
                if response.status == 200:
                    break
            await asyncio.sleep(0.1)
        yield Operator(app, session)
    await app.runtime.stop()


def _empty_keys(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "api-keys.yaml"
    path.write_text("api_keys: []\n")
    return path


@pytest.mark.asyncio
async def test_admin_credentials_by_token_review_and_subject_access_review(
    kube: Kube, operator: Operator
) -> None:
    admin_user, admin_token = _operator(kube, "maas-gateway-admin")
    viewer_user, viewer_token = _operator(kube, "maas-gateway-viewer")
    _, nobody_token = _operator(kube, None)

    assert await operator.call("GET", "/admin/v1/whoami", admin_token) == (
        200,
        {"operator": admin_user},
    )
    assert (await operator.call("GET", "/admin/v1/decisions", viewer_token))[0] == 200
    status, body = await operator.call("POST", "/admin/v1/purge", viewer_token)
    assert status == 403 and viewer_user in body["error"]["message"]
    assert (await operator.call("POST", "/admin/v1/purge", admin_token))[0] == 200
    assert (await operator.call("GET", "/admin/v1/decisions", nobody_token))[0] == 403
    assert (await operator.call("GET", "/admin/v1/decisions", "not-a-token"))[0] == 401


@pytest.mark.asyncio
async def test_tier_edits_go_to_the_configmap(kube: Kube, operator: Operator) -> None:
    _, token = _operator(kube, "maas-gateway-admin")
    status, document = await operator.call("GET", "/admin/v1/policy/tiers", token)
    assert status == 200
    assert document == {
        "part": "tiers",
        "source": f"ConfigMap {AUTHZ_NS}/{CONFIGMAP}, key tiers",
        "document": TIERS,
    }
    new = TIERS + "- {name: gold, level: 3, groups: [gold-users]}\n"
    status, dry = await operator.call(
        "POST", "/admin/v1/policy/tiers?dry_run=true", token, data=new
    )
    assert status == 200 and dry["changed"] and not dry["applied"]
    assert "+- {name: gold" in dry["diff"]
    assert kube.core.read_namespaced_config_map(CONFIGMAP, AUTHZ_NS).data["tiers"] == TIERS
    status, applied = await operator.call("POST", "/admin/v1/policy/tiers", token, data=new)
    assert status == 200 and applied["applied"], applied
    assert kube.core.read_namespaced_config_map(CONFIGMAP, AUTHZ_NS).data["tiers"] == new
    status, refused = await operator.call(
        "POST", "/admin/v1/policy/tiers", token, data="- {name: BAD, level: x}\n"
    )
    assert status == 422 and refused["error"]["code"] == "invalid_policy"
    assert kube.core.read_namespaced_config_map(CONFIGMAP, AUTHZ_NS).data["tiers"] == new


def _subscription(name: str, limit: int | str) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "maas.opendatahub.io/v1alpha1",
            "kind": "MaaSSubscription",
            "metadata": {"name": name, "namespace": SUB_NS},
            "spec": {
                "owner": {"groups": [{"name": "team-x"}]},
                "modelRefs": [
                    {
                        "name": "tiny",
                        "namespace": "llm",
                        "tokenRateLimits": [{"limit": limit, "window": "1m"}],
                    }
                ],
            },
        }
    )


@pytest.mark.asyncio
async def test_subscription_edits_are_applied_to_the_objects(
    kube: Kube, operator: Operator, crds: client.CustomObjectsApi
) -> None:
    _, token = _operator(kube, "maas-gateway-admin")
    name = _name("edited")
    group, version, plural = "maas.opendatahub.io", "v1alpha1", "maassubscriptions"

    def exists() -> bool:
        try:
            crds.get_namespaced_custom_object(group, version, SUB_NS, plural, name)
        except client.ApiException as exc:
            assert exc.status == 404
            return False
        return True

    status, dry = await operator.call(
        "POST", "/admin/v1/policy/subscriptions?dry_run=true", token, data=_subscription(name, 500)
    )
    assert status == 200 and not dry["applied"], dry
    assert not exists()  # the API server dry-ran it, nothing was created
    status, applied = await operator.call(
        "POST", "/admin/v1/policy/subscriptions", token, data=_subscription(name, 500)
    )
    assert status == 200 and applied["applied"], applied
    stored = crds.get_namespaced_custom_object(group, version, SUB_NS, plural, name)
    assert stored["spec"]["modelRefs"][0]["tokenRateLimits"] == [{"limit": 500, "window": "1m"}]
    assert stored["metadata"]["managedFields"][0]["manager"] == "maas-admin"
    # the API server's schema refuses what our parser would not catch first: reported, not applied
    status, refused = await operator.call(
        "POST", "/admin/v1/policy/subscriptions", token, data=_subscription(name, "lots")
    )
    assert status == 422, refused
    stored = crds.get_namespaced_custom_object(group, version, SUB_NS, plural, name)
    assert stored["spec"]["modelRefs"][0]["tokenRateLimits"][0]["limit"] == 500
    crds.delete_namespaced_custom_object(group, version, SUB_NS, plural, name)


# --- peeks on real maas-ratelimit processes ------------------------------------------------------

LIMITS = """\
domain: maas
limits:
  - {name: burst, tier: free, kind: requests, limit: 20, window: 1h}
  - {name: daily-tokens, tier: free, kind: tokens, limit: 1000, window: 1d}
"""


@pytest.mark.asyncio
@pytest.mark.parametrize("store_type", ["memory", "redis"])
async def test_peeks_consume_nothing_on_either_store(
    tmp_path: pathlib.Path, store_type: str, request: pytest.FixtureRequest
) -> None:
    store: dict[str, object] = {"type": "memory"}
    if store_type == "redis":
        redis_server: RedisServer = request.getfixturevalue("redis")
        store = {"type": "redis", "redis": {"url": redis_server.url, "timeout": "1s"}}
    servers = [start_server(tmp_path, "first", store, LIMITS)]
    if store_type == "redis":  # a second replica on the same Redis sees the same counts
        servers.append(start_server(tmp_path, "second", store, LIMITS))
    clients = [server.client() for server in servers]
    peekers = [
        RateLimitPeeker(f"127.0.0.1:{server.grpc_port}", "maas", timeout=2, max_concurrency=4)
        for server in servers
    ]
    try:
        for _ in range(7):
            assert await clients[0].admitted("free", "alice")
        descriptor = {"tier": "free", "user": "alice"}
        for peeker in peekers:
            for _ in range(30):
                peek = await peeker.peek([descriptor])
                left = {x["name"]: x["remaining"] for x in peek.limits}
                assert left == {"burst": 13, "daily-tokens": 1000}
        # the 13 left are really there: exactly 13 more admissions
        results = [await clients[-1].admitted("free", "alice") for _ in range(15)]
        assert sum(results) == 13
        assert (await peekers[0].peek([descriptor])).limits[0]["would_allow"] is False
    finally:
        for c in clients:
            await c.close()
        for p in peekers:
            await p.close()
        for server in servers:
            assert server.child.stop() == 0
