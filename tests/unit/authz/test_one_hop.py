"""The one-hop topology's rate limits in maas-authz (one_hop.py), with the real limiter on the
memory store and an injected clock: the descriptors Envoy's rate limit filter would have sent,
admission in Check, settlement from the access log, peeks, the failure modes."""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.service.auth.v3.external_auth_pb2 import CheckResponse
from google.protobuf.json_format import MessageToDict
from prometheus_client import CollectorRegistry

from maas_authz import one_hop
from maas_authz.config import AuthzConfig
from maas_authz.one_hop import AUTHZ, USAGE, Admitted, InlineLimits, Refused
from maas_common.clock import ManualClock
from maas_common.config import validate
from maas_common.errors import BackendUnavailable, ConfigError
from maas_ratelimit.accounting import FailureMode, LimitAccounting
from maas_ratelimit.limiter import RateLimiter
from maas_ratelimit.limits import parse_limits
from maas_ratelimit.memory_store import MemoryBucketStore
from maas_ratelimit.metrics import RateLimitMetrics
from maas_ratelimit.store import Admission, AdmitResult, Charge, ChargeResult

REPO = Path(__file__).resolve().parents[3]
LIMITS = """\
limits:
  - {name: free-requests, tier: free, kind: requests, limit: 2, window: 1m}
  - {name: free-tokens, tier: free, kind: tokens, limit: 100, window: 1m}
  - {name: free-shadow, tier: free, kind: requests, limit: 1, window: 1m, shadow: true}
"""
AUTHZ_META = {"user": "alice@example.com", "tier": "free", "model": "llm/tiny"}


class DownStore:
    name = "down"

    async def admit(
        self, admissions: Sequence[Admission], now_ms: int, request_id: str | None
    ) -> AdmitResult:
        raise BackendUnavailable("redis", "timeout", "no answer in 50ms")

    async def charge(
        self, charges: Sequence[Charge], now_ms: int, request_id: str | None
    ) -> ChargeResult:
        raise BackendUnavailable("redis", "timeout", "no answer in 50ms")

    async def close(self) -> None:
        pass


