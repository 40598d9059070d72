"""sk-oai- key validation behind a database or maas-api: the short cache (revocation bound,
refusals, expiry, stale-if-error while the store fails, purge) and maas-api's validate endpoint
as its handler answers (an in-process HTTP server speaking the documented contract; the real
maas-api, a Go service, is not built here)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
import pytest_asyncio
from aiohttp import web

from maas_authz.api_key_maas_api import VALIDATE_PATH, MaasApiKeyValidator
from maas_authz.api_keys import KeyIdentity, Rejection
from maas_authz.caching import CachedKeyValidator
from maas_authz.config import AuthzConfig
from maas_common.clock import ManualClock
from maas_common.config import validate
from maas_common.errors import BackendUnavailable, ConfigError

KEY = "sk-oai-abc_Secret1"
ALICE = KeyIdentity("k1", "laptop", "alice", ("team",), "basic")


class Store:
    """A key store whose answer and health the test sets; counts lookups."""

    def __init__(self) -> None:
        self.answer: KeyIdentity | Rejection = ALICE
        self.down = False
        self.calls = 0

    async def verify(self, token: str) -> KeyIdentity | Rejection:
        self.calls += 1
        if self.down:
            raise BackendUnavailable("postgresql", "connect", "refused")
        return self.answer


def cached(store: Store, clock: ManualClock) -> CachedKeyValidator:
    return CachedKeyValidator(
        store, ttl=1.0, negative_ttl=0.5, stale_if_error=30.0, max_entries=10, clock=clock
    )


@pytest.mark.asyncio
async def test_a_revoked_key_stops_working_once_the_ttl_is_over() -> None:
    store, clock = Store(), ManualClock()
    keys = cached(store, clock)
    assert await keys.verify(KEY) == ALICE
    store.answer = "key revoked or expired"
    clock.advance(0.9)
    assert await keys.verify(KEY) == ALICE and store.calls == 1  # within the ttl: cached
    clock.advance(0.2)
    assert await keys.verify(KEY) == "key revoked or expired"
    store.answer = ALICE
    clock.advance(0.4)
    assert await keys.verify(KEY) == "key revoked or expired"  # refusals: negative_ttl
    clock.advance(0.2)
    assert await keys.verify(KEY) == ALICE


@pytest.mark.asyncio
async def test_while_the_store_is_down_recently_valid_keys_keep_working_for_a_bound() -> None:
    store, clock = Store(), ManualClock()
    served: list[int] = []
    keys = CachedKeyValidator(
        store, ttl=1.0, negative_ttl=0.5, stale_if_error=30.0, max_entries=10, clock=clock,
        on_stale=lambda: served.append(1),
    )  # fmt: skip
    assert await keys.verify(KEY) == ALICE
    store.down = True
    clock.advance(10)
    assert await keys.verify(KEY) == ALICE and served == [1]
    with pytest.raises(BackendUnavailable):  # never seen: the failure
        await keys.verify("sk-oai-other_Key2")
    clock.advance(25)  # 35 s since it was last found valid
    with pytest.raises(BackendUnavailable):
        await keys.verify(KEY)
    # a refusal is never kept for stale use
    store.down, store.answer = False, "key revoked or expired"
    assert await keys.verify(KEY) == "key revoked or expired"
    store.down = True
    clock.advance(1)
    with pytest.raises(BackendUnavailable):
        await keys.verify(KEY)


@pytest.mark.asyncio
async def test_no_verdict_outlives_the_keys_expiry() -> None:
    clock = ManualClock(wall=datetime(2030, 1, 1, tzinfo=UTC).timestamp() - 0.3)
    store = Store()
    store.answer = KeyIdentity("k1", "", "alice", (), "basic", datetime(2030, 1, 1, tzinfo=UTC))
    keys = cached(store, clock)
    assert await keys.verify(KEY) == store.answer
    clock.advance(0.4)  # past the expiry, within the ttl
    store.answer = "key revoked or expired"
    assert await keys.verify(KEY) == "key revoked or expired" and store.calls == 2
    store.down = True
    clock.advance(0.6)
    with pytest.raises(BackendUnavailable):  # and no stale use past it either
        await keys.verify(KEY)


@pytest.mark.asyncio
async def test_purge_forgets_a_users_keys_at_once() -> None:
    store, clock = Store(), ManualClock()
    keys = cached(store, clock)
    await keys.verify(KEY)
    assert keys.forget_user("bob") == 0
    assert keys.forget_user("alice") == 1
    store.down = True
    with pytest.raises(BackendUnavailable):  # nothing left to fall back on either
        await keys.verify(KEY)


@pytest.mark.asyncio
async def test_concurrent_lookups_of_one_key_share_one_call() -> None:
    store, clock = Store(), ManualClock()
    keys = cached(store, clock)
    assert await asyncio.gather(*(keys.verify(KEY) for _ in range(20))) == [ALICE] * 20
    assert store.calls == 1


# --- maas-api's validate endpoint ------------------------------------------------------------


class FakeMaasApi:
    def __init__(self) -> None:
        self.answer: tuple[int, object] = (200, {"valid": False, "reason": "key not found"})
        self.delay = 0.0
        self.seen: list[object] = []
        self.in_flight = 0
        self.most_in_flight = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(await request.json())
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        status, body = self.answer
        text = body if isinstance(body, str) else json.dumps(body)
        return web.Response(status=status, text=text, content_type="application/json")


@pytest_asyncio.fixture
async def maas_api() -> AsyncIterator[tuple[FakeMaasApi, str]]:
    fake = FakeMaasApi()
    app = web.Application()
    app.router.add_post(VALIDATE_PATH, fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield fake, f"http://127.0.0.1:{port}/"
    await runner.cleanup()


@pytest.mark.asyncio
async def test_maas_api_answers_become_verdicts(maas_api: tuple[FakeMaasApi, str]) -> None:
    fake, url = maas_api
    validator = MaasApiKeyValidator(url, timeout=2.0)
    try:
        fake.answer = (200, {"valid": True, "username": "alice", "keyId": "k1",
                             "keyName": "laptop", "groups": ["team"], "subscription": "basic",
                             "tenant": "models-as-a-service"})  # fmt: skip
        assert await validator.verify(KEY) == ALICE
        assert fake.seen[-1] == {"key": KEY}
        fake.answer = (200, {"valid": False, "reason": "key revoked or expired"})
        assert await validator.verify(KEY) == "key revoked or expired"
        fake.answer = (200, {"valid": False, "reason": "something new"})
        assert await validator.verify(KEY) == "key not found"  # unknown reasons fail closed
        fake.answer = (200, {"valid": True, "username": "alice", "groups": []})
        assert await validator.verify(KEY) == "key has no subscription bound"
    finally:
        await validator.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        ((500, {"error": "validation failed"}), "http_500"),
        ((200, "not json"), "bad_response"),
        ((200, {"username": "x"}), "bad_response"),
        ((200, {"valid": True, "groups": ["a"], "subscription": "s"}), "bad_response"),
        ((200, {"valid": True, "username": "a", "groups": "a", "subscription": "s"}),
         "bad_response"),
    ],
)  # fmt: skip
async def test_maas_api_failures_are_unavailable_never_a_verdict(
    maas_api: tuple[FakeMaasApi, str], answer: tuple[int, object], kind: str
) -> None:
    fake, url = maas_api
    fake.answer = answer
    validator = MaasApiKeyValidator(url, timeout=2.0)
    try:
        with pytest.raises(BackendUnavailable) as raised:
            await validator.verify(KEY)
        assert raised.value.kind == kind
        assert KEY not in str(raised.value)
    finally:
        await validator.close()


@pytest.mark.asyncio
async def test_maas_api_calls_are_bounded_in_time_and_number(
    maas_api: tuple[FakeMaasApi, str],
) -> None:
    fake, url = maas_api
    fake.delay = 0.3
    validator = MaasApiKeyValidator(url, timeout=5.0, max_concurrency=3)
    try:
        await asyncio.gather(*(validator.verify(f"sk-oai-k{i}_S") for i in range(9)))
        assert fake.most_in_flight == 3
    finally:
        await validator.close()
    slow = MaasApiKeyValidator(url, timeout=0.1)
    try:
        with pytest.raises(BackendUnavailable) as raised:
            await slow.verify(KEY)
        assert raised.value.kind == "timeout"
    finally:
        await slow.close()
    closed = MaasApiKeyValidator("http://127.0.0.1:9/", timeout=1.0)
    try:
        with pytest.raises(BackendUnavailable) as raised:
            await closed.verify(KEY)
        assert raised.value.kind == "connect"
    finally:
        await closed.close()


# --- configuration ---------------------------------------------------------------------------


def config_error(api_keys: dict[str, object]) -> ConfigError:
    raw = {"authorization": {"mode": "both"}, "api_keys": api_keys}
    with pytest.raises(ConfigError) as raised:
        validate(AuthzConfig, raw, "authz.yaml")
    return raised.value


def test_the_key_sources_need_their_settings_and_no_password_in_a_dsn() -> None:
    assert "needs a postgresql: section" in str(config_error({"source": "postgresql"}))
    assert "needs a maas_api: section" in str(config_error({"source": "maas-api"}))
    leaked = config_error(
        {"source": "postgresql", "postgresql": {"dsn": "postgresql://maas:hunter2@db/maas"}}
    )
    assert "password_file" in str(leaked) and "hunter2" not in str(leaked)
    wrong = config_error({"source": "postgresql", "postgresql": {"dsn": "mysql://u:pw@db/x"}})
    assert "pw" not in str(wrong)
    assert "api_keys" in str(config_error({"source": "maas-api", "maas_api": {"url": "db:80"}}))
    both = {"authorization": {"mode": "both"}}
    with pytest.raises(ConfigError, match="needs api_keys"):
        validate(AuthzConfig, both, "authz.yaml")
