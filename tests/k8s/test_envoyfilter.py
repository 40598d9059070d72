"""The EnvoyFilter we ship is envoy/gateway.yaml's configuration, and it works in the real Envoy.

1. k8s/istio/envoyfilter.yaml equals what scripts/gen-envoyfilter.py makes from envoy/gateway.yaml
   and envoy/lua/usage.lua (so the two cannot drift), and what it carries is exactly the local
   gateway's filters and clusters.
2. (e2e) The EnvoyFilter of the built overlay is applied the way istiod applies its patches to a
   gateway listener (an HTTP connection manager whose chain ends in CORS, fault and router
   filters, like an Istio gateway's), into a bootstrap that the real Envoy 1.40 accepts
   (`--mode validate`) and then runs in front of maas-authz (demo keys), maas-ratelimit (the
   shipped configuration and limits, on a real Redis) and the demo model: 200, 401, 429 on the
   6th free request, and the usage of each answer charged after the response.

What this cannot show: how a particular Istio release translates the patches (no Istio here).
The patch semantics used (INSERT_BEFORE a sub-filter, MERGE into the HCM, CLUSTER ADD) are the
documented ones, and filter configs travel as TypedStruct, which istiod passes on untouched.
"""

from __future__ import annotations

import copy
import json
import math
import pathlib
import string
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import yaml

from maas_demo.envoy import find_envoy
from maas_demo.stack import Child, free_port, wait_until_ready
from tests.e2e.conftest import HttpResult, demo_authz_config, http
from tests.k8s.manifests import (
    REPO_ROOT,
    built,
    configmap_named,
    load_generator,
    one,
    pod_spec,
)
from tests.support.redis_server import RedisServer, find_redis_server

HCM = "envoy.filters.network.http_connection_manager"
HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
    ".HttpConnectionManager"
)
ROUTER = "envoy.filters.http.router"
TYPED_STRUCT = "type.googleapis.com/xds.type.v3.TypedStruct"
CHAT = "/llm/tiny/v1/chat/completions"
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
DEMO_CONFIG = REPO_ROOT / "src" / "maas_demo" / "config"


# -- 1. the committed file is the generator's output, and the generator changes nothing else ------


def test_committed_envoyfilters_are_the_generators_output() -> None:
    generator = load_generator()
    assert len(generator.TARGETS) == 2  # two servers, and one hop
    for template, output, name in generator.TARGETS:
        committed = output.read_text()
        assert committed == generator.render(template=template, envoyfilter_name=name), (
            f"{output} is out of date: run .venv/bin/python scripts/gen-envoyfilter.py"
        )


def test_generator_check_mode() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "gen-envoyfilter.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def _local_gateway(name: str = "gateway.yaml") -> dict[str, Any]:
    """envoy/gateway.yaml (or `name`) with its placeholders filled the way the demo fills
    them."""
    text = (REPO_ROOT / "envoy" / name).read_text()
    values = {
        "ENVOY_HOST": "127.0.0.1",
        "ENVOY_PORT": "1",
        "ENVOY_ADMIN_PORT": "2",
        "AUTHZ_GRPC_PORT": "3",
        "RATELIMIT_GRPC_PORT": "4",
        "BACKEND_PORT": "5",
        "USAGE_LUA": "USAGE_LUA_FILE",
    }
    data: dict[str, Any] = yaml.safe_load(string.Template(text).substitute(values))
    return data


def _unwrap(http_filter: dict[str, Any]) -> dict[str, Any]:
    typed = http_filter["typed_config"]
    assert typed["@type"] == TYPED_STRUCT
    return {
        "name": http_filter["name"],
        "typed_config": {"@type": typed["type_url"], **typed["value"]},
    }


