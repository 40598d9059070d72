"""The usage ledger and budgets end to end, through the real Envoy.

- The demo (`make demo`'s stack, SQLite): three chats, then /admin/v1/usage says 3 and the tokens
  the three responses reported; the trial key runs into its monthly budget (429 budget_exceeded,
  named, with its reset) and /v1/quota shows it; maas-ctl usage prints the same.
- Clusters (PostgreSQL and Redis, both real): under load, PostgreSQL is stopped and started again
  and the ledger ends with exactly one record per charged response (the responses' own usage
  summed); maas-ratelimit is killed with SIGKILL mid-load and restarted, and nothing it had
  journaled is lost or doubled (checked against Redis's own record of applied charges).
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import redis
import yaml

from maas_common.ledger.records import UsageRecord
from maas_demo.stack import LocalStack, Ports, wait_until_ready
from tests.e2e.conftest import Gateway, Metrics, http, stack_configs, wait_for
from tests.support.postgres_server import PostgresServer
from tests.support.redis_server import RedisServer

CHAT = "/llm/tiny/v1/chat/completions"
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8}
ADMIN = {"Authorization": "Bearer sk-demo-admin"}


def admin_get(stack: LocalStack, path: str) -> object:
    answer = http(f"http://127.0.0.1:{stack.ports.authz_admin}{path}", method="GET", headers=ADMIN)
    assert answer.status == 200, (path, answer.status, answer.body[:300])
    return answer.json()


# --- the demo -------------------------------------------------------------------------------------


def test_the_demo_records_three_chats_and_their_tokens(gateway: Gateway) -> None:
    reported = []
    for _ in range(3):
        answer = gateway.request(CHAT, "sk-demo-enterprise", BODY)
        assert answer.status == 200
        usage = answer.json()["usage"]  # type: ignore[index]
        reported.append(usage["total_tokens"])

    def usage() -> dict[str, object]:
        found = admin_get(gateway.stack, "/admin/v1/usage?user=demo-enterprise")
        assert isinstance(found, dict)
        return found

    assert wait_for(lambda: usage()["requests"] == 3, 10), usage()
    summary = usage()
    assert summary["total_tokens"] == sum(reported)
    assert summary["prompt_tokens"] + summary["completion_tokens"] == sum(reported)  # type: ignore[operator]
    assert float(summary["cost"]) > 0  # type: ignore[arg-type]  # the demo prices llm/tiny
    records = admin_get(gateway.stack, "/admin/v1/usage/records?user=demo-enterprise")
    assert isinstance(records, dict)
    rows = records["records"]
    assert [r["total_tokens"] for r in rows] == reported
    assert {r["tier"] for r in rows} == {"enterprise"} and {r["status"] for r in rows} == {200}
    assert len({r["request_id"] for r in rows}) == 3
    # maas-ctl, the real command, says the same
    env = {**os.environ, "MAAS_ADMIN_TOKEN": "sk-demo-admin"}
    printed = subprocess.run(
        [sys.executable, "-m", "maas_ctl", "--url",
         f"http://127.0.0.1:{gateway.stack.ports.authz_admin}", "usage", "--user",
         "demo-enterprise", "--group-by", "day"],
        capture_output=True, text=True, env=env, timeout=30, check=True,
    ).stdout  # fmt: skip
    assert (
        f"total: 3 requests, {sum(reported) - sum(r['completion_tokens'] for r in rows)}" in printed
    )
    assert f"{sum(reported)} total tokens" in printed


def test_a_streamed_answer_is_recorded_as_streamed_with_its_usage(gateway: Gateway) -> None:
    answer = gateway.request(CHAT, "sk-demo-premium", {**BODY, "stream": True})
    assert answer.status == 200 and b"data: [DONE]" in answer.body
    assert b'"usage"' not in answer.body  # the client did not ask for it: the gateway did

    def records() -> list[dict[str, object]]:
        found = admin_get(gateway.stack, "/admin/v1/usage/records?user=demo-premium")
        assert isinstance(found, dict)
        return list(found["records"])

    assert wait_for(lambda: len(records()) == 1, 10)
    (record,) = records()
    assert record["streamed"] is True and record["status"] == 200
    assert record["completion_tokens"] > 0 and record["tier"] == "premium"  # type: ignore[operator]


def test_the_trial_key_runs_into_its_monthly_budget(gateway: Gateway) -> None:
    statuses = []
    for _ in range(12):
        answer = gateway.request(CHAT, "sk-demo-budget", {**BODY, "max_tokens": 40})
        statuses.append(answer.status)
        if answer.status == 429:
            break
    assert statuses[-1] == 429 and set(statuses[:-1]) == {200}, statuses
    error = answer.json()["error"]  # type: ignore[index]
    assert error["code"] == "budget_exceeded" and error["budget"] == "trial-monthly"
    assert int(answer.headers["retry-after"]) == error["resets_in_seconds"] > 0
    quota = gateway.request("/v1/quota?model=llm/tiny", "sk-demo-budget", method="GET")
    assert quota.status == 200
    budget = next(x for x in quota.json()["limits"] if x["name"] == "trial-monthly")  # type: ignore[index]
    assert budget["budget"] is True and budget["remaining"] == 0 and budget["limit"] == 200
    assert budget["period"] == "month" and budget["resets_at"].endswith("-01T00:00:00Z")
    # the requests and tokens limits of the tier are far from spent: the budget refused
    assert {x["name"] for x in quota.json()["limits"]} >= {"trial-requests", "trial-tokens"}  # type: ignore[index]


# --- PostgreSQL and Redis, under load -------------------------------------------------------------

USERS = {f"sk-load-{i}": (f"load-{i}", "tier-enterprise-users") for i in range(4)}
HIGH_LIMITS = {
    "limits": [
        {"name": "e-requests", "tier": "enterprise", "kind": "requests", "limit": 1_000_000,
         "window": "1m"},
        {"name": "e-tokens", "tier": "enterprise", "kind": "tokens", "limit": 100_000_000,
         "window": "1m"},
    ],
    "prices": [{"model": "*", "prompt_per_million": 1, "completion_per_million": 2}],
}  # fmt: skip


@dataclass
class Cluster:
    stack: LocalStack
    gateway: Gateway
    postgres: PostgresServer
    redis: RedisServer
    journal: pathlib.Path

    def ratelimit_metrics(self) -> Metrics:
        url = f"http://127.0.0.1:{self.stack.ports.ratelimit_http}/metrics"
        try:
            return Metrics(http(url, method="GET").body.decode())
        except OSError:
            return Metrics("")

    def ledger(self, *users: str) -> list[tuple[str, int]]:
        """(request id, total tokens) of these users' records, from PostgreSQL itself."""
        names = ", ".join(f"'{user}'" for user in users)  # the test's own names
        rows = self.postgres.psql(
            f"SELECT request_id, total_tokens FROM usage_records WHERE user_name IN ({names})"
        )
        return [(line.split("|")[0], int(line.split("|")[1])) for line in rows.splitlines()]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("ledger")
    postgres = PostgresServer()  # its own directory: the postgres user must reach it
    redis_server = RedisServer(work / "redis")
    postgres.start()
    redis_server.start()
    configs = stack_configs(work, USERS, HIGH_LIMITS)
    authz = yaml.safe_load(configs["authz_config"].read_text())
    authz["usage"] = {"url": postgres.dsn, "timeout": "2s"}
    configs["authz_config"].write_text(yaml.safe_dump(authz))
    journal = work / "journal"
    ratelimit = {
        "limits": {"file": str(work / "limits.yaml")},
        "store": {"type": "redis", "redis": {"url": redis_server.url, "timeout": "500ms"}},
        "ledger": {"url": postgres.dsn, "spool_dir": str(journal), "batch_size": 100,
                   "flush_interval": "100ms", "timeout": "1s"},
    }  # fmt: skip
    configs["ratelimit_config"].write_text(yaml.safe_dump(ratelimit))
    stack = LocalStack(work / "run", Ports.free(), **configs)  # type: ignore[arg-type]
    try:
        stack.start()
        yield Cluster(stack, Gateway(stack), postgres, redis_server, journal)
    finally:
        stack.stop()
        postgres.cleanup()
        redis_server.cleanup()


