"""KubernetesWatchTransport waits, at shutdown, for the connections its lists and watches closed
(TLS's close_notify completes on the loop later; a loop stopped first leaks the socket)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from maas_authz.kubernetes import KubernetesWatchTransport


def response_closing(loop: asyncio.AbstractEventLoop) -> tuple[Any, asyncio.Future[None]]:
    closed: asyncio.Future[None] = loop.create_future()
    return SimpleNamespace(
        connection=SimpleNamespace(protocol=SimpleNamespace(closed=closed))
    ), closed


@pytest.mark.asyncio
async def test_wait_closed_waits_for_the_connections_still_closing() -> None:
    loop = asyncio.get_running_loop()
    transport = KubernetesWatchTransport(api=None)  # type: ignore[arg-type]
    response, closed = response_closing(loop)
    transport._track_close(response)
    loop.call_later(0.05, closed.set_result, None)
    started = loop.time()
    await transport.wait_closed()
    assert closed.done() and loop.time() - started >= 0.04
    assert not transport._closing  # forgotten once closed
    await transport.wait_closed()  # nothing left: returns at once


@pytest.mark.asyncio
async def test_a_response_without_a_connection_is_not_tracked() -> None:
    transport = KubernetesWatchTransport(api=None)  # type: ignore[arg-type]
    transport._track_close(SimpleNamespace(connection=None))
    transport._track_close(object())
    assert not transport._closing
