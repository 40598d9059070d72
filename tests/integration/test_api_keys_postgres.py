"""The api_keys lookup against a real PostgreSQL (Debian's postgresql, maas-api's columns):
rows found by hash and tenant, maas-api's verdicts, the read-only role, the pool's bound, and
the database stopped and started again under a live store."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from maas_authz.api_key_postgres import PostgresApiKeys
from maas_authz.api_key_store import ApiKeyVerifier
from maas_authz.api_keys import KeyIdentity, hash_key
from maas_common.clock import SystemClock
from maas_common.errors import BackendUnavailable
from tests.support.postgres_server import (
    PostgresServer,
    gateway_dsn,
    insert_key,
    maas_api_database,
)

pytestmark = pytest.mark.integration

ALICE = "sk-oai-alice_AliceSecret1"
OLD = "sk-oai-old_OldSecret1"
OTHER_TENANT = "sk-oai-tenant_TenantSecret1"


@pytest.fixture(scope="module")
def database() -> Iterator[PostgresServer]:
    server = maas_api_database()
    insert_key(server, key_id="k-alice", username="alice", key_hash=hash_key(ALICE) or "",
               groups=["team-a", "system:authenticated"], subscription="basic",
               expires_at="2099-01-01T00:00:00Z")  # fmt: skip
    insert_key(server, key_id="k-old", username="alice", key_hash=hash_key(OLD) or "",
               groups=["team-a"], subscription="basic", status="revoked")  # fmt: skip
    insert_key(server, key_id="k-t", username="t", key_hash=hash_key(OTHER_TENANT) or "",
               groups=[], subscription="basic", tenant="someone-else")  # fmt: skip
    try:
        yield server
    finally:
        server.cleanup()


def store_for(server: PostgresServer, **options: object) -> PostgresApiKeys:
    return PostgresApiKeys(gateway_dsn(server), **options)  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_rows_are_found_by_hash_and_judged_as_maas_api_does(database: PostgresServer) -> None:
    store = store_for(database)
    verifier = ApiKeyVerifier(lambda: store, SystemClock())
    try:
        record = await store.find(hash_key(ALICE) or "")
        assert record is not None
        assert (record.id, record.username, record.groups, record.subscription) == (
            "k-alice", "alice", ("team-a", "system:authenticated"), "basic",
        )  # fmt: skip
        assert record.expires_at == datetime(2099, 1, 1, tzinfo=UTC)
        verdict = await verifier.verify(ALICE)
        assert isinstance(verdict, KeyIdentity) and verdict.key_id == "k-alice"
        assert await verifier.verify(OLD) == "key revoked or expired"
        assert await verifier.verify("sk-oai-nobody_Nothing1") == "key not found"
        assert await verifier.verify(OTHER_TENANT) == "key not found"  # another tenant's row
        # revoked in the database: the next lookup says so
        database.psql("UPDATE api_keys SET status = 'revoked' WHERE id = 'k-alice'")
        assert await verifier.verify(ALICE) == "key revoked or expired"
        database.psql("UPDATE api_keys SET status = 'active' WHERE id = 'k-alice'")
    finally:
        await store.close()


def test_the_gateways_role_can_read_the_table_and_write_nothing(database: PostgresServer) -> None:
    role = "SET ROLE maas_gateway; "
    assert database.psql(role + "SELECT count(*) FROM api_keys").split() == ["SET", "3"]
    with pytest.raises(RuntimeError, match="permission denied"):
        database.psql(role + "UPDATE api_keys SET status = 'active'")


@pytest.mark.asyncio
async def test_no_more_connections_than_the_pool_allows(database: PostgresServer) -> None:
    store = store_for(database, max_connections=3, timeout=5.0)
    try:
        found = await asyncio.gather(*(store.find(hash_key(ALICE) or "") for _ in range(60)))
        assert all(r is not None for r in found)
        count = database.psql(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'maas-authz'"
        )
        assert 1 <= int(count) <= 3
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_the_database_stopped_is_a_clear_failure_and_recovery_needs_no_restart(
    database: PostgresServer,
) -> None:
    store = store_for(database, timeout=0.5, connect_timeout=1.0)
    outcomes: list[str] = []
    store = PostgresApiKeys(
        gateway_dsn(database), timeout=0.5, connect_timeout=1.0,
        observe=lambda _s, outcome: outcomes.append(outcome),
    )  # fmt: skip
    try:
        assert await store.find(hash_key(ALICE) or "") is not None
        database.stop()
        for _ in range(3):
            with pytest.raises(BackendUnavailable) as raised:
                await store.find(hash_key(ALICE) or "")
            assert raised.value.backend == "postgresql"
            assert raised.value.kind in {"connect", "timeout"}
        database.start()
        for _ in range(50):  # the pool's dead connections are replaced on demand
            try:
                if await store.find(hash_key(ALICE) or "") is not None:
                    break
            except BackendUnavailable:
                await asyncio.sleep(0.1)
        else:
            pytest.fail("the store did not recover after the database came back")
        assert outcomes[0] == "found" and outcomes[-1] == "found"
        assert {"connect", "timeout"} & set(outcomes[1:4])
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_a_store_made_while_the_database_is_down_works_once_it_is_up() -> None:
    server = maas_api_database()
    insert_key(server, key_id="k", username="u", key_hash=hash_key(ALICE) or "", groups=[],
               subscription="basic")  # fmt: skip
    server.stop()
    store = store_for(server, timeout=0.5, connect_timeout=0.5)
    try:
        with pytest.raises(BackendUnavailable):
            await store.find(hash_key(ALICE) or "")
        server.start()
        assert await store.find(hash_key(ALICE) or "") is not None
    finally:
        await store.close()
        server.cleanup()
