"""The deployment tier: k8s/overlays/kubernetes (+ the standalone component, as docs/deploy.md
installs it without MaaS) rendered by kubectl, adapted for podman (tests/deploy/transform.py),
played with `podman kube play` from the image `make image` built, in front of a real
kube-apiserver; the repository's Envoy config on the host routes to the pods and to the demo
model."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from maas_demo.envoy import find_envoy
from maas_demo.processes import free_port
from maas_demo.stack import Child, Ports, gateway_config, wait_until_ready
from tests.deploy import podman as pm
from tests.deploy.transform import Adapted, Cluster, Probe, for_podman
from tests.k8s.manifests import kubectl, kustomize, of_kind, standalone_overlay
from tests.support.kube_cluster import KubeCluster
from tests.support.kube_fixtures import cluster, kube
from tests.support.kube_platform import Kube

__all__ = ["cluster", "kube"]

IMAGES = {
    "registry.example.com/maas/maas-gateway": pm.GATEWAY_IMAGE,
    "docker.io/library/redis": pm.REDIS_IMAGE,
}
AUTHZ_ACCOUNT = ("maas-api", "maas-authz")
# OpenShift: no UID in the overlay; restricted-v2 assigns one from the namespace's range
OPENSHIFT_UID = 1000650000


def probe_passes(probe: Probe) -> bool:
    """One try, from outside the container, as a kubelet probes."""
    try:
        if probe.action == "tcpSocket":
            with socket.create_connection(("127.0.0.1", probe.port), probe.timeout_seconds):
                return True
        url = f"http://127.0.0.1:{probe.port}{probe.path}"
        with urllib.request.urlopen(url, timeout=probe.timeout_seconds) as response:
            return 200 <= response.status < 400
    except (OSError, urllib.error.URLError):
        return False


@dataclass
class PlayedStack:
    overlay: str
    workdir: pathlib.Path
    adapted: Adapted
    ports: Ports
    children: list[Child]

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.envoy}"

    def probes(self, deployment: str, kind: str) -> list[Probe]:
        return [p for p in self.adapted.probes if p.deployment == deployment and p.kind == kind]

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Until every readiness probe the manifests declare passes."""
        deadline = time.monotonic() + timeout
        pending = [p for p in self.adapted.probes if p.kind == "readinessProbe"]
        while pending:
            pending = [p for p in pending if not probe_passes(p)]
            if pending and time.monotonic() > deadline:
                names = ", ".join(f"{p.deployment} :{p.port}{p.path}" for p in pending)
                raise AssertionError(f"not ready after {timeout}s: {names}\n{self.logs()}")
            time.sleep(0.25)

    def containers(self) -> list[tuple[str, str]]:
        """(deployment, container) of every played container."""
        return [
            (d["metadata"]["name"], c["name"])
            for d in self.adapted.played
            if d["kind"] == "Deployment"
            for c in d["spec"]["template"]["spec"]["containers"]
        ]

    def inspect(self, deployment: str, container: str | None = None) -> dict[str, Any]:
        return pm.inspect(pm.container_name(deployment, container or deployment))

    def kill(self, deployment: str, container: str | None = None) -> int:
        """SIGKILL the container's main process from the host (a crash, an OOM kill); its pid."""
        pid = int(self.inspect(deployment, container)["State"]["Pid"])
        os.kill(pid, signal.SIGKILL)
        return pid

    def logs(self, lines: int = 20) -> str:
        out = []
        for deployment, container in self.containers():
            name = pm.container_name(deployment, container)
            proc = pm.podman("logs", "--tail", str(lines), name, check=False)
            out.append(f"--- {name}\n{proc.stdout}{proc.stderr}")
        return "\n".join(out)


def _ports_in_use(adapted: Adapted) -> list[int]:
    ports = sorted({p.port for p in adapted.probes} | {50051, 50052, 8090, 8091})
    busy = []
    for port in ports:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                busy.append(port)
    return busy


def _credentials(kube: Kube, cluster: KubeCluster, directory: pathlib.Path) -> pathlib.Path:
    """What a kubelet projects for maas-authz's ServiceAccount (after it exists)."""
    directory.mkdir(parents=True, exist_ok=True)
    namespace, name = AUTHZ_ACCOUNT
    (directory / "token").write_text(kube.mint_token(namespace, name, seconds=86400))
    (directory / "ca.crt").write_bytes(cluster.ca_file.read_bytes())
    (directory / "namespace").write_text(namespace)
    for file in directory.iterdir():
        file.chmod(0o644)  # the container's user is 65532; the directory is mounted read-only
    return directory


@pytest.fixture(scope="module", params=["kubernetes", "openshift"])
def played(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    cluster: KubeCluster,
    kube: Kube,
) -> Iterator[PlayedStack]:
    """One overlay played at a time, released after the module: the pods hold the host's
    ports (50051, 8081, 8090, ...) that other tiers' shipped configs use too."""
    pm.require_images()
    overlay: str = request.param
    workdir = tmp_path_factory.mktemp(f"podman-{overlay}")
    resources = kustomize(standalone_overlay(workdir / "overlay", overlay))
    credentials = workdir / "serviceaccount"
    target = Cluster("127.0.0.1", cluster.port, workdir / "hosts", {AUTHZ_ACCOUNT: credentials})
    uid = OPENSHIFT_UID if overlay == "openshift" else None
    adapted = for_podman(resources, IMAGES, target, assigned_uid=uid)
    for deployment in of_kind(adapted.played, "Deployment"):  # left by a run that crashed
        pod = f"{deployment['metadata']['name']}-pod-0"
        pm.podman("pod", "rm", "--force", "--ignore", pod, timeout=120)
    busy = _ports_in_use(adapted)
    if busy:
        pytest.fail(f"ports the pods listen on are taken on this host: {busy}", False)

    admin = cluster.write_kubeconfig(workdir / "admin.kubeconfig")
    # the second overlay re-applies the same objects (kubectl apply is idempotent)
    kubectl("apply", "-f", "-", kubeconfig=admin, stdin=yaml.safe_dump_all(adapted.cluster))
    _credentials(kube, cluster, credentials)
    play_file = workdir / "play.yaml"
    play_file.write_text(yaml.safe_dump_all(adapted.played))

    ports = Ports(
        envoy=free_port(),
        envoy_admin=free_port(),
        backend=free_port(),
        authz_grpc=50051,
        ratelimit_grpc=50052,
    )
    stack = PlayedStack(overlay, workdir, adapted, ports, [])
    pm.podman("kube", "play", str(play_file), timeout=300)
    try:
        stack.wait_ready()
        envoy_config = workdir / "envoy.yaml"
        envoy_config.write_text(gateway_config(ports))
        for name, argv, ready in (
            (
                "backend",
                [sys.executable, "-m", "maas_demo.backend", "--addr", f"127.0.0.1:{ports.backend}"],
                f"http://127.0.0.1:{ports.backend}/healthz",
            ),
            (
                "envoy",
                [str(find_envoy()), "-c", str(envoy_config), "--disable-hot-restart",
                 "--log-level", "warn"],
                f"http://127.0.0.1:{ports.envoy_admin}/ready",
            ),
        ):  # fmt: skip
            child = Child(name, argv, workdir / f"{name}.log", False, {})
            stack.children.append(child)
            child.start()
            wait_until_ready(child, ready, 60)
        yield stack
    finally:
        for child in reversed(stack.children):
            child.stop()
        (workdir / "pods.log").write_text(stack.logs(lines=2000))
        pm.podman("kube", "down", str(play_file), check=False, timeout=120)
