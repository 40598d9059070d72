"""Keep a local copy of one kind of Kubernetes object current, as client-go's informers do.

List, then watch from the list's resourceVersion; apply each ADDED / MODIFIED / DELETED event;
follow BOOKMARKs; on 410 Gone (the version is too old for the API server) list again; on any
other failure reconnect after a backoff (doubling up to a ceiling, reset once a watch works).
After every change the whole collection is handed to `on_change`, which rebuilds whatever it
derives from the objects (one snapshot, never a half-applied list).

`Collection` is the pure part (events in, objects out); `Informer` drives it over a
`WatchTransport`, so tests can feed it any sequence of answers and the real transport stays a
thin adapter (maas_authz.kubernetes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from maas_common.errors import BackendUnavailable

log = logging.getLogger(__name__)

Object = Mapping[str, Any]
ObjectId = tuple[str, str]  # (namespace, name)


class Gone(Exception):
    """The watch's resourceVersion is too old: list again (HTTP 410, or an ERROR event with 410)."""


class WatchTransport(Protocol):
    async def list(self, path: str) -> Object:
        """GET the collection: {"metadata": {"resourceVersion"}, "items": [...]}."""
        ...

    def watch(self, path: str, resource_version: str) -> AsyncGenerator[Object, None]:
        """The watch events from `resource_version` on, until the server ends the stream."""
        ...


def object_id(obj: Object) -> ObjectId:
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        return ("", "")
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


class Collection:
    """The objects of one kind, by (namespace, name), and the version they are current at."""

    def __init__(self) -> None:
        self._objects: dict[ObjectId, Object] = {}
        self.resource_version = ""

    @property
    def objects(self) -> list[Object]:
        return list(self._objects.values())

    def replace(self, listing: Object) -> None:
        items = listing.get("items")
        if not isinstance(items, list):
            raise BackendUnavailable("kubernetes", "bad_response", "a list without items")
        self._objects = {object_id(o): o for o in items if isinstance(o, Mapping)}
        self.resource_version = _version(listing)

    def apply(self, event: Object) -> bool:
        """Apply one watch event; True when the objects changed. Gone: list again."""
        kind, obj = event.get("type"), event.get("object")
        if not isinstance(obj, Mapping):
            raise BackendUnavailable("kubernetes", "bad_response", f"a {kind} event without object")
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone(str(obj.get("message", "resource version too old")))
            raise BackendUnavailable(
                "kubernetes", "watch_error", str(obj.get("message", obj))[:200]
            )
        version = _version(obj)
        if kind == "BOOKMARK":
            self.resource_version = version or self.resource_version
            return False
        if kind in ("ADDED", "MODIFIED"):
            self._objects[object_id(obj)] = obj
        elif kind == "DELETED":
            self._objects.pop(object_id(obj), None)
        else:
            raise BackendUnavailable("kubernetes", "bad_response", f"unknown event type {kind!r}")
        self.resource_version = version or self.resource_version
        return True


def _version(obj: Object) -> str:
    meta = obj.get("metadata")
    return str(meta.get("resourceVersion") or "") if isinstance(meta, Mapping) else ""


@dataclass(frozen=True)
class Backoff:
    first: float = 0.5
    ceiling: float = 30.0


class Informer:
    """One kind's list-and-watch loop. `run()` runs until cancelled; it never raises otherwise."""

    def __init__(
        self,
        name: str,
        path: str,
        transport: WatchTransport,
        on_change: Callable[[list[Object]], Awaitable[None] | None],
        *,
        backoff: Backoff = Backoff(),
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_error: Callable[[str, str], None] | None = None,  # (informer name, error kind)
    ) -> None:
        self.name = name
        self.path = path
        self.collection = Collection()
        self.synced = asyncio.Event()  # set after the first successful list
        self._transport = transport
        self._on_change = on_change
        self._sleep = sleep
        self._backoff = backoff
        self._on_error = on_error or (lambda _name, _kind: None)

    async def run(self) -> None:
        delay = self._backoff.first
        need_list = True
        while True:
            try:
                if need_list:
                    self.collection.replace(await self._transport.list(self.path))
                    need_list = False
                    delay = self._backoff.first
                    await self._changed()
                    self.synced.set()
                # aclosing: leaving the loop early (Gone from an ERROR event, a cancel while
                # on_change runs) must close the stream now, not when the generator is collected.
                async with contextlib.aclosing(
                    self._transport.watch(self.path, self.collection.resource_version)
                ) as events:
                    async for event in events:
                        if self.collection.apply(event):
                            await self._changed()
                        delay = self._backoff.first  # a working watch resets the backoff
                continue  # the server ended the watch (its timeout): watch again from here
            except Gone as exc:
                log.info(
                    "watch expired, listing again",
                    extra={"informer": self.name, "detail": str(exc)},
                )
                need_list = True
                continue
            except BackendUnavailable as exc:
                self._on_error(self.name, exc.kind)
                log.warning(
                    "watch failed, retrying",
                    extra={
                        "informer": self.name,
                        "kind": exc.kind,
                        "detail": exc.detail,
                        "retry_in": delay,
                    },
                )
            except Exception:  # a bug in on_change must not end the watch for good
                self._on_error(self.name, "internal")
                log.exception("informer failed, retrying", extra={"informer": self.name})
                need_list = True
            await self._sleep(delay)
            delay = min(delay * 2, self._backoff.ceiling)

    async def _changed(self) -> None:
        result = self._on_change(self.collection.objects)
        if result is not None:
            await result
