"""The servers' event loop: uvloop by default, plain asyncio on request."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from maas_common import event_loop
from maas_common.config import validate
from maas_common.errors import ConfigError
from maas_common.settings import ServerSection


@pytest.mark.parametrize(("choice", "loop_type"), [("uvloop", uvloop.Loop), ("asyncio", None)])
def test_run_uses_the_chosen_loop(choice: event_loop.EventLoop, loop_type: type | None) -> None:
    seen: list[object] = []

    async def main() -> None:
        seen.append(asyncio.get_running_loop())

    event_loop.run(main(), choice)
    if loop_type is None:
        assert not isinstance(seen[0], uvloop.Loop)
        assert isinstance(seen[0], asyncio.BaseEventLoop)
    else:
        assert isinstance(seen[0], loop_type)


def test_server_section_defaults_to_uvloop_and_refuses_others() -> None:
    addrs = {"grpc_addr": "127.0.0.1:1", "http_addr": "127.0.0.1:2"}
    assert validate(ServerSection, addrs, "f.yaml").event_loop == "uvloop"
    with pytest.raises(ConfigError, match="event_loop"):
        validate(ServerSection, {**addrs, "event_loop": "trio"}, "f.yaml")
