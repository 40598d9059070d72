"""Closed-loop load through the gateway for the chaos tests: a few client threads, each sending
its own kind of request back to back until stopped, every request's start, end and answer kept,
and the moments of the fault marked, so a test can say how each request ended in each phase.

Threads and blocking HTTP on purpose: the faults are applied from the test's own thread (stop a
process, wait for it) while the load goes on, and nothing here has to share an event loop.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

# what a client sends: (path, headers, JSON body), asked afresh for every request
Request = tuple[str, Mapping[str, str], object]


@dataclass(frozen=True)
class Outcome:
    client: str
    started: float  # time.monotonic()
    ended: float
    status: int  # 0: no HTTP answer (connection refused or reset, timeout)
    code: str  # the error code of a JSON error body ("auth_backend_unavailable"), else ""
    body: bytes = b""

    @property
    def label(self) -> str:
        if self.status == 0:
            return "no answer"
        return f"{self.status} {self.code}".strip()


def _error_code(body: bytes) -> str:
    try:
        answer = json.loads(body)
    except ValueError:
        return ""
    error = answer.get("error") if isinstance(answer, dict) else None
    if isinstance(error, dict):
        return str(error.get("code") or error.get("type") or "")
    return ""


@dataclass
class Load:
    """`clients`: name -> a function giving the next request; `pause` between one client's
    requests (0: back to back). Use as a context manager; `marks` holds the fault's moments."""

    host: str
    port: int
    clients: Mapping[str, Callable[[], Request]]
    pause: float = 0.0
    timeout: float = 10.0
    outcomes: list[Outcome] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> Load:
        self.marks["start"] = time.monotonic()
        for name, next_request in self.clients.items():
            thread = threading.Thread(
                target=self._run, args=(name, next_request), name=f"load-{name}", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def mark(self, name: str) -> float:
        self.marks[name] = at = time.monotonic()
        return at

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)
        self._threads = []
        self.marks.setdefault("stop", time.monotonic())
        return self.outcomes

    def sent(self, client: str | None = None) -> int:
        return len(self.of(client))

    def of(self, client: str | None = None) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if client is None or o.client == client]

    def _run(self, name: str, next_request: Callable[[], Request]) -> None:
        connection: http.client.HTTPConnection | None = None
        while not self._stop.is_set():
            path, headers, body = next_request()
            started = time.monotonic()
            status, payload = 0, b""
            try:
                if connection is None:
                    connection = http.client.HTTPConnection(
                        self.host, self.port, timeout=self.timeout
                    )
                connection.request(
                    "POST",
                    path,
                    body=json.dumps(body).encode(),
                    headers={"content-type": "application/json", **headers},
                )
                answer = connection.getresponse()
                status, payload = answer.status, answer.read()
                if answer.will_close:
                    connection.close()
                    connection = None
            except (OSError, http.client.HTTPException):
                if connection is not None:
                    connection.close()
                connection = None
            outcome = Outcome(
                name, started, time.monotonic(), status, _error_code(payload), payload
            )
            with self._lock:
                self.outcomes.append(outcome)
            if self.pause:
                self._stop.wait(self.pause)
        if connection is not None:
            connection.close()


def tally(outcomes: Iterable[Outcome]) -> dict[str, int]:
    """How the requests ended: {"200": 812, "503 auth_backend_unavailable": 40, ...}."""
    return dict(Counter(o.label for o in outcomes))


def between(outcomes: Iterable[Outcome], start: float, end: float) -> list[Outcome]:
    """The requests sent in [start, end)."""
    return [o for o in outcomes if start <= o.started < end]


def report(title: str, load: Load, phases: Mapping[str, tuple[str, str]]) -> str:
    """A table per client and phase (phase -> (from mark, to mark)), printed by the tests so a
    run shows the number of requests sent and how each ended."""
    lines = [f"{title}: {load.sent()} requests"]
    for client in load.clients:
        mine = load.of(client)
        for phase, (start, end) in phases.items():
            chunk = between(mine, load.marks[start], load.marks[end])
            lines.append(f"  {client:>10} {phase:<12} {len(chunk):>6}  {tally(chunk)}")
    return "\n".join(lines)
