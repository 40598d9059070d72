"""The Kubernetes adapter: TokenReview and SubjectAccessReview calls, bounded and timed.

Every call has a timeout and waits for one of `max_concurrency` slots (the wait counts against the
timeout). Every failure is classified once, here, into BackendUnavailable(kind=...), so the rest of
the server deals with one error type.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config

from maas_authz.identity import Identity
from maas_authz.kube_reviews import (
    MalformedReview,
    ResourceCheck,
    parse_subject_access_review,
    parse_token_review,
    subject_access_review_body,
    token_review_body,
)
from maas_authz.model_path import ModelRef
from maas_common.errors import BackendUnavailable, ConfigError
from maas_common.informer import Gone

log = logging.getLogger(__name__)
# The client logs response bodies at debug level, and a TokenReview response echoes the token.
logging.getLogger("kubernetes_asyncio").setLevel(logging.WARNING)

Observer = Callable[[str, float, str], None]  # (call, seconds, outcome: "ok" or an error kind)

TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"  # noqa: S105 - a path
SUBJECT_ACCESS_REVIEWS = "/apis/authorization.k8s.io/v1/subjectaccessreviews"


class KubernetesApi:
    def __init__(
        self,
        api_client: client.ApiClient,
        *,
        timeout: float,
        max_concurrency: int,
        observe: Observer | None = None,
    ) -> None:
        self._api = api_client
        self._timeout = timeout
        self._slots = asyncio.Semaphore(max_concurrency)
        self._observe = observe or (lambda _call, _seconds, _outcome: None)

    @classmethod
    async def connect(
        cls,
        *,
        kubeconfig: Path | None,
        context: str | None,
        call_timeout: float,
        max_concurrency: int,
        observe: Observer | None = None,
    ) -> KubernetesApi:
        """In-cluster credentials when `kubeconfig` is None, else that file (and context)."""
        configuration = client.Configuration()
        try:
            if kubeconfig is None:
                config.load_incluster_config(client_configuration=configuration)
            else:
                await config.load_kube_config(
                    config_file=str(kubeconfig),
                    context=context,
                    client_configuration=configuration,
                )
        except (config.ConfigException, OSError, ValueError, TypeError) as exc:
            key = "kubernetes.kubeconfig" if kubeconfig else "kubernetes (in-cluster)"
            source = str(kubeconfig) if kubeconfig else "service account files"
            raise ConfigError(source, key, f"cannot load Kubernetes credentials: {exc}") from None
        configuration.connection_pool_maxsize = max_concurrency
        return cls(
            client.ApiClient(configuration),
            timeout=call_timeout,
            max_concurrency=max_concurrency,
            observe=observe,
        )

    async def create(self, call: str, path: str, body: dict[str, Any]) -> Any:
        """POST a review object and return the decoded answer."""
        return await self.request(call, "POST", path, body)

    async def request(
        self,
        call: str,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        query: list[tuple[str, str]] | None = None,
    ) -> Any:
        """One API call with its timeout and concurrency slot: the decoded JSON answer of a
        2xx; BackendUnavailable for anything else (its kind says the status: http_404)."""
        started = time.perf_counter()
        outcome = "ok"
        try:
            async with asyncio.timeout(self._timeout):
                async with self._slots:
                    response = await self._api.call_api(
                        path,
                        method,
                        query_params=query or [],
                        header_params={"Content-Type": content_type, "Accept": "application/json"},
                        body=body,
                        auth_settings=["BearerToken"],
                        _preload_content=False,
                        _request_timeout=self._timeout,
                    )
                    async with response:
                        payload = await response.read()
                        status = response.status
            return _answer(call, status, payload)
        except BackendUnavailable as exc:
            outcome = exc.kind
            raise
        except TimeoutError:
            outcome = "timeout"
            raise BackendUnavailable(
                "kubernetes", outcome, f"{call} took longer than {self._timeout}s"
            ) from None
        except aiohttp.ClientError as exc:
            outcome = _client_error_kind(exc)
            raise BackendUnavailable("kubernetes", outcome, f"{call}: {exc}") from None
        except OSError as exc:  # e.g. the in-cluster token file could not be re-read
            outcome = "credentials"
            raise BackendUnavailable("kubernetes", outcome, f"{call}: {exc}") from None
        finally:
            self._observe(call, time.perf_counter() - started, outcome)

    @property
    def api_client(self) -> client.ApiClient:
        return self._api

    async def close(self) -> None:
        await self._api.close()


def _answer(call: str, status: int, payload: bytes) -> Any:
    """The decoded JSON of a 2xx answer; any other answer as BackendUnavailable."""
    if status // 100 != 2:
        raise BackendUnavailable(
            "kubernetes", f"http_{status}", f"{call} answered HTTP {status}: {_excerpt(payload)}"
        )
    try:
        return json.loads(payload)
    except ValueError:
        raise BackendUnavailable(
            "kubernetes", "bad_response", f"{call} answered non-JSON"
        ) from None


def _client_error_kind(exc: aiohttp.ClientError) -> str:
    return "connect" if isinstance(exc, aiohttp.ClientConnectionError) else "client"


def _excerpt(payload: bytes) -> str:
    # Error bodies are Status objects with a message; they never contain the reviewed token.
    try:
        message = json.loads(payload).get("message")
        if isinstance(message, str):
            return message[:200]
    except (ValueError, AttributeError):
        pass
    return payload[:200].decode("utf-8", "replace")


class TokenReviewReviewer:
    """Identity by TokenReview: the cluster decides whether a token is valid and for whom."""

    def __init__(self, api: KubernetesApi, audiences: Sequence[str]) -> None:
        self._api = api
        self._audiences = tuple(audiences)

    async def review(self, token: str) -> Identity | None:
        answer = await self._api.create(
            "tokenreview", TOKEN_REVIEWS, token_review_body(token, self._audiences)
        )
        try:
            return parse_token_review(answer, self._audiences)
        except MalformedReview as exc:
            raise BackendUnavailable("kubernetes", "bad_response", str(exc)) from None


class SubjectAccessReviewer:
    """Model access by SubjectAccessReview: RBAC decides (verb `post` on the model by default)."""

    def __init__(self, api: KubernetesApi, check: ResourceCheck) -> None:
        self._api = api
        self._check = check

    async def allowed(self, identity: Identity, model: ModelRef) -> bool:
        answer = await self._api.create(
            "subjectaccessreview",
            SUBJECT_ACCESS_REVIEWS,
            subject_access_review_body(identity, model, self._check),
        )
        try:
            return parse_subject_access_review(answer)
        except MalformedReview as exc:
            raise BackendUnavailable("kubernetes", "bad_response", str(exc)) from None


_CLOSE_WAIT = 1.0  # seconds, at most, for ended watches' connections to close (at shutdown)


class KubernetesWatchTransport:
    """List and watch over the same credentials (maas_common.informer's WatchTransport).

    The list has the call timeout; a watch asks the server to end it after `watch_seconds` and
    gives up on a connection that has sent nothing (not even a bookmark) for `idle_timeout`.
    """

    def __init__(
        self,
        api: KubernetesApi,
        *,
        list_timeout: float = 10.0,
        watch_seconds: int = 300,
        idle_timeout: float = 360.0,
        connect_timeout: float = 5.0,
    ) -> None:
        self._api = api
        self._list_timeout = list_timeout
        self._watch_seconds = watch_seconds
        self._read = aiohttp.ClientTimeout(
            sock_connect=connect_timeout, connect=connect_timeout, sock_read=idle_timeout
        )
        # connections of ended lists and watches still shutting down TLS (see wait_closed)
        self._closing: set[asyncio.Future[None]] = set()

    async def wait_closed(self) -> None:
        """Waits for the connections of ended lists and watches to finish closing. One cancelled
        at shutdown closes its connection, but TLS's close_notify exchange completes later on the
        loop: a loop stopped before that leaves the socket to the garbage collector."""
        if self._closing:
            await asyncio.wait(list(self._closing), timeout=_CLOSE_WAIT)

    async def list(self, path: str) -> Any:
        try:
            async with asyncio.timeout(self._list_timeout):
                response = await self._get(path, [], self._list_timeout)
                self._track_close(response)
                async with response:
                    payload = await response.read()
                    status = response.status
        except TimeoutError:
            raise BackendUnavailable(
                "kubernetes", "timeout", f"listing {path} took longer than {self._list_timeout}s"
            ) from None
        return _answer(f"list {path}", status, payload)

    async def watch(self, path: str, resource_version: str) -> AsyncGenerator[Any, None]:
        query = [
            ("watch", "true"),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(self._watch_seconds)),
        ]
        if resource_version:
            query.append(("resourceVersion", resource_version))
        try:
            response = await self._get(path, query, self._read)
            self._track_close(response)
            async with response:
                if response.status == 410:
                    raise Gone(f"watch {path}: HTTP 410")
                if response.status // 100 != 2:
                    _answer(f"watch {path}", response.status, await response.read())  # raises
                async for line in response.content:
                    if line.strip():
                        try:
                            yield json.loads(line)
                        except ValueError:
                            raise BackendUnavailable(
                                "kubernetes", "bad_response", f"watch {path}: a non-JSON event"
                            ) from None
        except TimeoutError:
            raise BackendUnavailable("kubernetes", "timeout", f"watch {path}: idle") from None
        except aiohttp.ClientError as exc:
            raise BackendUnavailable(
                "kubernetes", _client_error_kind(exc), f"watch {path}: {exc}"
            ) from None

    def _track_close(self, response: Any) -> None:
        connection = getattr(response, "connection", None)
        closed = getattr(getattr(connection, "protocol", None), "closed", None)
        if isinstance(closed, asyncio.Future) and not closed.done():
            self._closing.add(closed)
            closed.add_done_callback(self._closing.discard)

    async def _get(self, path: str, query: Sequence[tuple[str, str]], deadline: object) -> Any:
        try:
            return await self._api.api_client.call_api(
                path,
                "GET",
                query_params=list(query),
                header_params={"Accept": "application/json"},
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=deadline,
            )
        except aiohttp.ClientError as exc:
            raise BackendUnavailable(
                "kubernetes", _client_error_kind(exc), f"GET {path}: {exc}"
            ) from None
        except OSError as exc:
            raise BackendUnavailable("kubernetes", "credentials", f"GET {path}: {exc}") from None
