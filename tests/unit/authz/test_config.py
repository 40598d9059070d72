"""The maas-authz configuration file, --check-config and the command line's exit status."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import maas_demo
from maas_authz.app import check_config
from maas_authz.config import AuthzConfig
from maas_authz.main import main
from maas_common.config import read_yaml, validate
from maas_common.errors import ConfigError

DEMO_CONFIG = Path(maas_demo.__file__).parent / "config" / "authz.yaml"


def config_error(data: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        validate(AuthzConfig, data, "authz.yaml")
    return str(caught.value)


# --- defaults ---------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [None, {}])
def test_defaults(data: Any) -> None:
    config = validate(AuthzConfig, data, "authz.yaml")
    assert config.identity.source == "kubernetes"
    assert config.identity.audiences == ["maas-default-gateway-sa"]
    assert (config.identity.cache.ttl, config.identity.cache.negative_ttl) == (600, 10)
    assert (config.access.cache.ttl, config.access.cache.negative_ttl) == (60, 5)
    assert config.access.source == "kubernetes"
    assert config.access.verb == "post"
    assert config.access.group == "serving.kserve.io"
    assert config.access.resource == "llminferenceservices"
    assert config.identity.max_token_length == 8192
    assert config.tiers.file is None
    assert config.tiers.instance == "maas-default-gateway"
    assert config.models.path_template == "/{namespace}/{model}"
    assert config.models.open_paths == []
    assert config.response.forward_authorization is False
    assert config.response.retry_after == 5
    assert config.server.grpc_addr == "0.0.0.0:50051"
    assert config.uses_kubernetes()


def test_config_is_frozen() -> None:
    config = validate(AuthzConfig, {}, "authz.yaml")
    with pytest.raises(ValueError):
        config.identity.source = "static"  # type: ignore[misc]


def test_static_everything_does_not_use_kubernetes() -> None:
    config = validate(
        AuthzConfig,
        {
            "identity": {"source": "static", "static": {"keys_file": "keys.yaml"}},
            "access": {"source": "static", "static_grants": [{"models": ["*"], "users": ["a"]}]},
        },
        "authz.yaml",
    )
    assert not config.uses_kubernetes()
    assert config.identity.static is not None
    assert config.identity.static.keys_file == Path("keys.yaml")
    assert config.identity.static.reload_interval == 2.0


def test_static_identity_without_keys_file() -> None:
    assert config_error({"identity": {"source": "static"}}) == (
        "authz.yaml: identity: source 'static' needs static.keys_file"
    )


def test_static_section_without_keys_file() -> None:
    assert config_error({"identity": {"source": "static", "static": {}}}) == (
        "authz.yaml: identity.static.keys_file: is required"
    )


def test_unknown_identity_source() -> None:
    message = config_error({"identity": {"source": "ldap"}})
    assert message.startswith("authz.yaml: identity.source: ")
    assert "'kubernetes'" in message and "'static'" in message


# --- unknown keys at several depths ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"serverr": {}},
            "authz.yaml: serverr: unknown key "
            "(expected one of: access, admin, api_keys, authorization, identity, kubernetes, "
            "models, quota, ratelimit, response, server, subscriptions, tiers, usage)",
        ),
        (
            {"identity": {"cach": {}}},
            "authz.yaml: identity.cach: unknown key "
            "(expected one of: audiences, cache, max_token_length, source, static)",
        ),
        (
            {"identity": {"cache": {"ttl": 1, "negative_ttl": 1, "tll": 2}}},
            "authz.yaml: identity.cache.tll: unknown key "
            "(expected one of: max_entries, negative_ttl, ttl)",
        ),
        (
            {"identity": {"source": "static", "static": {"keys_file": "k", "reload": 1}}},
            "authz.yaml: identity.static.reload: unknown key "
            "(expected one of: keys_file, reload_interval)",
        ),
        (
            {"access": {"static_grants": [{"models": ["*"], "group": ["g"]}]}},
            "authz.yaml: access.static_grants[0].group: unknown key "
            "(expected one of: groups, models, users)",
        ),
        (
            {"models": {"open_paths": [{"path": "/v1/models", "auth": False}]}},
            "authz.yaml: models.open_paths[0].auth: unknown key "
            "(expected one of: authenticate, match, path)",
        ),
        (
            {"server": {"grpc_address": "x"}},
            "authz.yaml: server.grpc_address: unknown key (expected one of: admin_addr, "
            "admin_api_addr, drain_timeout, event_loop, grpc_addr, http_addr, log_format, "
            "log_level, shutdown_delay, tls, workers)",
        ),
    ],
)
def test_unknown_keys(data: Any, expected: str) -> None:
    assert config_error(data) == expected


# --- models -------------------------------------------------------------------------------------


def test_bad_path_template() -> None:
    assert config_error({"models": {"path_template": "/{namespace}"}}) == (
        "authz.yaml: models: path_template '/{namespace}' must contain the segment {model}"
    )


def test_path_template_without_namespace_needs_a_default() -> None:
    assert config_error({"models": {"path_template": "/{model}"}}) == (
        "authz.yaml: models: path_template '/{model}' needs a {namespace} segment or "
        "models.default_namespace"
    )
    config = validate(
        AuthzConfig,
        {"models": {"path_template": "/{model}", "default_namespace": "llm"}},
        "authz.yaml",
    )
    assert config.models.default_namespace == "llm"


def test_bad_default_namespace() -> None:
    data = {"models": {"path_template": "/{model}", "default_namespace": "Bad_NS"}}
    assert (
        config_error(data)
        == "authz.yaml: models: default_namespace 'Bad_NS' is not a namespace name"
    )


def test_open_path_must_be_absolute() -> None:
    assert config_error({"models": {"open_paths": [{"path": "v1/models"}]}}) == (
        "authz.yaml: models.open_paths[0].path: must start with '/'"
    )


# --- access grants ------------------------------------------------------------------------------


def test_grant_without_groups_or_users() -> None:
    assert config_error({"access": {"static_grants": [{"models": ["llm/tiny"]}]}}) == (
        "authz.yaml: access.static_grants[0]: a grant needs groups or users"
    )


def test_grant_with_empty_groups_and_users() -> None:
    data = {"access": {"static_grants": [{"models": ["*"], "groups": [], "users": []}]}}
    assert (
        config_error(data) == "authz.yaml: access.static_grants[0]: a grant needs groups or users"
    )


def test_grant_with_a_bad_model_pattern() -> None:
    data = {
        "access": {
            "static_grants": [
                {"models": ["*"], "users": ["a"]},
                {"models": ["tiny"], "users": ["a"]},
            ]
        }
    }
    assert config_error(data) == (
        "authz.yaml: access.static_grants[1]: model 'tiny' must be 'namespace/name', "
        "'namespace/*' or '*'"
    )


def test_grant_without_models() -> None:
    message = config_error({"access": {"static_grants": [{"models": [], "users": ["a"]}]}})
    assert message.startswith("authz.yaml: access.static_grants[0].models: ")


# --- durations ----------------------------------------------------------------------------------


def test_durations_accept_units() -> None:
    config = validate(
        AuthzConfig,
        {
            "identity": {"cache": {"ttl": "10m", "negative_ttl": "30s"}},
            "access": {"cache": {"ttl": "1h", "negative_ttl": 2.5}},
            "kubernetes": {"timeout": "250ms"},
            "tiers": {"reload_interval": "1d"},
        },
        "authz.yaml",
    )
    assert config.identity.cache.ttl == 600.0
    assert config.identity.cache.negative_ttl == 30.0
    assert config.access.cache.ttl == 3600.0
    assert config.access.cache.negative_ttl == 2.5
    assert config.kubernetes.timeout == 0.25
    assert config.tiers.reload_interval == 86400.0


@pytest.mark.parametrize("value", ["soon", "-1s", "10 minutes", True])
def test_bad_durations(value: Any) -> None:
    message = config_error({"kubernetes": {"timeout": value}})
    assert message.startswith("authz.yaml: kubernetes.timeout: ")
    assert "duration" in message


def test_negative_numeric_duration() -> None:
    assert config_error({"kubernetes": {"timeout": -1}}) == (
        "authz.yaml: kubernetes.timeout: a duration cannot be negative"
    )


# --- check_config and main ----------------------------------------------------------------------


def test_check_config_on_the_demo_config() -> None:
    config = validate(AuthzConfig, read_yaml(DEMO_CONFIG), str(DEMO_CONFIG))
    summary = check_config(config, DEMO_CONFIG.parent)
    lines = summary.splitlines()
    assert lines[0] == "tiers: free, premium, trial, enterprise"
    assert "identity: static, 6 key(s) from " in summary
    assert "usage ledger: sqlite (read by the operator API)" in lines
    assert str(DEMO_CONFIG.parent / "keys.yaml") in summary
    assert "access: static" in lines
    assert lines[-1] == "configuration OK"


def test_check_config_with_built_in_tiers_and_kubernetes() -> None:
    summary = check_config(validate(AuthzConfig, {}, "authz.yaml"), Path("/nonexistent"))
    assert "tiers: free, premium, enterprise" in summary
    assert "identity: kubernetes TokenReview, audiences ['maas-default-gateway-sa']" in summary


def test_check_config_reports_a_missing_keys_file(tmp_path: Path) -> None:
    config = validate(
        AuthzConfig,
        {"identity": {"source": "static", "static": {"keys_file": "missing.yaml"}}},
        "authz.yaml",
    )
    with pytest.raises(ConfigError) as caught:
        check_config(config, tmp_path)
    assert caught.value.source == str(tmp_path / "missing.yaml")


def test_check_config_reports_a_missing_kubeconfig(tmp_path: Path) -> None:
    config = validate(AuthzConfig, {"kubernetes": {"kubeconfig": "kube.yaml"}}, "authz.yaml")
    with pytest.raises(ConfigError) as caught:
        check_config(config, tmp_path)
    assert caught.value.key == "kubernetes.kubeconfig"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CONFIG", "GRPC_ADDR", "HTTP_ADDR", "LOG_LEVEL", "LOG_FORMAT"):
        monkeypatch.delenv(f"MAAS_AUTHZ_{name}", raising=False)


@pytest.mark.usefixtures("clean_env")
def test_main_check_config_with_a_bad_key_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "authz.yaml"
    path.write_text("identity:\n  cach:\n    ttl: 10m\n", encoding="utf-8")
    assert main(["--config", str(path), "--check-config"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"maas-authz: configuration error: {path}: identity.cach: ")
    assert "unknown key (expected one of: " in lines[0]


@pytest.mark.usefixtures("clean_env")
def test_main_check_config_with_invalid_yaml_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "authz.yaml"
    path.write_text("identity: [\n", encoding="utf-8")
    assert main(["--config", str(path), "--check-config"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert str(path) in err
    assert "is not valid YAML" in err


@pytest.mark.usefixtures("clean_env")
def test_main_check_config_with_a_missing_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "nope.yaml"
    assert main(["--config", str(path), "--check-config"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert f"{path}: cannot be read" in err
