"""The usage ledger on the operator API: totals, groups, records, CSV.

  GET /admin/v1/usage           totals {requests, prompt_tokens, completion_tokens, total_tokens,
                                cost}; group_by=day,model,... adds `groups`; format=csv gives the
                                groups (or the totals) as CSV
  GET /admin/v1/usage/records   the records themselves, oldest first: limit= and after= (the
                                previous page's `next`) page through them; format=csv streams
                                every matching record

Filters: user, subscription, tier, model, key_id, organization_id, cost_center; since / until
(RFC 3339, a date, or epoch ms; until exclusive) or month=YYYY-MM; tz= the time zone of dates,
months and days (default: usage.timezone).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web

from maas_common.ledger.database import LedgerDatabase
from maas_common.ledger.queries import FILTERS, QueryError, UsageQuery
from maas_common.ledger.records import COLUMNS, UsageRecord, format_cost
from maas_common.periods import month_bounds, parse_instant, zone

_TOTAL_FIELDS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "cost")
_PAGE = 1000  # records per database read while streaming CSV


class UsageRequestError(ValueError):
    """A query parameter that cannot be used (the message names it)."""


def query_of(params: Mapping[str, str], default_timezone: str) -> UsageQuery:
    tz_name = params.get("tz") or default_timezone
    try:
        tz = zone(tz_name)
    except ValueError as exc:
        raise UsageRequestError(f"tz: {exc}") from None
    since = until = None
    try:
        if params.get("month"):
            if params.get("since") or params.get("until"):
                raise UsageRequestError("month= or since=/until=, not both")
            since, until = month_bounds(params["month"], tz)
        if params.get("since"):
            since = parse_instant(params["since"], tz)
        if params.get("until"):
            until = parse_instant(params["until"], tz)
    except ValueError as exc:
        raise UsageRequestError(str(exc)) from None
    filters = {name: params[name] for name in FILTERS if params.get(name)}
    group_by = tuple(g for g in params.get("group_by", "").split(",") if g)
    try:
        return UsageQuery(filters, since, until, group_by, tz_name)
    except QueryError as exc:
        raise UsageRequestError(str(exc)) from None


def _record_dict(record: UsageRecord) -> dict[str, object]:
    out = record.as_dict()
    out["cost"] = format_cost(out.pop("cost_nanos"))
    return out


_CSV_COLUMNS = [name if name != "cost_nanos" else "cost" for name in COLUMNS]


@dataclass
class UsageApi:
    database: LedgerDatabase
    timezone: str = "UTC"

    async def summary(self, request: web.Request) -> web.StreamResponse:
        query = query_of(request.query, self.timezone)
        summary = await self.database.summary(query)
        if request.query.get("format") == "csv":
            out = io.StringIO()
            writer = csv.writer(out)
            writer.writerow([*query.group_by, *_TOTAL_FIELDS])
            rows = summary.groups if query.group_by else [({}, summary.totals)]
            for keys, totals in rows:
                values = totals.as_dict()
                writer.writerow([*keys.values(), *(values[f] for f in _TOTAL_FIELDS)])
            return web.Response(
                text=out.getvalue(),
                content_type="text/csv",
                headers={"Content-Disposition": 'attachment; filename="usage.csv"'},
            )
        return web.json_response(
            {
                **summary.as_dict(query.group_by),
                "since": query.since_ms,
                "until": query.until_ms,
                "timezone": query.timezone,
                **({"group_by": list(query.group_by)} if query.group_by else {}),
                **({"filters": query.filters} if query.filters else {}),
            }
        )

    async def records(self, request: web.Request) -> web.StreamResponse:
        query = query_of(request.query, self.timezone)
        if query.group_by:
            raise UsageRequestError("records are not grouped: group_by is for /admin/v1/usage")
        after = _cursor(request.query.get("after"))
        if request.query.get("format") == "csv":
            return await self._csv(request, query, after)
        text = request.query.get("limit", "100")
        if not text.isdigit() or not 1 <= int(text) <= 10_000:
            raise UsageRequestError("limit must be a whole number from 1 to 10000")
        records = await self.database.records(query, int(text), after)
        last = records[-1] if len(records) == int(text) else None
        return web.json_response(
            {
                "records": [_record_dict(r) for r in records],
                "next": f"{last.ts_ms}:{last.request_id}" if last else None,
            }
        )

    async def _csv(
        self, request: web.Request, query: UsageQuery, after: tuple[int, str] | None
    ) -> web.StreamResponse:
        # streamed page by page: an export of a month of records never sits in memory
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/csv; charset=utf-8",
                "Content-Disposition": 'attachment; filename="usage-records.csv"',
            }
        )
        records = await self.database.records(query, _PAGE, after)  # errors before the headers
        await response.prepare(request)
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(_CSV_COLUMNS)
        while True:
            for record in records:
                row = _record_dict(record)
                writer.writerow([row[name] for name in _CSV_COLUMNS])
            await response.write(out.getvalue().encode())
            out.seek(0)
            out.truncate()
            if len(records) < _PAGE:
                break
            last = records[-1]
            records = await self.database.records(query, _PAGE, (last.ts_ms, last.request_id))
        await response.write_eof()
        return response


def _cursor(text: str | None) -> tuple[int, str] | None:
    if not text:
        return None
    ts, sep, request_id = text.partition(":")
    if not sep or not ts.isdigit() or not request_id:
        raise UsageRequestError("after must be the `next` of the previous page")
    return int(ts), request_id
