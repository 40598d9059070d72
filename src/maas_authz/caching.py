"""Caching in front of the reviewers: one TtlCache each, keyed without ever storing a token."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from maas_authz.access import AccessReviewer
from maas_authz.api_keys import KeyIdentity, KeyValidator, Rejection
from maas_authz.credentials import jwt_expiry, token_digest
from maas_authz.identity import Identity, TokenReviewer
from maas_authz.model_path import ModelRef
from maas_common.cache import CacheEvent, TtlCache
from maas_common.clock import Clock
from maas_common.errors import BackendUnavailable

AccessKey = tuple[str, str, tuple[str, ...], str, str]


class CachedTokenReviewer:
    """Identities by SHA-256 of the token. A positive entry never outlives the token's `exp`."""

    def __init__(
        self,
        inner: TokenReviewer,
        *,
        ttl: float,
        negative_ttl: float,
        max_entries: int,
        clock: Clock,
        on_event: Callable[[CacheEvent], None] | None = None,
    ) -> None:
        self._inner = inner
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._clock = clock
        self.cache: TtlCache[bytes, Identity | None] = TtlCache(
            max_entries=max_entries, clock=clock, on_event=on_event
        )

    async def review(self, token: str) -> Identity | None:
        key = token_digest(token)
        return await self.cache.get_or_load(key, self._load, token)

    async def _load(self, token: str) -> tuple[Identity | None, float]:
        identity = await self._inner.review(token)
        if identity is None:
            return None, self._negative_ttl
        ttl = self._ttl
        expiry = jwt_expiry(token)
        if expiry is not None:
            ttl = min(ttl, expiry - self._clock.wall())
        return identity, ttl

    def forget_user(self, username: str) -> int:
        return self.cache.invalidate(lambda _k, v: v is not None and v.username == username)


class CachedAccessReviewer:
    """Access decisions by (user, uid, groups, namespace, model); denials for a shorter time."""

    def __init__(
        self,
        inner: AccessReviewer,
        *,
        ttl: float,
        negative_ttl: float,
        max_entries: int,
        clock: Clock,
        on_event: Callable[[CacheEvent], None] | None = None,
    ) -> None:
        self._inner = inner
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self.cache: TtlCache[AccessKey, bool] = TtlCache(
            max_entries=max_entries, clock=clock, on_event=on_event
        )

    async def allowed(self, identity: Identity, model: ModelRef) -> bool:
        key = (identity.username, identity.uid, identity.groups, model.namespace, model.name)
        return await self.cache.get_or_load(key, self._load, identity, model)

    async def _load(self, identity: Identity, model: ModelRef) -> tuple[bool, float]:
        allowed = await self._inner.allowed(identity, model)
        return allowed, self._ttl if allowed else self._negative_ttl

    def forget_user(self, username: str) -> int:
        return self.cache.invalidate(lambda k, _v: k[0] == username)


class CachedKeyValidator:
    """sk-oai- verdicts by SHA-256 of the key, briefly: `ttl` bounds how long a key revoked in
    the database keeps working (upstream's bound is 2 s). A refusal is kept `negative_ttl`.

    When the lookup fails (database or maas-api down), a key that was valid within the last
    `stale_if_error` seconds keeps working, as the failure modes promise, never past its expiry;
    a key not seen in that time gets the failure (503).
    """

    def __init__(
        self,
        inner: KeyValidator,
        *,
        ttl: float,
        negative_ttl: float,
        stale_if_error: float,
        max_entries: int,
        clock: Clock,
        on_event: Callable[[CacheEvent], None] | None = None,
        on_stale: Callable[[], None] = lambda: None,
    ) -> None:
        self._inner = inner
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._stale_if_error = stale_if_error
        self._max_entries = max_entries
        self._clock = clock
        self._on_stale = on_stale
        self.cache: TtlCache[bytes, KeyIdentity | Rejection] = TtlCache(
            max_entries=max_entries, clock=clock, on_event=on_event
        )
        # key hash -> (when it was last found valid, monotonic; the verdict)
        self._last_good: OrderedDict[bytes, tuple[float, KeyIdentity]] = OrderedDict()

    async def verify(self, token: str) -> KeyIdentity | Rejection:
        key = token_digest(token)
        try:
            return await self.cache.get_or_load(key, self._load, token, key)
        except BackendUnavailable:
            kept = self._last_good.get(key)
            if kept is None or self._clock.monotonic() - kept[0] > self._stale_if_error:
                raise
            verdict = kept[1]
            if (
                verdict.expires_at is not None
                and verdict.expires_at.timestamp() <= self._clock.wall()
            ):
                raise
            self._on_stale()
            return verdict

    async def _load(self, token: str, key: bytes) -> tuple[KeyIdentity | Rejection, float]:
        verdict = await self._inner.verify(token)
        if isinstance(verdict, str):
            self._last_good.pop(key, None)
            return verdict, self._negative_ttl
        ttl = self._ttl
        if verdict.expires_at is not None:
            ttl = min(ttl, verdict.expires_at.timestamp() - self._clock.wall())
        self._last_good[key] = (self._clock.monotonic(), verdict)
        self._last_good.move_to_end(key)
        while len(self._last_good) > self._max_entries:
            self._last_good.popitem(last=False)
        return verdict, ttl

    def forget_user(self, username: str) -> int:
        for key in [k for k, (_, v) in self._last_good.items() if v.username == username]:
            del self._last_good[key]
        return self.cache.invalidate(
            lambda _k, v: not isinstance(v, str) and v.username == username
        )

    def clear(self) -> int:
        self._last_good.clear()
        return self.cache.clear()
