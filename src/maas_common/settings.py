"""Settings every server shares: the `server:` config section and the command line that feeds it.

Precedence, highest first: command-line flag, environment variable, config file, default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from maas_common.config import (
    Address,
    Duration,
    StrictModel,
    parse_address,
    read_yaml,
    validate,
)
from maas_common.errors import ConfigError
from maas_common.event_loop import EventLoop
from maas_common.tls import TlsSection

M = TypeVar("M", bound=StrictModel)


class ServerSection(StrictModel):
    grpc_addr: Address
    http_addr: Address
    drain_timeout: Duration = 10.0
    # after SIGTERM, keep serving this long while reporting not ready (readyz 503, gRPC health
    # NOT_SERVING), so a load balancer that health-checks (Envoy without Kubernetes) stops
    # picking this server before the drain refuses new calls; 0: drain at once (a pod's
    # preStop sleep does the same job)
    shutdown_delay: Duration = 0.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = "json"
    event_loop: EventLoop = "uvloop"
    # TLS on the gRPC listener (and maas-authz's operator API); off by default: in a mesh the
    # sidecars do it. /metrics and the probes stay plain HTTP for the kubelet and Prometheus.
    tls: TlsSection | None = None


@dataclass(frozen=True)
class CommandLine:
    config: Path | None
    raw: dict[str, Any]
    overrides: dict[str, str | None]  # None: an optional listener turned off ("off")
    check_only: bool


def parse_command_line(
    *,
    prog: str,
    description: str,
    env_prefix: str,
    argv: Sequence[str] | None = None,
    extra_flags: Mapping[str, tuple[str, str]] | None = None,
) -> CommandLine:
    """`extra_flags`: settings only this server has, `{key: (flag, help)}`; like the shared
    ones they override `server.<key>` (or, for a dotted key `section.name`, that setting) and
    read `<env_prefix>_<KEY>` (dots as underscores) from the environment.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    env = os.environ
    parser.add_argument(
        "--config",
        type=Path,
        default=env.get(f"{env_prefix}_CONFIG") or None,  # set but empty counts as unset
        help=f"YAML config file (env {env_prefix}_CONFIG); omitted: built-in defaults",
    )
    flags = {
        "grpc_addr": ("--grpc-addr", "HOST:PORT of the gRPC server"),
        "http_addr": ("--http-addr", "HOST:PORT of /metrics, /healthz and /readyz"),
        "log_level": ("--log-level", "debug, info, warning or error"),
        "log_format": ("--log-format", "json or text"),
        "event_loop": ("--event-loop", "uvloop (default) or asyncio"),
        **(extra_flags or {}),
    }
    for key, (flag, help_text) in flags.items():
        env_name = _env_name(env_prefix, key)
        parser.add_argument(flag, dest=key, help=f"{help_text} (env {env_name})")
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration (and the files it names), print a summary and exit",
    )
    args = parser.parse_args(argv)

    overrides: dict[str, str | None] = {}
    for key, (flag, _) in flags.items():
        env_name = _env_name(env_prefix, key)
        value, source = getattr(args, key), flag
        if value is None and env.get(env_name):
            value, source = env[env_name], env_name
        if value is None:
            continue
        if key.endswith("_addr") and value.lower() == "off":
            overrides[key] = None  # an optional listener (admin_addr, ...) turned off
            continue
        if key.endswith("_addr"):
            try:
                parse_address(value)
            except ValueError as exc:
                raise ConfigError(source, "", str(exc)) from None
        overrides[key] = value

    raw: dict[str, Any] = {}
    if args.config is not None:
        loaded = read_yaml(args.config)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(str(args.config), "(top level)", "expected a mapping of sections")
        raw = loaded or {}
    return CommandLine(
        config=args.config, raw=raw, overrides=overrides, check_only=args.check_config
    )


def load_server_config(model: type[M], command_line: CommandLine) -> M:
    """The validated config: file (or built-in defaults) with flag/env overrides applied."""
    source = str(command_line.config) if command_line.config else "built-in defaults"
    return validate(model, apply_server_overrides(command_line.raw, command_line.overrides), source)


def _env_name(prefix: str, key: str) -> str:
    return f"{prefix}_{key.upper().replace('.', '_')}"


def apply_server_overrides(
    raw: dict[str, Any], overrides: Mapping[str, str | None]
) -> dict[str, Any]:
    """A copy of the raw config with flag/env values placed into its `server:` section (or, for
    a dotted key, the section it names)."""
    merged = dict(raw)
    by_section: dict[str, dict[str, str | None]] = {}
    for key, value in overrides.items():
        prefix, _, name = key.rpartition(".")
        by_section.setdefault(prefix or "server", {})[name] = value
    for section_name, values in by_section.items():
        found = merged.get(section_name)
        section = dict(found) if isinstance(found, dict) else ({} if found is None else found)
        if isinstance(section, dict):  # else validation names the bad section
            section.update(values)
        merged[section_name] = section
    if merged.get("server") is None:
        merged["server"] = {}
    return merged
