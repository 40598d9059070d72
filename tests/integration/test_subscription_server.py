"""maas-authz in mode `subscriptions` against the real kube-apiserver, with the RBAC that
k8s/components/subscriptions ships: Kubernetes tokens authenticated by TokenReview, access from
MaaSAuthPolicy, the subscription from MaaSSubscription, and objects created, changed and deleted
while the server runs. The component's ClusterRole is applied as shipped; its binding names the
test's maas-authz ServiceAccount (namespace maas-system here, maas-api in the manifests)."""

from __future__ import annotations

import asyncio
import json
import pathlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio
import yaml
from kubernetes import client
from prometheus_client import CollectorRegistry

from maas_authz.app import AuthzApp, build_app
from maas_authz.config import AuthzConfig
from maas_common.config import validate
from tests.integration.conftest import SUB_NS
from tests.k8s.manifests import kubectl
from tests.support.authz_client import AuthzClient, CheckResult
from tests.support.kube_cluster import KubeCluster
from tests.support.kube_platform import AUTHZ_NS, PREMIUM_NS, Kube

pytestmark = pytest.mark.integration

REPO = pathlib.Path(__file__).resolve().parents[2]
COMPONENT_RBAC = REPO / "k8s" / "components" / "subscriptions" / "rbac.yaml"
GROUP, VERSION = "maas.opendatahub.io", "v1alpha1"
MODEL_NS = "sub-llm"
CHAT = f"/{MODEL_NS}/tiny/v1/chat/completions"
TEAM = f"system:serviceaccounts:{PREMIUM_NS}"  # every ServiceAccount of that namespace


def _premium_token(kube: Kube) -> tuple[str, str]:
    """(username, token) of a new ServiceAccount in the premium namespace (in group TEAM)."""
    name = f"sub-user-{secrets.token_hex(3)}"
    kube.service_account(PREMIUM_NS, name)
    return f"system:serviceaccount:{PREMIUM_NS}:{name}", kube.mint_token(PREMIUM_NS, name)


@pytest.fixture(scope="module")
def component_rbac(kube: Kube, authz_kubeconfig: pathlib.Path) -> None:
    # the read-only role (the component's edit role is for the operator API's edits)
    docs = {
        d["metadata"]["name"] + "/" + d["kind"]: d
        for d in yaml.safe_load_all(COMPONENT_RBAC.read_text())
    }
    role = docs["maas-authz-subscriptions/ClusterRole"]
    binding = docs["maas-authz-subscriptions/ClusterRoleBinding"]
    binding["subjects"][0]["namespace"] = AUTHZ_NS
    for create, body in (
        (kube.rbac.create_cluster_role, role),
        (kube.rbac.create_cluster_role_binding, binding),
    ):
        try:
            create(body)
        except client.ApiException as exc:
            if exc.status != 409:  # the same shipped object, created by another module first
                raise


class Objects:
    def __init__(self, api: client.CustomObjectsApi) -> None:
        self.api = api

    def put(self, plural: str, namespace: str, kind: str, name: str, spec: dict[str, Any]) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": kind,
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        }
        try:
            self.api.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, body)
        except client.ApiException as exc:
            if exc.status != 409:
                raise
            self.api.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, name, {"spec": spec}
            )

    def team_policy(self, name: str) -> None:
        """A MaaSAuthPolicy: TEAM may call tiny."""
        self.put(
            "maasauthpolicies",
            SUB_NS,
            "MaaSAuthPolicy",
            name,
            {
                "modelRefs": [{"name": "tiny", "namespace": MODEL_NS}],
                "subjects": {"groups": [{"name": TEAM}]},
            },
        )

    def delete(self, plural: str, namespace: str, name: str) -> None:
        self.api.delete_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)

    def subscription(self, name: str, limit: int, priority: int = 0) -> None:
        self.put(
            "maassubscriptions",
            SUB_NS,
            "MaaSSubscription",
            name,
            {
                "owner": {"groups": [{"name": TEAM}]},
                "priority": priority,
                "modelRefs": [
                    {
                        "name": "tiny",
                        "namespace": MODEL_NS,
                        "tokenRateLimits": [{"limit": limit, "window": "1m"}],
                    }
                ],
            },
        )


@pytest_asyncio.fixture
async def authz(
    kube: Kube,
    crds: client.CustomObjectsApi,
    component_rbac: None,
    authz_kubeconfig: pathlib.Path,
    tmp_path: pathlib.Path,
) -> AsyncIterator[tuple[AuthzApp, AuthzClient, Objects]]:
    kube.ensure_namespace(MODEL_NS)
    objects = Objects(crds)
    objects.put(
        "maasmodelrefs",
        MODEL_NS,
        "MaaSModelRef",
        "tiny",
        {"modelRef": {"kind": "LLMInferenceService", "name": "tiny"}},
    )
    raw = {
        "server": {"grpc_addr": "127.0.0.1:0", "http_addr": "127.0.0.1:0"},
        "identity": {"source": "kubernetes"},
        "authorization": {"mode": "subscriptions"},
        "subscriptions": {"source": "kubernetes", "watch_timeout": 10},
        "kubernetes": {"kubeconfig": str(authz_kubeconfig), "timeout": "1s"},
    }
    config = validate(AuthzConfig, raw, "test config")
    app = await build_app(config, tmp_path, registry=CollectorRegistry())
    await app.runtime.start()
    authz_client = AuthzClient(f"127.0.0.1:{app.runtime.grpc_port}")
    try:
        await _until(lambda: _ready(app), "the subscription objects are listed")
        yield app, authz_client, objects
    finally:
        await authz_client.close()
        await app.runtime.stop()


