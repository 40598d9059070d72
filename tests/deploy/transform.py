"""The rendered overlay, adapted where `podman kube play` differs from a kubelet.

`for_podman` is the whole transform, and docs/deploy.md ("Verified with podman") lists it. It
changes only what a single podman host cannot do as a cluster does; every other field (command,
args, ConfigMaps and their mounts, env, emptyDirs, container security contexts, read-only root
filesystems, restart policy) is played as rendered:

1. Kinds. podman plays Deployments and ConfigMaps. The RBAC objects, ServiceAccounts, the
   Namespace and the ConfigMaps go to the real kube-apiserver the pods authenticate against (so
   the manifests' own RBAC is what lets maas-authz make its TokenReviews and
   SubjectAccessReviews). Services, NetworkPolicies, PodDisruptionBudgets and the Istio
   EnvoyFilter have no podman equivalent and are dropped (the EnvoyFilter's Envoy config is
   checked by the real Envoy in tests/k8s; here the repository's standalone Envoy config
   stands in for the mesh's gateway).
2. Networking: no Services or cluster DNS. Each pod uses the host's network and every
   Service's DNS names resolve to 127.0.0.1, through a hosts file mounted at /etc/hosts (what
   hostAliases would write; podman ignores hostAliases on the host's network). One replica
   per Deployment, since two would share the ports. podman refuses port mappings on the
   host's network, so the containers' `ports` go.
3. Probes: podman turns a liveness probe into a healthcheck that runs curl or nc inside the
   container (neither is in the image; a kubelet probes from outside) on a systemd timer
   (none here). They are left out of what is played; the tests run the probes the manifests
   declare, liveness and readiness, from outside as a kubelet does (`Adapted.probes`).
4. Images: the placeholders point at the images built here.
5. ServiceAccount tokens: podman projects none. A pod that automounts one gets a hostPath
   directory at the same path with a token minted by the kube-apiserver (TokenRequest, the
   pod's ServiceAccount), its CA and namespace, and KUBERNETES_SERVICE_HOST/PORT.
6. Pod-level runAsUser/runAsGroup, which podman ignores, are copied to each container (where it
   honours them). For the OpenShift overlay, which sets no UID, `assigned_uid` plays what the
   restricted-v2 SCC does at admission: an arbitrary UID from the namespace's range, group 0.

Not played, because podman has no equivalent: preStop hooks, termination grace periods,
pod-level seccomp profiles, eviction at resource limits, rolling updates.
"""

from __future__ import annotations

import copy
import pathlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

Resource = dict[str, Any]

PLAYED = {"Deployment", "ConfigMap"}
TO_CLUSTER = {
    "Namespace",
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "ClusterRole",
    "ClusterRoleBinding",
    "ConfigMap",
}
DROPPED = {"Service", "NetworkPolicy", "PodDisruptionBudget", "EnvoyFilter"}
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


@dataclass(frozen=True)
class Cluster:
    """The kube-apiserver the pods talk to, and how to give a pod a ServiceAccount's files."""

    host: str
    port: int
    hosts_file: pathlib.Path  # written by for_podman: the Services' names -> 127.0.0.1
    # ServiceAccount (namespace, name) -> a directory holding token, ca.crt and namespace
    credentials: dict[tuple[str, str], pathlib.Path] = field(default_factory=dict)


@dataclass(frozen=True)
class Probe:
    """A probe as the manifest declares it, its named port resolved."""

    deployment: str
    container: str
    kind: str  # livenessProbe | readinessProbe
    action: str  # httpGet | tcpSocket
    port: int
    path: str  # "" for tcpSocket
    period_seconds: int
    timeout_seconds: int
    failure_threshold: int


@dataclass
class Adapted:
    played: list[Resource]  # what `podman kube play` gets
    cluster: list[Resource]  # what is applied to the kube-apiserver first
    dropped: list[Resource]
    probes: list[Probe] = field(default_factory=list)


class UnknownKind(ValueError):
    pass


def service_hostnames(resources: Iterable[Resource]) -> list[str]:
    """Every DNS name a pod could use for the overlay's Services."""
    names: list[str] = []
    for resource in resources:
        if resource["kind"] != "Service":
            continue
        name = resource["metadata"]["name"]
        namespace = resource["metadata"].get("namespace", "default")
        names += [name, f"{name}.{namespace}", f"{name}.{namespace}.svc"]
        names.append(f"{name}.{namespace}.svc.cluster.local")
    return names


