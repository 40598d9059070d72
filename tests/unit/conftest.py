"""Fixtures the unit tests share."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def luajit() -> str:
    """The LuaJIT binary that runs the Lua under test (Envoy's usage filter, the Redis scripts)."""
    found = shutil.which("luajit")
    if found is None:
        pytest.fail("luajit not found: scripts/install-test-packages.sh installs it", pytrace=False)
    return found
