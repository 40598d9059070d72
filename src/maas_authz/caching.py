"""Caching in front of the reviewers: one TtlCache each, keyed without ever storing a token."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from maas_authz.access import AccessReviewer
from maas_authz.credentials import jwt_expiry
from maas_authz.identity import Identity, TokenReviewer
from maas_authz.model_path import ModelRef
from maas_common.cache import CacheEvent, TtlCache
from maas_common.clock import Clock

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
        key = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
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
