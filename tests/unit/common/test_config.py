"""Unit tests for maas_common.config and maas_common.settings (strict YAML config, flags, env)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field

from maas_common.config import (
    Address,
    Duration,
    StrictModel,
    format_location,
    load_file,
    parse_address,
    parse_duration,
    read_yaml,
    validate,
)
from maas_common.errors import ConfigError
from maas_common.settings import (
    ServerSection,
    apply_server_overrides,
    parse_command_line,
)

DURATION_HINT = "expected a duration such as 500ms, 2s, 2m, 1h or 1d"


# --- parse_duration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (3, 3.0),
        (1.5, 1.5),
        ("500ms", 0.5),
        ("2s", 2.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1.5m", 90.0),
        ("7", 7.0),
        (" 2 s ", 2.0),
    ],
)
def test_parse_duration_accepts_numbers_and_unit_suffixes(value: object, seconds: float) -> None:
    result = parse_duration(value)
    assert result == pytest.approx(seconds)
    assert isinstance(result, float)


@pytest.mark.parametrize("value", ["", "ms", "soon", "2S", "2 sec", "1e3", "1.2.3s", "-1s", None])
def test_parse_duration_rejects_malformed_values_naming_them(value: object) -> None:
    with pytest.raises(ValueError) as excinfo:
        parse_duration(value)
    assert str(excinfo.value) == f"{DURATION_HINT}, got {value!r}"


@pytest.mark.parametrize("value", [[1], {"s": 1}])
def test_parse_duration_rejects_containers(value: object) -> None:
    with pytest.raises(ValueError, match=r"^expected a duration such as"):
        parse_duration(value)


@pytest.mark.parametrize("value", [-1, -0.5])
def test_parse_duration_rejects_negative_numbers(value: float) -> None:
    with pytest.raises(ValueError) as excinfo:
        parse_duration(value)
    assert str(excinfo.value) == "a duration cannot be negative"


@pytest.mark.parametrize("value", [True, False])
def test_parse_duration_rejects_booleans_although_they_are_ints(value: bool) -> None:
    with pytest.raises(ValueError) as excinfo:
        parse_duration(value)
    assert str(excinfo.value) == DURATION_HINT


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(float("nan"), id="nan"),
        pytest.param(float("inf"), id="inf"),
        pytest.param(10**400, id="huge-int"),
        pytest.param("9" * 400 + "s", id="huge-string"),
    ],
)
def test_parse_duration_rejects_values_that_are_not_finite(value: object) -> None:
    # YAML's `.nan` and `.inf` load as floats; a NaN TTL would never compare as expired.
    with pytest.raises(ValueError) as excinfo:
        parse_duration(value)
    assert str(excinfo.value) == f"expected a finite duration, got {value!r}"


def test_parse_duration_rejects_negative_infinity_as_negative() -> None:
    with pytest.raises(ValueError, match=r"^a duration cannot be negative$"):
        parse_duration(float("-inf"))


# --- parse_address --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:50051", ("127.0.0.1", 50051)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("localhost:65535", ("localhost", 65535)),
        ("[::1]:80", ("::1", 80)),
        ("[::]:8080", ("::", 8080)),
    ],
)
def test_parse_address_splits_host_and_port(value: str, expected: tuple[str, int]) -> None:
    assert parse_address(value) == expected


@pytest.mark.parametrize("value", ["localhost", "", 8080, None])
def test_parse_address_without_a_colon_is_refused(value: object) -> None:
    with pytest.raises(ValueError) as excinfo:
        parse_address(value)
    assert str(excinfo.value) == f"expected HOST:PORT, got {value!r}"


@pytest.mark.parametrize(
    "value",
    [":80", "[]:80", "host:", "host:65536", "host:-1", "host: 80", "host:http", "[::1]", "h:²"],
)
def test_parse_address_refuses_a_missing_host_or_bad_port(value: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        parse_address(value)
    assert str(excinfo.value) == f"expected HOST:PORT with a port from 0 to 65535, got {value!r}"


def test_parse_address_refuses_non_ascii_digits_in_the_port() -> None:
    # "٣" (Arabic-Indic three) passes str.isdigit() and int() would read it as 3.
    with pytest.raises(ValueError, match="port from 0 to 65535"):
        parse_address("host:\u0663")


@pytest.mark.parametrize("value", ["::1:80", "[::1:80", "::1]:80", "fe80::1:443"])
def test_parse_address_requires_brackets_around_ipv6_hosts(value: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        parse_address(value)
    assert (
        str(excinfo.value) == f"expected HOST:PORT with an IPv6 HOST in [brackets], got {value!r}"
    )


# --- read_yaml ------------------------------------------------------------------------------


def test_read_yaml_parses_one_document(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("server:\n  grpc_addr: 127.0.0.1:1\nlist: [1, 2]\n", encoding="utf-8")
    assert read_yaml(path) == {"server": {"grpc_addr": "127.0.0.1:1"}, "list": [1, 2]}


def test_read_yaml_of_an_empty_file_is_none(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    assert read_yaml(path) is None


def test_read_yaml_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as excinfo:
        read_yaml(path)
    assert str(excinfo.value) == f"{path}: cannot be read: No such file or directory"
    assert excinfo.value.source == str(path)
    assert excinfo.value.key == ""


def test_read_yaml_of_a_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        read_yaml(tmp_path)
    assert str(excinfo.value) == f"{tmp_path}: cannot be read: Is a directory"


def test_read_yaml_invalid_yaml_reports_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("a: 1\n  b: 2\n", encoding="utf-8")
    with pytest.raises(ConfigError) as excinfo:
        read_yaml(path)
    assert str(excinfo.value) == (
        f"{path}: is not valid YAML at line 2, column 4: mapping values are not allowed here"
    )


def test_read_yaml_unclosed_flow_sequence_reports_where(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("a: [1, 2\nb: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError) as excinfo:
        read_yaml(path)
    assert str(excinfo.value) == (
        f"{path}: is not valid YAML at line 2, column 2: expected ',' or ']', but got ':'"
    )


def test_read_yaml_refuses_text_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: café\n".encode("latin-1"))
    with pytest.raises(ConfigError) as excinfo:
        read_yaml(path)
    assert str(excinfo.value) == f"{path}: is not UTF-8 text"


# --- validate -------------------------------------------------------------------------------


class Tier(StrictModel):
    name: str
    level: int


class Limits(StrictModel):
    rpm: int = 1
    burst: int = 1


class Root(StrictModel):
    tiers: list[Tier] = Field(default_factory=list)
    timeout: Duration = 1.0
    listen: Address = "127.0.0.1:80"
    limits: Limits = Limits()


def config_error(data: object, prefix: str = "") -> ConfigError:
    with pytest.raises(ConfigError) as excinfo:
        validate(Root, data, "f.yaml", prefix=prefix)
    return excinfo.value


def test_format_location_uses_dots_for_keys_and_brackets_for_indexes() -> None:
    assert format_location(("tiers", 2, "level")) == "tiers[2].level"
    assert format_location(("a", "b", 0, 1, "c")) == "a.b[0][1].c"
    assert format_location(()) == ""


def test_validate_returns_a_frozen_model_with_parsed_values() -> None:
    root = validate(
        Root,
        {"tiers": [{"name": " free ", "level": 1}], "timeout": "500ms", "limits": {"rpm": 5}},
        "f.yaml",
    )
    assert root.tiers == [Tier(name="free", level=1)]  # strings are stripped
    assert root.timeout == 0.5
    assert root.limits == Limits(rpm=5, burst=1)
    with pytest.raises(ValueError, match="frozen"):
        root.timeout = 2.0  # type: ignore[misc]


def test_validate_treats_an_empty_document_as_all_defaults() -> None:
    assert validate(Root, None, "f.yaml") == Root()


def test_validate_unknown_top_level_key_lists_the_expected_keys() -> None:
    error = config_error({"tierz": []})
    assert str(error) == (
        "f.yaml: tierz: unknown key (expected one of: limits, listen, tiers, timeout)"
    )
    assert (error.source, error.key) == ("f.yaml", "tierz")


def test_validate_unknown_nested_key_lists_the_keys_of_that_section() -> None:
    error = config_error({"limits": {"rpn": 3}})
    assert str(error) == "f.yaml: limits.rpn: unknown key (expected one of: burst, rpm)"


def test_validate_unknown_key_inside_a_list_item_lists_the_item_keys() -> None:
    error = config_error({"tiers": [{"name": "a", "level": 1, "colour": "red"}]})
    assert str(error) == "f.yaml: tiers[0].colour: unknown key (expected one of: level, name)"


def test_validate_missing_key_in_a_list_item_is_required_with_its_location() -> None:
    tiers = [{"name": "a", "level": 1}, {"name": "b", "level": 2}, {"name": "c"}]
    error = config_error({"tiers": tiers})
    assert str(error) == "f.yaml: tiers[2].level: is required"
    assert error.key == "tiers[2].level"
    assert error.problem == "is required"


def test_validate_type_errors_read_as_lower_case_sentences() -> None:
    error = config_error({"tiers": [{"name": "a", "level": "high"}]})
    assert str(error) == (
        "f.yaml: tiers[0].level: input should be a valid integer, "
        "unable to parse string as an integer"
    )


def test_validate_custom_validator_messages_lose_pydantics_prefix() -> None:
    error = config_error({"timeout": "soon"})
    assert str(error) == f"f.yaml: timeout: {DURATION_HINT}, got 'soon'"
    assert str(config_error({"listen": "nowhere"})) == (
        "f.yaml: listen: expected HOST:PORT, got 'nowhere'"
    )
    assert str(config_error({"timeout": -2})) == ("f.yaml: timeout: a duration cannot be negative")


def test_validate_reports_the_first_problem_and_counts_the_rest() -> None:
    error = config_error({"tiers": [{}]})  # both keys of the item missing, in field order
    assert str(error) == "f.yaml: tiers[0].name: is required (and 1 more problem(s) in this file)"
    assert error.key == "tiers[0].name"


def test_validate_reports_an_unknown_key_before_other_problems() -> None:
    # A misspelt key usually explains the "is required" error next to it.
    error = config_error({"tiers": [{"name": "a", "levle": 1}]})
    assert str(error) == (
        "f.yaml: tiers[0].levle: unknown key (expected one of: level, name)"
        " (and 1 more problem(s) in this file)"
    )
    error = config_error({"timeout": "x", "listen": 3, "tierz": 1})
    assert str(error) == (
        "f.yaml: tierz: unknown key (expected one of: limits, listen, tiers, timeout)"
        " (and 2 more problem(s) in this file)"
    )


def test_validate_a_list_document_is_a_top_level_error() -> None:
    error = config_error([1, 2])
    assert (
        str(error) == "f.yaml: (top level): input should be a valid dictionary or instance of Root"
    )


def test_validate_prefix_is_put_in_front_of_the_key() -> None:
    assert str(config_error({"limits": {"rpn": 1}}, prefix="authz")) == (
        "f.yaml: authz.limits.rpn: unknown key (expected one of: burst, rpm)"
    )
    assert config_error("text", prefix="authz").key == "authz"


def test_load_file_reads_and_validates(tmp_path: Path) -> None:
    path = tmp_path / "root.yaml"
    path.write_text("timeout: 2m\nlimits:\n  burst: 9\n", encoding="utf-8")
    assert load_file(Root, path) == Root(timeout=120.0, limits=Limits(burst=9))
    path.write_text("timeout: 2m\nlimits:\n  burts: 9\n", encoding="utf-8")
    with pytest.raises(ConfigError) as excinfo:
        load_file(Root, path)
    assert str(excinfo.value) == (
        f"{path}: limits.burts: unknown key (expected one of: burst, rpm)"
    )


def test_yaml_nan_duration_is_refused_when_validating(tmp_path: Path) -> None:
    path = tmp_path / "root.yaml"
    path.write_text("timeout: .nan\n", encoding="utf-8")
    with pytest.raises(ConfigError) as excinfo:
        load_file(Root, path)
    assert str(excinfo.value) == f"{path}: timeout: expected a finite duration, got nan"


# --- settings: command line, environment and file -------------------------------------------

PREFIX = "MAASTEST"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CONFIG", "GRPC_ADDR", "HTTP_ADDR", "LOG_LEVEL", "LOG_FORMAT"):
        monkeypatch.delenv(f"{PREFIX}_{name}", raising=False)


def parse(*argv: str) -> ServerSection:
    """The whole path a server takes: flags/env, the file, overrides, then validation."""
    command_line = parse_command_line(
        prog="maas-test", description="test", env_prefix=PREFIX, argv=list(argv)
    )
    merged = apply_server_overrides(command_line.raw, command_line.overrides)
    return validate(ServerSection, merged["server"], "config", prefix="server")


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "server.yaml"
    path.write_text(text, encoding="utf-8")
    return path


FILE_CONFIG = """\
server:
  grpc_addr: 127.0.0.1:1001
  http_addr: 127.0.0.1:2001
  log_level: warning
