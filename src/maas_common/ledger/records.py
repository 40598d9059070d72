"""A usage record, its cost, and its line in the journal.

Costs are integers in nano-units of the configured currency (1e-9): sums are exact on both
engines, and a price per token as fine as 0.000000001 is kept.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any

NANOS = Decimal(1_000_000_000)
MAX_TEXT = 256  # longest text field kept; longer values are cut (they come from descriptors)


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One charged response. `key_id` is an API key's id, never the key."""

    request_id: str
    ts_ms: int  # when the charge was applied (wall clock, ms since the epoch)
    user: str
    model: str = ""
    tier: str = ""  # the tier, in the tier flow
    subscription: str = ""  # the MaaSSubscription (namespace/name), in the subscription flow
    key_id: str = ""
    organization_id: str = ""
    cost_center: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost_nanos: int = 0
    priced: bool = False  # a price was known (cost 0 of an unpriced model is not "free")
    status: int = 0  # the model's HTTP status
    streamed: bool = False

    def to_line(self) -> bytes:
        """The journal line: a JSON array in field order, newline-terminated."""
        return (json.dumps(_values(self), separators=(",", ":")) + "\n").encode()

    @classmethod
    def from_line(cls, line: bytes) -> UsageRecord:
        values = json.loads(line)
        if not isinstance(values, list) or len(values) != len(_FIELDS):
            raise ValueError("not a usage record line")
        return cls(*values)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_FIELDS = tuple(f.name for f in fields(UsageRecord))
COLUMNS = _FIELDS


def _values(record: UsageRecord) -> list[Any]:
    # dataclasses.astuple deep-copies; the fields are all scalars
    return [getattr(record, name) for name in _FIELDS]


def clip(text: str | None) -> str:
    if not text:
        return ""
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT]


def parse_rate(text: str | None) -> Decimal | None:
    """A billing rate (price per token) as maas-authz sends it, or None when there is none or it
    is not a plain non-negative decimal."""
    if not text:
        return None
    try:
        rate = Decimal(text)
    except InvalidOperation:
        return None
    return rate if rate.is_finite() and rate >= 0 else None


def cost_nanos(
    prompt_tokens: int,
    completion_tokens: int,
    *,
    per_token: Decimal | None = None,
    prompt_per_million: Decimal | None = None,
    completion_per_million: Decimal | None = None,
) -> int | None:
    """The cost of a response in nano-units, or None when no price applies. A per-token rate
    (MaaSSubscription's billingRate.perToken) prices every token alike and wins over prices per
    million prompt and completion tokens (the limits file's `prices`)."""
    if per_token is not None:
        amount = per_token * (prompt_tokens + completion_tokens)
    elif prompt_per_million is not None or completion_per_million is not None:
        amount = (
            (prompt_per_million or Decimal(0)) * prompt_tokens
            + (completion_per_million or Decimal(0)) * completion_tokens
        ) / 1_000_000
    else:
        return None
    return int((amount * NANOS).to_integral_value(rounding=ROUND_HALF_EVEN))


def format_cost(nanos: int) -> str:
    """Nano-units as a decimal string without trailing zeros ("0.000123")."""
    text = format(Decimal(nanos) / NANOS, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"
