"""The bucket store interface, its operations as plain data, and the rules every store follows.

Two operations, each atomic over all the buckets it names:
- admit: every bucket must have its `need`; if every enforced one does, each bucket that has it
  gives up its `take`; if any enforced one does not, nothing at all is taken (all-or-nothing).
  Shadow buckets are evaluated and reported but never refuse.
- Every bucket keeps time in its own clock when it says so (`at`, `unit_ms`): by default the
  call's now in milliseconds; a budget's calendar bucket is frozen at its period's end (`at`: it
  never refills, and expires when the period is over), a long rolling budget counts in seconds
  or minutes (`unit_ms`) so that its level stays exact.
- charge: post-paid usage. Never refused, may drive a bucket into debt (down to the spec's floor,
  DEBT_WINDOWS windows' worth), and applied at most once
  per request id; a request id that was refused at admission is never charged. A negative
  amount is a refund (a reservation given back); no bucket ever rises above its capacity.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from maas_ratelimit.bucket import BucketSpec

# The operations and their results are values, never changed once built, but plain slotted
# dataclasses rather than frozen ones: several are built per call, and a frozen dataclass's
# __init__ (object.__setattr__ per field) costs four times as much.


@dataclass(slots=True)
class Admission:
    key: str
    spec: BucketSpec
    need: int  # scaled level the bucket must have (requests: hits x window; tokens: 1)
    take: int  # scaled amount removed when admitted (tokens limits: the reservation, or 0)
    shadow: bool = False
    at: int = 0  # the bucket's time, in its units (0: the call's now_ms)
    unit_ms: int = 1  # milliseconds per unit of the bucket's time


@dataclass(slots=True)
class Outcome:
    sufficient: bool  # the bucket had its `need`
    level: int  # scaled level after the operation


@dataclass(slots=True)
class AdmitResult:
    admitted: bool
    outcomes: tuple[Outcome, ...]


@dataclass(slots=True)
class Charge:
    key: str
    spec: BucketSpec
    amount: int  # scaled amount removed, unconditionally (negative: added, up to the capacity)
    at: int = 0  # as Admission
    unit_ms: int = 1


class ChargeStatus(enum.Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"  # this request id was charged before
    DENIED_REQUEST = "denied_request"  # this request id was refused at admission


@dataclass(slots=True)
class ChargeResult:
    status: ChargeStatus
    levels: tuple[int, ...]  # scaled levels after the charge; empty unless applied


class BucketStore(Protocol):
    """Raises maas_common.errors.BackendUnavailable when the store cannot answer."""

    name: str

    async def admit(
        self, admissions: Sequence[Admission], now_ms: int, request_id: str | None
    ) -> AdmitResult: ...

    async def charge(
        self, charges: Sequence[Charge], now_ms: int, request_id: str | None
    ) -> ChargeResult: ...

    async def close(self) -> None: ...
