"""A config file that is re-read when it changes, keeping the last good version on errors.

Mounted ConfigMaps change by an atomic symlink swap (`..data` -> a new timestamped directory), which
inotify on the file itself does not see. Polling the file's bytes through the symlink is simple,
catches every kind of update and costs one small read per interval, off the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Generic, Literal, TypeVar

from maas_common.errors import ConfigError

T = TypeVar("T")
log = logging.getLogger(__name__)

ReloadResult = Literal["applied", "rejected", "unreadable"]


class WatchedFile(Generic[T]):
    """Holds the parsed content of one file. `parse(text, source)` raises ConfigError when bad."""

    def __init__(
        self,
        path: Path,
        parse: Callable[[str, str], T],
        *,
        name: str,
        interval: float = 1.0,
        on_reload: Callable[[ReloadResult], None] | None = None,
        on_change: Callable[[T], None] | None = None,
    ) -> None:
        self.path = path
        self.name = name
        self._parse = parse
        self._interval = interval
        self._on_reload = on_reload or (lambda _result: None)
        self._on_change = on_change or (lambda _value: None)
        self._digest = b""
        self._value: T | None = None

    @property
    def value(self) -> T:
        if self._value is None:
            raise RuntimeError(f"{self.name} was never loaded")
        return self._value

    def load(self) -> T:
        """First load, at start-up: any problem is a ConfigError that stops the server."""
        raw = self._read()
        self._apply(raw, self._parse(self._decode(raw), str(self.path)))
        return self.value

    async def reload_if_changed(self) -> ReloadResult | None:
        """Re-read the file; None when unchanged. Never raises for a bad or missing file."""
        try:
            raw = await asyncio.to_thread(self._read)
        except ConfigError as exc:
            if self._digest != b"unreadable":
                log.error("%s: keeping the previous version: %s", self.name, exc)
                self._digest = b"unreadable"
                self._on_reload("unreadable")
            return "unreadable"
        if hashlib.sha256(raw).digest() == self._digest:
            return None
        try:
            parsed = await asyncio.to_thread(self._parse, self._decode(raw), str(self.path))
        except Exception as exc:  # ConfigError, or a parser bug: either way keep the old version
            log.error("%s: rejected the new version, keeping the previous one: %s", self.name, exc)
            self._digest = hashlib.sha256(raw).digest()  # report a broken version once
            self._on_reload("rejected")
            return "rejected"
        self._apply(raw, parsed)
        log.info("%s: applied a new version from %s", self.name, self.path)
        self._on_reload("applied")
        return "applied"

    async def watch(self) -> None:
        """Poll forever (cancel the task to stop)."""
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.reload_if_changed()
            except Exception:  # a watcher must never die; the old config stays in force
                log.exception("%s: unexpected error while reloading", self.name)

    def _apply(self, raw: bytes, parsed: T) -> None:
        self._digest = hashlib.sha256(raw).digest()
        self._value = parsed
        self._on_change(parsed)

    def _read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except OSError as exc:
            raise ConfigError(
                str(self.path), "", f"cannot be read: {exc.strerror or exc}"
            ) from None

    def _decode(self, raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(str(self.path), "", "is not UTF-8 text") from None