"""


def test_config_file_values_are_used_without_flags_or_env(tmp_path: Path) -> None:
    config = write_config(tmp_path, FILE_CONFIG)
    section = parse("--config", str(config))
    assert (section.grpc_addr, section.http_addr) == ("127.0.0.1:1001", "127.0.0.1:2001")
    assert section.log_level == "warning"
    assert section.log_format == "json"
    assert section.drain_timeout == 10.0


def test_env_beats_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_config(tmp_path, FILE_CONFIG)
    monkeypatch.setenv(f"{PREFIX}_GRPC_ADDR", "127.0.0.1:1002")
    monkeypatch.setenv(f"{PREFIX}_LOG_LEVEL", "debug")
    section = parse("--config", str(config))
    assert section.grpc_addr == "127.0.0.1:1002"
    assert section.log_level == "debug"
    assert section.http_addr == "127.0.0.1:2001"


def test_flag_beats_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_config(tmp_path, FILE_CONFIG)
    monkeypatch.setenv(f"{PREFIX}_GRPC_ADDR", "127.0.0.1:1002")
    monkeypatch.setenv(f"{PREFIX}_LOG_FORMAT", "json")
    section = parse("--config", str(config), "--grpc-addr", "[::1]:1003", "--log-format", "text")
    assert section.grpc_addr == "[::1]:1003"
    assert section.log_format == "text"
    assert section.log_level == "warning"  # still from the file


def test_config_path_can_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path, FILE_CONFIG)
    monkeypatch.setenv(f"{PREFIX}_CONFIG", str(config))
    command_line = parse_command_line(prog="p", description="d", env_prefix=PREFIX, argv=[])
    assert command_line.config == config
    assert command_line.raw["server"]["grpc_addr"] == "127.0.0.1:1001"
    assert command_line.check_only is False


def test_flags_and_env_work_without_a_config_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(f"{PREFIX}_HTTP_ADDR", "127.0.0.1:2002")
    command_line = parse_command_line(
        prog="p",
        description="d",
        env_prefix=PREFIX,
        argv=["--grpc-addr", "127.0.0.1:1003", "--check-config"],
    )
    assert command_line.config is None
    assert command_line.raw == {}
    assert command_line.overrides == {"grpc_addr": "127.0.0.1:1003", "http_addr": "127.0.0.1:2002"}
    assert command_line.check_only is True


def test_an_empty_env_var_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_config(tmp_path, FILE_CONFIG)
    monkeypatch.setenv(f"{PREFIX}_GRPC_ADDR", "")
    assert parse("--config", str(config)).grpc_addr == "127.0.0.1:1001"


def test_a_bad_grpc_addr_flag_is_a_config_error_naming_the_flag() -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse("--grpc-addr", "localhost")
    assert str(excinfo.value) == "--grpc-addr: expected HOST:PORT, got 'localhost'"
    assert excinfo.value.source == "--grpc-addr"


def test_a_bad_http_addr_env_var_is_a_config_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(f"{PREFIX}_HTTP_ADDR", "host:99999")
    with pytest.raises(ConfigError) as excinfo:
        parse()
    assert str(excinfo.value) == (
        f"{PREFIX}_HTTP_ADDR: expected HOST:PORT with a port from 0 to 65535, got 'host:99999'"
    )


def test_env_var_for_the_grpc_address_is_prefix_grpc_addr(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(f"{PREFIX}_GRPC_ADDR", "nope")
    with pytest.raises(ConfigError) as excinfo:
        parse()
    assert excinfo.value.source == f"{PREFIX}_GRPC_ADDR"


def test_a_bad_flag_is_reported_even_when_env_is_good(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(f"{PREFIX}_GRPC_ADDR", "127.0.0.1:1")
    with pytest.raises(ConfigError, match=r"^--grpc-addr: "):
        parse("--grpc-addr", "bad")


def test_a_config_file_whose_top_level_is_a_list_is_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path, "- server\n- other\n")
    with pytest.raises(ConfigError) as excinfo:
        parse("--config", str(config))
    assert str(excinfo.value) == f"{config}: (top level): expected a mapping of sections"


def test_a_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as excinfo:
        parse("--config", str(missing))
    assert str(excinfo.value) == f"{missing}: cannot be read: No such file or directory"


def test_an_empty_config_file_with_flags_is_enough(tmp_path: Path) -> None:
    config = write_config(tmp_path, "")
    section = parse(
        "--config", str(config), "--grpc-addr", "127.0.0.1:1", "--http-addr", "127.0.0.1:2"
    )
    assert (section.grpc_addr, section.http_addr) == ("127.0.0.1:1", "127.0.0.1:2")


def test_a_missing_server_address_is_required(tmp_path: Path) -> None:
    config = write_config(tmp_path, "server:\n  http_addr: 127.0.0.1:2\n")
    with pytest.raises(ConfigError) as excinfo:
        parse("--config", str(config))
    assert str(excinfo.value) == "config: server.grpc_addr: is required"


def test_a_bad_log_level_from_env_fails_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(f"{PREFIX}_LOG_LEVEL", "loud")
    with pytest.raises(ConfigError) as excinfo:
        parse("--grpc-addr", "127.0.0.1:1", "--http-addr", "127.0.0.1:2")
    assert excinfo.value.key == "server.log_level"
    assert "'debug', 'info', 'warning' or 'error'" in excinfo.value.problem


def test_apply_server_overrides_copies_and_keeps_other_sections() -> None:
    raw = {"server": {"grpc_addr": "a:1", "drain_timeout": "5s"}, "authz": {"x": 1}}
    merged = apply_server_overrides(raw, {"grpc_addr": "b:2"})
    assert merged == {"server": {"grpc_addr": "b:2", "drain_timeout": "5s"}, "authz": {"x": 1}}
    assert raw["server"] == {"grpc_addr": "a:1", "drain_timeout": "5s"}  # not mutated


def test_apply_server_overrides_creates_a_missing_or_null_server_section() -> None:
    assert apply_server_overrides({}, {"grpc_addr": "b:2"}) == {"server": {"grpc_addr": "b:2"}}
    assert apply_server_overrides({"server": None}, {}) == {"server": {}}


def test_apply_server_overrides_leaves_a_malformed_section_for_validation() -> None:
    merged = apply_server_overrides({"server": ["x"]}, {"grpc_addr": "b:2"})
    assert merged == {"server": ["x"]}
    with pytest.raises(ConfigError) as excinfo:
        validate(ServerSection, merged["server"], "f.yaml", prefix="server")
    assert excinfo.value.key == "server"


def test_apply_server_overrides_puts_a_dotted_key_in_its_section() -> None:
    raw = {"ratelimit": {"domain": "maas"}, "server": {"grpc_addr": "a:1"}}
    merged = apply_server_overrides(raw, {"ratelimit.target": "h:2", "http_addr": "c:3"})
    assert merged == {
        "ratelimit": {"domain": "maas", "target": "h:2"},
        "server": {"grpc_addr": "a:1", "http_addr": "c:3"},
    }
    assert raw == {"ratelimit": {"domain": "maas"}, "server": {"grpc_addr": "a:1"}}  # a copy


def test_an_optional_listener_is_turned_off_from_the_command_line() -> None:
    line = parse_command_line(
        prog="x",
        description="",
        env_prefix="MAAS_X",
        argv=["--admin-api-addr", "off"],
        extra_flags={"admin_api_addr": ("--admin-api-addr", "")},
    )
    assert line.overrides == {"admin_api_addr": None}
    merged = apply_server_overrides(
        {"server": {"admin_api_addr": "127.0.0.1:8090"}}, line.overrides
    )
    assert merged["server"]["admin_api_addr"] is None
