"""Which model a request is for, read from its path, and which paths need no model.

Everything here is decided before any Kubernetes call: a path that could smuggle another model
past the check (dot segments, encoded slashes, empty segments) or that names no valid Kubernetes
object is refused outright.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_ENCODED_SEPARATOR = re.compile(r"%(2f|5c)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class ModelRef:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class OpenPath:
    """A path that names no model but is served anyway (after authentication unless told not)."""

    path: str
    match: Literal["exact", "prefix"] = "exact"
    authenticate: bool = True

    def matches(self, path: str) -> bool:
        if self.match == "exact":
            return path.rstrip("/") == self.path.rstrip("/")
        # whole segments only: prefix /docs matches /docs and /docs/x, not /docsx
        prefix = self.path.rstrip("/")
        return path == prefix or path.startswith(prefix + "/")


@dataclass(frozen=True, slots=True)
class BodyRoute:
    """An OpenAI-style path (/v1/chat/completions) whose model is the JSON body's `model`."""

    path: str


@dataclass(frozen=True, slots=True)
class BadPath:
    status: Literal[400, 404]
    code: str
    message: str


def is_namespace_name(value: str) -> bool:
    return len(value) <= 63 and bool(_DNS_LABEL.match(value))


def is_object_name(value: str) -> bool:
    return len(value) <= 253 and bool(_DNS_SUBDOMAIN.match(value))


class PathTemplate:
    """A template such as `/{namespace}/{model}` matched against the leading path segments.

    Literal segments must match exactly; `{namespace}` may be left out when a default namespace is
    configured. Whatever follows the matched segments (`/v1/chat/completions`) is not examined.
    """

    def __init__(self, template: str, default_namespace: str | None = None) -> None:
        if not template.startswith("/"):
            raise ValueError("must start with '/'")
        parts = [p for p in template.strip("/").split("/")]
        if "{model}" not in parts:
            raise ValueError("must contain the segment {model}")
        if parts.count("{model}") > 1 or parts.count("{namespace}") > 1:
            raise ValueError("may name {model} and {namespace} once each")
        if "{namespace}" not in parts and default_namespace is None:
            raise ValueError("needs a {namespace} segment or models.default_namespace")
        for part in parts:
            if part not in ("{model}", "{namespace}") and ("{" in part or not part):
                raise ValueError(
                    f"segment {part!r} is neither a literal nor {{model}}/{{namespace}}"
                )
        self.template = template
        self._parts = parts
        self._default_namespace = default_namespace

    def match(self, segments: list[str]) -> ModelRef | BadPath | None:
        if len(segments) < len(self._parts):
            return None
        namespace, name = self._default_namespace, None
        for part, segment in zip(self._parts, segments, strict=False):
            if part == "{namespace}":
                namespace = segment
            elif part == "{model}":
                name = segment
            elif part != segment:
                return None
        assert namespace is not None and name is not None
        if not is_namespace_name(namespace):
            return BadPath(
                400, "invalid_model_path", f"{_show(namespace)} is not a valid namespace name"
            )
        if not is_object_name(name):
            return BadPath(400, "invalid_model_path", f"{_show(name)} is not a valid model name")
        return ModelRef(namespace, name)


def _show(segment: str) -> str:
    """A path segment made safe to quote back to the client."""
    shown = segment if len(segment) <= 64 else segment[:61] + "..."
    return ascii(shown)


@dataclass(frozen=True, slots=True)
class PathRouting:
    template: PathTemplate
    open_paths: tuple[OpenPath, ...] = ()
    body_routes: frozenset[str] = frozenset()

    def classify(self, raw_path: str) -> ModelRef | OpenPath | BodyRoute | BadPath:
        path = raw_path.split("?", 1)[0].split("#", 1)[0]
        if not path.startswith("/"):
            return BadPath(400, "invalid_path", "the request path must start with '/'")
        if _ENCODED_SEPARATOR.search(path) or "\\" in path:
            return BadPath(
                400,
                "invalid_path",
                "the request path must not contain encoded slashes or backslashes",
            )
        segments = path[1:].split("/")
        if segments[-1] == "":
            segments.pop()  # one trailing slash is harmless; "/" has no segments at all
        for segment in segments:
            if segment == "":
                return BadPath(400, "invalid_path", "the request path has an empty segment ('//')")
            if unquote(segment) in (".", ".."):
                return BadPath(400, "invalid_path", "the request path must not contain '.' or '..'")
        if self.body_routes and (path.rstrip("/") or "/") in self.body_routes:
            return BodyRoute(path)
        for open_path in self.open_paths:
            if open_path.matches(path):
                return open_path
        found = self.template.match(segments)
        if found is None:
            return BadPath(
                404,
                "model_not_found",
                f"the path names no model (expected {self.template.template}/...)",
            )
        return found
