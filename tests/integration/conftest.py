"""A real etcd + kube-apiserver for the whole session, with the platform's objects in it."""

from __future__ import annotations

import pathlib
import time
from collections.abc import Iterator

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.support import kube_platform
from tests.support.kube_fixtures import cluster, kube
from tests.support.kube_platform import Kube

__all__ = ["cluster", "kube"]  # session fixtures shared with tests/deploy

CRDS = pathlib.Path(__file__).resolve().parents[2] / "k8s" / "crds" / "maas.opendatahub.io.yaml"
SUB_NS = "models-as-a-service"  # where upstream MaaS keeps subscriptions and auth policies


@pytest.fixture(scope="session")
def authz_kubeconfig(kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Credentials for maas-authz itself: a ServiceAccount bound to system:auth-delegator only."""
    return kube_platform.authz_kubeconfig(kube, tmp_path_factory.mktemp("authz") / "kubeconfig")


@pytest.fixture(scope="session")
def crds(kube: Kube) -> Iterator[client.CustomObjectsApi]:
    """Our CRDs (k8s/crds/) installed and established; the namespaces the objects go in."""
    extensions = client.ApiextensionsV1Api(kube.api)
    for doc in yaml.safe_load_all(CRDS.read_text()):
        try:
            extensions.create_custom_resource_definition(doc)
        except ApiException as exc:
            if exc.status != 409:
                raise
    deadline = time.monotonic() + 30
    for doc in yaml.safe_load_all(CRDS.read_text()):
        while True:
            crd = extensions.read_custom_resource_definition(doc["metadata"]["name"])
            conditions = {c.type: c.status for c in (crd.status.conditions or [])}
            if conditions.get("Established") == "True":
                break
            assert time.monotonic() < deadline, f"{doc['metadata']['name']} never established"
            time.sleep(0.2)
    kube.ensure_namespace(SUB_NS)
    yield client.CustomObjectsApi(kube.api)
