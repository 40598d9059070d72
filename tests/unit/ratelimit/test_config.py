"""The maas-ratelimit configuration file, --check-config and the command line's exit status."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import maas_demo
from maas_common.config import read_yaml, validate
from maas_common.errors import ConfigError
from maas_ratelimit.app import build_app, build_store, check_config
from maas_ratelimit.config import RateLimitConfig
from maas_ratelimit.main import main
from maas_ratelimit.memory_store import MemoryBucketStore
from maas_ratelimit.store import ChargeStatus

DEMO_CONFIG = Path(maas_demo.__file__).parent / "config" / "ratelimit.yaml"
DEFAULT_SUMMARY_LIMITS = [
    "limit free-requests: free tier: 5 requests per 2m",
    "limit free-tokens: free tier: 100 tokens per 1m",
    "limit premium-requests: premium tier: 20 requests per 2m",
    "limit premium-tokens: premium tier: 50000 tokens per 1m",
    "limit enterprise-requests: enterprise tier: 50 requests per 2m",
    "limit enterprise-tokens: enterprise tier: 100000 tokens per 1m",
]


def config_error(data: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        validate(RateLimitConfig, data, "ratelimit.yaml")
    return str(caught.value)


# --- defaults -----------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [None, {}])
def test_defaults(data: Any) -> None:
    config = validate(RateLimitConfig, data, "ratelimit.yaml")
    assert config.store.type == "memory"
    assert config.store.failure_mode == "open"
    assert config.store.request_id_ttl == 600.0
    assert config.store.redis is None
    assert config.server.grpc_addr == "0.0.0.0:50052"
    assert config.server.http_addr == "0.0.0.0:8082"
    assert config.server.log_format == "json"
    assert config.server.drain_timeout == 10.0
    assert config.limits.file is None
    assert config.limits.reload_interval == 2.0


def test_config_is_frozen() -> None:
    config = validate(RateLimitConfig, {}, "ratelimit.yaml")
    with pytest.raises(ValueError):
        config.store.type = "redis"  # type: ignore[misc]


def test_redis_store_with_defaults() -> None:
    config = validate(
        RateLimitConfig,
        {"store": {"type": "redis", "failure_mode": "closed", "redis": {}}},
        "ratelimit.yaml",
    )
    assert config.store.failure_mode == "closed"
    redis = config.store.redis
    assert redis is not None
    assert redis.url == "redis://127.0.0.1:6379/0"
    assert (redis.timeout, redis.connect_timeout) == (0.05, 0.2)
    assert redis.max_connections == 64
    assert redis.key_prefix == "maas:rl:"


def test_durations_and_paths() -> None:
    config = validate(
        RateLimitConfig,
        {
            "limits": {"file": "limits.yaml", "reload_interval": "500ms"},
            "store": {"request_id_ttl": "15m", "redis": {"timeout": "20ms"}},
        },
        "ratelimit.yaml",
    )
    assert config.limits.file == Path("limits.yaml")
    assert config.limits.reload_interval == 0.5
    assert config.store.request_id_ttl == 900.0
    assert config.store.redis is not None
    assert config.store.redis.timeout == 0.02
    assert config.store.type == "memory"  # a redis section alone does not switch stores


@pytest.mark.asyncio
async def test_build_store_memory_uses_the_request_id_ttl() -> None:
    config = validate(RateLimitConfig, {"store": {"request_id_ttl": "2s"}}, "ratelimit.yaml")
    store = build_store(config.store)
    assert isinstance(store, MemoryBucketStore)
    assert (await store.charge([], 10_000, "r1")).status is ChargeStatus.APPLIED
    assert (await store.charge([], 11_999, "r1")).status is ChargeStatus.DUPLICATE
    assert (await store.charge([], 12_000, "r1")).status is ChargeStatus.APPLIED  # forgotten


# --- errors -------------------------------------------------------------------------------------


def test_redis_store_without_a_redis_section() -> None:
    assert config_error({"store": {"type": "redis"}}) == (
        "ratelimit.yaml: store: type 'redis' needs a redis: section (at least redis.url)"
    )


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"limit": {}},
            "ratelimit.yaml: limit: unknown key (expected one of: ledger, limits, server, store)",
        ),
        (
            {"store": {"typ": "redis"}},
            "ratelimit.yaml: store.typ: unknown key "
            "(expected one of: failure_mode, redis, request_id_ttl, type)",
        ),
        (
            {"store": {"type": "redis", "redis": {"uri": "redis://x"}}},
            "ratelimit.yaml: store.redis.uri: unknown key "
            "(expected one of: connect_timeout, key_prefix, max_connections, timeout, url)",
        ),
        (
            {"limits": {"path": "limits.yaml"}},
            "ratelimit.yaml: limits.path: unknown key (expected one of: file, reload_interval)",
        ),
        (
            {"server": {"grpc_address": "x"}},
            "ratelimit.yaml: server.grpc_address: unknown key (expected one of: drain_timeout, "
            "event_loop, grpc_addr, http_addr, log_format, log_level, shutdown_delay, tls)",
        ),
    ],
)
def test_unknown_keys(data: Any, expected: str) -> None:
    assert config_error(data) == expected


def test_bad_values() -> None:
    assert config_error({"store": {"type": "disk"}}) == (
        "ratelimit.yaml: store.type: input should be 'memory' or 'redis'"
    )
    assert config_error({"store": {"failure_mode": "maybe"}}) == (
        "ratelimit.yaml: store.failure_mode: input should be 'open' or 'closed'"
    )
    message = config_error({"store": {"redis": {"max_connections": 0}}})
    assert message.startswith("ratelimit.yaml: store.redis.max_connections: ")
    message = config_error({"server": {"grpc_addr": "nope"}})
    assert message.startswith("ratelimit.yaml: server.grpc_addr: expected HOST:PORT")
    message = config_error({"limits": {"reload_interval": "soon"}})
    assert message.startswith("ratelimit.yaml: limits.reload_interval: expected a duration")


# --- check_config -------------------------------------------------------------------------------


def test_check_config_on_the_demo_config() -> None:
    config = validate(RateLimitConfig, read_yaml(DEMO_CONFIG), str(DEMO_CONFIG))
    assert config.limits.file == Path("limits.yaml")
    summary = check_config(config, DEMO_CONFIG.parent)
    assert summary.splitlines() == [
        "domain: maas",
        *DEFAULT_SUMMARY_LIMITS,
        "limit trial-requests: trial tier: 20 requests per 2m",
        "limit trial-tokens: trial tier: 10000 tokens per 1m",
        "budget trial-monthly: trial tier: budget trial-monthly, 200 tokens per month (UTC) per "
        "user",
        "budget subscription-monthly-cost: every subscription: budget subscription-monthly-cost, "
        "cost 0.05 per month (UTC) per user",
        "price llm/tiny: 0.5 prompt, 1.5 completion per million tokens",
        "store: memory (failure mode open)",
        f"ledger: sqlite, journal {Path('../ledger-journal')}",
        "configuration OK",
    ]


def test_check_config_with_the_built_in_limits() -> None:
    config = validate(
        RateLimitConfig,
        {"store": {"type": "redis", "failure_mode": "closed", "redis": {}}},
        "ratelimit.yaml",
    )
    summary = check_config(config, Path("/nonexistent"))
    assert summary.splitlines() == [
        "domain: maas",
        *DEFAULT_SUMMARY_LIMITS,
        "store: redis (failure mode closed)",
        "configuration OK",
    ]


def test_check_config_with_a_limits_file_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "mine.yaml").write_text(
        "domain: edge\nlimits:\n"
        "  - {name: gold-requests, tier: gold, kind: requests, limit: 7, window: 1h}\n",
        encoding="utf-8",
    )
    config = validate(RateLimitConfig, {"limits": {"file": "mine.yaml"}}, "ratelimit.yaml")
    assert check_config(config, tmp_path).splitlines() == [
        "domain: edge",
        "limit gold-requests: gold tier: 7 requests per 1h",
        "store: memory (failure mode open)",
        "configuration OK",
    ]


def test_check_config_reports_a_missing_limits_file(tmp_path: Path) -> None:
    config = validate(RateLimitConfig, {"limits": {"file": "missing.yaml"}}, "ratelimit.yaml")
    with pytest.raises(ConfigError) as caught:
        check_config(config, tmp_path)
    assert caught.value.source == str(tmp_path / "missing.yaml")
    assert "cannot be read" in str(caught.value)


def test_check_config_reports_a_bad_limits_file(tmp_path: Path) -> None:
    path = tmp_path / "limits.yaml"
    path.write_text(
        "limits:\n  - {name: a, tier: free, kind: requests, limit: 0, window: 1m}\n",
        encoding="utf-8",
    )
    config = validate(RateLimitConfig, {"limits": {"file": str(path)}}, "ratelimit.yaml")
    with pytest.raises(ConfigError) as caught:
        check_config(config, Path("/elsewhere"))  # an absolute path ignores the base directory
    assert str(caught.value) == (
        f"{path}: limits[0].limit: input should be greater than or equal to 1"
    )


# --- main ---------------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CONFIG", "GRPC_ADDR", "HTTP_ADDR", "LOG_LEVEL", "LOG_FORMAT"):
        monkeypatch.delenv(f"MAAS_RATELIMIT_{name}", raising=False)


@pytest.mark.usefixtures("clean_env")
def test_main_check_config_with_a_bad_key_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ratelimit.yaml"
    path.write_text("store:\n  typ: redis\n", encoding="utf-8")
    assert main(["--config", str(path), "--check-config"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"maas-ratelimit: configuration error: {path}: store.typ: unknown key "
        "(expected one of: failure_mode, redis, request_id_ttl, type)"
    ]


@pytest.mark.usefixtures("clean_env")
def test_main_check_config_with_redis_but_no_section_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ratelimit.yaml"
    path.write_text("store:\n  type: redis\n", encoding="utf-8")
    assert main(["--config", str(path), "--check-config"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"maas-ratelimit: configuration error: {path}: store: type 'redis' needs a redis: "
        "section (at least redis.url)"
    ]


@pytest.mark.usefixtures("clean_env")
def test_main_check_config_with_a_bad_limits_file_names_that_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("maas_common.entrypoint.setup_logging", lambda *args: None)
    (tmp_path / "ratelimit.yaml").write_text("limits:\n  file: limits.yaml\n", encoding="utf-8")
    (tmp_path / "limits.yaml").write_text(
        "limits:\n  - {name: a, tier: free, kind: requests, limit: 1, window: 1m, per: [model]}\n",
        encoding="utf-8",
    )
    assert main(["--config", str(tmp_path / "ratelimit.yaml"), "--check-config"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"maas-ratelimit: configuration error: {tmp_path / 'limits.yaml'}: limits[0].per: "
        "must contain 'user', optionally 'model', each once"
    ]


@pytest.mark.usefixtures("clean_env")
def test_main_check_config_on_the_demo_config_exits_0(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("maas_common.entrypoint.setup_logging", lambda *args: None)
    assert main(["--config", str(DEMO_CONFIG), "--check-config"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = captured.out.splitlines()
    assert lines[0] == "domain: maas"
    assert lines[1:7] == DEFAULT_SUMMARY_LIMITS
    assert lines[-1] == "configuration OK"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"store": {"type": "redis", "redis": {"url": "http://x"}}},
            "ratelimit.yaml: store.redis.url: expected a redis://, rediss:// or unix:// URL, "
            "got 'http://x'",
        ),
        (
            {"store": {"request_id_ttl": 0}},
            "ratelimit.yaml: store.request_id_ttl: must be longer than 0 (a zero timeout or "
            "interval cannot work)",
        ),
        (
            {"limits": {"reload_interval": "0s"}},
            "ratelimit.yaml: limits.reload_interval: must be longer than 0 (a zero timeout or "
            "interval cannot work)",
        ),
    ],
)
def test_values_that_cannot_work_are_refused(data: Any, expected: str) -> None:
    assert str_error(data) == expected


def str_error(data: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        validate(RateLimitConfig, data, "ratelimit.yaml")
    return str(caught.value)


def test_a_redis_url_redis_py_refuses_is_a_config_error_naming_the_key() -> None:
    config = validate(
        RateLimitConfig,
        {"store": {"type": "redis", "redis": {"url": "redis://host:notaport/0"}}},
        "ratelimit.yaml",
    )
    with pytest.raises(ConfigError) as caught:
        build_store(config.store, "ratelimit.yaml")
    assert str(caught.value).startswith("ratelimit.yaml: store.redis.url: ")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///", "ratelimit.yaml: ledger.url: a sqlite URL names a file"),
        ("sqlite:///dir/", "ratelimit.yaml: ledger.url: a sqlite URL names a file"),
        (
            "mysql://db/ledger",
            "ratelimit.yaml: ledger.url: expected sqlite:///path or a postgresql",
        ),
        ("postgresql://maas:s3cret@db/maas", "keep the password out of the URL: use password_file"),
    ],
)
def test_ledger_url_errors_name_the_key_and_never_echo_a_password(url: str, expected: str) -> None:
    message = config_error({"ledger": {"url": url}})
    assert expected in message
    assert "s3cret" not in message


def test_a_ledger_journal_another_process_holds_is_a_start_up_error(tmp_path: Path) -> None:
    config = validate(
        RateLimitConfig,
        {"ledger": {"url": "sqlite:///ledger.db", "spool_dir": "journal"}},
        "ratelimit.yaml",
    )
    first = build_app(config, tmp_path)
    with pytest.raises(ConfigError, match=r"ledger\.spool_dir: .* in use by another process"):
        build_app(config, tmp_path)
    assert first.ledger is not None
    asyncio.run(first.ledger.close())  # the lock goes with the journal
    asyncio.run(build_app(config, tmp_path).ledger.close())  # type: ignore[union-attr]
