"""The dashboard and the alert rules (k8s/monitoring) against a real Prometheus (Debian's)
scraping the real stack: Envoy, maas-authz with sk-oai- keys in a real PostgreSQL (behind its
cache), maas-ratelimit on a real Redis that is then stopped (errors, failing open). Every panel
must return data, every rule must evaluate, and the failing-open alert must go off."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from maas_authz.api_keys import hash_key
from maas_demo.processes import free_port
from maas_demo.stack import CONFIG_DIR, LocalStack, Ports
from tests.e2e.conftest import Gateway, demo_authz_config, http, wait_for
from tests.support.postgres_server import (
    PostgresServer,
    gateway_dsn,
    insert_key,
    maas_api_database,
)
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.e2e
REPO = pathlib.Path(__file__).resolve().parents[2]
MONITORING = REPO / "k8s" / "monitoring"
CHAT = "/llm/tiny/v1/chat/completions"
BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
KEY = "sk-oai-monitored_MonitoredSecret1"
SCRAPE = 1  # seconds


class Prometheus:
    def __init__(self, workdir: pathlib.Path, targets: dict[str, tuple[int, str]]) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise FileNotFoundError("no prometheus: scripts/install-test-packages.sh installs it")
        workdir.mkdir(parents=True, exist_ok=True)
        rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
        (workdir / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
        config = {
            "global": {"scrape_interval": f"{SCRAPE}s", "evaluation_interval": f"{SCRAPE}s"},
            "rule_files": [str(workdir / "rules.yaml")],
            "scrape_configs": [
                {"job_name": job, "metrics_path": path,
                 "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                for job, (port, path) in targets.items()
            ],
        }  # fmt: skip
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with (workdir / "prometheus.log").open("wb") as log:
            self.process = subprocess.Popen(
                [binary, f"--config.file={workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.log = workdir / "prometheus.log"
        try:
            assert wait_for(self._ready, timeout=30), self.log.read_text()[-2000:]
            # the first scrapes come a few seconds after start-up (target discovery): traffic
            # before them would never show as a rate
            assert wait_for(lambda: len(self.query("up == 1")) == len(targets), timeout=30)
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        try:
            return http(f"{self.url}/-/ready", method="GET").status == 200
        except OSError:  # not listening yet
            return False

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        answer = http(f"{self.url}/api/v1/{path}?{query}", method="GET")
        body = answer.json()
        assert isinstance(body, dict) and body.get("status") == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return list(data["result"])

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(20)


@pytest.fixture(scope="module")
def monitored(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Gateway, Prometheus, RedisServer, PostgresServer]]:
    work = tmp_path_factory.mktemp("monitoring")
    redis = RedisServer(work / "redis")
    redis.start()
    database = maas_api_database()
    insert_key(database, key_id="id-monitored", username="monitored", key_hash=hash_key(KEY) or "",
               groups=["demo-team"], subscription="demo-basic")  # fmt: skip
    authz = demo_authz_config()
    authz["api_keys"] = {
        "source": "postgresql",
        "postgresql": {"dsn": gateway_dsn(database), "timeout": "500ms"},
        "cache": {"ttl": "1s"},
    }
    (work / "authz.yaml").write_text(yaml.safe_dump(authz))
    ratelimit = {
        "limits": {"file": str(CONFIG_DIR / "limits.yaml")},
        "store": {"type": "redis", "failure_mode": "open",
                  "redis": {"url": redis.url, "timeout": "200ms", "connect_timeout": "200ms"}},
        # the usage ledger in the same PostgreSQL (its tables beside maas-api's): stopped below
        # with it, so that the ledger's panels show a backlog
        "ledger": {"url": database.dsn, "spool_dir": str(work / "journal"), "timeout": "500ms"},
    }  # fmt: skip
    (work / "ratelimit.yaml").write_text(yaml.safe_dump(ratelimit))
    stack = LocalStack(
        work / "run",
        Ports.free(),
        authz_config=work / "authz.yaml",
        ratelimit_config=work / "ratelimit.yaml",
    )
    try:
        stack.start()
        p = stack.ports
        prometheus = Prometheus(
            work / "prometheus",
            {
                "maas-authz": (p.authz_http, "/metrics"),
                "maas-ratelimit": (p.ratelimit_http, "/metrics"),
                "envoy": (p.envoy_admin, "/stats/prometheus"),
            },
        )
        try:
            yield Gateway(stack), prometheus, redis, database
        finally:
            prometheus.stop()
    finally:  # whatever failed to start, nothing is left running
        stack.stop()
        database.cleanup()
        redis.cleanup()


def traffic(gw: Gateway) -> None:
    """Every kind of answer: allowed (tiers and a subscription key from PostgreSQL), 401, 403,
    429, tokens charged."""
    for key in ("sk-demo-premium", "sk-demo-enterprise", "sk-demo-tokens"):
        assert gw.request(CHAT, key, BODY).status == 200
    for _ in range(3):
        assert gw.request("/v1/chat/completions", KEY, {"model": "tiny", **BODY}).status == 200
    assert gw.request(CHAT, "sk-demo-wrong", BODY).status == 401
    assert gw.request(CHAT, "sk-demo-noaccess", BODY).status == 403
    for _ in range(6):
        gw.request(CHAT, "sk-demo-free", BODY)


def panels() -> list[dict[str, Any]]:
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    return list(dashboard["panels"])


def _has_data(result: list[dict[str, Any]]) -> bool:
    values = [float(series["value"][1]) for series in result]
    return any(v > 0 for v in values if v == v)  # not NaN


def test_every_panel_returns_data_and_the_alerts_evaluate(
    monitored: tuple[Gateway, Prometheus, RedisServer, PostgresServer],
) -> None:
    gw, prometheus, redis, database = monitored
    # counters must rise between two scrapes to have a rate: traffic in rounds, scrapes between
    for _ in range(2):
        traffic(gw)
        time.sleep(3 * SCRAPE)
    # the stores go away: Redis (errors, failing open, charges lost) and the key database
    # (lookups fail, keys seen recently are served stale)
    # the database first, with Redis still up: the usage ledger's records wait in its journal
    database.stop()
    for key in ("sk-demo-premium", "sk-demo-enterprise"):
        assert gw.request(CHAT, key, BODY).status == 200
    time.sleep(3 * SCRAPE)
    redis.stop()
    for _ in range(2):
        for key in ("sk-demo-premium", "sk-demo-enterprise"):
            assert gw.request(CHAT, key, BODY).status == 200  # failing open
        time.sleep(1.2)  # past the key cache's ttl
        assert gw.request("/v1/chat/completions", KEY, {"model": "tiny", **BODY}).status == 200
        time.sleep(3 * SCRAPE)

    targets = prometheus.api("targets")["activeTargets"]
    assert {t["labels"]["job"]: t["health"] for t in targets} == {
        "maas-authz": "up",
        "maas-ratelimit": "up",
        "envoy": "up",
    }
    empty: list[str] = []
    for panel in panels():
        results = [
            prometheus.query(t["expr"].replace("$__rate_interval", "5m")) for t in panel["targets"]
        ]  # a query that does not parse fails in prometheus.query itself
        if not any(_has_data(r) for r in results):
            empty.append(f"{panel['title']}: {results}")
    assert empty == [], f"panels without data: {empty}"

    def failing_open_alert() -> str:
        rules = prometheus.api("rules")["groups"][0]["rules"]
        assert all(rule["health"] == "ok" for rule in rules), [
            (r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"
        ]
        states = {rule["name"]: rule["state"] for rule in rules}
        assert len(states) == 10
        assert states["MaasGatewayServerDown"] == "inactive"
        return str(states["MaasRateLimitFailingOpen"])

    assert wait_for(lambda: failing_open_alert() in ("pending", "firing"), timeout=10)
