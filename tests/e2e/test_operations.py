"""Operating the servers: grpcurl, hot reload of tiers and keys, SIGTERM, a lost authz server."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import yaml

from maas_demo.stack import CONFIG_DIR
from tests.e2e.conftest import Gateway, demo_authz_config, http, start_stack, wait_for

pytestmark = pytest.mark.e2e
CHAT = "/llm/tiny/v1/chat/completions"
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
GRPCURL = str(pathlib.Path(sys.executable).parent / "grpcurl")


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=30, check=False
    )


def test_grpcurl_lists_describes_and_calls_check(gateway: Gateway) -> None:
    port = gateway.stack.ports.authz_grpc

    address = f"127.0.0.1:{port}"
    listed = grpcurl(address, "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == [
        "envoy.service.accesslog.v3.AccessLogService",  # Envoy's access log: the decisions view
        "envoy.service.auth.v3.Authorization",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ]

    described = grpcurl(address, "describe", "envoy.service.auth.v3.Authorization")
    assert described.returncode == 0, described.stderr
    assert "rpc Check ( .envoy.service.auth.v3.CheckRequest )" in described.stdout

    request = {
        "attributes": {
            "request": {
                "http": {
                    "path": CHAT,
                    "headers": {"authorization": "Bearer sk-demo-premium"},
                }
            }
        }
    }
    called = grpcurl(
        "-d", json.dumps(request), address, "envoy.service.auth.v3.Authorization/Check"
    )
    assert called.returncode == 0, called.stderr
    answer = json.loads(called.stdout)
    assert answer["dynamic_metadata"]["tier"] == "premium"
    assert {"key": "x-maas-user", "value": "demo-premium"} in [
        h["header"] for h in answer["ok_response"]["headers"]
    ]

    health = grpcurl(address, "grpc.health.v1.Health/Check")
    assert json.loads(health.stdout) == {"status": "SERVING"}


@pytest.fixture
def mounted_config(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """The demo config with tiers and keys in a directory laid out like a mounted ConfigMap."""
    mount = tmp_path / "mount"
    first = mount / "..2026_11_25_00_00_00.000000001"
    first.mkdir(parents=True)
    for name in ("tiers.yaml", "keys.yaml"):
        shutil.copy(CONFIG_DIR / name, first / name)
        (mount / name).symlink_to(pathlib.Path("..data") / name)
    (mount / "..data").symlink_to(first.name)
    config = demo_authz_config()
    config["identity"]["static"] = {
        "keys_file": str(mount / "keys.yaml"),
        "reload_interval": "100ms",
    }
    config["tiers"] = {"file": str(mount / "tiers.yaml"), "reload_interval": "100ms"}
    path = tmp_path / "authz.yaml"
    path.write_text(yaml.safe_dump(config))
    yield path


def _swap_mount(mount: pathlib.Path, version: str, files: dict[str, str]) -> None:
    """What the kubelet does on a ConfigMap update: a new directory, then an atomic symlink swap."""
    new = mount / version
    new.mkdir()
    for name, content in files.items():
        (new / name).write_text(content)
    tmp_link = mount / "..data_tmp"
    tmp_link.symlink_to(version)
    os.replace(tmp_link, mount / "..data")


def _tier_seen(gateway: Gateway, key: str) -> str | None:
    gateway.clear_backend()
    if gateway.request(CHAT, key, BODY).status != 200:
        return None
    return gateway.backend_saw()[-1]["headers"]["x-maas-tier"]  # type: ignore[index,no-any-return]


def test_tier_mapping_and_keys_reload_on_configmap_swap_without_failed_requests(
    mounted_config: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    mount = mounted_config.parent / "mount"
    stack = start_stack(tmp_path / "stack", mounted_config)
    try:
        gateway = Gateway(stack)
        assert _tier_seen(gateway, "sk-demo-free") == "free"
        keys = (CONFIG_DIR / "keys.yaml").read_text()

        # move tier-free-users into premium: the free key becomes premium, no restart
        tiers = (
            (CONFIG_DIR / "tiers.yaml")
            .read_text()
            .replace(
                "groups: [tier-premium-users]", "groups: [tier-premium-users, tier-free-users]"
            )
        )
        _swap_mount(mount, "..v2", {"tiers.yaml": tiers, "keys.yaml": keys})
        assert wait_for(lambda: _tier_seen(gateway, "sk-demo-free") == "premium", timeout=10.0)

        # a broken version is rejected and the previous one stays in force
        _swap_mount(mount, "..v3", {"tiers.yaml": "- name: [broken", "keys.yaml": keys})
        time.sleep(0.5)  # several reload intervals; every request in between must succeed
        assert _tier_seen(gateway, "sk-demo-free") == "premium"
        assert "rejected the new version" in stack.child("authz").log_tail(50)
        metrics = http(f"http://127.0.0.1:{stack.ports.authz_http}/metrics", method="GET")
        assert 'maas_config_reloads_total{config="tiers",result="rejected"} 1.0' in (
            metrics.body.decode()
        )

        # removing a key from the key file revokes it
        without_free = "\n".join(
            line for line in keys.splitlines() if "e47e4ba5" not in line
        ).replace("    username: demo-free\n    groups: [tier-free-users]\n", "")
        _swap_mount(mount, "..v4", {"tiers.yaml": tiers, "keys.yaml": without_free})
        assert wait_for(
            lambda: gateway.request(CHAT, "sk-demo-free", BODY).status == 401, timeout=10.0
        )
        assert gateway.request(CHAT, "sk-demo-premium", BODY).status == 200
    finally:
        stack.stop()


def test_sigterm_stops_the_authz_server_cleanly(tmp_path: pathlib.Path) -> None:
    stack = start_stack(tmp_path, CONFIG_DIR / "authz.yaml")
    try:
        authz = stack.child("authz")
        assert authz.stop() == 0
        assert "stopped" in authz.log_tail()

        # with the authz server gone, Envoy fails closed with 503 (status_on_error)
        gateway = Gateway(stack)
        result = gateway.request(CHAT, "sk-demo-free", BODY)
        assert result.status == 503
    finally:
        stack.stop()


def test_bad_config_stops_start_up_with_one_clear_line(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "authz.yaml"
    config.write_text("identity:\n  source: static\n  statik: {}\n")
    done = subprocess.run(
        [sys.executable, "-m", "maas_authz", "--config", str(config)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"maas-authz: configuration error: {config}: identity.statik: unknown key "
        "(expected one of: audiences, cache, max_token_length, source, static)"
    )
