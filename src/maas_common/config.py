"""Strict YAML configuration: frozen models, unknown keys refused, errors naming file and key."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from maas_common.errors import ConfigError

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of every config section: immutable, and a misspelt key is an error, not a default."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: object) -> float:
    """`1.5`, `"500ms"`, `"2s"`, `"2m"`, `"1h"`, `"1d"` -> seconds. Negative values are refused."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 500ms, 2s, 2m, 1h or 1d")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return _finite(value, value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return _finite(float(match.group(1)) * _UNIT_SECONDS[match.group(2)], value)
    raise ValueError(f"expected a duration such as 500ms, 2s, 2m, 1h or 1d, got {value!r}")


def _finite(seconds: float, original: object) -> float:
    # YAML's .nan/.inf (and absurdly long numbers) would make TTLs and timeouts never expire.
    try:
        result = float(seconds)
    except OverflowError:
        result = math.inf
    if not math.isfinite(result):
        raise ValueError(f"expected a finite duration, got {original!r}")
    return result


Duration = Annotated[float, BeforeValidator(parse_duration)]


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be longer than 0 (a zero timeout or interval cannot work)")
    return seconds


PositiveDuration = Annotated[float, BeforeValidator(_positive_duration)]


def parse_address(value: object) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 as `[::1]:PORT`) -> (host, port)."""
    if not isinstance(value, str) or ":" not in value:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host, _, port_text = value.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    # isascii(): str.isdigit() also accepts digits such as '²' and '٣'.
    digits = port_text.isascii() and port_text.isdigit()
    if not host or not digits or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"expected HOST:PORT with a port from 0 to 65535, got {value!r}")
    if not bracketed and ("[" in host or "]" in host or ":" in host):
        raise ValueError(f"expected HOST:PORT with an IPv6 HOST in [brackets], got {value!r}")
    return host, int(port_text)


def _check_address(value: object) -> str:
    parse_address(value)
    assert isinstance(value, str)
    return value


Address = Annotated[str, BeforeValidator(_check_address)]


def read_yaml(path: Path) -> Any:
    """Parse one YAML document, turning every failure into a ConfigError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), "", "is not UTF-8 text") from None
    return parse_yaml_text(text, str(path))


def parse_yaml_text(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, "", f"is not valid YAML{where}: {problem}") from None


def format_location(loc: tuple[int | str, ...]) -> str:
    """('tiers', 2, 'level') -> 'tiers[2].level'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _describe(error: Any, model: type[BaseModel]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key" + _allowed_keys_hint(model, error["loc"][:-1])
    if kind == "missing":
        return "is required"
    msg = str(error["msg"])
    # pydantic prefixes messages of custom validators; the rest reads fine as it is.
    msg = msg.removeprefix("Value error, ")
    return msg[:1].lower() + msg[1:]


def _allowed_keys_hint(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return ""
        annotation = fields[part].annotation
        current = _first_model_in(annotation)
        if current is None:
            return ""
    fields = getattr(current, "model_fields", None)
    return f" (expected one of: {', '.join(sorted(fields))})" if fields else ""


def _first_model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _first_model_in(arg)
        if found is not None:
            return found
    return None


def validate(model: type[M], data: Any, source: str, prefix: str = "") -> M:
    """Validate `data` as `model`; the first problem becomes a ConfigError naming its key."""
    if data is None:
        data = {}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # a misspelt key usually explains the "required" error next to it: report it first
        first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        key = format_location(tuple(first["loc"]))
        if prefix:
            key = f"{prefix}.{key}" if key else prefix
        problem = _describe(first, model)
        if len(errors) > 1:
            problem += f" (and {len(errors) - 1} more problem(s) in this file)"
        raise ConfigError(source, key or "(top level)", problem) from None


def resolve_path(base_dir: Path, path: Path) -> Path:
    """Paths in a config file are relative to the file's own directory."""
    return path if path.is_absolute() else base_dir / path


def load_file(model: type[M], path: Path) -> M:
    return validate(model, read_yaml(path), str(path))


def password_reader(path: Path) -> Callable[[], str | None]:
    """A password read from a (mounted Secret) file at each connect: a rotated Secret applies;
    an unreadable file gives no password (the connect then fails and is retried)."""

    def read() -> str | None:
        try:
            return path.read_text().strip() or None
        except OSError as exc:
            log.warning("cannot read the database password file %s: %s", path, exc)
            return None

    return read
