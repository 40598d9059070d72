"""The caches in front of the reviewers: TTLs on a manual clock, coalescing, purging, hashing."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections import Counter

import pytest

from maas_authz.caching import CachedAccessReviewer, CachedTokenReviewer
from maas_authz.identity import Identity
from maas_authz.model_path import ModelRef
from maas_common.cache import CacheEvent
from maas_common.clock import ManualClock
from maas_common.errors import BackendUnavailable
from tests.support.fakes import FakeAccessReviewer, FakeTokenReviewer

ALICE = Identity("system:serviceaccount:maas-default-gateway-tier-free:alice", "uid-a", ("g1",))
BOB = Identity("bob", "uid-b", ("g2",))
TINY = ModelRef("llm", "tiny")
OTHER = ModelRef("llm", "other")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt_with_exp(exp: float, subject: str = "alice") -> str:
    header = b64url(json.dumps({"alg": "RS256", "kid": "k"}).encode())
    payload = b64url(json.dumps({"sub": subject, "exp": exp}).encode())
    return f"{header}.{payload}.c2lnbmF0dXJl"


def unavailable() -> BackendUnavailable:
    return BackendUnavailable("kubernetes", "timeout", "tokenreview took longer than 0.4s")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def token_cache(
    inner: FakeTokenReviewer,
    clock: ManualClock,
    *,
    ttl: float = 600,
    negative_ttl: float = 10,
    max_entries: int = 1000,
    events: list[CacheEvent] | None = None,
) -> CachedTokenReviewer:
    return CachedTokenReviewer(
        inner,
        ttl=ttl,
        negative_ttl=negative_ttl,
        max_entries=max_entries,
        clock=clock,
        on_event=events.append if events is not None else None,
    )


def access_cache(
    inner: FakeAccessReviewer, clock: ManualClock, *, ttl: float = 60, negative_ttl: float = 5
) -> CachedAccessReviewer:
    return CachedAccessReviewer(
        inner, ttl=ttl, negative_ttl=negative_ttl, max_entries=1000, clock=clock
    )


# --- identities ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_second_lookup_is_a_hit(clock: ManualClock) -> None:
    inner = FakeTokenReviewer({"tok-a": ALICE})
    events: list[CacheEvent] = []
    cached = token_cache(inner, clock, events=events)
    assert await cached.review("tok-a") == ALICE
    assert await cached.review("tok-a") == ALICE
    assert inner.calls == 1
    assert events == ["miss", "hit"]


@pytest.mark.asyncio
async def test_different_tokens_are_different_entries(clock: ManualClock) -> None:
    inner = FakeTokenReviewer({"tok-a": ALICE, "tok-b": BOB})
    cached = token_cache(inner, clock)
    assert await cached.review("tok-a") == ALICE
    assert await cached.review("tok-b") == BOB
    assert await cached.review("tok-a") == ALICE
    assert inner.calls_by_token == {"tok-a": 1, "tok-b": 1}


@pytest.mark.asyncio
async def test_entry_expires_after_the_ttl(clock: ManualClock) -> None:
    inner = FakeTokenReviewer({"tok-a": ALICE})
    events: list[CacheEvent] = []
    cached = token_cache(inner, clock, ttl=600, events=events)
    await cached.review("tok-a")
    clock.advance(599.9)
    assert await cached.review("tok-a") == ALICE
    assert inner.calls == 1
    clock.advance(0.1)
    assert await cached.review("tok-a") == ALICE
    assert inner.calls == 2
    assert events == ["miss", "hit", "expired", "miss"]


@pytest.mark.asyncio
async def test_a_revoked_token_is_seen_after_the_ttl(clock: ManualClock) -> None:
    inner = FakeTokenReviewer({"tok-a": ALICE})
    cached = token_cache(inner, clock, ttl=600)
    assert await cached.review("tok-a") == ALICE
    del inner.identities["tok-a"]  # maas-api recreated the ServiceAccount
    assert await cached.review("tok-a") == ALICE  # still cached
    clock.advance(600)
    assert await cached.review("tok-a") is None


@pytest.mark.asyncio
async def test_jwt_exp_caps_the_entry(clock: ManualClock) -> None:
    token = jwt_with_exp(clock.wall() + 30)
    inner = FakeTokenReviewer({token: ALICE})
    cached = token_cache(inner, clock, ttl=600)
    assert await cached.review(token) == ALICE
    clock.advance(29.5)
    assert await cached.review(token) == ALICE
    assert inner.calls == 1
    clock.advance(0.5)  # the token's exp: the entry must be gone even though ttl is 600
    del inner.identities[token]  # and the API server now says the token has expired
    assert await cached.review(token) is None
    assert inner.calls == 2


@pytest.mark.asyncio
async def test_ttl_caps_a_jwt_that_lives_longer(clock: ManualClock) -> None:
    token = jwt_with_exp(clock.wall() + 4 * 3600)
    inner = FakeTokenReviewer({token: ALICE})
    cached = token_cache(inner, clock, ttl=600)
    await cached.review(token)
    clock.advance(599)
    await cached.review(token)
    assert inner.calls == 1
    clock.advance(1)
    await cached.review(token)
    assert inner.calls == 2


@pytest.mark.asyncio
@pytest.mark.parametrize("seconds_past", [0, 1, 3600])
async def test_already_expired_jwt_is_not_cached(clock: ManualClock, seconds_past: float) -> None:
    # the API server may still accept it for a moment (clock skew); the cache must not keep it
    token = jwt_with_exp(clock.wall() - seconds_past)
    inner = FakeTokenReviewer({token: ALICE})
    cached = token_cache(inner, clock, ttl=600)
    assert await cached.review(token) == ALICE
    assert await cached.review(token) == ALICE
    assert inner.calls == 2
    assert len(cached.cache) == 0


@pytest.mark.asyncio
async def test_negative_results_are_cached_for_negative_ttl_only(clock: ManualClock) -> None:
    inner = FakeTokenReviewer({})
    cached = token_cache(inner, clock, ttl=600, negative_ttl=10)
    assert await cached.review("bad") is None
    clock.advance(9.9)
    assert await cached.review("bad") is None
    assert inner.calls == 1
    clock.advance(0.1)
    assert await cached.review("bad") is None
    assert inner.calls == 2


@pytest.mark.asyncio
async def test_a_token_that_becomes_valid_is_seen_after_negative_ttl(clock: ManualClock) -> None:
    inner = FakeTokenReviewer({})
    cached = token_cache(inner, clock, negative_ttl=10)
    assert await cached.review("tok-a") is None
    inner.identities["tok-a"] = ALICE
    assert await cached.review("tok-a") is None
    clock.advance(10)
    assert await cached.review("tok-a") == ALICE


@pytest.mark.asyncio
async def test_negative_ttl_zero_caches_nothing(clock: ManualClock) -> None:
    inner = FakeTokenReviewer({})
    cached = token_cache(inner, clock, negative_ttl=0)
    await cached.review("bad")
    await cached.review("bad")
    assert inner.calls == 2


@pytest.mark.asyncio
async def test_concurrent_reviews_of_a_new_token_share_one_call(clock: ManualClock) -> None:
    inner = FakeTokenReviewer({"tok-a": ALICE})
    inner.gate = asyncio.Event()
    events: list[CacheEvent] = []
    cached = token_cache(inner, clock, events=events)

    everyone = asyncio.gather(*(cached.review("tok-a") for _ in range(100)))
    await inner.started.wait()
    assert inner.calls == 1
    inner.gate.set()
    results = await everyone

    assert results == [ALICE] * 100
    assert inner.calls == 1
    assert Counter(events) == {"miss": 1, "coalesced": 99}
    assert await cached.review("tok-a") == ALICE
    assert inner.calls == 1


@pytest.mark.asyncio
async def test_a_cancelled_first_caller_does_not_cancel_the_shared_review(
    clock: ManualClock,
) -> None:
    inner = FakeTokenReviewer({"tok-a": ALICE})
    inner.gate = asyncio.Event()
    cached = token_cache(inner, clock)
    first = asyncio.ensure_future(cached.review("tok-a"))
    second = asyncio.ensure_future(cached.review("tok-a"))
    await inner.started.wait()
    first.cancel()
    inner.gate.set()
    assert await second == ALICE
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await cached.review("tok-a") == ALICE
    assert inner.calls == 1


@pytest.mark.asyncio
async def test_backend_unavailable_is_not_cached(clock: ManualClock) -> None:
    inner = FakeTokenReviewer({"tok-a": ALICE})
    inner.error = unavailable()
    cached = token_cache(inner, clock)
    with pytest.raises(BackendUnavailable):
        await cached.review("tok-a")
    assert len(cached.cache) == 0
    inner.error = None
    assert await cached.review("tok-a") == ALICE  # no clock movement needed
    assert inner.calls == 2


@pytest.mark.asyncio
async def test_backend_unavailable_reaches_every_coalesced_caller_once(
    clock: ManualClock,
) -> None:
    inner = FakeTokenReviewer({"tok-a": ALICE})
    inner.gate = asyncio.Event()
    inner.error = unavailable()
    cached = token_cache(inner, clock)
    everyone = asyncio.gather(*(cached.review("tok-a") for _ in range(10)), return_exceptions=True)
    await inner.started.wait()
    inner.gate.set()
    results = await everyone
    assert all(isinstance(r, BackendUnavailable) for r in results)
    assert inner.calls == 1
    inner.error = None
    assert await cached.review("tok-a") == ALICE
    assert inner.calls == 2


@pytest.mark.asyncio
async def test_forget_user_drops_only_that_users_entries(clock: ManualClock) -> None:
    inner = FakeTokenReviewer({"tok-a1": ALICE, "tok-a2": ALICE, "tok-b": BOB})
    cached = token_cache(inner, clock)
    for token in ("tok-a1", "tok-a2", "tok-b", "unknown"):
        await cached.review(token)
    assert inner.calls == 4

    assert cached.forget_user(ALICE.username) == 2
    assert len(cached.cache) == 2  # bob and the negative entry stay

    await cached.review("tok-b")
    await cached.review("unknown")
    assert inner.calls == 4
    await cached.review("tok-a1")
    await cached.review("tok-a2")
    assert inner.calls_by_token == {"tok-a1": 2, "tok-a2": 2, "tok-b": 1, "unknown": 1}


@pytest.mark.asyncio
async def test_forget_user_matches_the_username_not_the_userid(clock: ManualClock) -> None:
    inner = FakeTokenReviewer({"tok-a": ALICE})
    cached = token_cache(inner, clock)
    await cached.review("tok-a")
    assert cached.forget_user("alice") == 0
    assert cached.forget_user("nobody") == 0
    assert cached.forget_user(ALICE.username) == 1


@pytest.mark.asyncio
async def test_the_cache_never_holds_the_raw_token(clock: ManualClock) -> None:
    tokens = ["tok-a-" + "x" * 40, jwt_with_exp(clock.wall() + 300), "never-valid-token"]
    inner = FakeTokenReviewer({tokens[0]: ALICE, tokens[1]: BOB})
    cached = token_cache(inner, clock)
    for token in tokens:
        await cached.review(token)

    keys = list(cached.cache._entries)
    assert len(keys) == 3
    assert sorted(keys) == sorted(hashlib.sha256(t.encode()).digest() for t in tokens)
    for key in keys:
        assert isinstance(key, bytes)
        assert len(key) == 32
    dump = repr(cached.cache._entries)
    for token in tokens:
        assert token not in dump
        assert token.encode() not in keys


@pytest.mark.asyncio
async def test_least_recently_used_entry_is_evicted(clock: ManualClock) -> None:
    inner = FakeTokenReviewer({"a": ALICE, "b": BOB, "c": BOB})
    events: list[CacheEvent] = []
    cached = token_cache(inner, clock, max_entries=2, events=events)
    await cached.review("a")
    await cached.review("b")
    await cached.review("a")  # "b" is now the least recently used
    await cached.review("c")
    assert "evicted" in events
    await cached.review("a")
    assert inner.calls_by_token["a"] == 1
    await cached.review("b")
    assert inner.calls_by_token["b"] == 2


# --- access decisions ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_access_second_lookup_is_a_hit(clock: ManualClock) -> None:
    inner = FakeAccessReviewer({(ALICE.username, TINY)})
    cached = access_cache(inner, clock)
    assert await cached.allowed(ALICE, TINY) is True
    assert await cached.allowed(ALICE, TINY) is True
    assert inner.calls == 1


@pytest.mark.asyncio
async def test_access_allow_lives_for_ttl_and_deny_for_negative_ttl(clock: ManualClock) -> None:
    inner = FakeAccessReviewer({(ALICE.username, TINY)})
    cached = access_cache(inner, clock, ttl=60, negative_ttl=5)
    assert await cached.allowed(ALICE, TINY) is True
    assert await cached.allowed(ALICE, OTHER) is False
    assert inner.calls == 2

    clock.advance(4.9)
    await cached.allowed(ALICE, TINY)
    await cached.allowed(ALICE, OTHER)
    assert inner.calls == 2

    clock.advance(0.1)  # 5 s: the denial is reloaded, the grant is not
    inner.grants.add((ALICE.username, OTHER))  # a RoleBinding was just added
    assert await cached.allowed(ALICE, OTHER) is True
    await cached.allowed(ALICE, TINY)
    assert inner.calls == 3

    clock.advance(55)  # 60 s after the first grant was cached
    inner.grants.discard((ALICE.username, TINY))
    assert await cached.allowed(ALICE, TINY) is False
    assert inner.calls == 4


@pytest.mark.asyncio
async def test_access_key_includes_groups_uid_and_model(clock: ManualClock) -> None:
    inner = FakeAccessReviewer({(ALICE.username, TINY)})
    cached = access_cache(inner, clock)
    variants = [
        (ALICE, TINY),
        (Identity(ALICE.username, ALICE.uid, ("g1", "tier-premium-users")), TINY),
        (Identity(ALICE.username, ALICE.uid, ()), TINY),
        (Identity(ALICE.username, "other-uid", ALICE.groups), TINY),
        (ALICE, OTHER),
        (ALICE, ModelRef("team-a", "tiny")),
        (BOB, TINY),
    ]
    for identity, model in variants:
        await cached.allowed(identity, model)
    assert inner.calls == len(variants)
    for identity, model in variants:
        await cached.allowed(identity, model)
    assert inner.calls == len(variants)
    assert len(cached.cache) == len(variants)


@pytest.mark.asyncio
async def test_access_namespace_and_name_cannot_collide(clock: ManualClock) -> None:
    inner = FakeAccessReviewer({(ALICE.username, ModelRef("a", "b-c"))})
    cached = access_cache(inner, clock)
    assert await cached.allowed(ALICE, ModelRef("a", "b-c")) is True
    assert await cached.allowed(ALICE, ModelRef("a-b", "c")) is False
    assert inner.calls == 2


@pytest.mark.asyncio
async def test_access_backend_unavailable_is_not_cached(clock: ManualClock) -> None:
    inner = FakeAccessReviewer({(ALICE.username, TINY)})
    inner.error = unavailable()
    cached = access_cache(inner, clock)
    with pytest.raises(BackendUnavailable):
        await cached.allowed(ALICE, TINY)
    inner.error = None
    assert await cached.allowed(ALICE, TINY) is True
    assert inner.calls == 2


@pytest.mark.asyncio
async def test_access_forget_user_drops_only_that_users_entries(clock: ManualClock) -> None:
    inner = FakeAccessReviewer({(ALICE.username, TINY), (BOB.username, TINY)})
    cached = access_cache(inner, clock)
    await cached.allowed(ALICE, TINY)
    await cached.allowed(ALICE, OTHER)
    await cached.allowed(BOB, TINY)
    assert inner.calls == 3

    assert cached.forget_user(ALICE.username) == 2
    assert cached.forget_user(ALICE.username) == 0

    await cached.allowed(BOB, TINY)
    assert inner.calls == 3
    await cached.allowed(ALICE, TINY)
    await cached.allowed(ALICE, OTHER)
    assert inner.calls == 5
