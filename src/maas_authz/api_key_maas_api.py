"""maas-api's own validator over HTTP, for clusters whose database the gateway cannot reach:
`POST /internal/v1/api-keys/validate` with `{"key": ...}`, answered (200) with
`{"valid", "username", "keyId", "keyName", "groups", "subscription", "reason"}`, the call
Authorino makes in upstream MaaS. Bounded: `max_concurrency` calls at once, each within
`timeout`; anything but a well-formed 200 is BackendUnavailable, never a verdict.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, get_args

import aiohttp

from maas_authz.api_keys import KeyIdentity, Rejection
from maas_common.errors import BackendUnavailable

VALIDATE_PATH = "/internal/v1/api-keys/validate"
_REASONS: frozenset[str] = frozenset(get_args(Rejection))


class MaasApiKeyValidator:
    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 0.5,
        max_concurrency: int = 32,
        observe: Callable[[float, str], None] = lambda _seconds, _outcome: None,
    ) -> None:
        self._url = base_url.rstrip("/") + VALIDATE_PATH
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._slots = asyncio.Semaphore(max_concurrency)
        self._seconds = timeout
        self._observe = observe
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=0),  # the semaphore bounds it
                raise_for_status=False,
            )
        return self._session

    async def verify(self, token: str) -> KeyIdentity | Rejection:
        started = asyncio.get_running_loop().time()
        outcome = "error"
        try:
            async with (
                asyncio.timeout(self._seconds),
                self._slots,
                self._client().post(self._url, json={"key": token}) as answer,
            ):
                body = await answer.read()
                status = answer.status
            outcome = f"http_{status}"
        except TimeoutError:
            outcome = "timeout"
            raise BackendUnavailable(
                "maas-api", "timeout", f"key validation took longer than {self._seconds}s"
            ) from None
        except aiohttp.ClientError as exc:
            outcome = "connect"
            raise BackendUnavailable("maas-api", "connect", f"key validation: {exc}") from None
        finally:
            self._observe(asyncio.get_running_loop().time() - started, outcome)
        if status != 200:
            raise BackendUnavailable(
                "maas-api", f"http_{status}", f"key validation answered HTTP {status}"
            )
        return _verdict(body)

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


def _verdict(body: bytes) -> KeyIdentity | Rejection:
    try:
        answer: Any = json.loads(body)
    except ValueError:
        raise BackendUnavailable("maas-api", "bad_response", "a non-JSON answer") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("valid"), bool):
        raise BackendUnavailable("maas-api", "bad_response", "an answer without `valid`")
    if not answer["valid"]:
        reason = answer.get("reason")
        # maas-api's reasons as they are; anything else reads as "not found" (fail closed)
        return reason if isinstance(reason, str) and reason in _REASONS else "key not found"  # type: ignore[return-value]
    username, subscription = answer.get("username"), answer.get("subscription")
    groups = answer.get("groups") or []
    if not isinstance(username, str) or not username:
        raise BackendUnavailable("maas-api", "bad_response", "a valid key without username")
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise BackendUnavailable("maas-api", "bad_response", "groups is not a list of strings")
    if not isinstance(subscription, str) or not subscription.strip():
        return "key has no subscription bound"  # fail closed, as maas-api's Authorino rules do
    return KeyIdentity(
        key_id=str(answer.get("keyId") or ""),
        key_name=str(answer.get("keyName") or ""),
        username=username,
        groups=tuple(groups),
        subscription=subscription.strip(),
    )
