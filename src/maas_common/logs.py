"""Logging set-up: one line per event (JSON or text), with secrets scrubbed as a last defence."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
import time
from typing import Any, Literal

from maas_common.clock import Clock

LogFormat = Literal["json", "text"]

# Anything that looks like a bearer credential or a JWT. Code never logs tokens on purpose (it logs
# token_fingerprint() instead); this filter exists so a mistake cannot leak one either.
_SECRET_PATTERNS = (
    re.compile(r"(?i)(bearer\s+)[^\s\"',;]+"),
    re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"),
    re.compile(r"\bsk-[A-Za-z0-9_-]{4,}"),
)
_STANDARD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def token_fingerprint(token: str) -> str:
    """A short, non-reversible name for a token that is safe to log."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def scrub(text: str) -> str:
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.lastindex else "") + "[REDACTED]", text)
    return text


class _ScrubFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed log call: let emit() report it, never raise to the caller
            return True
        cleaned = scrub(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = scrub(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["exc"] = scrub(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = {
            k: v
            for k, v in vars(record).items()
            if k not in _STANDARD_ATTRS and not k.startswith("_")
        }
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return scrub(line)


def setup_logging(level: str = "info", fmt: LogFormat = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ScrubFilter())
    formatter: logging.Formatter
    if fmt == "json":
        formatter = _JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = _TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log would print every probe; grpc's own logs are noise at info.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class LogThrottle:
    """One log line per interval for an event that may repeat per request (a backend down), on
    an injected clock: `allow()` says whether to log now, with how many it held back since."""

    def __init__(self, clock: Clock, seconds: float = 5.0) -> None:
        self._clock = clock
        self._seconds = seconds
        self._next = 0.0
        self._held = 0

    def allow(self) -> int | None:
        """None: stay quiet (counted). Else log now, saying this many were held back."""
        now = self._clock.monotonic()
        if now < self._next:
            self._held += 1
            return None
        held, self._held, self._next = self._held, 0, now + self._seconds
        return held

    def log(
        self,
        logger: logging.Logger,
        level: int,
        message: str,
        *args: object,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """`logger.log(level, message, *args)` unless held back; the line says how many were
        (`suppressed`)."""
        suppressed = self.allow()
        if suppressed is not None:
            logger.log(level, message, *args, extra={**(extra or {}), "suppressed": suppressed})
