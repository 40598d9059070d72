"""k8s/ against a real kube-apiserver (tests/support/kube_cluster.py: v1.20.2 + etcd).

- Every built resource of a built-in kind is accepted by `kubectl apply --dry-run=server`: kubectl
  1.37 validates it against the server's own OpenAPI schema (unknown fields are errors), then the
  server runs its defaulting, validation and admission without storing anything.
- The version skew, honestly: the test server is Kubernetes 1.20, and `policy/v1`
  PodDisruptionBudget only exists from 1.21 on. The server says so (`kubectl api-versions`),
  so resources of API versions it does not serve are left out of the dry run here, and this test
  insists that PodDisruptionBudgets are the only ones. They are validated against the
  Kubernetes 1.37 schema in strict mode instead (test_manifests.py). We do not ship
  policy/v1beta1 (removed in 1.25) to please an old test server.
- RBAC, enough and no more: the built ServiceAccounts and ClusterRoleBinding are applied for real,
  a token is minted for maas-authz's ServiceAccount, and with that token maas-authz can create
  TokenReviews and SubjectAccessReviews (and they work), and can read no Secret or ConfigMap,
  nor anything else; maas-ratelimit's ServiceAccount can do nothing at all.
"""

from __future__ import annotations

import copy
import pathlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import yaml
from kubernetes import client

from tests.k8s.manifests import (
    GATEWAY_NAMESPACE,
    NAMESPACE,
    Resource,
    built,
    is_builtin,
    kubectl,
    kustomize,
    of_kind,
    one,
    pod_spec,
    standalone_overlay,
)
from tests.support.kube_cluster import SA_AUDIENCE, KubeCluster, find_apiserver_binary

pytestmark = pytest.mark.integration

MODEL_NAMESPACE = "llm"
TIER_NAMESPACES = ("maas-default-gateway-tier-free", "maas-default-gateway-tier-premium")
# What every authenticated user may do (system:basic-user), and what auth-delegator adds.
SELF_REVIEWS = {
    ("authorization.k8s.io", "selfsubjectaccessreviews", "create"),
    ("authorization.k8s.io", "selfsubjectrulesreviews", "create"),
}
AUTH_DELEGATOR = {
    ("authentication.k8s.io", "tokenreviews", "create"),
    ("authorization.k8s.io", "subjectaccessreviews", "create"),
}


def _api(kube: KubeCluster, token: str) -> client.ApiClient:
    """The official (sync) client, authenticated with a bearer token."""
    configuration = client.Configuration()
    configuration.host = kube.url
    configuration.ssl_ca_cert = str(kube.ca_file)
    configuration.api_key = {"authorization": token}
    configuration.api_key_prefix = {"authorization": "Bearer"}
    return client.ApiClient(configuration)


@dataclass
class Cluster:
    kube: KubeCluster
    kubeconfig: pathlib.Path
    admin: client.ApiClient
    served: frozenset[str]  # apiVersions the server serves
    workdir: pathlib.Path

    def api(self, token: str) -> client.ApiClient:
        return _api(self.kube, token)

    def mint_token(self, namespace: str, name: str, audiences: list[str] | None = None) -> str:
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=audiences, expiration_seconds=3600)
        )
        answer = client.CoreV1Api(self.admin).create_namespaced_service_account_token(
            name, namespace, request
        )
        return str(answer.status.token)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    binary = find_apiserver_binary()
    if binary is None:
        pytest.fail(
            "no kube-apiserver: run scripts/provision-kube-apiserver.sh (`make test` does)",
            pytrace=False,
        )
    workdir = tmp_path_factory.mktemp("kube")
    kube = KubeCluster(workdir / "cluster", binary)
    kube.start()
    try:
        kubeconfig = kube.write_kubeconfig(workdir / "admin.kubeconfig")
        for namespace in (NAMESPACE, GATEWAY_NAMESPACE, MODEL_NAMESPACE, *TIER_NAMESPACES):
            kubectl("create", "namespace", namespace, kubeconfig=kubeconfig)
        served = frozenset(kubectl("api-versions", kubeconfig=kubeconfig).stdout.split())
        admin = _api(kube, kube.admin_token)
        yield Cluster(kube, kubeconfig, admin, served, workdir)
        admin.close()
    finally:
        kube.stop()


