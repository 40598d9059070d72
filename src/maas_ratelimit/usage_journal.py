"""The usage journal: every ledger record on local disk before the charge is answered.

Append-only segment files (`<number>.jsonl`, one JSON line per record) in a directory this
process holds with an exclusive lock; an `acked` file says how far the database has taken them.
A record is written with one os.write on the event loop (microseconds, into the page cache): a
process killed at any moment after answering loses nothing, and a restart ships what was not
acknowledged, in order; the database's request-id key makes a second shipment harmless. Bounded
by `max_bytes`: beyond it a record is refused (counted by the caller), never blocking a charge.
Reading happens on a worker thread, up to a position fixed on the loop (complete lines only).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from dataclasses import dataclass
from pathlib import Path

from maas_common.errors import ConfigError
from maas_common.ledger.records import UsageRecord

_SEGMENT = re.compile(r"^(\d{12})\.jsonl$")


@dataclass(frozen=True, order=True, slots=True)
class Position:
    segment: int
    offset: int


@dataclass(slots=True)
class Batch:
    records: list[UsageRecord]
    end: Position  # acknowledge this to drop the batch from the journal
    corrupt: int  # lines that were not records (skipped, counted)
    size: int  # bytes of journal it covers


class UsageJournal:
    def __init__(
        self, directory: Path, *, segment_bytes: int = 8 << 20, max_bytes: int = 1 << 30
    ) -> None:
        self.directory = directory
        self._segment_bytes = segment_bytes
        self._max_bytes = max_bytes
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._segment = 0  # the segment appended to
        self._size = 0  # its size
        self._acked = Position(0, 0)
        self.pending_bytes = 0  # appended and not acknowledged
        self.pending_records = 0  # appended and not acknowledged

    # -- opening -------------------------------------------------------------------------------

    def open(self) -> None:
        """Takes the directory (one process per journal) and finds where things stand; a
        record torn by a crash mid-write is cut off."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(self.directory / ".lock", os.O_CREAT | os.O_RDWR, 0o600)
        except OSError as exc:
            raise ConfigError(
                "config", "ledger.spool_dir", f"cannot use {self.directory}: {exc}"
            ) from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise ConfigError(
                "config",
                "ledger.spool_dir",
                f"{self.directory} is in use by another process (one journal per process)",
            ) from None
        self._lock_fd = lock_fd
        self._acked = self._read_ack()
        segments = self.segments()
        self._segment = max(segments, default=max(self._acked.segment, 1))
        path = self._path(self._segment)
        with open(path, "ab+") as handle:  # cut a torn last line (lines are far below 64 KiB)
            size = handle.seek(0, os.SEEK_END)
            start = max(0, size - 65536)
            handle.seek(start)
            tail = handle.read()
            if tail and not tail.endswith(b"\n"):
                cut = tail.rfind(b"\n")
                handle.truncate(start + cut + 1 if cut >= 0 else start)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._size = os.fstat(self._fd).st_size
        if self._acked.segment >= self._segment and self._acked.offset > self._size:
            # an acknowledgement past the end (files removed by hand): nothing of what is there
            # now was shipped
            self._acked = Position(self._segment, 0)
        self.pending_records, self.pending_bytes = self._count_pending()

    def segments(self) -> list[int]:
        return sorted(
            int(m.group(1)) for p in self.directory.iterdir() if (m := _SEGMENT.match(p.name))
        )

    def _path(self, segment: int) -> Path:
        return self.directory / f"{segment:012d}.jsonl"

    def _read_ack(self) -> Position:
        try:
            segment, offset = (self.directory / "acked").read_text().split()
            return Position(int(segment), int(offset))
        except (OSError, ValueError):
            return Position(0, 0)

    def _count_pending(self) -> tuple[int, int]:
        """(records, bytes) not acknowledged."""
        count = size = 0
        for segment in self.segments():
            if segment < self._acked.segment:
                continue
            with open(self._path(segment), "rb") as handle:
                if segment == self._acked.segment:
                    handle.seek(self._acked.offset)
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    count += chunk.count(b"\n")
                    size += len(chunk)
        return count, size

    # -- the hot path --------------------------------------------------------------------------

    def append(self, record: UsageRecord) -> bool:
        """Writes the record (False: the journal is full; nothing written)."""
        assert self._fd is not None, "open() first"
        line = record.to_line()
        if self.pending_bytes + len(line) > self._max_bytes:
            return False
        try:
            if self._size >= self._segment_bytes:
                self._rotate()
            written = os.write(self._fd, line)
        except OSError:  # a full or failing disk: refused (the caller counts and logs it)
            return False
        if written != len(line):  # a full disk mid-line: cut it, so the next line starts clean
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            return False
        self._size += written
        self.pending_records += 1
        self.pending_bytes += written
        return True

    def _rotate(self) -> None:
        assert self._fd is not None
        os.close(self._fd)
        self._segment += 1
        self._fd = os.open(self._path(self._segment), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._size = 0

    def end(self) -> Position:
        """Where the journal ends now (every line before it is complete)."""
        return Position(self._segment, self._size)

    # -- shipping (read on a worker thread, acknowledge on the loop) -----------------------------

    def read(self, until: Position, max_records: int) -> Batch:
        """Up to `max_records` unacknowledged records before `until`, in order."""
        records: list[UsageRecord] = []
        corrupt = size = 0
        position = self._acked
        if position.segment == 0:  # nothing acknowledged yet: from the first segment
            position = Position(min(self.segments(), default=until.segment), 0)
        while position < until and len(records) < max_records:
            last = position.segment == until.segment
            try:
                with open(self._path(position.segment), "rb") as handle:
                    handle.seek(position.offset)
                    data = handle.read(until.offset - position.offset if last else -1)
            except FileNotFoundError:
                data = b""
            offset = position.offset
            for line in data.splitlines(keepends=True):
                if len(records) >= max_records or not line.endswith(b"\n"):
                    break
                offset += len(line)
                try:
                    records.append(UsageRecord.from_line(line))
                except (ValueError, TypeError):
                    corrupt += 1
            size += offset - position.offset
            position = Position(position.segment, offset)
            if last or len(records) >= max_records:
                break
            position = Position(position.segment + 1, 0)  # an older segment, read to its end
        return Batch(records, position, corrupt, size)

    def ack(self, batch: Batch) -> None:
        """The batch is in the database: forget it (whole segments before it are deleted)."""
        end = batch.end
        tmp = self.directory / "acked.tmp"
        tmp.write_text(f"{end.segment} {end.offset}\n")
        os.replace(tmp, self.directory / "acked")
        self._acked = end
        self.pending_records = max(0, self.pending_records - len(batch.records) - batch.corrupt)
        self.pending_bytes = max(0, self.pending_bytes - batch.size)
        for segment in self.segments():
            if segment < end.segment:
                self._path(segment).unlink(missing_ok=True)

    def close(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._lock_fd = None
