"""The operator's plane with fakes: /v1/quota (quota.py), explain (explain.py), the admin keys
(admin_auth.py) and the operator API over real HTTP (admin_api.py, an aiohttp test server)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import pathlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from maas_authz.admin_api import OperatorApi
from maas_authz.admin_auth import AdminVerdict, parse_admin_keys
from maas_authz.check import CheckPipeline
from maas_authz.decision import Deny, QuotaReply
from maas_authz.decisions import DecisionLog
from maas_authz.explain import Explainer, ExplainRequest
from maas_authz.identity import Identity
from maas_authz.model_path import ModelRef, PathRouting, PathTemplate
from maas_authz.policy_edit import EditablePart, FileStore, PolicyEditor
from maas_authz.quota import Peek, QuotaEndpoint, quota_headers, target_of
from maas_authz.tiers import parse_tier_document
from maas_common.errors import BackendUnavailable, ConfigError
from maas_common.reload import WatchedFile
from tests.support.fakes import FakeAccessReviewer, FakeTokenReviewer
from tests.unit.authz.test_decisions import decision

TINY = ModelRef("llm", "tiny")
FREE = Identity("alice", "uid-a", ("tier-free-users",))
NOBODY = Identity("carol", "uid-c", ("elsewhere",))
MAPPING = parse_tier_document(
    """\
