"""Token bucket arithmetic (bucket.py): exact integers, levels scaled by the window in ms.

For SPEC (5 per 120_000 ms) one token is 120_000, the capacity is 600_000 and each millisecond
refills 5, so one token takes 24_000 ms to come back.
"""

from __future__ import annotations

import pytest

from maas_ratelimit.bucket import (
    MAX_EXACT,
    BucketSpec,
    BucketState,
    ceil_div,
    current_level,
    ms_until,
    ms_until_full,
    remaining_tokens,
)

SPEC = BucketSpec(limit=5, window_ms=120_000)
TOKEN = SPEC.window_ms
FULL = SPEC.capacity
T0 = 1_000_000


def state(level: int, updated_ms: int = T0, scale: int = SPEC.window_ms) -> BucketState:
    return BucketState(level=level, updated_ms=updated_ms, scale=scale)


# --- BucketSpec ---------------------------------------------------------------------------------


def test_capacity_is_limit_times_window() -> None:
    assert SPEC.capacity == 600_000
    assert BucketSpec(100, 60_000).capacity == 6_000_000
    assert BucketSpec(1, 1_000).capacity == 1_000


def test_max_exact_is_the_largest_exact_double_integer_range() -> None:
    assert MAX_EXACT == 9_007_199_254_740_992
    assert float(MAX_EXACT - 1) == MAX_EXACT - 1


# --- current_level ------------------------------------------------------------------------------


@pytest.mark.parametrize("now_ms", [0, T0, 10**15])
def test_a_fresh_bucket_is_full(now_ms: int) -> None:
    assert current_level(None, SPEC, now_ms) == FULL


def test_no_time_elapsed_keeps_the_level() -> None:
    assert current_level(state(123_456), SPEC, T0) == 123_456


@pytest.mark.parametrize(
    ("elapsed_ms", "expected"),
    [
        (1, 5),  # each millisecond refills `limit` scaled units
        (2, 10),
        (23_999, 119_995),  # not yet a whole token
        (24_000, TOKEN),  # one token after window / limit
        (48_000, 2 * TOKEN),
        (119_999, FULL - 5),
        (120_000, FULL),  # empty to full in one window
    ],
)
def test_refill_per_millisecond_is_the_limit(elapsed_ms: int, expected: int) -> None:
    assert current_level(state(0), SPEC, T0 + elapsed_ms) == expected


@pytest.mark.parametrize("elapsed_ms", [120_001, 1_000_000, 10**12])
def test_refill_is_capped_at_the_capacity(elapsed_ms: int) -> None:
    assert current_level(state(0), SPEC, T0 + elapsed_ms) == FULL
    assert current_level(state(FULL - 1), SPEC, T0 + elapsed_ms) == FULL


def test_a_full_bucket_stays_full() -> None:
    assert current_level(state(FULL), SPEC, T0 + 1) == FULL


def test_debt_is_paid_back_by_refill() -> None:
    debt = state(-2 * TOKEN)  # two tokens owed
    assert current_level(debt, SPEC, T0 + 24_000) == -TOKEN
    assert current_level(debt, SPEC, T0 + 48_000) == 0
    assert current_level(debt, SPEC, T0 + 48_001) == 5
    assert current_level(debt, SPEC, T0 + 168_000) == FULL  # 2 owed + 5 of capacity = 7 tokens
    assert current_level(debt, SPEC, T0 + 167_999) == FULL - 5


@pytest.mark.parametrize("backwards_ms", [1, 1_000, T0])
def test_a_clock_step_backwards_refills_nothing(backwards_ms: int) -> None:
    assert current_level(state(7), SPEC, T0 - backwards_ms) == 7
    assert current_level(state(-TOKEN), SPEC, T0 - backwards_ms) == -TOKEN


def test_rescale_keeps_the_number_of_tokens_when_the_window_changes() -> None:
    shorter = BucketSpec(limit=5, window_ms=60_000)
    # 2 tokens scaled by 120_000 -> 2 tokens scaled by 60_000
    assert current_level(state(2 * 120_000), shorter, T0) == 2 * 60_000
    longer = BucketSpec(limit=5, window_ms=240_000)
    assert current_level(state(2 * 120_000), longer, T0) == 2 * 240_000


