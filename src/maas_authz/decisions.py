"""The gateway's recent decisions, from Envoy's access log: what the operator's live view shows.

Envoy streams an entry per request (envoy.service.accesslog.v3, see access_log.py) carrying the
final answer and the dynamic metadata both servers set: maas-authz's identity, tier or
subscription and model on an allowed request, its reason (and the user, when known) on a denied
one (as log_user, log_tier: names no rate limit reads); maas-ratelimit's refusing limit on a
429. This module turns an entry into a Decision, keeps
the last `capacity` of them, and feeds live subscribers, each through a bounded queue (a slow
reader loses the oldest entries it has not read, never the server's memory).

Nothing here ever holds a credential: only the fields below are read from an entry (never a
request header), and the path loses its query.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from typing import Any

AUTHZ_NAMESPACE = "envoy.filters.http.ext_authz"
RATELIMIT_NAMESPACE = "envoy.filters.http.ratelimit"
_MAX_PATH = 256
_MAX_FIELD = 256


@dataclass(frozen=True, slots=True)
class Decision:
    """One request as the gateway answered it."""

    seq: int  # increasing; a reader resumes after the last one it saw
    time: str  # when the request started (UTC, ISO 8601)
    request_id: str  # Envoy's x-request-id
    method: str
    path: str  # without its query
    status: int  # the HTTP status the client got
    allowed: bool  # passed both policy checks (the model may still have failed)
    phase: str  # who answered: authorization, rate_limit, quota, upstream, gateway
    reason: str  # machine-readable: ok, a maas-authz deny code, rate_limited, ...
    user: str = ""
    tier: str = ""
    subscription: str = ""
    model: str = ""
    limit: str = ""  # the limit that refused (429s)
    retry_after_seconds: int | None = None
    duration_ms: int = 0

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class DecisionFilter:
    """Which decisions a reader wants; an unset field matches everything."""

    allowed: bool | None = None
    reason: str | None = None
    tier: str | None = None
    subscription: str | None = None
    model: str | None = None
    user: str | None = None

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> DecisionFilter:
        """From URL query parameters; raises ValueError naming a bad one."""
        allowed: bool | None = None
        text = query.get("allowed")
        if text is not None:
            if text not in ("true", "false"):
                raise ValueError(f"allowed must be true or false, got {text!r}")
            allowed = text == "true"
        denied = query.get("denied")
        if denied is not None:
            if denied not in ("true", "false"):
                raise ValueError(f"denied must be true or false, got {denied!r}")
            allowed = denied == "false"
        return cls(
            allowed,
            query.get("reason") or None,
            query.get("tier") or None,
            query.get("subscription") or None,
            query.get("model") or None,
            query.get("user") or None,
        )

    def matches(self, decision: Decision) -> bool:
        if self.allowed is not None and decision.allowed != self.allowed:
            return False
        for name in ("reason", "tier", "subscription", "model", "user"):
            wanted = getattr(self, name)
            if wanted is not None and getattr(decision, name) != wanted:
                return False
        return True


DECISION_FIELDS = tuple(f.name for f in fields(Decision))


def classify(
    *,
    status: int,
    details: str,
    authz: Mapping[str, Any],
    ratelimit: Mapping[str, Any],
    rate_limited_flag: bool,
) -> tuple[bool, str, str]:
    """(allowed, phase, reason) of an answer, from its status, Envoy's response code details
    and the two servers' metadata."""
    if authz.get("answer") == "quota":
        return True, "quota", "ok"
    if authz.get("phase") == "rate_limit":  # the one-hop topology's own rate limits refused
        return False, "rate_limit", str(authz.get("reason") or "rate_limited")
    if "reason" in authz:
        return False, "authorization", str(authz["reason"])
    if "refusal" in ratelimit:
        return False, "rate_limit", str(ratelimit["refusal"])
    if "limit" in ratelimit or rate_limited_flag:
        return False, "rate_limit", "rate_limited"
    if details.startswith("ext_authz"):  # Envoy's own: maas-authz unreachable or failing
        return False, "authorization", "authz_unavailable"
    if "user" not in authz and status >= 400 and not details.startswith("via_upstream"):
        return False, "gateway", details or f"status_{status}"
    return True, "upstream", "ok"


