"""The decisions view: access log entries -> Decisions (access_log.py, decisions.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from envoy.data.accesslog.v3.accesslog_pb2 import HTTPAccessLogEntry
from envoy.service.accesslog.v3.als_pb2 import StreamAccessLogsMessage

from maas_authz.access_log import AccessLogService
from maas_authz.decisions import (
    AUTHZ_NAMESPACE,
    RATELIMIT_NAMESPACE,
    Decision,
    DecisionFilter,
    DecisionLog,
    TooManyReaders,
    classify,
    decision_from,
)


def decision(seq: int, **fields: Any) -> Decision:
    base: dict[str, Any] = {
        "seq": seq,
        "time": "2026-12-07T00:00:00.000+00:00",
        "request_id": f"r{seq}",
        "method": "POST",
        "path": "/llm/tiny/v1/chat/completions",
        "status": 200,
        "allowed": True,
        "phase": "upstream",
        "reason": "ok",
    }
    return Decision(**{**base, **fields})


# --- classify -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "details", "authz", "ratelimit", "flag", "expected"),
    [
        (200, "via_upstream", {"user": "a", "tier": "free"}, {}, False, (True, "upstream", "ok")),
        # the model failed: the policy still allowed it
        (503, "via_upstream", {"user": "a"}, {}, False, (True, "upstream", "ok")),
        (403, "ext_authz_denied", {"reason": "no_tier"}, {}, False,
         (False, "authorization", "no_tier")),
        (429, "request_rate_limited", {"user": "a"}, {"limit": "free-requests"}, True,
         (False, "rate_limit", "rate_limited")),
        (429, "request_rate_limited", {"user": "a"}, {}, True,
         (False, "rate_limit", "rate_limited")),
        (429, "request_rate_limited", {"user": "a"}, {"refusal": "no_subscription"}, True,
         (False, "rate_limit", "no_subscription")),
        (200, "ext_authz_denied", {"answer": "quota"}, {}, False, (True, "quota", "ok")),
        # Envoy's own answer when maas-authz is unreachable
        (503, "ext_authz_error", {}, {}, False, (False, "authorization", "authz_unavailable")),
        (404, "route_not_found", {}, {}, False, (False, "gateway", "route_not_found")),
    ],
)  # fmt: skip
def test_classify(
    status: int,
    details: str,
    authz: dict[str, Any],
    ratelimit: dict[str, Any],
    flag: bool,
    expected: tuple[bool, str, str],
) -> None:
    result = classify(
        status=status,
        details=details,
        authz=authz,
        ratelimit=ratelimit,
        rate_limited_flag=flag,
    )
    assert result == expected


def test_decision_from_reads_log_names_on_local_replies_and_drops_the_query() -> None:
    made = decision_from(
        7,
        start=None,
        request_id="rid",
        method="GET",
        path="/v1/quota?model=llm/tiny&secret=x",
        status=403,
        details="ext_authz_denied",
        authz={"reason": "model_access_denied", "log_user": "bob", "log_tier": "free"},
        ratelimit={},
    )
    assert (made.user, made.tier, made.path) == ("bob", "free", "/v1/quota")
    assert (made.allowed, made.phase, made.reason) == (
        False,
        "authorization",
        "model_access_denied",
    )


# --- filters ------------------------------------------------------------------------------------


def test_filter_from_query() -> None:
    wanted = DecisionFilter.from_query({"denied": "true", "tier": "free", "user": ""})
    assert wanted == DecisionFilter(allowed=False, tier="free")
    assert wanted.matches(decision(1, allowed=False, tier="free"))
    assert not wanted.matches(decision(2, allowed=True, tier="free"))
    assert not wanted.matches(decision(3, allowed=False, tier="premium"))
    with pytest.raises(ValueError, match="allowed must be true or false"):
        DecisionFilter.from_query({"allowed": "yes"})


# --- the log ------------------------------------------------------------------------------------


def test_recent_keeps_the_last_capacity_and_filters() -> None:
    log = DecisionLog(capacity=10)
    for n in range(1, 26):
        log.add(decision(n, user="alice" if n % 2 else "bob", tier="free"))
    assert [d.seq for d in log.recent(DecisionFilter())] == list(range(16, 26))
    assert [d.seq for d in log.recent(DecisionFilter(user="bob"), limit=2)] == [22, 24]
    latest = log.latest_for("alice")
    assert latest is not None and latest.seq == 25
    assert log.latest_for("carol") is None


@pytest.mark.asyncio
async def test_a_follower_sees_what_matches_and_a_slow_one_loses_the_oldest() -> None:
    log = DecisionLog(reader_queue=3)
    async with log.follow(DecisionFilter(allowed=False)) as reader:
        assert log.readers == 1
        for n in range(1, 9):
            log.add(decision(n, allowed=n % 2 == 0))  # the odd ones are denied
        # the queue holds 3: of the denied 1, 3, 5, 7 the oldest is dropped
        seen = [(await reader.next()) for _ in range(3)]
        assert [d.seq for d in seen if d] == [3, 5, 7]
        assert log.dropped == 1
    assert log.readers == 0


@pytest.mark.asyncio
async def test_close_ends_followers_and_refuses_new_ones() -> None:
    log = DecisionLog(max_readers=1)
    async with log.follow(DecisionFilter()) as reader:
        with pytest.raises(TooManyReaders):
            async with log.follow(DecisionFilter()):
                pass
        waiting = asyncio.create_task(reader.next())
        await asyncio.sleep(0)
        log.close()
        assert await waiting is None
    with pytest.raises(TooManyReaders):
        async with log.follow(DecisionFilter()):
            pass


# --- the access log adapter ---------------------------------------------------------------------


def entry(
    path: str, status: int, authz: dict[str, Any], ratelimit: dict[str, Any] | None = None
) -> HTTPAccessLogEntry:
    made = HTTPAccessLogEntry()
    made.request.path = path
    made.request.request_id = "rid-1"
    made.request.request_method = 3  # POST
    made.response.response_code.value = status
    made.common_properties.start_time.FromSeconds(1_800_000_000)
    made.common_properties.duration.FromMilliseconds(12)
    filters = made.common_properties.metadata.filter_metadata
    filters[AUTHZ_NAMESPACE].update(authz)
    if ratelimit is not None:
        filters[RATELIMIT_NAMESPACE].update(ratelimit)
    return made


async def stream(*entries: HTTPAccessLogEntry) -> AsyncIterator[StreamAccessLogsMessage]:
    message = StreamAccessLogsMessage()
    message.http_logs.log_entry.extend(entries)
    yield message


@pytest.mark.asyncio
async def test_entries_become_decisions() -> None:
    log = DecisionLog()
    results: list[str] = []
    service = AccessLogService(log, results.append)
    refused = entry(
        "/v1/chat/completions",
        429,
        {"user": "alice", "tier": "free", "model": "llm/tiny"},
        {"limit": "free-requests", "retry_after_seconds": 24, "unit": "requests"},
    )
    refused.request.original_path = "/llm/tiny/v1/chat/completions"
    refused.request.request_headers["authorization"] = "Bearer sk-secret-never-kept"
    await service.StreamAccessLogs(stream(refused, entry("/x", 200, {"user": "bob"})), None)
    first, second = log.recent(DecisionFilter())
    assert first.path == "/llm/tiny/v1/chat/completions"  # as the client sent it
    assert (first.allowed, first.phase, first.limit, first.retry_after_seconds) == (
        False,
        "rate_limit",
        "free-requests",
        24,
    )
    assert (first.user, first.tier, first.model, first.method) == (
        "alice",
        "free",
        "llm/tiny",
        "POST",
    )
    assert first.time.startswith("2027-01-15T08:00:00")
    assert first.duration_ms == 12
    assert "sk-secret" not in repr(first.as_json())
    assert second.user == "bob" and second.allowed
    assert results == ["recorded", "recorded"]