def test_envoyfilter_carries_exactly_the_local_gateways_filters_and_clusters() -> None:
    envoy_filter = one(built("kubernetes"), "EnvoyFilter", "maas-gateway")
    patches = envoy_filter["spec"]["configPatches"]
    local = _local_gateway()
    (listener,) = local["static_resources"]["listeners"]
    (hcm,) = [f for f in listener["filter_chains"][0]["filters"] if f["name"] == HCM]
    local_filters = hcm["typed_config"]["http_filters"]

    inserted = [
        _unwrap(p["patch"]["value"])
        for p in patches
        if p["applyTo"] == "HTTP_FILTER" and p["patch"]["operation"] == "INSERT_BEFORE"
    ]
    expected = copy.deepcopy(local_filters[:-1])
    for f in expected:
        if f["name"] == "envoy.filters.http.lua":
            assert f["typed_config"]["default_source_code"] == {"filename": "USAGE_LUA_FILE"}
            f["typed_config"]["default_source_code"] = {
                "inline_string": (REPO_ROOT / "envoy" / "lua" / "usage.lua").read_text()
            }
    assert inserted == expected
    assert [f["name"] for f in inserted] == [
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.lua",
        "envoy.filters.http.ratelimit",
    ]

    (merge,) = [p for p in patches if p["applyTo"] == "NETWORK_FILTER"]
    assert merge["patch"]["value"]["typed_config"] == {
        "@type": HCM_TYPE,
        "normalize_path": True,
        "merge_slashes": False,
        # the decisions view: every answer streamed to maas-authz (a MERGE appends it to the
        # gateway's own access logs)
        "access_log": hcm["typed_config"]["access_log"],
    }
    (access_log,) = hcm["typed_config"]["access_log"]
    assert access_log["typed_config"]["common_config"]["grpc_service"] == {
        "envoy_grpc": {"cluster_name": "maas_authz"}
    }

    added = {
        p["patch"]["value"]["name"]: p["patch"]["value"]
        for p in patches
        if p["applyTo"] == "CLUSTER"
    }
    local_clusters = {c["name"]: c for c in local["static_resources"]["clusters"]}
    assert set(added) == {"maas_authz", "maas_ratelimit"}
    resources = built("kubernetes")
    for name, cluster in added.items():
        # the same cluster, except that the endpoints are the servers' headless Services
        ours = {k: v for k, v in cluster.items() if k not in {"type", "load_assignment"}}
        theirs = {
            k: v for k, v in local_clusters[name].items() if k not in {"type", "load_assignment"}
        }
        assert ours == theirs
        assert cluster["type"] == "STRICT_DNS"
        (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        address = endpoint["endpoint"]["address"]["socket_address"]
        service_name, namespace, svc, *domain = address["address"].split(".")
        assert (svc, ".".join(domain)) == ("svc", "cluster.local")
        service = one(resources, "Service", service_name)
        assert service["metadata"]["namespace"] == namespace
        assert service["spec"]["clusterIP"] == "None"
        (grpc,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
        assert address["port_value"] == grpc["port"]


def test_one_hop_envoyfilter_carries_exactly_the_one_hop_gateways_filters() -> None:
    resources = built("kubernetes+one-hop")
    envoy_filter = one(resources, "EnvoyFilter", "maas-gateway-one-hop")
    assert not [r for r in resources if r["kind"] == "EnvoyFilter" and r is not envoy_filter]
    patches = envoy_filter["spec"]["configPatches"]
    local = _local_gateway("gateway-one-hop.yaml")
    (listener,) = local["static_resources"]["listeners"]
    (hcm,) = [f for f in listener["filter_chains"][0]["filters"] if f["name"] == HCM]
    expected = copy.deepcopy(hcm["typed_config"]["http_filters"][:-1])
    for f in expected:
        if f["name"] == "envoy.filters.http.lua":
            f["typed_config"]["default_source_code"] = {
                "inline_string": (REPO_ROOT / "envoy" / "lua" / "usage.lua").read_text()
            }
    inserted = [_unwrap(p["patch"]["value"]) for p in patches if p["applyTo"] == "HTTP_FILTER"]
    assert inserted == expected
    # the usage reader first (its reservation estimate reaches ext_authz as metadata), no
    # rate limit filter
    assert [f["name"] for f in inserted] == [
        "envoy.filters.http.lua",
        "envoy.filters.http.ext_authz",
    ]
    assert inserted[1]["typed_config"]["metadata_context_namespaces"] == ["maas.usage"]
    (merge,) = [p for p in patches if p["applyTo"] == "NETWORK_FILTER"]
    (access_log,) = merge["patch"]["value"]["typed_config"]["access_log"]
    assert access_log == hcm["typed_config"]["access_log"][0]
    assert access_log["typed_config"]["common_config"]["grpc_service"] == {
        "envoy_grpc": {"cluster_name": "maas_authz"}
    }
    added = [p["patch"]["value"]["name"] for p in patches if p["applyTo"] == "CLUSTER"]
    assert added == ["maas_authz"]


# -- 2. the extracted configuration in the real Envoy ----------------------------------------------


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """Proto merge, as istiod's MERGE: messages merge, repeated fields append, scalars replace."""
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        elif isinstance(value, list) and isinstance(target.get(key), list):
            target[key].extend(copy.deepcopy(value))
        else:
            target[key] = copy.deepcopy(value)


def apply_envoyfilter(
    envoy_filter: dict[str, Any], hcm: dict[str, Any], clusters: list[dict[str, Any]]
) -> None:
    """Apply the patches to a gateway's HCM config and cluster list, as istiod would.

    Only what the shipped EnvoyFilter uses is modelled; anything else fails the test loudly
    instead of being silently skipped.
    """
    for patch in envoy_filter["spec"]["configPatches"]:
        apply_to, operation = patch["applyTo"], patch["patch"]["operation"]
        match, value = patch.get("match", {}), patch["patch"]["value"]
        assert match.get("context") == "GATEWAY", patch
        if apply_to == "CLUSTER" and operation == "ADD":
            clusters.append(copy.deepcopy(value))
            continue
        network_filter = match["listener"]["filterChain"]["filter"]
        assert network_filter["name"] == HCM
        if apply_to == "NETWORK_FILTER" and operation == "MERGE":
            assert value["typed_config"]["@type"] == hcm["@type"]
            _merge(hcm, {k: v for k, v in value["typed_config"].items() if k != "@type"})
        elif apply_to == "HTTP_FILTER" and operation == "INSERT_BEFORE":
            names = [f["name"] for f in hcm["http_filters"]]
            hcm["http_filters"].insert(
                names.index(network_filter["subFilter"]["name"]), copy.deepcopy(value)
            )
        else:
            raise AssertionError(f"not modelled by this test: {apply_to} {operation}")


def gateway_bootstrap(
    envoy_filter: dict[str, Any], *, port: int, admin_port: int, backend_port: int,
    upstreams: dict[str, int],
) -> dict[str, Any]:  # fmt: skip
    """A bootstrap standing in for an Istio gateway pod, with the EnvoyFilter applied."""
    cors = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"
    fault = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
    hcm: dict[str, Any] = {
        "@type": HCM_TYPE,
        "stat_prefix": "gateway",
        "route_config": {
            "name": "gateway",
            "virtual_hosts": [
                {
                    "name": "maas",
                    "domains": ["*"],
                    # like KServe's HTTPRoute for llm/tiny: strip /<namespace>/<name>
                    "routes": [
                        {
                            "match": {"prefix": "/llm/tiny/"},
                            "route": {
                                "cluster": "model_backend",
                                "prefix_rewrite": "/",
                                "timeout": "300s",
                            },
                        }
                    ],
                }
            ],
        },
        # an Istio gateway's chain ends like this (its istio.* filters are not in upstream Envoy)
        "http_filters": [
            {"name": "envoy.filters.http.cors", "typed_config": {"@type": cors}},
            {"name": "envoy.filters.http.fault", "typed_config": {"@type": fault}},
            {"name": ROUTER, "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
    }  # fmt: skip
    clusters: list[dict[str, Any]] = [
        {
            "name": "model_backend",
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": "model_backend",
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                    "socket_address": {"address": "127.0.0.1", "port_value": backend_port}}}}]}],
            },
        }
    ]  # fmt: skip
    added_from = len(clusters)
    apply_envoyfilter(envoy_filter, hcm, clusters)
    for cluster in clusters[added_from:]:
        # the Service's DNS name -> this machine; STRICT_DNS and everything else stay as shipped
        (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        address = endpoint["endpoint"]["address"]["socket_address"]
        address["address"] = "127.0.0.1"
        address["port_value"] = upstreams[cluster["name"]]
    return {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "gateway",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [{"filters": [{"name": HCM, "typed_config": hcm}]}],
                }
            ],
            "clusters": clusters,
        },
    }