def decision_from(
    seq: int,
    *,
    start: datetime | None,
    request_id: str,
    method: str,
    path: str,
    status: int,
    details: str,
    authz: Mapping[str, Any],
    ratelimit: Mapping[str, Any],
    rate_limited_flag: bool = False,
    duration_ms: int = 0,
) -> Decision:
    allowed, phase, reason = classify(
        status=status,
        details=details,
        authz=authz,
        ratelimit=ratelimit,
        rate_limited_flag=rate_limited_flag,
    )
    if authz.get("phase") == "rate_limit":  # one hop: the refusal is in maas-authz's metadata
        ratelimit = authz
    retry = ratelimit.get("retry_after_seconds")
    return Decision(
        seq=seq,
        time=(start or datetime.now(UTC)).isoformat(timespec="milliseconds"),
        request_id=_text(request_id),
        method=_text(method),
        path=path.partition("?")[0][:_MAX_PATH],
        status=status,
        allowed=allowed,
        phase=phase,
        reason=_text(reason),
        user=_logged(authz, "user"),
        tier=_logged(authz, "tier"),
        subscription=_logged(authz, "subscription"),
        model=_logged(authz, "model"),
        limit=_text(ratelimit.get("limit") or ""),
        retry_after_seconds=int(retry) if isinstance(retry, int | float) else None,
        duration_ms=duration_ms,
    )


def _logged(authz: Mapping[str, Any], name: str) -> str:
    """An allowed request's `name` from maas-authz's metadata, or the log_`name` it sets on a
    local reply (a deny, a quota answer), where the rate limit filter must not find it."""
    return _text(authz.get(name) or authz.get(f"log_{name}") or "")


def _text(value: object) -> str:
    return str(value)[:_MAX_FIELD]


class DecisionLog:
    """The last `capacity` decisions, and live readers of new ones."""

    def __init__(
        self, capacity: int = 2000, reader_queue: int = 256, max_readers: int = 64
    ) -> None:
        self._recent: deque[Decision] = deque(maxlen=capacity)
        self._readers: set[_Reader] = set()
        self._reader_queue = reader_queue
        self._max_readers = max_readers
        self._seq = itertools.count(1)
        self.dropped = 0  # entries slow live readers lost
        self._closed = False

    def next_seq(self) -> int:
        return next(self._seq)

    def add(self, decision: Decision) -> None:
        self._recent.append(decision)
        for reader in self._readers:
            if reader.wanted.matches(decision):
                self.dropped += reader.offer(decision)

    def recent(self, wanted: DecisionFilter, limit: int = 100) -> list[Decision]:
        """The latest `limit` matching decisions, oldest first."""
        out: list[Decision] = []
        for decision in reversed(self._recent):
            if wanted.matches(decision):
                out.append(decision)
                if len(out) >= limit:
                    break
        out.reverse()
        return out

    def latest_for(self, user: str) -> Decision | None:
        """The newest decision about `user` that says their tier or subscription."""
        for decision in reversed(self._recent):
            if decision.user == user and (decision.tier or decision.subscription):
                return decision
        return None

    @property
    def readers(self) -> int:
        return len(self._readers)

    def close(self) -> None:
        """Ends every live reader (the server is stopping) and refuses new ones."""
        self._closed = True
        for reader in self._readers:
            reader.end()

    @contextlib.asynccontextmanager
    async def follow(self, wanted: DecisionFilter) -> AsyncIterator[_Reader]:
        """A live reader of the decisions `wanted` matches, while the context lasts."""
        if self._closed:
            raise TooManyReaders("the server is stopping")
        if len(self._readers) >= self._max_readers:
            raise TooManyReaders(f"at most {self._max_readers} live readers at once")
        reader = _Reader(wanted, self._reader_queue)
        self._readers.add(reader)
        try:
            yield reader
        finally:
            self._readers.discard(reader)


class TooManyReaders(RuntimeError):
    pass


class _Reader:
    def __init__(self, wanted: DecisionFilter, size: int) -> None:
        self.wanted = wanted
        self._queue: asyncio.Queue[Decision | None] = asyncio.Queue(size)

    def end(self) -> None:
        if self._queue.full():
            self._queue.get_nowait()
        self._queue.put_nowait(None)

    def offer(self, decision: Decision) -> int:
        """Queues `decision`; returns how many older ones were dropped to make room."""
        dropped = 0
        if self._queue.full():
            self._queue.get_nowait()
            dropped = 1
        self._queue.put_nowait(decision)
        return dropped

    async def next(self) -> Decision | None:
        """The next decision, or None once the log is closed (the caller bounds the wait)."""
        return await self._queue.get()