@dataclass
class Load:
    """Four clients sending chats until stopped; every answer kept."""

    gateway: Gateway
    keys: list[str]
    answers: list[tuple[int, int | None]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _client(self, key: str) -> None:
        while not self._stop.is_set():
            try:
                answer = self.gateway.request(CHAT, key, BODY)
            except OSError:
                self.answers.append((0, None))
                continue
            tokens = None
            if answer.status == 200:
                tokens = int(answer.json()["usage"]["total_tokens"])  # type: ignore[index]
            self.answers.append((answer.status, tokens))

    def __enter__(self) -> Load:
        self._threads = [threading.Thread(target=self._client, args=(k,)) for k in self.keys]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def count(self) -> int:
        return len(self.answers)


def test_postgres_stopped_under_load_the_ledger_holds_each_charged_response_once(
    cluster: Cluster,
) -> None:
    keys = list(USERS)
    before = cluster.ratelimit_metrics().value("maas_ratelimit_ledger_write_failures_total")
    with Load(cluster.gateway, keys[:2]) as load:
        assert wait_for(lambda: load.count() >= 50, 30)
        cluster.postgres.stop()
        stopped_at, stopped = load.count(), time.monotonic()
        # down for at least 3 s and 100 responses
        assert wait_for(lambda: load.count() >= stopped_at + 100, 60)
        time.sleep(max(0.0, 3.0 - (time.monotonic() - stopped)))
        during = cluster.ratelimit_metrics()
        assert during.value("maas_ratelimit_ledger_pending_records") > 0
        assert during.value("maas_ratelimit_ledger_spool_bytes") > 0
        cluster.postgres.start()
        restarted_at = load.count()
        assert wait_for(lambda: load.count() >= restarted_at + 50, 30)
    answers = list(load.answers)
    served = [tokens for status, tokens in answers if status == 200]
    assert len(served) == len(answers), {s for s, _ in answers}  # the gateway never failed
    m = cluster.ratelimit_metrics()
    assert m.value("maas_ratelimit_ledger_write_failures_total") > before
    assert wait_for(lambda: len(cluster.ledger("load-0", "load-1")) >= len(served), 60)
    assert wait_for(
        lambda: cluster.ratelimit_metrics().value("maas_ratelimit_ledger_pending_records") == 0, 30
    )
    ledger = cluster.ledger("load-0", "load-1")
    assert len(ledger) == len(served)  # one record per charged response
    assert len({request_id for request_id, _ in ledger}) == len(ledger)
    assert sum(tokens for _, tokens in ledger) == sum(t or 0 for t in served)
    summary = admin_get(cluster.stack, "/admin/v1/usage?user=load-0")  # the API reads the same
    assert isinstance(summary, dict)
    assert summary["requests"] == len(cluster.ledger("load-0"))
    failures = m.value("maas_ratelimit_ledger_write_failures_total") - before
    print(f"\nPostgreSQL stopped: {len(answers)} responses, {len(ledger)} records, "
          f"{failures:.0f} failed writes")  # fmt: skip


def test_sigkill_of_the_rate_limiter_mid_load_loses_and_doubles_nothing_journaled(
    cluster: Cluster,
) -> None:
    client = redis.Redis.from_url(cluster.redis.url)
    client.flushdb()  # from here on, Redis's charge marks are this test's
    ratelimit = cluster.stack.child("ratelimit")
    keys = list(USERS)[2:]
    with Load(cluster.gateway, keys) as load:
        assert wait_for(lambda: load.count() >= 100, 30)
        assert ratelimit.process is not None
        ratelimit.process.send_signal(signal.SIGKILL)
        ratelimit.process.wait(10)
        # what the dead process had written down, and what had reached the database
        journaled = _journal_ids(cluster.journal, {USERS[k][0] for k in keys})
        users = [USERS[k][0] for k in keys]
        recorded = {request_id for request_id, _ in cluster.ledger(*users)}
        killed_at = load.count()
        assert wait_for(lambda: load.count() >= killed_at + 20, 30)  # failing open meanwhile
        ratelimit.stop()
        ratelimit.start()
        wait_until_ready(
            ratelimit, f"http://127.0.0.1:{cluster.stack.ports.ratelimit_http}/readyz", 30
        )
        restarted_at = load.count()
        assert wait_for(lambda: load.count() >= restarted_at + 100, 30)
    assert wait_for(
        lambda: cluster.ratelimit_metrics().value("maas_ratelimit_ledger_pending_records") == 0, 30
    )
    time.sleep(0.5)  # the last answers' charges
    assert wait_for(
        lambda: cluster.ratelimit_metrics().value("maas_ratelimit_ledger_pending_records") == 0, 30
    )
    ids = [request_id for request_id, _ in cluster.ledger(*(USERS[k][0] for k in keys))]
    assert len(ids) == len(set(ids))  # nothing doubled
    assert journaled, "nothing was journaled before the kill"
    assert journaled | recorded <= set(ids)  # nothing journaled was lost
    charged = {
        key.decode().rsplit(":", 1)[1]
        for key in client.scan_iter("maas:rl:rid:*")
        if client.get(key) == b"charged"
    }
    # every record is of a charge Redis applied; a charge in flight at the kill may have been
    # applied without its record (at most one per client); usually none
    assert set(ids) <= charged
    missing = charged - set(ids)
    assert len(missing) <= len(keys), missing
    print(f"\nSIGKILL: {load.count()} responses, {len(journaled)} journaled at the kill, "
          f"{len(charged)} charges applied, {len(missing)} without a record")  # fmt: skip


def _journal_ids(directory: pathlib.Path, users: set[str]) -> set[str]:
    """The request ids of these users' records in the journal's files (complete lines)."""
    ids = set()
    for segment in sorted(directory.glob("*.jsonl")):
        for line in segment.read_bytes().splitlines(keepends=True):
            if line.endswith(b"\n"):
                record = UsageRecord.from_line(line)
                if record.user in users:
                    ids.add(record.request_id)
    return ids