def for_podman(
    resources: list[Resource],
    images: dict[str, str],
    cluster: Cluster,
    assigned_uid: int | None = None,
) -> Adapted:
    """`images` maps the rendered image names (without tag) to the local ones."""
    adapted = Adapted(played=[], cluster=[], dropped=[])
    hostnames = service_hostnames(resources)
    cluster.hosts_file.write_text(
        "127.0.0.1 localhost\n::1 localhost\n" + "".join(f"127.0.0.1 {n}\n" for n in hostnames)
    )
    cluster.hosts_file.chmod(0o644)
    for original in resources:
        kind = original["kind"]
        if kind not in PLAYED | TO_CLUSTER | DROPPED:
            raise UnknownKind(f"{kind} {original['metadata']['name']}: no rule for podman")
        resource = copy.deepcopy(original)
        if kind in TO_CLUSTER:
            adapted.cluster.append(resource)
        if kind == "Deployment":
            adapted.probes += _adapt_deployment(resource, images, cluster, assigned_uid)
        if kind in PLAYED:
            adapted.played.append(copy.deepcopy(resource))
        if kind in DROPPED:
            adapted.dropped.append(resource)
    return adapted


def _adapt_deployment(
    deployment: Resource, images: dict[str, str], cluster: Cluster, assigned_uid: int | None
) -> list[Probe]:
    probes: list[Probe] = []
    deployment["spec"]["replicas"] = 1
    pod: dict[str, Any] = deployment["spec"]["template"]["spec"]
    namespace = deployment["metadata"].get("namespace", "default")
    pod["hostNetwork"] = True
    volumes = pod.setdefault("volumes", [])
    volumes.append({"name": "hosts", "hostPath": {"path": str(cluster.hosts_file), "type": "File"}})
    pod_security = dict(pod.get("securityContext", {}))
    if assigned_uid is not None and "runAsUser" not in pod_security:
        pod_security.update(runAsUser=assigned_uid, runAsGroup=0)
    credentials = None
    if pod.get("automountServiceAccountToken", True):
        account = pod.get("serviceAccountName", "default")
        credentials = cluster.credentials.get((namespace, account))
        if credentials is None:
            raise KeyError(f"no credentials for ServiceAccount {namespace}/{account}")
        volumes.append(
            {
                "name": "kube-api-access",
                "hostPath": {"path": str(credentials), "type": "Directory"},
            }
        )
    for container in pod["containers"]:
        name, _, tag = container["image"].rpartition(":")
        if name in images:
            container["image"] = images[name]
        elif container["image"] in images:
            container["image"] = images[container["image"]]
        else:
            raise KeyError(f"no local image for {container['image']} ({tag})")
        ports = {port["name"]: port["containerPort"] for port in container.pop("ports", [])}
        for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
            declared = container.pop(kind, None)
            if declared is None:
                continue
            action = next(a for a in ("httpGet", "tcpSocket", "exec", "grpc") if a in declared)
            if action not in ("httpGet", "tcpSocket"):
                raise ValueError(f"{deployment['metadata']['name']}: no rule for {action} probes")
            port = declared[action]["port"]
            probes.append(
                Probe(
                    deployment=deployment["metadata"]["name"],
                    container=container["name"],
                    kind=kind,
                    action=action,
                    port=ports[port] if isinstance(port, str) else int(port),
                    path=declared[action].get("path", ""),
                    period_seconds=declared.get("periodSeconds", 10),
                    timeout_seconds=declared.get("timeoutSeconds", 1),
                    failure_threshold=declared.get("failureThreshold", 3),
                )
            )
        container.setdefault("volumeMounts", []).append(
            {"name": "hosts", "mountPath": "/etc/hosts", "readOnly": True}
        )
        security = container.setdefault("securityContext", {})
        for key in ("runAsUser", "runAsGroup"):
            if key in pod_security:
                security.setdefault(key, pod_security[key])
        if credentials is not None:
            container.setdefault("volumeMounts", []).append(
                {"name": "kube-api-access", "mountPath": SERVICE_ACCOUNT_DIR, "readOnly": True}
            )
            container.setdefault("env", []).extend(
                [
                    {"name": "KUBERNETES_SERVICE_HOST", "value": cluster.host},
                    {"name": "KUBERNETES_SERVICE_PORT", "value": str(cluster.port)},
                ]
            )
    return probes
