"""What Envoy asks about, as plain data: descriptors with their entries and effective hits.

The entry keys this server understands (Envoy's rate_limits actions produce them from the
dynamic metadata maas-authz sets, never from client headers):
  tier        the tier; limits are chosen by it (required for any limit to apply, unless
              `subscription` is there instead)
  subscription  in MaaS's subscription flow, instead of `tier`: the MaaSSubscription
              (namespace/name) the request runs under; its limits come with it in
  token_limits  `limit/window_seconds`, comma-separated: the subscription's token limits for
              the model, each a bucket per user and model. A model request with neither tier
              nor subscription is refused (the default deny)
  billing_rate  the subscription's price per token (decimal); carried with the usage
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

from dataclasses import dataclass, field

TIER, USER, MODEL, REQUEST_ID, CHARGE, OUTCOME = (
    "tier", "user", "model", "request_id", "charge", "outcome"
)  # fmt: skip
SUBSCRIPTION, TOKEN_LIMITS, BILLING_RATE = "subscription", "token_limits", "billing_rate"
RESERVE_PROMPT, RESERVE_COMPLETION = "reserve_prompt", "reserve_completion"
CHARGE_KINDS = ("prompt_tokens", "completion_tokens", "total_tokens")
_MAX_RESERVE_DIGITS = 18  # far above any estimate (the Lua caps each at 1e9); the limiter caps it


@dataclass(slots=True)  # not frozen, though never changed: one per descriptor per call, and a
class Descriptor:  # frozen dataclass's __init__ costs four times as much
    """A descriptor's entries, with the ones this server understands read out once (plain
    fields rather than properties: the decision reads each of them on every call)."""

    entries: dict[str, str]
    hits: int  # how many to count: per-descriptor hits_addend, else the request's, else 1
    check_only: bool  # a per-descriptor hits_addend of 0: check, consume nothing
    tier: str | None = field(init=False)  # the tier, or in the subscription flow the subscription
    subscription: str | None = field(init=False)
    token_limits: str | None = field(init=False)
    billing_rate: str | None = field(init=False)
    by_subscription: bool = field(init=False)  # no tier, a subscription: its limits apply
    user: str | None = field(init=False)
    model: str | None = field(init=False)
    request_id: str | None = field(init=False)
    charge_kind: str | None = field(init=False)  # set on a charge descriptor only
    outcome: str | None = field(init=False)
    # (prompt, completion) tokens reserved for the request, or None: see parse_reservation
    reservation: tuple[int, int] | None = field(init=False)

    def __post_init__(self) -> None:
        get = self.entries.get
        self.tier, self.user, self.model = get(TIER), get(USER), get(MODEL)
        self.subscription = get(SUBSCRIPTION)
        self.token_limits, self.billing_rate = get(TOKEN_LIMITS), get(BILLING_RATE)
        self.by_subscription = self.tier is None and self.subscription is not None
        if self.by_subscription:
            self.tier = self.subscription
        self.request_id, self.charge_kind, self.outcome = get(REQUEST_ID), get(CHARGE), get(OUTCOME)
        prompt, completion = get(RESERVE_PROMPT), get(RESERVE_COMPLETION)
        self.reservation = (
            None if prompt is None and completion is None else parse_reservation(prompt, completion)
        )


def parse_reservation(prompt: str | None, completion: str | None) -> tuple[int, int] | None:
    """(prompt, completion) from the reserve_* entries, or None.

    Either entry alone counts (the other is 0); a value that is not a plain decimal integer
    makes the whole reservation absent, on admission and on settlement alike (both read the
    same entries, so what is taken is what is given back).
    """
    if prompt is None:
        prompt = "0"
    if completion is None:
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
