"""The other maas-authz replicas, for the operator API: each replica keeps the decisions Envoy
sent it and its own caches, so a view of the gateway (decisions) and a purge (instant
revocation) must reach all of them.

Replicas are found by DNS (the headless Service: one address per ready pod) or listed. The
replica an operator reaches asks every replica, itself included, with `local=true` (so the
question goes no further) and the operator's own credential (each replica checks it). Every
call has a timeout and a concurrency bound; a replica that does not answer is named in the
answer (`unreachable`), never silently left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerAnswers:
    answers: list[Any]  # the JSON answers of the replicas that answered
    unreachable: list[str]  # the replicas that did not, each with why


class Peers:
    def __init__(
        self,
        *,
        dns: str | None,
        port: int,
        addresses: Sequence[str],
        timeout: float,
        max_concurrency: int = 16,
    ) -> None:
        self._dns = dns
        self._port = port
        self._addresses = list(addresses)
        self._timeout = timeout
        self._slots = asyncio.Semaphore(max_concurrency)
        self._session: aiohttp.ClientSession | None = None

    async def urls(self) -> list[str]:
        """The replicas' operator API base URLs, now."""
        found = [f"http://{address}" for address in self._addresses]
        if self._dns:
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self._timeout):
                    infos = await loop.getaddrinfo(self._dns, self._port, type=socket.SOCK_STREAM)
            except (OSError, TimeoutError) as exc:
                raise PeersUnknown(f"cannot resolve {self._dns}: {exc}") from None
            for family, _, _, _, sockaddr in infos:
                address = str(sockaddr[0])
                host = f"[{address}]" if family == socket.AF_INET6 else address
                found.append(f"http://{host}:{int(sockaddr[1])}")
        return list(dict.fromkeys(found))

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._timeout)
            )
        return self._session

    async def call(self, method: str, path: str, token: str) -> PeerAnswers:
        """The same request to every replica (path with local=true): their JSON answers."""
        urls = await self.urls()
        results = await asyncio.gather(*(self._one(method, url + path, token) for url in urls))
        answers = [r for r in results if not isinstance(r, str)]
        unreachable = [
            f"{url}: {r}" for url, r in zip(urls, results, strict=True) if isinstance(r, str)
        ]
        return PeerAnswers(answers, unreachable)

    async def _one(self, method: str, url: str, token: str) -> Any:
        try:
            headers = {"Authorization": f"Bearer {token}"}
            async with (
                asyncio.timeout(self._timeout),
                self._slots,
                self._client().request(method, url, headers=headers) as response,
            ):
                body = await response.read()
                if response.status != 200:
                    return f"HTTP {response.status}"
                return json.loads(body)
        except TimeoutError:
            return "timed out"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return type(exc).__name__

    async def stream(self, path: str, token: str) -> AsyncGenerator[dict[str, Any], None]:
        """Every replica's server-sent events (path with local=true), merged as they come. A
        replica that cannot be reached, or ends, is reported as an event with `unreachable`."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(1024)
        urls = await self.urls()
        readers = [asyncio.create_task(self._read(url, path, token, queue)) for url in urls]
        try:
            while True:
                yield await queue.get()
        finally:
            for reader in readers:
                reader.cancel()
            for reader in readers:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader
        return

    async def _read(
        self, url: str, path: str, token: str, queue: asyncio.Queue[dict[str, Any]]
    ) -> None:
        why = "ended"
        try:
            async with self._client().get(
                url + path,
                headers={"Authorization": f"Bearer {token}", "Accept": "text/event-stream"},
            ) as response:
                if response.status != 200:
                    why = f"HTTP {response.status}"
                else:
                    async for raw in response.content:
                        line = raw.decode("utf-8", "replace")
                        if line.startswith("data: "):
                            await queue.put(json.loads(line[6:]))
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            why = type(exc).__name__
        await queue.put({"unreachable": f"{url}: {why}"})

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class PeersUnknown(RuntimeError):
    pass
