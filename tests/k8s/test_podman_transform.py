"""The podman transform of tests/deploy on the rendered overlays: it changes only what its
docstring (and docs/deploy.md) lists, and refuses what it has no rule for."""

from __future__ import annotations

import copy
import pathlib

import pytest

from tests.deploy.transform import SERVICE_ACCOUNT_DIR, Cluster, UnknownKind, for_podman
from tests.k8s.manifests import built, of_kind, one, pod_spec

IMAGES = {
    "registry.example.com/maas/maas-gateway": "localhost/maas-gateway:test",
    "docker.io/library/redis": "localhost/redis:test",
}


def cluster(tmp_path: pathlib.Path) -> Cluster:
    return Cluster("127.0.0.1", 6443, tmp_path / "hosts", {("maas-api", "maas-authz"): tmp_path})


@pytest.mark.parametrize("overlay", ["kubernetes", "openshift"])
def test_only_the_listed_fields_change(overlay: str, tmp_path: pathlib.Path) -> None:
    rendered = list(built(overlay))
    adapted = for_podman(rendered, IMAGES, cluster(tmp_path), assigned_uid=1000650000)
    assert {r["kind"] for r in adapted.played} == {"Deployment", "ConfigMap"}
    assert {r["kind"] for r in adapted.dropped} == {
        "Service",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "EnvoyFilter",
    }
    assert "Deployment" not in {r["kind"] for r in adapted.cluster}
    for played in of_kind(adapted.played, "Deployment"):
        original = one(rendered, "Deployment", played["metadata"]["name"])
        before, after = pod_spec(original), pod_spec(played)
        assert after["hostNetwork"] is True and played["spec"]["replicas"] == 1
        for old, new in zip(before["containers"], after["containers"], strict=True):
            # what podman plays as rendered
            for key in ("command", "args", "resources", "lifecycle"):
                assert new.get(key) == old.get(key), key
            assert new.get("env", [])[: len(old.get("env", []))] == old.get("env", [])
            expected = copy.deepcopy(old.get("securityContext", {}))
            for key in ("runAsUser", "runAsGroup"):
                value = before.get("securityContext", {}).get(key)
                if value is None and overlay == "openshift":
                    value = {"runAsUser": 1000650000, "runAsGroup": 0}[key]
                if value is not None:
                    expected.setdefault(key, value)
            assert new["securityContext"] == expected
            assert new["image"] in IMAGES.values()
            assert "ports" not in new and "livenessProbe" not in new
            mounts = {m["mountPath"] for m in new["volumeMounts"]}
            assert {m["mountPath"] for m in old.get("volumeMounts", [])} <= mounts
            assert "/etc/hosts" in mounts
            assert (SERVICE_ACCOUNT_DIR in mounts) == before.get(
                "automountServiceAccountToken", True
            )
    # every declared probe is kept for the tests to run, its named port resolved
    declared = sum(
        1
        for d in of_kind(rendered, "Deployment")
        for c in pod_spec(d)["containers"]
        for kind in ("livenessProbe", "readinessProbe")
        if kind in c
    )
    assert len(adapted.probes) == declared
    assert all(isinstance(p.port, int) for p in adapted.probes)
    hosts = (tmp_path / "hosts").read_text()
    assert "127.0.0.1 maas-ratelimit-redis\n" in hosts
    assert "127.0.0.1 maas-authz.maas-api.svc.cluster.local\n" in hosts


def test_a_kind_without_a_rule_is_refused(tmp_path: pathlib.Path) -> None:
    stray = {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "x"}}
    with pytest.raises(UnknownKind, match="CronJob x"):
        for_podman([*built("kubernetes"), stray], IMAGES, cluster(tmp_path))


def test_an_image_without_a_local_build_is_refused(tmp_path: pathlib.Path) -> None:
    with pytest.raises(KeyError, match="no local image"):
        for_podman(list(built("kubernetes")), {}, cluster(tmp_path))
