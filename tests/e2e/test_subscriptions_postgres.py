"""sk-oai- keys from maas-api's PostgreSQL through the real Envoy: a key revoked in the database
is refused within 2 s (upstream's bound); with the database stopped, keys seen valid recently
keep working and others get 503 with Retry-After; started again, everything works, no restart."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import yaml

from maas_authz.api_keys import hash_key
from maas_demo.stack import LocalStack, Ports
from tests.e2e.conftest import Gateway, HttpResult, demo_authz_config, http, seconds_until, wait_for
from tests.support.postgres_server import (
    PostgresServer,
    api_keys_section,
    insert_key,
    maas_api_database,
)

pytestmark = pytest.mark.e2e

USED = "sk-oai-used_UsedSecret1"  # used before the database stops
UNSEEN = "sk-oai-unseen_UnseenSecret1"  # valid, but first used while it is down
REVOKED_LATER = "sk-oai-leaver_LeaverSecret1"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


class Stack(Gateway):
    def __init__(self, stack: LocalStack, database: PostgresServer) -> None:
        super().__init__(stack)
        self.database = database

    def chat(self, key: str) -> HttpResult:
        return self.request("/v1/chat/completions", key, CHAT)

    def authz_metric(self, name: str) -> float:
        text = http(f"http://127.0.0.1:{self.stack.ports.authz_http}/metrics", method="GET")
        for line in text.body.decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    database = maas_api_database()
    for key, user in ((USED, "used"), (UNSEEN, "unseen"), (REVOKED_LATER, "leaver")):
        insert_key(database, key_id=f"id-{user}", username=user, key_hash=hash_key(key) or "",
                   groups=["demo-team"], subscription="demo-basic")  # fmt: skip
    work = tmp_path_factory.mktemp("pg-stack")
    authz = demo_authz_config()
    authz["api_keys"] = api_keys_section(database)
    (work / "authz.yaml").write_text(yaml.safe_dump(authz))
    local = LocalStack(work / "run", Ports.free(), authz_config=work / "authz.yaml")
    local.start()
    try:
        yield Stack(local, database)
    finally:
        local.stop()
        database.cleanup()


def test_a_key_revoked_in_the_database_is_refused_within_2_seconds(stack: Stack) -> None:
    assert stack.chat(REVOKED_LATER).status == 200
    stack.database.psql("UPDATE api_keys SET status = 'revoked' WHERE id = 'id-leaver'")
    took = seconds_until(lambda: stack.chat(REVOKED_LATER).status == 401)
    assert took <= 2.0, f"refused after {took:.2f}s"
    refused = stack.chat(REVOKED_LATER)
    assert refused.body == b"key revoked or expired"


def test_with_the_database_down_recent_keys_work_and_others_get_503(stack: Stack) -> None:
    assert stack.chat(USED).status == 200
    stack.database.stop()
    try:
        time.sleep(1.2)  # past the cache's ttl: every lookup now goes to the database
        assert [stack.chat(USED).status for _ in range(3)] == [200] * 3
        assert stack.authz_metric("maas_authz_api_key_stale_served_total") >= 3
        unseen = stack.chat(UNSEEN)
        assert unseen.status == 503 and unseen.headers["retry-after"]
        assert unseen.json()["error"]["code"] == "auth_backend_unavailable"  # type: ignore[index]
        # the tier flow's keys never needed the database
        assert stack.chat("sk-demo-premium").status == 200
    finally:
        stack.database.start()
    assert wait_for(lambda: stack.chat(UNSEEN).status == 200, timeout=10.0)