class Rig:
    def __init__(self, *, store: Any = None, failure_mode: FailureMode = "open") -> None:
        self.registry = CollectorRegistry()
        self.clock = ManualClock()
        table = parse_limits(LIMITS, "limits.yaml")
        limiter = RateLimiter(
            limits=lambda: table, store=store or MemoryBucketStore(), clock=self.clock
        )
        self.accounting = LimitAccounting(
            limiter, RateLimitMetrics(self.registry), failure_mode=failure_mode, clock=self.clock
        )
        self.limits = InlineLimits(self.accounting, retry_after=7)

    def sample(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    async def admit(self, request_id: str, **usage: str) -> Admitted | Refused:
        return await self.limits.admit({**AUTHZ_META, "request_id": request_id}, usage)


def _gateway(name: str) -> dict[str, Any]:
    text = string.Template((REPO / "envoy" / name).read_text()).substitute(
        {k: "1" for k in ("ENVOY_HOST", "ENVOY_PORT", "ENVOY_ADMIN_PORT", "AUTHZ_GRPC_PORT",
                          "RATELIMIT_GRPC_PORT", "BACKEND_PORT", "USAGE_LUA")}
    )  # fmt: skip
    config: dict[str, Any] = yaml.safe_load(text)
    return config


def _rate_limits_of(gateway: str) -> list[dict[str, Any]]:
    config = _gateway(gateway)
    (listener,) = config["static_resources"]["listeners"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (ratelimit,) = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ratelimit"]
    rate_limits: list[dict[str, Any]] = ratelimit["typed_config"]["rate_limits"]
    return rate_limits


def test_the_actions_mirror_the_two_server_gateways_rate_limits() -> None:
    """one_hop.py builds what envoy/gateway.yaml makes Envoy send: same keys, same metadata,
    same skip_if_absent, same hits, in the same order."""
    shipped = _rate_limits_of("gateway.yaml")
    ours = [(one_hop.ADMISSION, None), *one_hop.AFTER_RESPONSE]
    assert len(shipped) == len(ours) == 4
    for entry, (actions, count_key) in zip(shipped, ours, strict=True):
        mirrored = [(a.descriptor_key, a.namespace, a.key, a.skip_if_absent) for a in actions]
        assert mirrored == [
            (
                action["metadata"]["descriptor_key"],
                action["metadata"]["metadata_key"]["key"],
                action["metadata"]["metadata_key"]["path"][0]["key"],
                action["metadata"].get("skip_if_absent", False),
            )
            for action in entry["actions"]
        ]
        if actions is one_hop.ADMISSION:
            assert "apply_on_stream_done" not in entry and "hits_addend" not in entry
        elif count_key is None:
            assert entry["apply_on_stream_done"] and entry["hits_addend"] == {"number": 0}
        else:
            assert entry["apply_on_stream_done"]
            assert entry["hits_addend"] == {"format": f"%DYNAMIC_METADATA(maas.usage:{count_key})%"}


def test_the_one_hop_gateway_has_no_rate_limit_filter_and_sends_the_usage_to_ext_authz() -> None:
    config = _gateway("gateway-one-hop.yaml")
    (listener,) = config["static_resources"]["listeners"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in hcm["http_filters"]]
    assert names == ["envoy.filters.http.lua", "envoy.filters.http.ext_authz",
                     "envoy.filters.http.router"]  # fmt: skip
    assert hcm["http_filters"][1]["typed_config"]["metadata_context_namespaces"] == [USAGE]
    (access_log,) = hcm["access_log"]
    assert access_log["typed_config"]["common_config"]["grpc_service"] == {
        "envoy_grpc": {"cluster_name": "maas_authz"}
    }
    assert [c["name"] for c in config["static_resources"]["clusters"]] == [
        "maas_authz", "model_backend"
    ]  # fmt: skip


def test_a_required_value_absent_sends_no_descriptor_and_optional_ones_are_left_out() -> None:
    assert one_hop.descriptor_of(one_hop.ADMISSION, {AUTHZ: {"tier": "free"}}) is None
    descriptor = one_hop.descriptor_of(
        one_hop.ADMISSION, {AUTHZ: {"user": "u", "tier": "free"}, USAGE: {"reserve_prompt": "9"}}
    )
    assert descriptor is not None
    assert descriptor.entries == {"tier": "free", "user": "u", "reserve_prompt": "9"}
    assert descriptor.reservation == (9, 0) and descriptor.hits == 1


def test_after_the_response_the_charges_and_the_outcome_as_envoy_sends_them() -> None:
    authz = {**AUTHZ_META, "request_id": "r1", "key_id": "k1"}
    usage = {"prompt_tokens": 12, "completion_tokens": 0, "charge_prompt": "prompt_tokens",
             "charge_completion": "completion_tokens", "outcome": "charged", "status": "200",
             "streamed": "false", "reserve_prompt": "20", "reserve_completion": "8"}  # fmt: skip
    prompt, completion, outcome = one_hop.after_response_descriptors({AUTHZ: authz, USAGE: usage})
    assert (prompt.charge_kind, prompt.hits, prompt.check_only) == ("prompt_tokens", 12, False)
    assert prompt.entries["key_id"] == "k1" and prompt.entries["status"] == "200"
    assert (completion.charge_kind, completion.hits, completion.check_only) == (
        "completion_tokens", 0, True
    )  # fmt: skip
    assert "key_id" not in completion.entries
    assert (outcome.outcome, outcome.hits, outcome.check_only) == ("charged", 0, True)
    assert {d.reservation for d in (prompt, completion, outcome)} == {(20, 8)}
    # an answer that charged nothing reports its outcome only; no user: nothing at all
    (only,) = one_hop.after_response_descriptors({AUTHZ: authz, USAGE: {"outcome": "no_usage"}})
    assert only.outcome == "no_usage"
    assert one_hop.after_response_descriptors({AUTHZ: {"tier": "free"}, USAGE: usage}) == []


@pytest.mark.asyncio
async def test_admission_answers_with_the_headers_envoys_filter_would_add() -> None:
    rig = Rig()
    admitted = await rig.admit("r1", reserve_prompt="30", reserve_completion="10")
    assert isinstance(admitted, Admitted)
    headers = dict(admitted.headers)
    assert headers["x-ratelimit-remaining-requests"] == "1"
    assert headers["x-ratelimit-remaining-tokens"] == "60"  # the reservation is taken
    # DRAFT_VERSION_03, from the statuses: the least remaining, each limit's policy
    assert headers["x-ratelimit-limit"] == '2, 2;w=60;name="free tier: 2 requests per 1m"'
    assert headers["x-ratelimit-remaining"] == "1" and headers["x-ratelimit-reset"] == "30"
    assert rig.sample("maas_ratelimit_tokens_reserved_total", tier="free", model="llm/tiny") == 40


@pytest.mark.asyncio
async def test_over_the_limit_a_429_like_the_rate_limit_filters() -> None:
    rig = Rig()
    for request_id in ("r1", "r2"):
        assert isinstance(await rig.admit(request_id), Admitted)
    refused = await rig.admit("r3")
    assert isinstance(refused, Refused)
    response = CheckResponse.FromString(refused.response)
    denied = response.denied_response
    assert denied.status.code == 429
    headers = [(h.header.key, h.header.value) for h in denied.headers]
    names = [key for key, _ in headers]
    assert names[:3] == ["retry-after", "x-maas-ratelimit-limit", "content-type"]
    assert ("x-envoy-ratelimited", "true") in headers
    assert names.index("x-envoy-ratelimited") < names.index("x-ratelimit-limit")
    body = json.loads(denied.body)
    assert body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"] == "requests"
    metadata = MessageToDict(response.dynamic_metadata)
    # for the decisions view; never `user`, which would make the access log charge it
    assert metadata["phase"] == "rate_limit" and metadata["limit"] == "free-requests"
    assert metadata["log_user"] == AUTHZ_META["user"] and "user" not in metadata
    assert rig.sample("maas_ratelimit_calls_total", answer="over_limit") == 1
    assert rig.sample("maas_ratelimit_usage_responses_total", tier="free",
                      outcome="rate_limited") == 1  # fmt: skip


@pytest.mark.asyncio
async def test_a_shadow_limit_is_counted_and_refuses_nothing() -> None:
    rig = Rig()
    assert isinstance(await rig.admit("r1"), Admitted)
    assert isinstance(await rig.admit("r2"), Admitted)  # the shadow limit (1) is over
    assert rig.sample("maas_ratelimit_decisions_total", tier="free", limit="free-shadow",
                      result="shadow_limited") == 1  # fmt: skip


@pytest.mark.asyncio
async def test_settlement_charges_refunds_and_never_twice() -> None:
    rig = Rig()
    assert isinstance(await rig.admit("r1", reserve_prompt="30", reserve_completion="10"), Admitted)
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "charge_prompt": "prompt_tokens",
             "charge_completion": "completion_tokens", "outcome": "charged",
             "reserve_prompt": "30", "reserve_completion": "10"}  # fmt: skip
    entry = {AUTHZ: {**AUTHZ_META, "request_id": "r1"}, USAGE: usage}
    await rig.limits.settle(entry)
    await rig.limits.settle(entry)  # Envoy's stream re-sent it: de-duplicated by request id
    charged = rig.sample("maas_ratelimit_tokens_charged_total", tier="free", model="llm/tiny",
                         kind="prompt_tokens")  # fmt: skip
    assert charged == 5
    assert rig.sample("maas_ratelimit_tokens_refunded_total", tier="free", model="llm/tiny") == 32
    peek = await rig.limits.peek([{"tier": "free", "user": AUTHZ_META["user"]}])
    tokens = next(x for x in peek.limits if x["name"] == "free-tokens")
    assert tokens["remaining"] == 92  # 100 - 5 - 3: the reservation given back, the use taken


@pytest.mark.asyncio
async def test_a_store_down_fails_open_counted_or_closed_with_503() -> None:
    opened = Rig(store=DownStore(), failure_mode="open")
    assert await opened.admit("r1") == Admitted(())
    assert opened.sample("maas_ratelimit_calls_total", answer="failure_open") == 1
    usage = {"prompt_tokens": 5, "charge_prompt": "prompt_tokens"}
    await opened.limits.settle({AUTHZ: {**AUTHZ_META, "request_id": "r1"}, USAGE: usage})
    assert opened.sample("maas_ratelimit_charges_skipped_total", reason="store_unavailable") == 1

    closed = Rig(store=DownStore(), failure_mode="closed")
    refused = await closed.admit("r1")
    assert isinstance(refused, Refused)
    denied = CheckResponse.FromString(refused.response).denied_response
    assert denied.status.code == 503
    assert ("retry-after", "7") in [(h.header.key, h.header.value) for h in denied.headers]
    assert json.loads(denied.body)["error"]["code"] == "ratelimit_unavailable"
    assert closed.sample("maas_ratelimit_calls_total", answer="unavailable") == 1


@pytest.mark.parametrize(
    ("ratelimit", "workers", "message"),
    [
        ({"mode": "inline", "target": "x:1"}, 1, "mode 'inline' limits in this process"),
        ({"limits": {"file": "limits.yaml"}}, 1, "configure mode 'inline'"),
        ({"mode": "inline"}, 2, "needs ratelimit.store.type 'redis'"),
        ({"mode": "inline", "store": {"type": "redis", "redis": {"url": "redis://r:6379/0"}},
          "ledger": {"url": "sqlite:///l.db"}}, 2, "no ratelimit.ledger"),
    ],
)  # fmt: skip
def test_inline_settings_that_cannot_work_fail_at_start_up(
    ratelimit: dict[str, Any], workers: int, message: str
) -> None:
    data = {"ratelimit": ratelimit, "server": {"workers": workers}}
    with pytest.raises(ConfigError, match=message):
        validate(AuthzConfig, data, "authz.yaml")


def test_inline_with_redis_serves_several_workers() -> None:
    data = {
        "server": {"workers": 2},
        "ratelimit": {"mode": "inline",
                      "store": {"type": "redis", "redis": {"url": "redis://r:6379/0"}}},
    }  # fmt: skip
    assert validate(AuthzConfig, data, "authz.yaml").ratelimit.inline


@pytest.mark.parametrize("ratelimit", [{}, {"target": "r:1"}, {"mode": "inline"}])
def test_a_full_dump_validates_again(ratelimit: dict[str, Any]) -> None:
    """A worker validates the supervisor's dump of every key, defaults included."""
    config = validate(AuthzConfig, {"ratelimit": ratelimit}, "authz.yaml")
    again = validate(AuthzConfig, config.model_dump(mode="json"), "from the supervisor")
    assert again == config
