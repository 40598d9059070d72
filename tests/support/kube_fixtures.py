"""Session fixtures: a real etcd + kube-apiserver with the platform's objects in it (the
integration and deployment tiers import them into their conftest)."""

from __future__ import annotations

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
