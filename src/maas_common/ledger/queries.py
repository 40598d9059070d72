"""What the ledger is asked: filters, grouping, totals; one SQL text for both engines.

Grouping by day folds quarter-hour sums (what the database groups by, in UTC) into days of the
asked time zone in Python: every time zone's offset is a multiple of 15 minutes, so the fold is
exact for all of them and the SQL stays the same on SQLite and PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from maas_common.ledger.records import COLUMNS, format_cost
from maas_common.periods import zone as find_zone

QUARTER_MS = 900_000
# what a summary can be grouped by ("day" in the query's time zone, the rest record fields)
GROUPS = (
    "day",
    "user",
    "model",
    "tier",
    "subscription",
    "organization_id",
    "cost_center",
    "key_id",
)
FILTERS = ("user", "model", "tier", "subscription", "organization_id", "cost_center", "key_id")
# a record field's column ("user" is reserved in PostgreSQL)
COLUMN = {name: ("user_name" if name == "user" else name) for name in COLUMNS}
SELECT_COLUMNS = ", ".join(COLUMN[name] for name in COLUMNS)


class QueryError(ValueError):
    """A query that cannot be answered as asked (the message says why)."""


def zone(name: str) -> dt.tzinfo:
    try:
        return find_zone(name)
    except ValueError as exc:
        raise QueryError(str(exc)) from None


@dataclass(frozen=True)
class UsageQuery:
    filters: dict[str, str] = field(default_factory=dict)  # record field -> value (FILTERS)
    since_ms: int | None = None  # inclusive
    until_ms: int | None = None  # exclusive
    group_by: tuple[str, ...] = ()
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        for name in self.filters:
            if name not in FILTERS:
                raise QueryError(f"cannot filter by {name!r}; one of {', '.join(FILTERS)}")
        for name in self.group_by:
            if name not in GROUPS:
                raise QueryError(f"cannot group by {name!r}; one of {', '.join(GROUPS)}")
        if len(set(self.group_by)) != len(self.group_by):
            raise QueryError("a group is named twice")
        zone(self.timezone)

    def where(self, placeholder: Callable[[int], str]) -> tuple[str, list[object]]:
        clauses, params = [], list[object]()
        for name, value in sorted(self.filters.items()):
            params.append(value)
            clauses.append(f"{COLUMN[name]} = {placeholder(len(params))}")
        if self.since_ms is not None:
            params.append(self.since_ms)
            clauses.append(f"ts_ms >= {placeholder(len(params))}")
        if self.until_ms is not None:
            params.append(self.until_ms)
            clauses.append(f"ts_ms < {placeholder(len(params))}")
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), params

    def summary_sql(self, placeholder: Callable[[int], str]) -> tuple[str, list[object]]:
        keys = [COLUMN[name] for name in self.group_by if name != "day"]
        if "day" in self.group_by:
            keys.append(f"ts_ms / {QUARTER_MS}")
        where, params = self.where(placeholder)
        select = ", ".join([*keys, *_TOTALS]) if keys else ", ".join(_TOTALS)
        sql = f"SELECT {select} FROM usage_records{where}"  # noqa: S608 - names are fixed above
        if keys:
            sql += " GROUP BY " + ", ".join(keys)
        return sql, params

    def records_sql(
        self, placeholder: Callable[[int], str], limit: int, after: tuple[int, str] | None
    ) -> tuple[str, list[object]]:
        where, params = self.where(placeholder)
        if after is not None:
            params += [after[0], after[1]]
            ts, request_id = placeholder(len(params) - 1), placeholder(len(params))
            cursor = f"(ts_ms, request_id) > ({ts}, {request_id})"
            where = f"{where} AND {cursor}" if where else f" WHERE {cursor}"
        params.append(limit)
        sql = (
            f"SELECT {SELECT_COLUMNS} FROM usage_records{where}"  # noqa: S608 - fixed names
            f" ORDER BY ts_ms, request_id LIMIT {placeholder(len(params))}"
        )
        return sql, params


_TOTALS = (
    "COUNT(*)",
    "SUM(prompt_tokens)",
    "SUM(completion_tokens)",
    "SUM(total_tokens)",
    "SUM(cost_nanos)",
)


@dataclass
class Totals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost_nanos: int = 0

    def add(self, values: Sequence[object]) -> None:
        requests, prompt, completion, total, cost = (int(v or 0) for v in values)  # type: ignore[call-overload]
        self.requests += requests
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.total_tokens += total
        self.cost_nanos += cost

    def as_dict(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "cost": format_cost(self.cost_nanos),
        }


@dataclass
class Summary:
    totals: Totals
    groups: list[tuple[dict[str, str], Totals]]  # sorted by their keys

    def as_dict(self, group_by: Sequence[str]) -> dict[str, object]:
        out: dict[str, object] = self.totals.as_dict()
        if group_by:
            out["groups"] = [{**keys, **totals.as_dict()} for keys, totals in self.groups]
        return out


def fold(query: UsageQuery, rows: Iterable[Sequence[object]]) -> Summary:
    """The database's rows (group keys, then the totals) as a Summary in the query's groups."""
    group_by = query.group_by
    named = [name for name in group_by if name != "day"]
    tz = zone(query.timezone)
    totals = Totals()
    groups: dict[tuple[str, ...], Totals] = {}
    for row in rows:
        values = dict(zip(named, (str(v) for v in row[: len(named)]), strict=True))
        if "day" in group_by:
            quarter = int(row[len(named)])  # type: ignore[call-overload]
            moment = dt.datetime.fromtimestamp(quarter * QUARTER_MS / 1000, tz)
            values["day"] = moment.date().isoformat()
        sums = row[len(named) + (1 if "day" in group_by else 0) :]
        totals.add(sums)
        if group_by:
            key = tuple(values[name] for name in group_by)
            groups.setdefault(key, Totals()).add(sums)
    ordered = [
        (dict(zip(group_by, key, strict=True)), value) for key, value in sorted(groups.items())
    ]
    return Summary(totals, ordered)
