"""GET /admin/v1/usage and /admin/v1/usage/records over aiohttp's test server, on a real SQLite
ledger: totals, filters, days in a time zone, CSV, paging, errors that name the parameter."""

from __future__ import annotations

import csv
import datetime as dt
import io
import pathlib
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from maas_authz.admin_api import OperatorApi
from maas_authz.usage_api import UsageApi
from maas_common.ledger.database import open_ledger
from maas_common.ledger.records import UsageRecord
from tests.unit.authz.test_operator import OPS, VIEW, Rig


def ms(text: str) -> int:
    return round(dt.datetime.fromisoformat(text).timestamp() * 1000)


RECORDS = [
    # 23:30 UTC on Nov 30 is Dec 1 in Berlin (UTC+1)
    UsageRecord("a1", ms("2026-11-30T23:30:00+00:00"), "alice", "llm/tiny", "free",
                prompt_tokens=10, completion_tokens=5, total_tokens=15, cost_nanos=1500,
                priced=True, status=200),
    UsageRecord("a2", ms("2026-12-01T10:00:00+00:00"), "alice", "llm/big", "free",
                prompt_tokens=20, completion_tokens=10, total_tokens=30, cost_nanos=3000,
                priced=True, status=200, streamed=True),
    UsageRecord("b1", ms("2026-12-01T11:00:00+00:00"), "bob", "llm/tiny", "",
                subscription="ns/gold", key_id="k1", prompt_tokens=1, completion_tokens=1,
                total_tokens=2, cost_nanos=4, priced=True, status=200),
]  # fmt: skip


@pytest_asyncio.fixture
async def usage(
    tmp_path: pathlib.Path,
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    database = open_ledger("sqlite:///ledger.db", base_dir=tmp_path)
    await database.migrate()
    assert await database.insert(RECORDS) == 3
    rig = Rig(tmp_path / "tiers.yaml")
    api: OperatorApi = rig.api
    api.usage = UsageApi(database)
    app = web.Application()
    app.add_routes(api.routes())
    async with TestClient(TestServer(app)) as client:
        yield client
    await database.close()


@pytest.mark.asyncio
async def test_usage_needs_an_admin_credential(usage: TestClient) -> None:  # type: ignore[type-arg]
    assert (await usage.get("/admin/v1/usage")).status == 401
    assert (await usage.get("/admin/v1/usage/records")).status == 401
    assert (await usage.get("/admin/v1/usage", headers=VIEW)).status == 200  # a read


@pytest.mark.asyncio
async def test_totals_filters_and_groups(usage: TestClient) -> None:  # type: ignore[type-arg]
    everything = await (await usage.get("/admin/v1/usage", headers=OPS)).json()
    assert {k: everything[k] for k in ("requests", "prompt_tokens", "completion_tokens",
            "total_tokens", "cost")} == {"requests": 3, "prompt_tokens": 31,
            "completion_tokens": 16, "total_tokens": 47, "cost": "0.000004504"}  # fmt: skip
    alice = await (await usage.get("/admin/v1/usage?user=alice", headers=OPS)).json()
    assert alice["requests"] == 2 and alice["total_tokens"] == 45
    gold = await (await usage.get("/admin/v1/usage?subscription=ns/gold", headers=OPS)).json()
    assert gold["requests"] == 1
    by_day = await (await usage.get("/admin/v1/usage?group_by=day", headers=OPS)).json()
    assert [(g["day"], g["requests"]) for g in by_day["groups"]] == [
        ("2026-11-30", 1), ("2026-12-01", 2)
    ]  # fmt: skip
    berlin = await (
        await usage.get("/admin/v1/usage?group_by=day,user&tz=Europe/Berlin", headers=OPS)
    ).json()
    assert [(g["day"], g["user"], g["requests"]) for g in berlin["groups"]] == [
        ("2026-12-01", "alice", 2), ("2026-12-01", "bob", 1)
    ]  # fmt: skip
    december = await (await usage.get("/admin/v1/usage?month=2026-12", headers=OPS)).json()
    assert december["requests"] == 2  # UTC: a1 is November
    berlin_december = await (
        await usage.get("/admin/v1/usage?month=2026-12&tz=Europe/Berlin", headers=OPS)
    ).json()
    assert berlin_december["requests"] == 3
    window = await (
        await usage.get("/admin/v1/usage?since=2026-12-01T10:30:00Z&until=2026-12-02", headers=OPS)
    ).json()
    assert window["requests"] == 1


@pytest.mark.asyncio
async def test_csv_exports(usage: TestClient) -> None:  # type: ignore[type-arg]
    response = await usage.get("/admin/v1/usage?group_by=model&format=csv", headers=OPS)
    assert response.content_type == "text/csv"
    rows = list(csv.reader(io.StringIO(await response.text())))
    assert rows[0] == ["model", "requests", "prompt_tokens", "completion_tokens",
                       "total_tokens", "cost"]  # fmt: skip
    assert rows[1:] == [["llm/big", "1", "20", "10", "30", "0.000003"],
                        ["llm/tiny", "2", "11", "6", "17", "0.000001504"]]  # fmt: skip
    records = await usage.get("/admin/v1/usage/records?format=csv&user=alice", headers=OPS)
    table = list(csv.DictReader(io.StringIO(await records.text())))
    assert [r["request_id"] for r in table] == ["a1", "a2"]
    assert table[1]["streamed"] == "True" and table[1]["cost"] == "0.000003"


@pytest.mark.asyncio
async def test_records_page_by_page(usage: TestClient) -> None:  # type: ignore[type-arg]
    first = await (await usage.get("/admin/v1/usage/records?limit=2", headers=OPS)).json()
    assert [r["request_id"] for r in first["records"]] == ["a1", "a2"]
    assert first["records"][0]["cost"] == "0.0000015"
    second = await (
        await usage.get(f"/admin/v1/usage/records?limit=2&after={first['next']}", headers=OPS)
    ).json()
    assert [r["request_id"] for r in second["records"]] == ["b1"] and second["next"] is None


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("group_by=week", "cannot group by 'week'"),
        ("tz=Mars/Base", "unknown time zone"),
        ("since=yesterday", "is not a time"),
        ("month=2026-12&since=2026-12-01", "not both"),
        ("month=12-2026", "YYYY-MM"),
    ],
)
async def test_bad_queries_name_the_parameter(
    usage: TestClient,  # type: ignore[type-arg]
    query: str,
    message: str,
) -> None:
    response = await usage.get(f"/admin/v1/usage?{query}", headers=OPS)
    assert response.status == 400
    assert message in (await response.json())["error"]["message"]
    bad_page = await usage.get("/admin/v1/usage/records?after=nonsense", headers=OPS)
    assert bad_page.status == 400