def test_patches_land_before_the_router_in_order() -> None:
    bootstrap = gateway_bootstrap(
        one(built("kubernetes"), "EnvoyFilter", "maas-gateway"),
        port=1, admin_port=2, backend_port=3, upstreams={"maas_authz": 4, "maas_ratelimit": 5},
    )  # fmt: skip
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    assert [f["name"] for f in hcm["typed_config"]["http_filters"]] == [
        "envoy.filters.http.cors",
        "envoy.filters.http.fault",
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.lua",
        "envoy.filters.http.ratelimit",
        ROUTER,
    ]
    assert hcm["typed_config"]["normalize_path"] is True
    assert hcm["typed_config"]["merge_slashes"] is False


class ShippedGateway:
    """The shipped EnvoyFilter and server configuration in front of real servers: two servers,
    or (topology one-hop) the one-hop component's EnvoyFilter and maas-authz alone."""

    def __init__(self, workdir: pathlib.Path, redis_url: str, topology: str = "two-hop") -> None:
        self.workdir = workdir
        self.one_hop = topology == "one-hop"
        self.port, self.admin_port = free_port(), free_port()
        self.backend_port = free_port()
        self.authz = (free_port(), free_port())
        self.ratelimit = (free_port(), free_port())
        self.redis_url = redis_url
        self.children: list[Child] = []
        self.bootstrap = workdir / "gateway.json"

    def write_configs(self) -> pathlib.Path:
        """Envoy's bootstrap; the limiter's configuration (maas-ratelimit's, or in one hop
        maas-authz's), whose path it returns."""
        resources = built("kubernetes+one-hop" if self.one_hop else "kubernetes")
        envoy_filter = "maas-gateway-one-hop" if self.one_hop else "maas-gateway"
        self.bootstrap.write_text(
            json.dumps(
                gateway_bootstrap(
                    one(resources, "EnvoyFilter", envoy_filter),
                    port=self.port,
                    admin_port=self.admin_port,
                    backend_port=self.backend_port,
                    upstreams={"maas_authz": self.authz[0], "maas_ratelimit": self.ratelimit[0]},
                ),
                indent=1,
            )
        )
        if self.one_hop:
            return self._write_one_hop_authz_config(resources)
        # maas-ratelimit: the shipped config and limits, laid out as the pod mounts them; only
        # the Redis address differs
        spec = pod_spec(one(resources, "Deployment", "maas-ratelimit"))
        args = spec["containers"][0]["args"]
        config_path = self.workdir / args[args.index("--config") + 1].lstrip("/")
        config_path.parent.mkdir(parents=True)
        config = yaml.safe_load(
            configmap_named(resources, "maas-ratelimit-config")["data"][config_path.name]
        )
        config["store"]["redis"]["url"] = self.redis_url
        config_path.write_text(yaml.safe_dump(config))
        limits = configmap_named(resources, "maas-ratelimit-limits")["data"]
        limits_dir = self.workdir / "etc" / "maas" / "limits"
        limits_dir.mkdir(parents=True)
        for key, text in limits.items():
            (limits_dir / key).write_text(text)
        return config_path

    def _write_one_hop_authz_config(self, resources: tuple[dict[str, Any], ...]) -> pathlib.Path:
        """The demo's maas-authz (its keys: no cluster here) with the one-hop component's
        ratelimit section as shipped; only the limits' directory and Redis differ."""
        shipped = yaml.safe_load(
            configmap_named(resources, "maas-authz-config")["data"]["authz.yaml"]
        )
        section = shipped["ratelimit"]
        assert section["mode"] == "inline"
        limits_dir = self.workdir / "limits"
        limits_dir.mkdir()
        for key, text in configmap_named(resources, "maas-ratelimit-limits")["data"].items():
            (limits_dir / key).write_text(text)
        section["limits"]["file"] = str(limits_dir / "limits.yaml")
        section["store"]["redis"]["url"] = self.redis_url
        config = demo_authz_config()
        config["ratelimit"] = section
        path = self.workdir / "authz.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    @property
    def limiter_http(self) -> int:
        return self.authz[1] if self.one_hop else self.ratelimit[1]

    def start(self) -> None:
        limiter_config = self.write_configs()
        authz_config = limiter_config if self.one_hop else DEMO_CONFIG / "authz.yaml"
        python = sys.executable
        backend = f"127.0.0.1:{self.backend_port}"
        plan = [
            ("backend", [python, "-m", "maas_demo.backend", "--addr", backend],
             f"http://{backend}/healthz"),
            ("authz", [python, "-m", "maas_authz", "--config", str(authz_config),
                       "--grpc-addr", f"127.0.0.1:{self.authz[0]}",
                       "--http-addr", f"127.0.0.1:{self.authz[1]}"],
             f"http://127.0.0.1:{self.authz[1]}/readyz"),
            ("ratelimit", [python, "-m", "maas_ratelimit", "--config", str(limiter_config),
                           "--grpc-addr", f"127.0.0.1:{self.ratelimit[0]}",
                           "--http-addr", f"127.0.0.1:{self.ratelimit[1]}",
                           "--log-format", "text"],
             f"http://127.0.0.1:{self.ratelimit[1]}/readyz"),
            ("envoy", [str(find_envoy()), "-c", str(self.bootstrap), "--disable-hot-restart",
                       "--log-level", "warn"],
             f"http://127.0.0.1:{self.admin_port}/ready"),
        ]  # fmt: skip
        if self.one_hop:
            plan = [step for step in plan if step[0] != "ratelimit"]
        for name, argv, ready in plan:
            child = Child(name, argv, self.workdir / f"{name}.log", echo=False)
            self.children.append(child)
            child.start()
            wait_until_ready(child, ready, 30)

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()

    def request(self, key: str | None, body: object = BODY, path: str = CHAT) -> HttpResult:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return http(f"http://127.0.0.1:{self.port}{path}", body=body, headers=headers)

    def ratelimit_metric(self, name: str) -> float:
        text = http(f"http://127.0.0.1:{self.limiter_http}/metrics", method="GET").body.decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + "{")
        )


