"""In-process fakes behind maas-authz's review seams (identity.TokenReviewer,
access.AccessReviewer): one set for every unit test that needs them."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable

from maas_authz.identity import Identity
from maas_authz.model_path import ModelRef


class FakeTokenReviewer:
    """Tokens -> identities from a dict; counts calls (per token too); can be held open with
    `gate` (`started` says a review began) or made to fail with `error`."""

    def __init__(self, identities: dict[str, Identity]) -> None:
        self.identities = identities
        self.calls = 0
        self.calls_by_token: Counter[str] = Counter()
        self.started = asyncio.Event()
        self.gate: asyncio.Event | None = None
        self.error: Exception | None = None

    async def review(self, token: str) -> Identity | None:
        self.calls += 1
        self.calls_by_token[token] += 1
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return self.identities.get(token)


class FakeAccessReviewer:
    """Allows the (username, model) pairs it is given; counts calls; can be made to fail."""

    def __init__(self, grants: Iterable[tuple[str, ModelRef]]) -> None:
        self.grants = set(grants)
        self.calls = 0
        self.error: Exception | None = None

    async def allowed(self, identity: Identity, model: ModelRef) -> bool:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return (identity.username, model) in self.grants
