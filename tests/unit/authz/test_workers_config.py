"""`server.workers` of maas-authz: validation, flag and environment, what the workers are given."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from maas_authz.app import load_config
from maas_authz.config import AuthzConfig
from maas_authz.main import EXTRA_FLAGS, _load_worker_payload, main, supervisor_settings
from maas_common.config import validate
from maas_common.errors import ConfigError
from maas_common.settings import parse_command_line


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CONFIG", "GRPC_ADDR", "HTTP_ADDR", "LOG_LEVEL", "LOG_FORMAT", "WORKERS"):
        monkeypatch.delenv(f"MAAS_AUTHZ_{name}", raising=False)


def config_error(server: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        validate(AuthzConfig, {"server": server}, "authz.yaml")
    return str(caught.value)


def load(*argv: str) -> AuthzConfig:
    command_line = parse_command_line(
        prog="maas-authz",
        description="test",
        env_prefix="MAAS_AUTHZ",
        argv=list(argv),
        extra_flags=EXTRA_FLAGS,
    )
    return load_config(command_line)


def test_one_worker_by_default() -> None:
    assert validate(AuthzConfig, {}, "authz.yaml").server.workers == 1


@pytest.mark.parametrize("workers", [1, 2, 64, "8"])
def test_workers_from_1_to_64_are_accepted(workers: object) -> None:
    server = {"workers": workers, "grpc_addr": "0.0.0.0:50051"}
    assert validate(AuthzConfig, {"server": server}, "authz.yaml").server.workers == int(
        str(workers)
    )


@pytest.mark.parametrize(
    ("workers", "expected"),
    [
        (0, "authz.yaml: server.workers: expected a whole number from 1 to 64, got 0"),
        (65, "authz.yaml: server.workers: expected a whole number from 1 to 64, got 65"),
        (-1, "authz.yaml: server.workers: expected a whole number from 1 to 64, got -1"),
        (True, "authz.yaml: server.workers: expected a whole number from 1 to 64, got True"),
        (
            "many",
            "authz.yaml: server.workers: input should be a valid integer, "
            "unable to parse string as an integer",
        ),
        (1.5, "authz.yaml: server.workers: input should be a valid integer, got a number with a "
              "fractional part"),
    ],
)  # fmt: skip
def test_bad_worker_counts(workers: object, expected: str) -> None:
    assert config_error({"workers": workers}) == expected


def test_several_workers_need_a_fixed_grpc_port() -> None:
    assert config_error({"workers": 2, "grpc_addr": "127.0.0.1:0"}) == (
        "authz.yaml: server.workers: more than 1 worker needs a fixed port in server.grpc_addr "
        "(127.0.0.1:0): each worker binds it, and port 0 would give each its own port"
    )
    # one process may still take whatever port it gets
    server = {"workers": 1, "grpc_addr": "127.0.0.1:0"}
    assert validate(AuthzConfig, {"server": server}, "authz.yaml").server.workers == 1


def test_workers_flag_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "authz.yaml"
    config.write_text("server:\n  workers: 2\n")
    assert load("--config", str(config)).server.workers == 2
    monkeypatch.setenv("MAAS_AUTHZ_WORKERS", "3")
    assert load("--config", str(config)).server.workers == 3
    assert load("--config", str(config), "--workers", "4").server.workers == 4


def test_a_port_0_flag_with_workers_from_the_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "authz.yaml"
    config.write_text("server:\n  workers: 2\n")
    with pytest.raises(ConfigError) as caught:
        load("--config", str(config), "--grpc-addr", "127.0.0.1:0")
    assert caught.value.key == "server.workers"


def test_a_bad_workers_flag_is_exit_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--workers", "0", "--check-config"]) == 2
    assert capsys.readouterr().err == (
        "maas-authz: configuration error: built-in defaults: server.workers: "
        "expected a whole number from 1 to 64, got 0\n"
    )


def test_only_maas_authz_has_the_workers_flag() -> None:
    # maas-ratelimit's store is in memory: it must not be split across processes
    with pytest.raises(SystemExit):
        parse_command_line(
            prog="maas-ratelimit", description="d", env_prefix="X", argv=["--workers", "2"]
        )


# --- what the supervisor hands its workers ------------------------------------------------------


def test_workers_get_the_validated_config_with_loopback_http_and_admin(tmp_path: Path) -> None:
    raw = {
        "server": {
            "grpc_addr": "0.0.0.0:50051",
            "http_addr": "0.0.0.0:8081",
            "admin_addr": "127.0.0.1:8091",
            "workers": 4,
            "drain_timeout": "3s",
        },
        "identity": {"source": "static", "static": {"keys_file": "keys.yaml"}},
        "tiers": {"file": "tiers.yaml", "reload_interval": "500ms"},
        "access": {"source": "static", "static_grants": [{"models": ["*"], "groups": ["g"]}]},
    }
    config = validate(AuthzConfig, raw, "authz.yaml")
    settings = supervisor_settings(config, tmp_path)

    assert settings.workers == 4
    assert settings.command == [sys.executable, "-m", "maas_authz"]
    assert (settings.grpc_addr, settings.http_addr, settings.admin_addr) == (
        "0.0.0.0:50051",
        "0.0.0.0:8081",
        "127.0.0.1:8091",
    )
    assert list(settings.admin_fanout) == ["/admin/purge"]
    assert settings.drain_timeout == 3.0

    worker_config, base_dir = _load_worker_payload(settings.payload)
    assert base_dir == tmp_path.absolute()
    assert worker_config.server.grpc_addr == "0.0.0.0:50051"
    assert worker_config.server.http_addr == "127.0.0.1:0"
    assert worker_config.server.admin_addr == "127.0.0.1:0"
    # everything else is what the supervisor validated
    assert worker_config.model_copy(update={"server": config.server}) == config


def test_workers_get_no_admin_listener_when_the_supervisor_has_none(tmp_path: Path) -> None:
    config = validate(AuthzConfig, {"server": {"workers": 2}}, "authz.yaml")
    settings = supervisor_settings(config, tmp_path)
    assert settings.admin_addr is None
    payload = json.loads(settings.payload)
    assert payload["config"]["server"]["admin_addr"] is None
    assert _load_worker_payload(settings.payload)[0].server.admin_addr is None
