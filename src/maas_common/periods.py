"""Calendar periods and instants in a time zone: budgets reset on them, usage queries use them.

A calendar month (week, day) starts at local midnight of its first day in the configured zone,
so with DST a day may be 23 or 25 hours long; everything is computed with zoneinfo, and instants
are integers in milliseconds since the epoch.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator

CalendarPeriod = Literal["day", "week", "month"]
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_MONTH = re.compile(r"^\d{4}-\d{2}$")


def zone(name: str) -> dt.tzinfo:
    """A time zone by IANA name (ValueError naming it when unknown)."""
    if name in ("UTC", "Z"):
        return dt.UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}") from None


def _known_zone(name: str) -> str:
    zone(name)
    return name


# a config value that must name a time zone (the error says which name is unknown)
TimeZoneName = Annotated[str, AfterValidator(_known_zone)]


def _ms(moment: dt.datetime) -> int:
    return round(moment.timestamp() * 1000)


def _midnight(day: dt.date, tz: dt.tzinfo) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, tzinfo=tz)


def calendar_period(period: CalendarPeriod, tz: dt.tzinfo, now_ms: int) -> tuple[str, int, int]:
    """(id, start ms, end ms) of the period that holds `now_ms`: id "2026-12", "2026-W49" or
    "2026-12-07", start inclusive, end exclusive."""
    today = dt.datetime.fromtimestamp(now_ms / 1000, tz).date()
    if period == "day":
        start, end = today, today + dt.timedelta(days=1)
        name = today.isoformat()
    elif period == "week":  # ISO weeks: Monday to Sunday
        start = today - dt.timedelta(days=today.weekday())
        end = start + dt.timedelta(days=7)
        year, week, _ = start.isocalendar()
        name = f"{year}-W{week:02d}"
    else:
        start = today.replace(day=1)
        end = (start + dt.timedelta(days=32)).replace(day=1)
        name = f"{start.year}-{start.month:02d}"
    return name, _ms(_midnight(start, tz)), _ms(_midnight(end, tz))


def month_bounds(text: str, tz: dt.tzinfo) -> tuple[int, int]:
    """(start, end) in ms of the month "YYYY-MM" in `tz` (ValueError otherwise)."""
    if not _MONTH.match(text):
        raise ValueError(f"a month is YYYY-MM, not {text!r}")
    first = dt.date(int(text[:4]), int(text[5:]), 1)
    _, start, end = calendar_period("month", tz, _ms(_midnight(first, tz)))
    return start, end


def parse_instant(text: str, tz: dt.tzinfo) -> int:
    """Milliseconds since the epoch from an RFC 3339 time ("2026-12-01T00:00:00Z"), a date
    ("2026-12-01": its midnight in `tz`) or milliseconds; ValueError saying what is expected."""
    if text.isdigit():
        return int(text)
    if _DATE.match(text):
        try:
            return _ms(_midnight(dt.date.fromisoformat(text), tz))
        except ValueError:
            pass
    else:
        try:
            moment = dt.datetime.fromisoformat(text)
        except ValueError:
            pass
        else:
            return _ms(moment if moment.tzinfo else moment.replace(tzinfo=tz))
    raise ValueError(f"{text!r} is not a time: use 2026-12-01, 2026-12-01T00:00:00Z or epoch ms")