@pytest.fixture(scope="module", params=["two-hop", "one-hop"])
def shipped_gateway(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[ShippedGateway]:
    if find_redis_server() is None:
        pytest.fail("redis-server not found: scripts/install-test-packages.sh installs it")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    gateway = ShippedGateway(tmp_path_factory.mktemp("gateway"), server.url, request.param)
    try:
        gateway.start()
        yield gateway
    finally:
        gateway.stop()
        server.stop()


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("overlay", "envoy_filter"),
    [("openshift", "maas-gateway"), ("openshift+one-hop", "maas-gateway-one-hop")],
)
def test_real_envoy_accepts_the_assembled_bootstrap(
    tmp_path: pathlib.Path, overlay: str, envoy_filter: str
) -> None:
    config = tmp_path / "gateway.json"
    config.write_text(
        json.dumps(
            gateway_bootstrap(
                one(built(overlay), "EnvoyFilter", envoy_filter),
                port=free_port(), admin_port=free_port(), backend_port=free_port(),
                upstreams={"maas_authz": free_port(), "maas_ratelimit": free_port()},
            )
        )
    )  # fmt: skip
    proc = subprocess.run(
        [str(find_envoy()), "--mode", "validate", "-c", str(config), "--disable-hot-restart",
         "--log-level", "warn"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout + proc.stderr


@pytest.mark.e2e
def test_shipped_filters_authorize_limit_and_charge(shipped_gateway: ShippedGateway) -> None:
    gateway = shipped_gateway
    first = gateway.request("sk-demo-free")
    assert first.status == 200, first.body
    assert first.json()["usage"]["total_tokens"] > 0  # type: ignore[index]
    # the limit with the least room is reported: the tokens one, which holds the request's
    # reservation (ceil(body bytes / 4) + max_tokens, estimated by the Lua filter)
    reserved = math.ceil(len(json.dumps(BODY).encode()) / 4) + 3
    assert first.headers["x-ratelimit-limit"] == '100, 100;w=60;name="free tier: 100 tokens per 1m"'
    assert first.headers["x-ratelimit-remaining"] == str(100 - reserved)
    seen = http(f"http://127.0.0.1:{gateway.backend_port}/_demo/requests", method="GET").json()
    assert isinstance(seen, list)
    last = {k.lower(): v for k, v in seen[-1]["headers"].items()}
    assert last["x-maas-tier"] == "free" and last["x-maas-model"] == "llm/tiny"
    assert "authorization" not in last

    missing = gateway.request(None)
    assert missing.status == 401
    assert missing.headers["www-authenticate"].startswith('Bearer realm="maas"')

    statuses = [gateway.request("sk-demo-free").status for _ in range(4)]
    assert statuses == [200] * 4
    sixth = gateway.request("sk-demo-free")
    assert sixth.status == 429, sixth.body
    assert int(sixth.headers["retry-after"]) > 0
    assert sixth.json()["error"]["code"] == "rate_limit_exceeded"  # type: ignore[index]

    # the Lua filter's usage, charged after each response: through apply_on_stream_done, or
    # in one hop from the access log
    deadline = time.monotonic() + 10
    charged = 0.0
    while time.monotonic() < deadline:
        charged = gateway.ratelimit_metric("maas_ratelimit_tokens_charged_total")
        if charged >= 5 * first.json()["usage"]["total_tokens"]:  # type: ignore[index]
            break
        time.sleep(0.1)
    assert charged == 5 * first.json()["usage"]["total_tokens"]  # type: ignore[index]

    # and the buckets are in Redis, under the shipped key prefix (store: redis, as in the cluster)
    store = redis.Redis.from_url(gateway.redis_url)
    try:
        assert store.keys("maas:rl:*")
    finally:
        store.close()
