"""Policy edits from the operator API: validated first, then applied through the source of truth.

Two parts can be edited, each where it really lives:
- tiers: the tier-to-group-mapping document: the watched file (`make demo`), or, with
  tiers.configmap set, that ConfigMap's key (a merge patch; the mounted file follows it);
- subscriptions: the MaaSModelRef / MaaSAuthPolicy / MaaSSubscription documents: the watched file,
  or, in a cluster, the objects themselves (server-side apply of each document named; objects
  the text leaves out are left as they are, never deleted).

Every edit is parsed by the same parser the server loads with (a bad one is refused with the
parser's message: document, key, expectation) and, on Kubernetes, also dry-run by the API server
first. A dry run answers the unified diff and applies nothing.
"""

from __future__ import annotations

import asyncio
import difflib
import os
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from maas_authz.kubernetes import KubernetesApi
from maas_authz.subscriptions import GROUP, PLURALS, VERSION
from maas_common.errors import BackendUnavailable, ConfigError
from maas_common.reload import WatchedFile

MAX_DOCUMENT = 1024 * 1024
FIELD_MANAGER = "maas-admin"


class PolicyStore(Protocol):
    """Where one part of the policy lives. Raises BackendUnavailable when that cannot answer."""

    source: str  # says where, for the operator

    async def read(self) -> str: ...

    async def dry_run(self, text: str) -> None:
        """Lets the source of truth check `text` too (the API server's schema); raises
        ConfigError when it refuses."""
        ...

    async def write(self, text: str) -> None: ...


class FileStore:
    """A watched file: written whole and atomically (a rename), then reloaded at once."""

    def __init__(self, path: Path, watched: WatchedFile[Any] | None) -> None:
        self.path = path
        self.source = f"file {path}"
        self._watched = watched

    async def read(self) -> str:
        return await asyncio.to_thread(self.path.read_text)

    async def dry_run(self, text: str) -> None:
        return None

    async def write(self, text: str) -> None:
        await asyncio.to_thread(_write_atomically, self.path, text)
        if self._watched is not None:
            await self._watched.reload_if_changed()  # in force now, not at the next poll


def _write_atomically(path: Path, text: str) -> None:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.chmod(temporary, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class ConfigMapStore:
    """One key of a ConfigMap (the platform's tier-to-group-mapping), by merge patch."""

    def __init__(self, api: KubernetesApi, namespace: str, name: str, key: str) -> None:
        self._api = api
        self._path = f"/api/v1/namespaces/{namespace}/configmaps/{name}"
        self._key = key
        self.source = f"ConfigMap {namespace}/{name}, key {key}"

    async def read(self) -> str:
        answer = await self._api.request("configmap", "GET", self._path)
        text = (answer.get("data") or {}).get(self._key, "")
        return text if isinstance(text, str) else ""

    async def dry_run(self, text: str) -> None:
        await self._patch(text, dry_run=True)

    async def write(self, text: str) -> None:
        await self._patch(text, dry_run=False)

    async def _patch(self, text: str, *, dry_run: bool) -> None:
        await _checked(
            self._api.request(
                "configmap",
                "PATCH",
                self._path,
                {"data": {self._key: text}},
                content_type="application/merge-patch+json",
                query=[("fieldManager", FIELD_MANAGER), *([("dryRun", "All")] if dry_run else [])],
            )
        )


class ObjectsStore:
    """The subscription objects in the cluster: read as YAML documents; written by server-side
    apply, one object per document (the ones the text names)."""

    source = "the cluster's maas.opendatahub.io objects (server-side apply)"

    def __init__(self, api: KubernetesApi) -> None:
        self._api = api

    async def read(self) -> str:
        documents: list[dict[str, Any]] = []
        for kind, plural in PLURALS.items():
            listed = await self._api.request(kind, "GET", f"/apis/{GROUP}/{VERSION}/{plural}")
            for item in listed.get("items", []):
                documents.append(_as_applied(kind, item))
        return yaml.safe_dump_all(documents, sort_keys=False) if documents else ""

    async def dry_run(self, text: str) -> None:
        await self._apply(text, dry_run=True)

    async def write(self, text: str) -> None:
        await self._apply(text, dry_run=False)

    async def _apply(self, text: str, *, dry_run: bool) -> None:
        for document in _documents(text):
            metadata = document.get("metadata") or {}
            kind = document["kind"]
            path = (
                f"/apis/{GROUP}/{VERSION}/namespaces/{metadata.get('namespace', 'default')}/"
                f"{PLURALS[kind]}/{metadata['name']}"
            )
            await _checked(
                self._api.request(
                    kind,
                    "PATCH",
                    path,
                    document,  # JSON is YAML: what apply-patch+yaml reads
                    content_type="application/apply-patch+yaml",
                    query=[
                        ("fieldManager", FIELD_MANAGER),
                        ("force", "true"),
                        *([("dryRun", "All")] if dry_run else []),
                    ],
                )
            )


def _as_applied(kind: str, item: dict[str, Any]) -> dict[str, Any]:
    """An object as it would be written to apply it again: no status, no server fields."""
    metadata = item.get("metadata") or {}
    kept = {k: metadata[k] for k in ("name", "namespace", "labels", "annotations") if k in metadata}
    annotations = kept.get("annotations")
    if isinstance(annotations, dict):
        annotations.pop("kubectl.kubernetes.io/last-applied-configuration", None)
        if not annotations:
            kept.pop("annotations")
    return {
        "apiVersion": item.get("apiVersion", f"{GROUP}/{VERSION}"),
        "kind": kind,
        "metadata": kept,
        "spec": item.get("spec", {}),
    }


def _documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]


