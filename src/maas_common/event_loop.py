"""Which asyncio event loop the servers run on.

uvloop by default: grpc.aio runs on it unchanged, and in `make bench` it made maas-authz ~7 %
faster per core (CPU per Check ~6 % lower). `server.event_loop: asyncio` is the escape hatch
should a platform or a future grpcio release not get on with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Literal

import uvloop

EventLoop = Literal["uvloop", "asyncio"]


def run(main: Coroutine[Any, Any, None], event_loop: EventLoop) -> None:
    """asyncio.run(main) on the chosen loop."""
    factory = uvloop.new_event_loop if event_loop == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)
