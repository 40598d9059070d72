"""The ConfigMaps k8s/ ships load with the servers' own loaders, at the paths the pods mount them.

Each server's volumes are laid out under a temporary root exactly as the kubelet mounts them
(every ConfigMap key a file under the container's mountPath), and the server's config is loaded
from the path in its container args, so the relative paths inside the configs (tiers.file,
limits.file) are checked against the real mount layout.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import yaml

from maas_authz import app as authz_app
from maas_authz.tiers import DEFAULT_TIERS, TierMapping, parse_tier_document
from maas_common.settings import parse_command_line
from maas_ratelimit import app as ratelimit_app
from maas_ratelimit.limits import DEFAULT_LIMITS, LimitTable, parse_limits
from tests.k8s.manifests import (
    Resource,
    built,
    kustomize,
    of_kind,
    one,
    pod_spec,
    standalone_overlay,
)

SERVERS = ("maas-authz", "maas-ratelimit")


def _materialize(
    deployment: Resource, configmaps: list[Resource], root: pathlib.Path
) -> pathlib.Path:
    """Write the pod's ConfigMap volumes under root; return root + the --config path."""
    spec = pod_spec(deployment)
    (container,) = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    by_name = {c["metadata"]["name"]: c for c in configmaps}
    for mount in container["volumeMounts"]:
        source = volumes[mount["name"]].get("configMap")
        if source is None:
            continue
        data = by_name[source["name"]]["data"]
        items = source.get("items") or [{"key": k, "path": k} for k in data]
        target = root / mount["mountPath"].lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        for item in items:
            (target / item["path"]).write_text(data[item["key"]])
    args = container["args"]
    return root / args[args.index("--config") + 1].lstrip("/")


@pytest.fixture(scope="module")
def configmaps(tmp_path_factory: pytest.TempPathFactory) -> list[Resource]:
    # the overlay's own ConfigMaps, plus the tier mapping of the standalone component (what
    # MaaS provides in a real install)
    workdir = tmp_path_factory.mktemp("standalone")
    return of_kind(kustomize(standalone_overlay(workdir, "kubernetes")), "ConfigMap")


def _tier_summary(mapping: TierMapping) -> list[tuple[str, int, frozenset[str]]]:
    return [(t.name, t.level, t.groups) for t in mapping.tiers]


def _limit_summary(table: LimitTable) -> list[tuple[object, ...]]:
    return [
        (lim.name, lim.tier, lim.kind, lim.spec, lim.per_model, lim.shadow, lim.models)
        for lim in table.limits
    ]


def test_shipped_tier_mapping_is_the_platform_default(configmaps: list[Resource]) -> None:
    configmap = one(configmaps, "ConfigMap", "tier-to-group-mapping")
    instance = "maas-default-gateway"
    from_key = parse_tier_document(configmap["data"]["tiers"], "data.tiers", instance)
    whole = parse_tier_document(yaml.safe_dump(configmap), "configmap", instance)
    default = parse_tier_document(DEFAULT_TIERS, "built-in", instance)
    assert _tier_summary(from_key) == _tier_summary(whole) == _tier_summary(default)


def test_shipped_limits_are_the_platform_defaults(configmaps: list[Resource]) -> None:
    configmap = one(configmaps, "ConfigMap", "maas-ratelimit-limits")
    (text,) = configmap["data"].values()
    shipped = parse_limits(text, "maas-ratelimit-limits")
    assert shipped.domain == "maas"
    assert _limit_summary(shipped) == _limit_summary(parse_limits(DEFAULT_LIMITS, "built-in"))


def test_maas_authz_config_loads_as_mounted(
    configmaps: list[Resource], tmp_path: pathlib.Path
) -> None:
    deployment = one(built("kubernetes"), "Deployment", "maas-authz")
    config_path = _materialize(deployment, configmaps, tmp_path)
    command_line = parse_command_line(
        prog="maas-authz",
        description="",
        env_prefix="MAAS_AUTHZ_TEST_UNSET",
        argv=["--config", str(config_path)],
    )
    config = authz_app.load_config(command_line)
    assert config.identity.source == "kubernetes"
    assert config.access.source == "kubernetes"
    assert config.kubernetes.kubeconfig is None  # in-cluster credentials
    assert config.identity.audiences == ["maas-default-gateway-sa"]
    assert config.tiers.file is not None
    summary = authz_app.check_config(config, config_path.parent)
    assert "tiers: free, premium, enterprise" in summary
    assert summary.endswith("configuration OK")
    # the tier file the config names is the platform's ConfigMap, as mounted
    tiers = authz_app.load_tiers(config, config_path.parent)
    assert tiers.names() == ["free", "premium", "enterprise"]


def test_maas_ratelimit_config_loads_as_mounted(
    configmaps: list[Resource], tmp_path: pathlib.Path
) -> None:
    deployment = one(built("kubernetes"), "Deployment", "maas-ratelimit")
    config_path = _materialize(deployment, configmaps, tmp_path)
    command_line = parse_command_line(
        prog="maas-ratelimit",
        description="",
        env_prefix="MAAS_RATELIMIT_TEST_UNSET",
        argv=["--config", str(config_path)],
    )
    config = ratelimit_app.load_config(command_line)
    assert config.store.type == "redis"
    assert config.store.redis is not None
    assert config.store.redis.url == "redis://maas-ratelimit-redis:6379/0"
    redis_service = one(built("kubernetes"), "Service", "maas-ratelimit-redis")
    assert redis_service["spec"]["ports"][0]["port"] == 6379
    summary = ratelimit_app.check_config(config, config_path.parent)
    assert "domain: maas" in summary and "store: redis" in summary
    watched = ratelimit_app.limits_file(config.limits, config_path.parent)
    assert watched is not None
    assert len(watched.load().limits) == 6


@pytest.mark.parametrize("server", SERVERS)
def test_check_config_command_accepts_the_shipped_config(
    server: str, configmaps: list[Resource], tmp_path: pathlib.Path
) -> None:
    """What the container runs, with --check-config: the whole start-up path of the config."""
    deployment = one(built("kubernetes"), "Deployment", server)
    config_path = _materialize(deployment, configmaps, tmp_path)
    module = server.replace("-", "_")
    proc = subprocess.run(
        [sys.executable, "-m", module, "--config", str(config_path), "--check-config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("configuration OK")
