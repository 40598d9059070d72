"""The operator's plane on the real stack (Envoy + both servers + the demo model): /v1/quota
through the gateway, the decisions Envoy's access log feeds (JSON and live), explain, quota for
any user, the admin API's credentials, and what grpcurl sees."""

from __future__ import annotations

import asyncio
import json
import pathlib
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from maas_demo.stack import LocalStack, Ports, Topology
from tests.e2e.conftest import Gateway, HttpResult, http, wait_for

CHAT = "/llm/tiny/v1/chat/completions"
BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
ADMIN = {"Authorization": "Bearer sk-demo-admin"}


@pytest.fixture(scope="module")
def operator_gateway(
    tmp_path_factory: pytest.TempPathFactory, topology: Topology
) -> Iterator[Gateway]:
    stack = LocalStack(tmp_path_factory.mktemp("operator"), Ports.free(), topology=topology)
    stack.start()
    yield Gateway(stack)
    stack.stop()


def admin_url(gateway: Gateway, path: str) -> str:
    return f"http://127.0.0.1:{gateway.stack.ports.authz_admin}{path}"


def admin(gateway: Gateway, path: str, body: object | None = None, **kw: Any) -> HttpResult:
    method = "POST" if body is not None else "GET"
    return http(admin_url(gateway, path), method=method, body=body, headers=ADMIN, **kw)


def quota(gateway: Gateway, key: str, query: str = "") -> HttpResult:
    return gateway.request(f"/v1/quota{query}", key, method="GET")


def remaining(result: HttpResult, name: str) -> int:
    body = result.json()
    assert isinstance(body, dict)
    return int(next(x["remaining"] for x in body["limits"] if x["name"] == name))


def decisions(gateway: Gateway, query: str = "") -> list[dict[str, Any]]:
    answer = admin(gateway, f"/admin/v1/decisions{query}")
    assert answer.status == 200, answer.body
    body = answer.json()
    assert isinstance(body, dict)
    return list(body["decisions"])


def test_quota_through_the_gateway_consumes_nothing_and_matches_the_model_headers(
    operator_gateway: Gateway,
) -> None:
    gw = operator_gateway
    first = quota(gw, "sk-demo-premium", "?model=llm/tiny")
    assert first.status == 200, first.body
    assert first.headers["content-type"] == "application/json"
    body = first.json()
    assert isinstance(body, dict)
    assert (body["tier"], body["model"]) == ("premium", "llm/tiny")
    assert {x["name"]: x["unit"] for x in body["limits"]} == {
        "premium-requests": "requests",
        "premium-tokens": "tokens",
    }
    before = remaining(first, "premium-requests")
    for _ in range(10):  # peeks: nothing is taken
        assert remaining(quota(gw, "sk-demo-premium"), "premium-requests") == before
    answer = gw.request(CHAT, "sk-demo-premium", BODY)
    assert answer.status == 200
    # the model response's exact headers and the quota agree, requests and tokens
    assert answer.headers["x-ratelimit-limit-requests"] == "20"
    assert int(answer.headers["x-ratelimit-remaining-requests"]) == before - 1
    after = quota(gw, "sk-demo-premium")
    assert remaining(after, "premium-requests") == before - 1
    assert after.headers["x-ratelimit-remaining-requests"] == str(before - 1)
    assert int(after.headers["x-ratelimit-remaining-tokens"]) <= 50000
    assert gw.backend_saw()[-1]["path"] != "/v1/quota"  # quota never reached the model


def test_quota_is_authenticated_and_authorized_like_a_model_request(
    operator_gateway: Gateway,
) -> None:
    gw = operator_gateway
    assert quota(gw, None).status == 401  # type: ignore[arg-type]
    assert quota(gw, "sk-demo-wrong").status == 401
    denied = quota(gw, "sk-demo-noaccess", "?model=llm/tiny")
    assert denied.status == 403
    subscribed = quota(gw, "sk-oai-demosmall_DemoSmallSecret1", "?model=tiny")
    assert subscribed.status == 200
    body = subscribed.json()
    assert isinstance(body, dict)
    assert body["subscription"] == "models-as-a-service/demo-small"
    limits = body["limits"]
    assert [(x["unit"], x["limit"]) for x in limits if not x.get("budget")] == [("tokens", 10)]
    # and the demo's budget of every subscription, in money
    budget = next(x for x in limits if x.get("budget"))
    assert (budget["name"], budget["unit"], budget["limit"]) == (
        "subscription-monthly-cost", "cost", "0.05"
    )  # fmt: skip