- {name: free, level: 0, groups: [tier-free-users]}
- {name: premium, level: 1, groups: [tier-premium-users]}
""",
    "tiers.yaml",
    "maas-default-gateway",
)


def limit(name: str, unit: str, lim: int, remaining: int, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "unit": unit,
        "limit": lim,
        "remaining": remaining,
        "reset_seconds": 12.5,
        "window_seconds": 60.0,
        "description": f"free tier: {lim} {unit} per 1m",
        "tier": "free",
        "shadow": False,
        "would_allow": remaining > 0,
        **extra,
    }


class FakePeeker:
    def __init__(self, *limits: dict[str, Any], refusal: str | None = None) -> None:
        self.limits = limits
        self.refusal = refusal
        self.asked: list[list[dict[str, str]]] = []
        self.fail = False

    async def peek(self, descriptors: Sequence[Mapping[str, str]]) -> Peek:
        self.asked.append([dict(d) for d in descriptors])
        if self.fail:
            raise BackendUnavailable("ratelimit", "timeout", "maas-ratelimit did not answer")
        return Peek(self.limits, self.refusal)


def pipeline() -> CheckPipeline:
    return CheckPipeline(
        routing=PathRouting(PathTemplate("/{namespace}/{model}"), ()),
        identities=FakeTokenReviewer({"alice-token": FREE, "carol-token": NOBODY}),
        tiers=lambda: MAPPING,
        access=FakeAccessReviewer({(FREE.username, TINY)}),
        default_namespace="llm",
    )


# --- /v1/quota ------------------------------------------------------------------------------------


def test_target_of() -> None:
    assert target_of("llm/tiny") == (TINY, b"")
    _, body = target_of("tiny")  # type: ignore[misc]
    assert json.loads(body) == {"model": "tiny"}
    assert isinstance(target_of("Bad Namespace/x"), Deny)


def test_quota_headers_take_the_tightest_enforced_limit_of_each_unit() -> None:
    headers = quota_headers(
        [
            limit("a", "requests", 10, 9),
            limit("b", "requests", 5, 1),
            limit("c", "requests", 2, 0, shadow=True),  # never shown
            limit("t", "tokens", 100, 50),
        ]
    )
    assert headers == [
        ("x-ratelimit-limit-requests", "5"),
        ("x-ratelimit-remaining-requests", "1"),
        ("x-ratelimit-reset-requests", "13s"),
        ("x-ratelimit-limit-tokens", "100"),
        ("x-ratelimit-remaining-tokens", "50"),
        ("x-ratelimit-reset-tokens", "13s"),
    ]


@pytest.mark.asyncio
async def test_quota_for_the_caller_with_a_model() -> None:
    peeker = FakePeeker(
        limit("free-requests", "requests", 5, 3), limit("x", "tokens", 9, 9, shadow=True)
    )
    endpoint = QuotaEndpoint(pipeline(), peeker)
    reply = await endpoint.answer("GET", "/v1/quota?model=llm/tiny", "Bearer alice-token", {})
    assert isinstance(reply, QuotaReply)
    assert peeker.asked == [[{"tier": "free", "user": "alice", "model": "llm/tiny"}]]
    assert reply.body["tier"] == "free" and reply.body["model"] == "llm/tiny"
    assert [x["name"] for x in reply.body["limits"]] == ["free-requests"]  # shadow: not shown
    assert set(reply.body["limits"][0]) == {
        "name", "unit", "limit", "remaining", "reset_seconds", "window_seconds", "description"
    }  # fmt: skip
    # the access log's names, never the ones the rate limit filter reads
    assert reply.metadata == {
        "answer": "quota",
        "log_user": "alice",
        "log_tier": "free",
        "log_model": "llm/tiny",
    }


@pytest.mark.asyncio
async def test_quota_is_authorized_like_a_model_request() -> None:
    peeker = FakePeeker()
    endpoint = QuotaEndpoint(pipeline(), peeker)
    no_key = await endpoint.answer("GET", "/v1/quota", None, {})
    assert isinstance(no_key, Deny) and no_key.status == 401
    no_tier = await endpoint.answer("GET", "/v1/quota", "Bearer carol-token", {})
    assert isinstance(no_tier, Deny) and no_tier.code == "no_tier"
    other_model = await endpoint.answer("GET", "/v1/quota?model=llm/big", "Bearer alice-token", {})
    assert isinstance(other_model, Deny) and other_model.code == "model_access_denied"
    posted = await endpoint.answer("POST", "/v1/quota", "Bearer alice-token", {})
    assert isinstance(posted, Deny) and posted.status == 405
    assert peeker.asked == []  # nothing was peeked for any of them
    peeker.fail = True
    down = await endpoint.answer("GET", "/v1/quota", "Bearer alice-token", {})
    assert isinstance(down, Deny) and (down.status, down.code) == (503, "ratelimit_unavailable")
    assert endpoint.handles("/v1/quota?x=1") and endpoint.handles("/v1/quota/")
    assert not endpoint.handles("/v1/quotas")


# --- explain --------------------------------------------------------------------------------------


def phases(answer: dict[str, Any]) -> list[tuple[str, str]]:
    return [(p["phase"], p["result"]) for p in answer["phases"]]


@pytest.mark.asyncio
async def test_explain_a_credential_that_is_rate_limited() -> None:
    peeker = FakePeeker(
        limit("free-requests", "requests", 5, 0), limit("free-tokens", "tokens", 100, 40)
    )
    answer = await Explainer(pipeline(), peeker).explain(
        ExplainRequest(token="alice-token", path="/llm/tiny/v1/chat/completions", tokens=30)
    )
    assert (answer["allowed"], answer["status"], answer["reason"]) == (False, 429, "rate_limited")
    assert answer["limit"] == "free-requests"
    assert phases(answer) == [
        ("route", "ok"),
        ("authenticate", "ok"),
        ("tier", "ok"),
        ("access", "ok"),
        ("rate_limit", "denied"),
    ]
    tokens = next(x for x in answer["limits"] if x["unit"] == "tokens")
    assert tokens["remaining_after_estimate"] == 10
    assert "alice-token" not in json.dumps(answer)


@pytest.mark.asyncio
async def test_explain_a_synthetic_user_phase_by_phase() -> None:
    explainer = Explainer(pipeline(), FakePeeker(limit("free-requests", "requests", 5, 5)))
    allowed = await explainer.explain(
        ExplainRequest(user="alice", groups=("tier-free-users",), model="llm/tiny")
    )
    assert allowed["allowed"] is True and allowed["tier"] == "free"
    assert ("authenticate", "skipped") in phases(allowed)
    no_tier = await explainer.explain(ExplainRequest(user="dave", model="llm/tiny"))
    assert (no_tier["reason"], phases(no_tier)[-1]) == ("no_tier", ("tier", "denied"))
    no_access = await explainer.explain(
        ExplainRequest(user="bob", groups=("tier-free-users",), model="llm/tiny")
    )
    assert (no_access["reason"], phases(no_access)[-1]) == (
        "model_access_denied",
        ("access", "denied"),
    )
    assert no_access["user"] == "bob"
    bad_path = await explainer.explain(ExplainRequest(user="alice", path="/a//b"))
    assert (bad_path["status"], phases(bad_path)[-1]) == (400, ("route", "denied"))
    bad_token = await explainer.explain(ExplainRequest(token="nope", model="llm/tiny"))
    assert phases(bad_token)[-1] == ("authenticate", "denied")


@pytest.mark.asyncio
async def test_explain_says_when_the_rate_limiter_cannot_be_asked() -> None:
    peeker = FakePeeker()
    peeker.fail = True
    answer = await Explainer(pipeline(), peeker).explain(
        ExplainRequest(user="alice", groups=("tier-free-users",), model="llm/tiny")
    )
    assert answer["allowed"] is None and answer["reason"] == "ratelimit_unavailable"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "expected a JSON object"),
        ({"user": "a", "token": "t", "path": "/x"}, "either token"),
        ({"user": "a"}, "either path or model"),
        ({"user": "a", "path": "/x", "tokens": -1}, "tokens must be"),
        ({"user": "a", "path": "/x", "groups": "g"}, "groups must be a list"),
        ({"token": "t", "path": "/x", "groups": ["g"]}, "groups go with user"),
        ({"user": "a", "path": "/x", "colour": 1}, "unknown field"),
    ],
)
def test_explain_request_errors(body: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ExplainRequest.from_json(body)


# --- admin keys -----------------------------------------------------------------------------------


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


KEYS = f"""\
keys:
  - {{name: ops, sha256: {digest("sk-ops")}, access: write}}
  - {{name: viewer, sha256: {digest("sk-view")}}}
