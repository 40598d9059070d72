"""A real etcd + kube-apiserver for the whole session, with the platform's objects in it."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from tests.support import kube_platform
from tests.support.kube_cluster import KubeCluster, find_apiserver_binary
from tests.support.kube_platform import Kube


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
    k = Kube.connect(cluster)
    kube_platform.create_platform(k)
    yield k
    k.close()


@pytest.fixture(scope="session")
def authz_kubeconfig(kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Credentials for maas-authz itself: a ServiceAccount bound to system:auth-delegator only."""
    return kube_platform.authz_kubeconfig(kube, tmp_path_factory.mktemp("authz") / "kubeconfig")