def _dry_run(cluster: Cluster, resources: list[Resource]) -> list[str]:
    proc = kubectl(
        "apply", "--dry-run=server", "-f", "-",
        kubeconfig=cluster.kubeconfig, stdin=yaml.safe_dump_all(resources),
    )  # fmt: skip
    return [line for line in proc.stdout.splitlines() if line.strip()]


def _split(cluster: Cluster, resources: list[Resource]) -> tuple[list[Resource], set[str]]:
    """(built-in resources the server serves, the kinds it cannot serve)."""
    builtin = [r for r in resources if is_builtin(r)]
    served = [r for r in builtin if r["apiVersion"] in cluster.served]
    skipped = {f"{r['apiVersion']} {r['kind']}" for r in builtin if r not in served}
    return served, skipped


@pytest.mark.parametrize(
    "name", ["kubernetes", "openshift", "kubernetes+one-hop", "standalone", "samples"]
)
def test_builtin_resources_pass_a_server_side_dry_run(cluster: Cluster, name: str) -> None:
    if name == "standalone":
        resources = kustomize(standalone_overlay(cluster.workdir / "standalone", "kubernetes"))
    else:
        resources = list(built(name))
    served, skipped = _split(cluster, resources)
    lines = _dry_run(cluster, served)
    assert len(lines) == len(served), lines
    assert all(line.endswith("(server dry run)") for line in lines), lines
    if name == "samples":
        assert skipped == set()
        assert {r["kind"] for r in served} == {"Role", "RoleBinding"}
    else:
        # the only thing a 1.20 server cannot check; policy/v1 is validated against 1.37's schema
        assert skipped == {"policy/v1 PodDisruptionBudget"}
        assert "policy/v1" not in cluster.served