@dataclass
class EditablePart:
    name: str
    store: PolicyStore
    validate: Callable[[str, str], object]  # the server's own parser; raises ConfigError


@dataclass(frozen=True)
class EditResult:
    part: str
    source: str
    dry_run: bool
    changed: bool
    diff: str
    applied: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "part": self.part,
            "source": self.source,
            "dry_run": self.dry_run,
            "changed": self.changed,
            "diff": self.diff,
            "applied": self.applied,
        }


class PolicyEditor:
    def __init__(self, parts: list[EditablePart]) -> None:
        self._parts = {part.name: part for part in parts}
        self._lock = asyncio.Lock()  # one edit at a time: read, compare, write

    @property
    def parts(self) -> list[str]:
        return list(self._parts)

    def part(self, name: str) -> EditablePart | None:
        return self._parts.get(name)

    async def read(self, name: str) -> dict[str, str]:
        part = self._part(name)
        return {"part": name, "source": part.store.source, "document": await part.store.read()}

    async def edit(self, name: str, text: str, *, dry_run: bool) -> EditResult:
        """Raises ConfigError (the edit is refused; nothing was applied) or BackendUnavailable."""
        part = self._part(name)
        if len(text.encode()) > MAX_DOCUMENT:
            raise ConfigError("(the edit)", "", f"is over {MAX_DOCUMENT} bytes")
        await asyncio.to_thread(part.validate, text, f"the edit of {name}")
        async with self._lock:
            current = await part.store.read()
            diff = "".join(
                difflib.unified_diff(
                    current.splitlines(keepends=True),
                    _ending_in_newline(text).splitlines(keepends=True),
                    fromfile=f"{name} ({part.store.source})",
                    tofile=f"{name} (proposed)",
                )
            )
            changed = bool(diff)
            await part.store.dry_run(text)
            if not dry_run and changed:
                await part.store.write(text)
        return EditResult(name, part.store.source, dry_run, changed, diff, not dry_run and changed)

    def _part(self, name: str) -> EditablePart:
        part = self._parts.get(name)
        if part is None:
            raise KeyError(name)
        return part


def _ending_in_newline(text: str) -> str:
    return text if text.endswith("\n") or not text else text + "\n"


async def _checked(call: Awaitable[Any]) -> None:
    """An API call whose refusal (a 4xx: invalid, conflicting, forbidden) is the edit's fault,
    reported as a ConfigError with the API server's message; anything else stays a backend
    failure."""
    try:
        await call
    except BackendUnavailable as exc:
        if exc.kind in ("http_400", "http_403", "http_404", "http_409", "http_422"):
            raise ConfigError("the API server", "", f"refused the edit: {exc}") from None
        raise