def test_a_429_is_in_the_decisions_with_its_limit_and_quota_for_that_user(
    operator_gateway: Gateway,
) -> None:
    gw = operator_gateway
    statuses = [gw.request(CHAT, "sk-demo-free", BODY).status for _ in range(6)]
    assert statuses[-1] == 429
    refused: list[dict[str, Any]] = []
    assert wait_for(
        lambda: (
            refused.extend(decisions(gw, "?denied=true&reason=rate_limited&user=demo-free"))
            or refused
        )
    )
    latest = refused[-1]
    assert (latest["status"], latest["phase"], latest["limit"]) == (
        429,
        "rate_limit",
        "free-requests",
    )
    assert (latest["tier"], latest["model"], latest["path"]) == ("free", "llm/tiny", CHAT)
    assert latest["retry_after_seconds"] >= 1
    everything = json.dumps(decisions(gw, "?limit=10000"))
    assert "sk-demo" not in everything and "sk-oai" not in everything  # never a credential
    # the operator's quota for that user: resolved from the user's latest decision
    looked_up = admin(gw, "/admin/v1/quota?user=demo-free")
    assert looked_up.status == 200
    assert remaining(looked_up, "free-requests") == 0
    body = looked_up.json()
    assert isinstance(body, dict)
    assert body["resolved_from"].startswith("decision ")


def test_explain_says_which_phase_refuses(operator_gateway: Gateway) -> None:
    gw = operator_gateway
    no_access = admin(gw, "/admin/v1/explain", {"token": "sk-demo-noaccess", "path": CHAT})
    answer = no_access.json()
    assert isinstance(answer, dict)
    assert (answer["allowed"], answer["reason"]) == (False, "model_access_denied")
    assert answer["phases"][-1]["phase"] == "access"
    assert "sk-demo-noaccess" not in no_access.body.decode()
    synthetic = admin(
        gw,
        "/admin/v1/explain",
        {"user": "newcomer", "groups": ["tier-enterprise-users"], "model": "llm/tiny"},
    ).json()
    assert isinstance(synthetic, dict)
    assert (synthetic["allowed"], synthetic["tier"]) == (True, "enterprise")
    assert {x["name"] for x in synthetic["limits"]} == {"enterprise-requests", "enterprise-tokens"}


def test_the_admin_api_needs_its_own_credential_and_is_not_on_the_gateway(
    operator_gateway: Gateway,
) -> None:
    gw = operator_gateway
    assert http(admin_url(gw, "/admin/v1/decisions"), method="GET").status == 401
    gateway_key = http(
        admin_url(gw, "/admin/v1/decisions"),
        method="GET",
        headers={"Authorization": "Bearer sk-demo-premium"},
    )
    assert gateway_key.status == 401
    through_gateway = gw.request("/admin/v1/decisions", "sk-demo-admin", method="GET")
    assert through_gateway.status == 401  # the gateway does not know admin keys at all
    viewer = http(
        admin_url(gw, "/admin/v1/purge"),
        method="POST",
        headers={"Authorization": "Bearer sk-demo-viewer"},
    )
    assert viewer.status == 403


@pytest.mark.asyncio
async def test_decisions_stream_live(operator_gateway: Gateway) -> None:
    gw = operator_gateway
    url = admin_url(gw, "/admin/v1/decisions?follow=true&limit=1&user=demo-enterprise")
    async with aiohttp.ClientSession() as session, session.get(url, headers=ADMIN) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        await asyncio.to_thread(gw.request, CHAT, "sk-demo-enterprise", BODY)

        async def next_decision() -> dict[str, Any]:
            while True:
                line = (await response.content.readline()).decode()
                if line.startswith("data: "):
                    data: dict[str, Any] = json.loads(line[6:])
                    return data

        seen = await asyncio.wait_for(next_decision(), 10)
        assert (seen["user"], seen["tier"], seen["status"]) == (
            "demo-enterprise",
            "enterprise",
            200,
        )