"""


@pytest.mark.asyncio
async def test_admin_keys() -> None:
    keys = parse_admin_keys(KEYS, "admin-keys.yaml")
    assert await keys.check("sk-ops", "update") == AdminVerdict("ok", "ops")
    assert await keys.check("sk-view", "get") == AdminVerdict("ok", "viewer")
    assert await keys.check("sk-view", "update") == AdminVerdict("forbidden", "viewer")
    assert await keys.check("sk-other", "get") == AdminVerdict("unauthenticated")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("keys:\n  - {name: a, sha256: abc}\n", "keys[0].sha256"),
        (f"keys:\n  - {{name: a, sha256: {digest('x')}}}\n  - {{name: b, sha256: {digest('x')}}}\n",
         "keys[1].sha256"),
        ("keys: []\n", "keys"),
    ],
)  # fmt: skip
def test_bad_admin_key_files_name_the_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_admin_keys(text, "admin-keys.yaml")
    assert excinfo.value.key == key


# --- the operator API over HTTP -------------------------------------------------------------------


TIERS_TEXT = """\
- {name: free, level: 0, groups: [tier-free-users]}
"""


class Rig:
    def __init__(self, tiers_file: pathlib.Path) -> None:
        tiers_file.write_text(TIERS_TEXT)
        self.tiers_file = tiers_file
        self.watched = WatchedFile(
            tiers_file,
            lambda text, src: parse_tier_document(text, src, "maas-default-gateway"),
            name="tiers",
        )
        self.watched.load()
        self.decisions = DecisionLog()
        self.peeker = FakePeeker(limit("free-requests", "requests", 5, 2))
        self.purged: list[str | None] = []
        self.requests: list[tuple[str, str]] = []

        async def policy() -> dict[str, Any]:
            return {"tiers": {"source": "built-in"}}

        def purge(user: str | None) -> dict[str, int]:
            self.purged.append(user)
            return {"identities": 1}

        self.api = OperatorApi(
            auth=parse_admin_keys(KEYS, "admin-keys.yaml"),
            explainer=Explainer(pipeline(), self.peeker),
            decisions=self.decisions,
            peeker=self.peeker,
            policy=policy,
            purge=purge,
            tier_of_groups=lambda groups: (
                MAPPING.resolve(groups).name if MAPPING.resolve(groups) else None
            ),
            token_limits_of=lambda sub, model: "100/60" if model == "llm/tiny" else None,
            on_request=lambda route, outcome: self.requests.append((route, outcome)),
            editor=PolicyEditor(
                [
                    EditablePart(
                        "tiers",
                        FileStore(tiers_file, self.watched),
                        lambda text, src: parse_tier_document(text, src, "maas-default-gateway"),
                    )
                ]
            ),
        )


@pytest_asyncio.fixture
async def admin(
    tmp_path: pathlib.Path,
) -> AsyncIterator[tuple[Rig, TestClient[web.Request, web.Application]]]:
    rig = Rig(tmp_path / "tiers.yaml")
    app = web.Application()
    app.add_routes(rig.api.routes())
    async with TestClient(TestServer(app)) as client:
        yield rig, client


OPS = {"Authorization": "Bearer sk-ops"}
VIEW = {"Authorization": "Bearer sk-view"}


@pytest.mark.asyncio
async def test_every_route_needs_an_admin_credential(admin: tuple[Rig, TestClient]) -> None:  # type: ignore[type-arg]
    rig, client = admin
    for method, path in [("GET", "/admin/v1/decisions"), ("POST", "/admin/v1/explain"),
                         ("GET", "/admin/v1/quota?user=a"), ("GET", "/admin/v1/policy"),
                         ("POST", "/admin/v1/purge"), ("GET", "/admin/v1/whoami")]:  # fmt: skip
        response = await client.request(method, path)
        assert response.status == 401, path
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = await client.request(method, path, headers={"Authorization": "Bearer sk-demo-x"})
        assert wrong.status == 401, path
    forbidden = await client.post("/admin/v1/purge", headers=VIEW)
    assert forbidden.status == 403
    assert rig.purged == []
    ok = await client.post("/admin/v1/purge?user=bob", headers=OPS)
    assert ok.status == 200 and await ok.json() == {"purged": {"identities": 1}}
    assert rig.purged == ["bob"]
    assert ("/admin/v1/purge", "forbidden") in rig.requests
    assert (await (await client.get("/admin/v1/whoami", headers=VIEW)).json()) == {
        "operator": "viewer"
    }


@pytest.mark.asyncio
async def test_explain_over_http(admin: tuple[Rig, TestClient]) -> None:  # type: ignore[type-arg]
    _, client = admin
    response = await client.post(
        "/admin/v1/explain",
        headers=VIEW,
        json={"user": "alice", "groups": ["tier-free-users"], "model": "llm/tiny"},
    )
    assert response.status == 200
    assert (await response.json())["allowed"] is True
    bad = await client.post("/admin/v1/explain", headers=VIEW, data=b"{not json")
    assert bad.status == 400
    assert (await bad.json())["error"]["message"] == "the body is not valid JSON"


@pytest.mark.asyncio
async def test_decisions_json_and_filters(admin: tuple[Rig, TestClient]) -> None:  # type: ignore[type-arg]
    rig, client = admin
    rig.decisions.add(decision(1, user="alice", tier="free"))
    rig.decisions.add(decision(2, user="bob", allowed=False, status=429, reason="rate_limited"))
    response = await client.get("/admin/v1/decisions?denied=true", headers=VIEW)
    assert [d["seq"] for d in (await response.json())["decisions"]] == [2]
    bad = await client.get("/admin/v1/decisions?limit=10001", headers=VIEW)
    assert bad.status == 400


@pytest.mark.asyncio
async def test_decisions_live_as_server_sent_events(admin: tuple[Rig, TestClient]) -> None:  # type: ignore[type-arg]
    rig, client = admin
    rig.decisions.add(decision(1, user="alice"))
    response = await client.get("/admin/v1/decisions?follow=true&user=alice", headers=VIEW)
    assert response.headers["Content-Type"] == "text/event-stream"

    async def next_event() -> dict[str, Any]:
        while True:
            line = (await response.content.readline()).decode()
            if line.startswith("data: "):
                data: dict[str, Any] = json.loads(line[6:])
                return data

    assert (await asyncio.wait_for(next_event(), 5))["seq"] == 1  # the recent ones first
    rig.decisions.add(decision(2, user="bob"))  # filtered out
    rig.decisions.add(decision(3, user="alice", allowed=False))
    assert (await asyncio.wait_for(next_event(), 5))["seq"] == 3
    rig.decisions.close()  # the server stops: the stream ends
    assert (await asyncio.wait_for(response.content.read(), 5)).strip() == b""  # then EOF


@pytest.mark.asyncio
async def test_quota_for_any_user(admin: tuple[Rig, TestClient]) -> None:  # type: ignore[type-arg]
    rig, client = admin
    unknown = await client.get("/admin/v1/quota?user=alice", headers=VIEW)
    assert unknown.status == 400
    assert "tier=" in (await unknown.json())["error"]["message"]
    rig.decisions.add(decision(5, user="alice", tier="free"))
    found = await client.get("/admin/v1/quota?user=alice", headers=VIEW)
    body = await found.json()
    assert body["tier"] == "free" and body["resolved_from"].startswith("decision 5")
    assert body["limits"][0]["remaining"] == 2
    by_groups = await client.get(
        "/admin/v1/quota?user=zed&groups=tier-premium-users&model=llm/tiny", headers=VIEW
    )
    assert (await by_groups.json())["tier"] == "premium"
    subscribed = await client.get(
        "/admin/v1/quota?user=zed&subscription=ns/gold&model=llm/tiny", headers=VIEW
    )
    assert subscribed.status == 200
    assert rig.peeker.asked[-1] == [
        {"subscription": "ns/gold", "model": "llm/tiny", "user": "zed", "token_limits": "100/60"}
    ]
    no_model = await client.get("/admin/v1/quota?user=zed&subscription=ns/gold", headers=VIEW)
    assert no_model.status == 400
    rig.peeker.fail = True
    down = await client.get("/admin/v1/quota?user=zed&tier=free", headers=VIEW)
    assert down.status == 503


@pytest.mark.asyncio
async def test_policy(admin: tuple[Rig, TestClient]) -> None:  # type: ignore[type-arg]
    _, client = admin
    response = await client.get("/admin/v1/policy", headers=VIEW)
    assert await response.json() == {"tiers": {"source": "built-in"}, "editable": ["tiers"]}


@pytest.mark.asyncio
async def test_policy_edit_dry_run_then_apply_through_the_file(
    admin: tuple[Rig, TestClient],  # type: ignore[type-arg]
) -> None:
    rig, client = admin
    document = await (await client.get("/admin/v1/policy/tiers", headers=VIEW)).json()
    assert document["document"] == TIERS_TEXT
    assert document["source"] == f"file {rig.tiers_file}"
    new = TIERS_TEXT + "- {name: gold, level: 3, groups: [vip]}\n"
    viewer = await client.post("/admin/v1/policy/tiers", headers=VIEW, data=new)
    assert viewer.status == 403  # an edit, even a dry run, needs update
    dry = await client.post("/admin/v1/policy/tiers?dry_run=true", headers=OPS, data=new)
    result = await dry.json()
    assert (result["dry_run"], result["changed"], result["applied"]) == (True, True, False)
    assert "+- {name: gold, level: 3, groups: [vip]}" in result["diff"]
    assert rig.tiers_file.read_text() == TIERS_TEXT  # nothing applied
    applied = await client.post("/admin/v1/policy/tiers", headers=OPS, json={"document": new})
    assert (await applied.json())["applied"] is True
    assert rig.tiers_file.read_text() == new
    assert [t.name for t in rig.watched.value.tiers] == ["free", "gold"]  # in force at once
    again = await client.post("/admin/v1/policy/tiers", headers=OPS, data=new)
    assert (await again.json())["changed"] is False


@pytest.mark.asyncio
async def test_a_bad_policy_edit_is_refused_naming_the_problem_and_changes_nothing(
    admin: tuple[Rig, TestClient],  # type: ignore[type-arg]
) -> None:
    rig, client = admin
    bad = await client.post(
        "/admin/v1/policy/tiers", headers=OPS, data="- {name: Free!, level: 0, groups: []}\n"
    )
    assert bad.status == 422
    error = (await bad.json())["error"]
    assert error["code"] == "invalid_policy"
    assert "the edit of tiers" in error["message"] and "name" in error["message"]
    assert rig.tiers_file.read_text() == TIERS_TEXT
    unknown = await client.get("/admin/v1/policy/limits", headers=VIEW)
    assert unknown.status == 400
    assert "editable: tiers" in (await unknown.json())["error"]["message"]