def test_rescale_of_a_fractional_level_floors() -> None:
    shorter = BucketSpec(limit=5, window_ms=60_000)
    # 1.5 tokens -> 90_000 at the new scale (exact); 1 unit at scale 120_000 -> 0.5 -> 0
    assert current_level(state(180_000), shorter, T0) == 90_000
    assert current_level(state(1), shorter, T0) == 0
    assert current_level(state(3, scale=2), BucketSpec(5, 3), T0) == 4  # 4.5 -> 4


def test_rescale_of_a_negative_level_floors_towards_more_debt() -> None:
    shorter = BucketSpec(limit=5, window_ms=60_000)
    assert current_level(state(-1), shorter, T0) == -1  # -0.5 floors to -1, not 0
    assert current_level(state(-3, scale=2), BucketSpec(5, 3), T0) == -5  # -4.5 -> -5
    assert current_level(state(-2 * 120_000), shorter, T0) == -2 * 60_000  # exact stays exact


def test_rescale_then_refill_then_cap_at_the_new_capacity() -> None:
    new = BucketSpec(limit=10, window_ms=60_000)  # capacity 600_000, 10 per ms
    old_level = 3 * 120_000  # 3 tokens at the old scale
    assert current_level(state(old_level), new, T0) == 3 * 60_000
    assert current_level(state(old_level), new, T0 + 1_000) == 3 * 60_000 + 10_000
    assert current_level(state(old_level), new, T0 + 42_000) == new.capacity
    # a level above the new capacity after rescale is capped too
    smaller = BucketSpec(limit=2, window_ms=60_000)
    assert current_level(state(FULL), smaller, T0) == smaller.capacity


def test_a_limit_change_with_the_same_window_keeps_the_level() -> None:
    bigger = BucketSpec(limit=20, window_ms=120_000)
    assert current_level(state(TOKEN), bigger, T0) == TOKEN
    assert current_level(state(TOKEN), bigger, T0 + 1) == TOKEN + 20


# --- remaining_tokens ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        (FULL, 5),
        (FULL - 1, 4),
        (TOKEN, 1),
        (TOKEN - 1, 0),
        (1, 0),
        (0, 0),
        (-1, 0),  # in debt: nothing, not -1
        (-5 * TOKEN, 0),
    ],
)
def test_remaining_tokens(level: int, expected: int) -> None:
    assert remaining_tokens(level, SPEC) == expected


# --- ms_until / ms_until_full -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "target", "expected"),
    [
        (0, TOKEN, 24_000),
        (1, TOKEN, 24_000),  # 119_999 / 5 = 23_999.8 -> ceil
        (5, TOKEN, 23_999),
        (6, TOKEN, 23_999),
        (TOKEN - 5, TOKEN, 1),
        (TOKEN - 1, TOKEN, 1),
        (TOKEN, TOKEN, 0),
        (FULL, TOKEN, 0),  # already there: 0, never negative
        (-TOKEN, TOKEN, 48_000),
        (-1, 1, 1),  # 2 / 5 -> ceil 1
        (0, 1, 1),
        (0, 3 * TOKEN, 72_000),
    ],
)
def test_ms_until(level: int, target: int, expected: int) -> None:
    assert ms_until(level, target, SPEC) == expected


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        (0, 120_000),
        (FULL, 0),
        (FULL - 1, 1),
        (FULL - 5, 1),
        (FULL - 6, 2),
        (-TOKEN, 144_000),
        (-1, 120_001),  # 600_001 / 5 = 120_000.2 -> ceil
    ],
)
def test_ms_until_full(level: int, expected: int) -> None:
    assert ms_until_full(level, SPEC) == expected


def test_ms_until_with_a_limit_that_does_not_divide_the_window() -> None:
    spec = BucketSpec(limit=7, window_ms=1_000)  # refill 7 per ms, one token is 1_000
    assert ms_until(0, 1_000, spec) == 143  # 142.86 -> 143
    assert current_level(state(0, scale=1_000), spec, T0 + 142) == 994  # not yet
    assert current_level(state(0, scale=1_000), spec, T0 + 143) == 1_001  # there
    assert ms_until_full(0, spec) == 1_000


@pytest.mark.parametrize(
    ("numerator", "denominator", "expected"),
    [(0, 5, 0), (1, 5, 1), (5, 5, 1), (6, 5, 2), (-1, 5, 0), (-5, 5, -1), (-6, 5, -1)],
)
def test_ceil_div(numerator: int, denominator: int, expected: int) -> None:
    assert ceil_div(numerator, denominator) == expected