def test_dry_run_has_teeth(cluster: Cluster) -> None:
    """A misspelt field (kubectl checks the server's schema), a bad value (the server does)."""
    deployment = one(built("kubernetes"), "Deployment", "maas-authz")
    misspelt = copy.deepcopy(deployment)
    pod_spec(misspelt)["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    proc = kubectl(
        "apply", "--dry-run=server", "-f", "-",
        kubeconfig=cluster.kubeconfig, stdin=yaml.safe_dump(misspelt), check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "readOnlyRootFileSystem" in proc.stderr
    invalid = copy.deepcopy(deployment)
    pod_spec(invalid)["containers"][0]["ports"][0]["containerPort"] = 70000
    proc = kubectl(
        "apply", "--dry-run=server", "-f", "-",
        kubeconfig=cluster.kubeconfig, stdin=yaml.safe_dump(invalid), check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "containerPort" in proc.stderr


# -- RBAC ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rbac_applied(cluster: Cluster) -> Cluster:
    """The shipped ServiceAccounts and ClusterRoleBinding, really applied; the sample RBAC too."""
    resources = built("kubernetes")
    shipped = [
        one(resources, "ServiceAccount", "maas-authz"),
        one(resources, "ServiceAccount", "maas-ratelimit"),
        *of_kind(resources, "ClusterRoleBinding"),
    ]
    sample_rbac = [r for r in built("samples") if r["kind"] in {"Role", "RoleBinding"}]
    out = kubectl(
        "apply", "-f", "-",
        kubeconfig=cluster.kubeconfig, stdin=yaml.safe_dump_all(shipped + sample_rbac),
    ).stdout  # fmt: skip
    assert out.count(" created") == len(shipped) + len(sample_rbac), out
    for namespace in TIER_NAMESPACES:
        kubectl("create", "serviceaccount", "alice", "-n", namespace, kubeconfig=cluster.kubeconfig)
    return cluster


def _can_i(cluster: Cluster, token: str, name: str, *args: str) -> bool:
    kubeconfig = cluster.kube.write_kubeconfig(cluster.workdir / f"{name}.kubeconfig", token)
    proc = kubectl("auth", "can-i", *args, kubeconfig=kubeconfig, check=False)
    assert proc.stdout.strip() in {"yes", "no"}, proc.stdout + proc.stderr
    return proc.stdout.strip() == "yes"


def _rules(api: client.ApiClient, namespace: str) -> set[tuple[str, str, str]]:
    review = client.AuthorizationV1Api(api).create_self_subject_rules_review(
        client.V1SelfSubjectRulesReview(
            spec=client.V1SelfSubjectRulesReviewSpec(namespace=namespace)
        )
    )
    assert not review.status.incomplete
    return {
        (group, resource, verb)
        for rule in review.status.resource_rules
        for group in rule.api_groups or [""]
        for resource in rule.resources or []
        for verb in rule.verbs
    }


def test_maas_authz_can_review_tokens_and_access(rbac_applied: Cluster) -> None:
    cluster = rbac_applied
    token = cluster.mint_token(NAMESPACE, "maas-authz")
    tier_token = cluster.mint_token(TIER_NAMESPACES[1], "alice", [SA_AUDIENCE])
    api = cluster.api(token)
    try:
        for group, resource, verb in AUTH_DELEGATOR:
            assert _can_i(cluster, token, "maas-authz", verb, f"{resource}.{group}")

        # what maas-authz does on every Check, with its own credentials
        review = client.AuthenticationV1Api(api).create_token_review(
            client.V1TokenReview(
                spec=client.V1TokenReviewSpec(token=tier_token, audiences=[SA_AUDIENCE])
            )
        )
        assert review.status.authenticated is True
        groups = review.status.user.groups
        assert f"system:serviceaccounts:{TIER_NAMESPACES[1]}" in groups

        def allowed(user_groups: list[str]) -> bool:
            answer = client.AuthorizationV1Api(api).create_subject_access_review(
                client.V1SubjectAccessReview(
                    spec=client.V1SubjectAccessReviewSpec(
                        user="system:serviceaccount:x:alice",
                        groups=user_groups,
                        resource_attributes=client.V1ResourceAttributes(
                            group="serving.kserve.io",
                            resource="llminferenceservices",
                            namespace=MODEL_NAMESPACE,
                            name="facebook-opt-125m",
                            verb="post",
                        ),
                    )
                )
            )
            return bool(answer.status.allowed)

        # the sample grants premium (and enterprise), not free
        assert allowed(groups) is True
        assert allowed([f"system:serviceaccounts:{TIER_NAMESPACES[0]}"]) is False
    finally:
        api.close()


def test_maas_authz_can_read_no_secret_configmap_or_anything_else(rbac_applied: Cluster) -> None:
    cluster = rbac_applied
    token = cluster.mint_token(NAMESPACE, "maas-authz")
    for verb in ("get", "list", "watch"):
        for resource in ("secrets", "configmaps"):
            for scope in (["-n", NAMESPACE], ["-n", MODEL_NAMESPACE], ["--all-namespaces"]):
                assert not _can_i(cluster, token, "maas-authz", verb, resource, *scope)
    for args in (
        ["create", "serviceaccounts", "--subresource=token", "-n", NAMESPACE],
        ["post", "llminferenceservices.serving.kserve.io", "-n", MODEL_NAMESPACE],
        ["get", "llminferenceservices.serving.kserve.io", "-n", MODEL_NAMESPACE],
        ["create", "pods", "-n", NAMESPACE],
        ["impersonate", "users"],
        ["*", "*", "--all-namespaces"],
    ):
        assert not _can_i(cluster, token, "maas-authz", *args), args

    api = cluster.api(token)
    try:
        for call in (
            lambda: client.CoreV1Api(api).list_namespaced_secret(NAMESPACE),
            lambda: client.CoreV1Api(api).list_secret_for_all_namespaces(),
            lambda: client.CoreV1Api(api).list_namespaced_config_map(NAMESPACE),
        ):
            with pytest.raises(client.ApiException) as denied:
                call()
            assert denied.value.status == 403
        # every rule it holds, in every namespace that matters: the reviews and nothing more
        for namespace in (NAMESPACE, MODEL_NAMESPACE, GATEWAY_NAMESPACE, "default"):
            rules = _rules(api, namespace)
            assert rules == AUTH_DELEGATOR | SELF_REVIEWS, namespace
    finally:
        api.close()


def test_maas_ratelimit_service_account_can_do_nothing(rbac_applied: Cluster) -> None:
    cluster = rbac_applied
    token = cluster.mint_token(NAMESPACE, "maas-ratelimit")
    for group, resource, verb in AUTH_DELEGATOR:
        assert not _can_i(cluster, token, "maas-ratelimit", verb, f"{resource}.{group}")
    assert not _can_i(cluster, token, "maas-ratelimit", "get", "secrets", "-n", NAMESPACE)
    api = cluster.api(token)
    try:
        assert _rules(api, NAMESPACE) == SELF_REVIEWS
    finally:
        api.close()
