"""The subscription catalog, kept current from the cluster by one informer per kind.

Every change to any MaaSModelRef, MaaSAuthPolicy or MaaSSubscription rebuilds the whole catalog
(a few hundred objects at most: cheap, and every request sees one consistent snapshot). A broken
object is logged once per version, naming it and the field, counted through `on_problem`, and
left out; the rest keeps applying.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from maas_authz.subscriptions import (
    GROUP,
    PLURALS,
    VERSION,
    InvalidObject,
    Kind,
    SubscriptionCatalog,
)
from maas_common.informer import Informer, Object, WatchTransport

log = logging.getLogger(__name__)

KINDS: tuple[Kind, ...] = ("MaaSModelRef", "MaaSAuthPolicy", "MaaSSubscription")


def collection_path(kind: Kind) -> str:
    """All namespaces' objects of `kind`."""
    return f"/apis/{GROUP}/{VERSION}/{PLURALS[kind]}"


class SubscriptionWatch:
    def __init__(
        self,
        transport: WatchTransport,
        *,
        on_problem: Callable[[InvalidObject], None] | None = None,
        on_error: Callable[[str, str], None] | None = None,
    ) -> None:
        self.catalog, _ = SubscriptionCatalog.build([], [], [])
        self.problems: list[InvalidObject] = []
        self._objects: dict[Kind, list[Object]] = {kind: [] for kind in KINDS}
        self._reported: set[str] = set()
        self._on_problem = on_problem or (lambda _problem: None)
        self.informers = [
            Informer(kind, collection_path(kind), transport, self._updater(kind), on_error=on_error)
            for kind in KINDS
        ]

    @property
    def synced(self) -> bool:
        """Every kind listed at least once (before that, the catalog is incomplete)."""
        return all(informer.synced.is_set() for informer in self.informers)

    async def wait_synced(self) -> None:
        await asyncio.gather(*(informer.synced.wait() for informer in self.informers))

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for informer in self.informers:
                group.create_task(informer.run(), name=f"informer:{informer.name}")

    def _updater(self, kind: Kind) -> Callable[[list[Object]], None]:
        def update(objects: list[Object]) -> None:
            self._objects[kind] = objects
            self._rebuild()

        return update

    def _rebuild(self) -> None:
        catalog, problems = SubscriptionCatalog.build(
            self._objects["MaaSModelRef"],
            self._objects["MaaSAuthPolicy"],
            self._objects["MaaSSubscription"],
        )
        self.catalog, self.problems = catalog, problems
        for problem in problems:
            text = f"{problem} (version {_version_of(problem, self._objects)})"
            if text not in self._reported:
                self._reported.add(text)
                self._on_problem(problem)
                log.warning(
                    "object skipped", extra={"object": str(problem.key), "problem": str(problem)}
                )


def _version_of(problem: InvalidObject, objects: Mapping[Kind, list[Object]]) -> Any:
    key = problem.key
    if isinstance(key, str):
        return "?"
    for obj in objects[key.kind]:
        meta = obj.get("metadata") or {}
        if meta.get("namespace") == key.namespace and meta.get("name") == key.name:
            return meta.get("resourceVersion", "?")
    return "?"
