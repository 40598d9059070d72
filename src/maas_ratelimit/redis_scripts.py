"""The Redis store's Lua scripts, package data under lua/, read once at import (start-up).

Each script is common.lua (the shared arithmetic and bucket helpers) followed by the operation's
own text; Redis caches a script by its SHA-1, so the text must be the same on every replica of a
version, which reading the files shipped with the package guarantees.
"""

from __future__ import annotations

from importlib import resources

from maas_ratelimit.bucket import DEBT_WINDOWS

_DIR = resources.files("maas_ratelimit") / "lua"


def read(name: str) -> str:
    """The text of lua/<name> as shipped with the package."""
    return (_DIR / name).read_text(encoding="utf-8")


def compose(operation: str) -> str:
    """The script Redis runs for `operation` ("admit" or "charge"): common.lua, then its own."""
    text = read("common.lua") + "\n" + read(f"{operation}.lua")
    return text.replace("__DEBT_WINDOWS__", str(DEBT_WINDOWS))


ADMIT = compose("admit")
CHARGE = compose("charge")
