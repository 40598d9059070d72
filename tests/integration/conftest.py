"""A real etcd + kube-apiserver for the whole session, with the platform's objects in it."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from kubernetes import client

from tests.support.kube_cluster import KubeCluster, find_apiserver_binary

FREE_NS = "maas-default-gateway-tier-free"
PREMIUM_NS = "maas-default-gateway-tier-premium"
MODEL_NS = "llm"
MODEL = "tiny"
AUDIENCE = "maas-default-gateway-sa"


@dataclass
class Kube:
    """Admin operations the tests need, through the official (sync) client."""

    cluster: KubeCluster
    api: client.ApiClient

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @property
    def rbac(self) -> client.RbacAuthorizationV1Api:
        return client.RbacAuthorizationV1Api(self.api)

    def ensure_namespace(self, name: str) -> None:
        try:
            self.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
        except client.ApiException as exc:
            if exc.status != 409:
                raise

    def service_account(self, namespace: str, name: str) -> str:
        """Creates the ServiceAccount; returns its username."""
        self.ensure_namespace(namespace)
        self.core.create_namespaced_service_account(
            namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name))
        )
        return f"system:serviceaccount:{namespace}:{name}"

    def mint_token(
        self, namespace: str, name: str, audiences: list[str] | None = None, seconds: int = 3600
    ) -> str:
        """A token the way maas-api mints one: TokenRequest with an audience and a lifetime."""
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(
                audiences=audiences or [AUDIENCE], expiration_seconds=seconds
            )
        )
        answer = self.core.create_namespaced_service_account_token(name, namespace, request)
        return str(answer.status.token)

    def delete_service_account(self, namespace: str, name: str) -> None:
        self.core.delete_namespaced_service_account(name, namespace)


def _admin_api(cluster: KubeCluster) -> client.ApiClient:
    configuration = client.Configuration()
    configuration.host = cluster.url
    configuration.ssl_ca_cert = str(cluster.ca_file)
    configuration.api_key = {"authorization": cluster.admin_token}
    configuration.api_key_prefix = {"authorization": "Bearer"}
    return client.ApiClient(configuration)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    binary = find_apiserver_binary()
    if binary is None:
        pytest.fail(
            "no kube-apiserver: run scripts/provision-kube-apiserver.sh (`make test` does)",
            pytrace=False,
        )
    kube_cluster = KubeCluster(tmp_path_factory.mktemp("kube"), binary)
    kube_cluster.start()
    yield kube_cluster
    kube_cluster.stop()


@pytest.fixture(scope="session")
def kube(cluster: KubeCluster) -> Iterator[Kube]:
    api = _admin_api(cluster)
    k = Kube(cluster, api)
    for namespace in (FREE_NS, PREMIUM_NS, MODEL_NS, "maas-system"):
        k.ensure_namespace(namespace)
    # the model grant the platform makes per model: premium tier may `post` to llm/tiny
    k.rbac.create_namespaced_role(
        MODEL_NS,
        client.V1Role(
            metadata=client.V1ObjectMeta(name="tiny-post"),
            rules=[
                client.V1PolicyRule(
                    api_groups=["serving.kserve.io"],
                    resources=["llminferenceservices"],
                    resource_names=[MODEL],
                    verbs=["post"],
                )
            ],
        ),
    )
    k.rbac.create_namespaced_role_binding(
        MODEL_NS,
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="tiny-post-premium"),
            role_ref=client.V1RoleRef(
                api_group="rbac.authorization.k8s.io", kind="Role", name="tiny-post"
            ),
            subjects=[
                client.RbacV1Subject(
                    kind="Group",
                    api_group="rbac.authorization.k8s.io",
                    name=f"system:serviceaccounts:{PREMIUM_NS}",
                )
            ],
        ),
    )
    yield k
    api.close()


@pytest.fixture(scope="session")
def authz_kubeconfig(kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Credentials for maas-authz itself: a ServiceAccount bound to system:auth-delegator only."""
    kube.service_account("maas-system", "maas-authz")
    kube.rbac.create_cluster_role_binding(
        client.V1ClusterRoleBinding(
            metadata=client.V1ObjectMeta(name="maas-authz-auth-delegator"),
            role_ref=client.V1RoleRef(
                api_group="rbac.authorization.k8s.io",
                kind="ClusterRole",
                name="system:auth-delegator",
            ),
            subjects=[
                client.RbacV1Subject(
                    kind="ServiceAccount", name="maas-authz", namespace="maas-system"
                )
            ],
        )
    )
    token = kube.mint_token("maas-system", "maas-authz", audiences=[AUDIENCE], seconds=86400)
    return kube.cluster.write_kubeconfig(tmp_path_factory.mktemp("authz") / "kubeconfig", token)
