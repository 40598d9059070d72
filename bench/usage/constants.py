"""What every part of the usage bench agrees on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
USAGE_LUA = REPO / "envoy" / "lua" / "usage.lua"
DEFAULT_OUT = REPO / ".bench" / "usage.json"
PROMPT_TOKENS = 17  # what the upstream reports for every prompt
TAIL_BYTES = 4096  # as usage.lua's TAIL_BYTES
NS = "maas.usage"
CONFIGS = ("baseline", "lua", "ext_proc")

Json = dict[str, Any]
