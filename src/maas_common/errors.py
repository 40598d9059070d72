"""The exception tree shared by both servers."""

from __future__ import annotations


class MaasError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(MaasError):
    """A configuration file or flag is unusable. The message names file, key and expectation."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {problem}")


class BackendUnavailable(MaasError):
    """An external dependency (Kubernetes API, Redis) did not answer usefully in time.

    `kind` is a short, label-safe classification such as "timeout", "connect" or "http_500".
    """

    def __init__(self, backend: str, kind: str, detail: str) -> None:
        self.backend = backend
        self.kind = kind
        self.detail = detail
        super().__init__(f"{backend} unavailable ({kind}): {detail}")