def test_grpcurl_lists_the_access_log_service(operator_gateway: Gateway) -> None:
    ports = operator_gateway.stack.ports
    grpcurl = pathlib.Path(sys.executable).parent / "grpcurl"
    listed = subprocess.run(
        [str(grpcurl), "-plaintext", f"127.0.0.1:{ports.authz_grpc}", "list"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    assert "envoy.service.accesslog.v3.AccessLogService" in listed


# --- maas-ctl, the real command ------------------------------------------------------------------


def maas_ctl(
    gateway: Gateway, *args: str, token: str = "sk-demo-admin", stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": "/usr/bin:/bin",
        "MAAS_ADMIN_URL": admin_url(gateway, ""),
        "MAAS_ADMIN_TOKEN": token,
    }
    return subprocess.run(
        [str(pathlib.Path(sys.executable).parent / "maas-ctl"), *args],
        capture_output=True, text=True, timeout=60, env=env, input=stdin, check=False,
    )  # fmt: skip


def test_maas_ctl_commands_and_exit_codes(
    operator_gateway: Gateway, tmp_path: pathlib.Path
) -> None:
    gw = operator_gateway
    allowed = maas_ctl(gw, "explain", "--user", "u1", "--groups", "tier-premium-users",
                       "--model", "llm/tiny", "--tokens", "100")  # fmt: skip
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.startswith("ALLOWED: 200 ok")
    assert "premium-tokens" in allowed.stdout and "49900 after the estimate" in allowed.stdout
    credential = tmp_path / "credential"
    credential.write_text("sk-demo-noaccess\n")
    refused = maas_ctl(gw, "explain", "--credential-file", str(credential), "--path", CHAT)
    assert refused.returncode == 1
    assert refused.stdout.startswith("DENIED: 403 model_access_denied")
    assert "sk-demo-noaccess" not in refused.stdout

    quota_json = maas_ctl(gw, "--json", "quota", "someone", "--tier", "enterprise")
    assert quota_json.returncode == 0, quota_json.stderr
    assert {x["name"] for x in json.loads(quota_json.stdout)["limits"]} == {
        "enterprise-requests",
        "enterprise-tokens",
    }
    shown = maas_ctl(gw, "policy", "show")
    assert shown.returncode == 0 and "premium (level 1)" in shown.stdout
    assert "editable: tiers, subscriptions" in shown.stdout
    document = maas_ctl(gw, "policy", "get", "tiers").stdout
    extra = "- {name: extra, level: 9, groups: [extra-users]}\n"
    dry = maas_ctl(gw, "policy", "apply", "tiers", "-", "--dry-run", stdin=document + extra)
    assert dry.returncode == 0, dry.stderr
    assert "+- {name: extra" in dry.stdout and "dry run: nothing applied" in dry.stdout
    assert "extra" not in maas_ctl(gw, "policy", "get", "tiers").stdout
    invalid = maas_ctl(gw, "policy", "apply", "tiers", "-", stdin="- {name: 'Bad Name'}\n")
    assert invalid.returncode == 2 and "422" in invalid.stderr

    gw.request(CHAT, "sk-demo-enterprise", BODY)
    assert wait_for(lambda: "demo-enterprise" in maas_ctl(gw, "decisions", "--user",
                                                            "demo-enterprise").stdout)  # fmt: skip
    assert maas_ctl(gw, "purge", token="sk-demo-viewer").returncode == 3
    assert maas_ctl(gw, "purge", "--user", "demo-free").stdout.startswith("purged ")
    assert maas_ctl(gw, "whoami", token="").returncode == 2
    assert maas_ctl(gw, "whoami", token="sk-demo-wrong").returncode == 3
    unreachable = subprocess.run(
        [str(pathlib.Path(sys.executable).parent / "maas-ctl"), "--url", "http://127.0.0.1:9",
         "whoami"],
        capture_output=True, text=True, timeout=60, env={"MAAS_ADMIN_TOKEN": "x"}, check=False,
    )  # fmt: skip
    assert unreachable.returncode == 4 and "cannot reach" in unreachable.stderr


def test_maas_ctl_follows_decisions(operator_gateway: Gateway) -> None:
    gw = operator_gateway
    env = {"MAAS_ADMIN_URL": admin_url(gw, ""), "MAAS_ADMIN_TOKEN": "sk-demo-admin"}
    follower = subprocess.Popen(
        [str(pathlib.Path(sys.executable).parent / "maas-ctl"), "decisions", "--follow",
         "--limit", "1", "--user", "demo-premium", "--denied"],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert follower.stdout is not None
        # 20 requests per 2 minutes: the premium tier's 21st is refused
        for _ in range(22):
            gw.request(CHAT, "sk-demo-premium", BODY)
        line = follower.stdout.readline()
        assert " 429 DENIED  rate_limited limit=premium-requests user=demo-premium" in line
    finally:
        follower.terminate()
        follower.wait(10)
        assert follower.stdout is not None
        follower.stdout.close()
