"""Token bucket arithmetic, exact: integers only, time in milliseconds, no clock of its own.

A bucket for "N per window W" holds at most N tokens and refills continuously at N/W. To keep
everything in integers the level is stored scaled by W (in "token-milliseconds"): capacity is N*W,
one token is W, and each elapsed millisecond adds N. A level below zero is debt, left by post-paid
token charges; it is paid back by refill before anything is admitted again.

Times are wall-clock milliseconds from the calling server (so that replicas sharing a Redis agree),
and a bucket's time never moves backwards.

The Redis store runs the same arithmetic in a Lua script (redis_store.py); the store contract
tests hold both to the same results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

# Lua numbers are doubles: every scaled value must stay an exact integer there too.
MAX_EXACT = 2**53
# Debt is capped at this many windows' worth of tokens: one absurd usage report cannot lock a
# user out for ever, and every level stays within +-(DEBT_WINDOWS + 1) x capacity < MAX_EXACT.
DEBT_WINDOWS = 64


def countable(limit: int, window_ms: int) -> bool:
    """Whether "limit per window" can be counted exactly, debt included (see MAX_EXACT)."""
    return (DEBT_WINDOWS + 1) * limit * window_ms < MAX_EXACT


@dataclass(frozen=True, slots=True)
class BucketSpec:
    limit: int  # tokens per window
    window_ms: int
    # limit x window, computed once: every decision reads it
    capacity: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "capacity", self.limit * self.window_ms)

    @property
    def floor(self) -> int:
        """The lowest level debt can reach."""
        return -DEBT_WINDOWS * self.capacity


class BucketState(NamedTuple):
    """A stored bucket. A store may keep it as any tuple that starts with these three fields
    (the memory store appends the time the bucket is full again)."""

    level: int  # scaled by `scale`
    updated_ms: int
    scale: int  # the window_ms the level was scaled with (windows can change on reload)


def current_level(state: Sequence[int] | None, spec: BucketSpec, now_ms: int) -> int:
    """The scaled level at `now_ms` of a stored bucket (a BucketState or a tuple that starts like
    one; None for none): refilled since the last update, at most the capacity."""
    if state is None:
        return spec.capacity  # a bucket nobody has touched (or that expired) is full
    level, updated_ms, scale = state[0], state[1], state[2]
    window = spec.window_ms
    if scale != window:
        level = level * window // scale  # same number of tokens, new scale
    elapsed = now_ms - updated_ms
    if elapsed > 0:  # a clock step backwards refills nothing
        level += elapsed * spec.limit
    capacity = spec.capacity
    return level if level < capacity else capacity  # not min(): this runs for every bucket read


def next_updated(state: Sequence[int] | None, now_ms: int) -> int:
    """A bucket's time only moves forward: replicas whose clocks differ must not make the same
    span of time refill twice (B at t-60s, then A at t, would otherwise refill 60 s again)."""
    return now_ms if state is None or state[1] < now_ms else state[1]


def ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def remaining_tokens(level: int, spec: BucketSpec) -> int:
    """Whole tokens available now (0 while in debt)."""
    return level // spec.window_ms if level > 0 else 0


def ms_until(level: int, target: int, spec: BucketSpec) -> int:
    """Milliseconds of refill until the level reaches `target` (0 if it already has)."""
    return 0 if level >= target else ceil_div(target - level, spec.limit)


def ms_until_full(level: int, spec: BucketSpec) -> int:
    return ms_until(level, spec.capacity, spec)