async def _ready(app: AuthzApp) -> bool:
    return app.runtime.readiness.ready


async def _until(check: Callable[[], Awaitable[bool]], what: str, seconds: float = 10.0) -> float:
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < seconds, f"not within {seconds}s: {what}"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


@pytest.mark.asyncio
async def test_changes_apply_while_the_server_runs(
    kube: Kube, authz: tuple[AuthzApp, AuthzClient, Objects]
) -> None:
    app, authz_client, objects = authz
    username, token = _premium_token(kube)

    async def check(**headers: str) -> CheckResult:
        return await authz_client.check(CHAT, token, **headers)

    denied = await check()
    assert (denied.http_status, denied.reason, denied.text) == (
        403,
        "unauthorized",
        "Access denied",
    )

    objects.team_policy("team-tiny")

    async def reason_is(reason: str) -> bool:
        return (await check()).reason == reason

    await _until(lambda: reason_is("not_found"), "the policy applies; no subscription yet")
    objects.subscription("team-basic", 10)
    await _until(lambda: _allowed(check), "the subscription applies")
    allowed = await check()
    assert allowed.metadata["subscription"] == f"{SUB_NS}/team-basic"
    assert allowed.metadata["token_limits"] == "10/60"
    assert allowed.headers["x-maas-username"] == username
    groups = json.loads(allowed.headers["x-maas-group"])
    assert groups[0] == "system:authenticated" and TEAM in groups

    objects.subscription("team-basic", 500)

    async def limit_is(text: str) -> bool:
        result = await check()
        return result.http_status == 200 and result.metadata.get("token_limits") == text

    await _until(lambda: limit_is("500/60"), "the changed limit applies")

    objects.subscription("team-pro", 1000, priority=5)
    await _until(lambda: reason_is("multiple_subscriptions"), "a second subscription applies")
    chosen = await check(x_maas_subscription="team-pro")
    assert chosen.http_status == 200 and chosen.headers["x-maas-subscription"] == "team-pro"

    objects.delete("maassubscriptions", SUB_NS, "team-pro")
    objects.delete("maassubscriptions", SUB_NS, "team-basic")
    await _until(lambda: reason_is("not_found"), "the deletions apply")
    objects.delete("maasauthpolicies", SUB_NS, "team-tiny")
    await _until(lambda: reason_is("unauthorized"), "the policy's deletion applies")
    assert app.registry.get_sample_value(
        "maas_authz_decisions_total",
        {"result": "allowed", "reason": "ok", "tier": f"{SUB_NS}/team-pro"},
    )


async def _allowed(check: Callable[[], Awaitable[CheckResult]]) -> bool:
    return (await check()).http_status == 200


@pytest.mark.asyncio
async def test_a_broken_object_is_counted_and_the_rest_keeps_serving(
    kube: Kube, authz: tuple[AuthzApp, AuthzClient, Objects]
) -> None:
    app, authz_client, objects = authz
    _, token = _premium_token(kube)
    objects.team_policy("team-tiny-2")
    objects.subscription("team-ok", 100)
    objects.put(
        "maassubscriptions",
        SUB_NS,
        "MaaSSubscription",
        "team-broken",
        {
            "owner": {"groups": [{"name": "someone-else"}]},
            "modelRefs": [
                {
                    "name": "tiny",
                    "namespace": MODEL_NS,
                    "tokenRateLimits": [{"limit": 5, "window": "1m"}],
                    "billingRate": {"perToken": "cheap"},
                }
            ],
        },
    )

    async def skipped() -> bool:
        value = app.registry.get_sample_value(
            "maas_authz_subscription_objects_skipped_total", {"kind": "MaaSSubscription"}
        )
        return bool(value)

    await _until(skipped, "the broken subscription is counted")
    result = await authz_client.check(CHAT, token)
    assert result.http_status == 200 and result.metadata["subscription"] == f"{SUB_NS}/team-ok"
    for plural, ns, obj in (
        ("maassubscriptions", SUB_NS, "team-ok"),
        ("maassubscriptions", SUB_NS, "team-broken"),
        ("maasauthpolicies", SUB_NS, "team-tiny-2"),
    ):
        objects.delete(plural, ns, obj)


def test_the_shipped_samples_pass_a_server_side_dry_run_against_the_crds(
    cluster: KubeCluster, crds: client.CustomObjectsApi, tmp_path: pathlib.Path
) -> None:
    kubeconfig = cluster.write_kubeconfig(tmp_path / "admin.kubeconfig")
    samples = REPO / "k8s" / "samples" / "subscriptions"
    kubectl("create", "namespace", "llm", kubeconfig=kubeconfig, check=False)
    out = kubectl("apply", "--dry-run=server", "-k", str(samples), kubeconfig=kubeconfig).stdout
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 3 and all(line.endswith("(server dry run)") for line in lines), out
    # and the schema has teeth: a window outside the CRD's pattern is refused by the server
    broken = (samples / "maas-objects.yaml").read_text().replace("window: 1m", "window: 1d")
    proc = kubectl(
        "apply", "--dry-run=server", "-f", "-", kubeconfig=kubeconfig, stdin=broken, check=False
    )
    assert proc.returncode != 0 and "window" in proc.stderr, proc.stderr
