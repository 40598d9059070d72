"""The platform's side of a test kube-apiserver, as cluster-admin: tier namespaces, the model
grant, ServiceAccount tokens minted as maas-api mints them, and maas-authz's own credentials.

Used by the integration tests' fixtures (tests/integration/conftest.py) and by `make bench`.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

from kubernetes import client

from tests.support.kube_cluster import SA_AUDIENCE, KubeCluster

FREE_NS = "maas-default-gateway-tier-free"
PREMIUM_NS = "maas-default-gateway-tier-premium"
MODEL_NS = "llm"
MODEL = "tiny"
AUDIENCE = SA_AUDIENCE
AUTHZ_NS = "maas-system"


@dataclass
class Kube:
    """Admin operations the tests need, through the official (sync) client."""

    cluster: KubeCluster
    api: client.ApiClient

    @classmethod
    def connect(cls, cluster: KubeCluster) -> Kube:
        """As cluster-admin (the cluster's static admin token)."""
        configuration = client.Configuration()
        configuration.host = cluster.url
        configuration.ssl_ca_cert = str(cluster.ca_file)
        configuration.api_key = {"authorization": cluster.admin_token}
        configuration.api_key_prefix = {"authorization": "Bearer"}
        return cls(cluster, client.ApiClient(configuration))

    def close(self) -> None:
        self.api.close()  # type: ignore[no-untyped-call]

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
        assert answer.status is not None
        return str(answer.status.token)

    def delete_service_account(self, namespace: str, name: str) -> None:
        self.core.delete_namespaced_service_account(name, namespace)


def create_platform(kube: Kube) -> None:
    """The namespaces (tiers, model, maas-authz) and the grant the platform makes per model:
    the premium tier may `post` to llm/tiny."""
    for namespace in (FREE_NS, PREMIUM_NS, MODEL_NS, AUTHZ_NS):
        kube.ensure_namespace(namespace)
    kube.rbac.create_namespaced_role(
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
    grant_model(kube, PREMIUM_NS)


def grant_model(kube: Kube, tier_namespace: str) -> str:
    """The platform's grant of llm/tiny to a tier (its namespace's ServiceAccounts); returns
    the RoleBinding's name."""
    name = f"tiny-post-{tier_namespace.rpartition('-')[2]}"
    kube.rbac.create_namespaced_role_binding(
        MODEL_NS,
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name=name),
            role_ref=client.V1RoleRef(
                api_group="rbac.authorization.k8s.io", kind="Role", name="tiny-post"
            ),
            subjects=[
                client.RbacV1Subject(
                    kind="Group",
                    api_group="rbac.authorization.k8s.io",
                    name=f"system:serviceaccounts:{tier_namespace}",
                )
            ],
        ),
    )
    return name


def authz_kubeconfig(kube: Kube, path: pathlib.Path) -> pathlib.Path:
    """Credentials for maas-authz itself, written to `path`: a ServiceAccount bound to
    system:auth-delegator only."""
    kube.service_account(AUTHZ_NS, "maas-authz")
    kube.rbac.create_cluster_role_binding(
        client.V1ClusterRoleBinding(
            metadata=client.V1ObjectMeta(name="maas-authz-auth-delegator"),
            role_ref=client.V1RoleRef(
                api_group="rbac.authorization.k8s.io",
                kind="ClusterRole",
                name="system:auth-delegator",
            ),
            subjects=[
                client.RbacV1Subject(kind="ServiceAccount", name="maas-authz", namespace=AUTHZ_NS)
            ],
        )
    )
    token = kube.mint_token(AUTHZ_NS, "maas-authz", audiences=[AUDIENCE], seconds=86400)
    return kube.cluster.write_kubeconfig(path, token)
