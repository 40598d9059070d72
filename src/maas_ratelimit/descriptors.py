"""What Envoy asks about, as plain data: descriptors with their entries and effective hits.

The entry keys this server understands (Envoy's rate_limits actions produce them from the
dynamic metadata maas-authz sets, never from client headers):
  tier        the tier; limits are chosen by it (required for any limit to apply)
  user        the user id; counters are per user (required)
  model       "namespace/name"; for per-model counters and model filters (optional)
  request_id  a unique id per request, from maas-authz; makes charges idempotent and lets a
              charge for a refused request be recognised (optional but recommended)
  charge      present on the after-response call: the descriptor's hits are LLM tokens to charge
              to `tokens` limits; the value says which: prompt_tokens, completion_tokens or
              total_tokens (each limit weighs them by its `cost`)
  outcome     present on the after-response call that reports what the usage reader saw:
              "charged", or why nothing was charged (no_usage, upstream_error, ...); counted
  reserve_prompt, reserve_completion
              the usage reader's estimate of the request's prompt and completion tokens
              (decimal strings), on the admission descriptor and again on the after-response
              ones: `tokens` limits take it on admission (a reservation) and settle it after
              the response (optional; absent = no reservation)
"""

from __future__ import annotations

from dataclasses import dataclass

TIER, USER, MODEL, REQUEST_ID, CHARGE, OUTCOME = (
    "tier", "user", "model", "request_id", "charge", "outcome"
)  # fmt: skip
RESERVE_PROMPT, RESERVE_COMPLETION = "reserve_prompt", "reserve_completion"
CHARGE_KINDS = ("prompt_tokens", "completion_tokens", "total_tokens")
_MAX_RESERVE_DIGITS = 18  # far above any estimate (the Lua caps each at 1e9); the limiter caps it


@dataclass(slots=True)  # not frozen, though never changed: one per descriptor per call, and a
class Descriptor:  # frozen dataclass's __init__ costs four times as much
    entries: dict[str, str]
    hits: int  # how many to count: per-descriptor hits_addend, else the request's, else 1
    check_only: bool  # a per-descriptor hits_addend of 0: check, consume nothing

    @property
    def tier(self) -> str | None:
        return self.entries.get(TIER)

    @property
    def user(self) -> str | None:
        return self.entries.get(USER)

    @property
    def model(self) -> str | None:
        return self.entries.get(MODEL)

    @property
    def request_id(self) -> str | None:
        return self.entries.get(REQUEST_ID)

    @property
    def is_charge(self) -> bool:
        return CHARGE in self.entries

    @property
    def charge_kind(self) -> str | None:
        return self.entries.get(CHARGE)

    @property
    def outcome(self) -> str | None:
        return self.entries.get(OUTCOME)

    @property
    def reservation(self) -> tuple[int, int] | None:
        """(prompt, completion) tokens reserved for the request, or None.

        Either entry alone counts (the other is 0); a value that is not a plain decimal integer
        makes the whole reservation absent, on admission and on settlement alike (both read the
        same entries, so what is taken is what is given back).
        """
        entries = self.entries
        prompt, completion = entries.get(RESERVE_PROMPT), entries.get(RESERVE_COMPLETION)
        if prompt is None:
            if completion is None:
                return None
            prompt = "0"
        elif completion is None:
            completion = "0"
        # each a plain decimal integer of at most _MAX_RESERVE_DIGITS digits (no sign, no spaces)
        if (
            prompt.isdigit()
            and completion.isdigit()
            and prompt.isascii()
            and completion.isascii()
            and len(prompt) <= _MAX_RESERVE_DIGITS
            and len(completion) <= _MAX_RESERVE_DIGITS
        ):
            return int(prompt), int(completion)
        return None


def effective_hits(descriptor_hits: int | None, request_hits: int) -> tuple[int, bool]:
    """(hits, check_only) per the RLS protocol.

    A request-level hits_addend of 0 means 1 (proto3 cannot tell unset from 0). A per-descriptor
    hits_addend is a wrapper type, so it has presence: there, 0 really means 0 — check only.
    """
    if descriptor_hits is not None:
        return descriptor_hits, descriptor_hits == 0
    return (request_hits or 1), False
