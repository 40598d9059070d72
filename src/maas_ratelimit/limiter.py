"""The rate limit decision, free of protobuf: descriptors in, a verdict per descriptor out.

For each descriptor the limits of its tier (and model) apply:
- `requests` limits take `hits` on admission; a check-only descriptor takes nothing but still
  needs room for one more;
- `tokens` limits need remaining credit (> 0) on admission. A descriptor with a reservation
  (`reserve_prompt` / `reserve_completion`, the usage reader's estimate) takes it then, weighted
  by the limit's cost, possibly into debt: concurrent requests see it and are refused until
  refill. Without one, nothing is taken. The real usage arrives later in `charge` descriptors
  and is settled then: usage minus the reservation the descriptors carry (subtracted once per
  limit per call), never refused, possibly into debt; negative is a refund. An `outcome` other
  than "charged" that carries a reservation refunds all of it (the answer used nothing we know
  of). Shadow limits reserve nothing (they never refuse; their buckets are charged the usage).
- budgets (limits.Budget) take the `tokens` paths, in their own units (tokens, or micro-units of
  money at the descriptor's prices) and on their own bucket clock: a calendar budget's bucket is
  keyed by its period and frozen at the period's end, a rolling one refills on a clock of ms,
  s, min or h (store.py).
All limits of all admission descriptors of one call are decided together and atomically (one
store operation): if any enforced limit is short, nothing is taken anywhere.

Two paths, kept apart as Limitador keeps Check and Report: admission (`_Admission`, then
`RateLimiter._admit`, one store admit) and settlement after the response (`_Settlement`, then
`RateLimiter._settle`, one store charge). `decide` only sorts a call's descriptors onto them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Literal

from maas_common.clock import Clock
from maas_common.ledger.records import parse_rate
from maas_ratelimit.bucket import DEBT_WINDOWS, ms_until, ms_until_full, remaining_tokens
from maas_ratelimit.descriptors import CHARGE_KINDS, Descriptor
from maas_ratelimit.limits import Limit, LimitTable, Pricing, subscription_limits
from maas_ratelimit.store import Admission, BucketStore, Charge, ChargeStatus, Outcome

Result = Literal["allowed", "limited", "shadow_limited"]

_MAX_APPLICABLE = 4096  # (tier, model) pairs whose applicable limits are remembered
_MICROS = Decimal(1_000_000)  # a cost budget counts micro-units of the currency

# _PER_CALL: the values a call builds (LimitState, DescriptorVerdict, ChargeReport, Verdict) are
# plain slotted dataclasses, not frozen ones, though nothing ever changes them: a frozen
# dataclass's __init__ (object.__setattr__ per field) costs four times as much, per object.


class UnknownDomain(ValueError):
    pass


@dataclass(slots=True)  # per call: see _PER_CALL
class LimitState:
    """One limit's bucket after the call. What a response reports is derived from it when asked,
    so a call pays only for the limit it reports."""

    limit: Limit
    sufficient: bool  # the bucket had what the call needed
    level: int  # scaled level after the call (bucket.py)
    need: int  # scaled level the call needed

    @property
    def result(self) -> Result:
        if self.sufficient:
            return "allowed"
        return "shadow_limited" if self.limit.shadow else "limited"

    @property
    def remaining(self) -> int:
        """Whole tokens left after this call."""
        return remaining_tokens(self.level, self.limit.spec)

    @property
    def reset_ms(self) -> int:
        """Until the bucket is full again."""
        return ms_until_full(self.level, self.limit.spec)

    @property
    def retry_after_ms(self) -> int:
        """Until it would have had enough (0 when it had)."""
        return 0 if self.sufficient else ms_until(self.level, self.need, self.limit.spec)


@dataclass(slots=True)  # per call: see _PER_CALL
class BudgetState(LimitState):
    """A budget's bucket after the call: its times come from the budget's own clock."""

    now_ms: int  # the call's time
    at: int  # the bucket's time (a calendar budget: its period's end, in ms)

    @property
    def reset_ms(self) -> int:
        budget = self.limit.budget
        assert budget is not None
        if budget.period is not None:  # a new period: a new, full bucket
            return max(0, self.at - self.now_ms)
        return ms_until_full(self.level, self.limit.spec) * budget.unit_ms

    @property
    def retry_after_ms(self) -> int:
        budget = self.limit.budget
        assert budget is not None
        if self.sufficient:
            return 0
        if budget.period is not None:
            return max(0, self.at - self.now_ms)
        return ms_until(self.level, self.need, self.limit.spec) * budget.unit_ms


@dataclass(slots=True)  # per call: see _PER_CALL
class DescriptorVerdict:
    over_limit: bool
    reported: LimitState | None  # the most restrictive limit, or None when none applied
    limits: tuple[LimitState, ...] = ()


_NOTHING_ADMITTED = DescriptorVerdict(False, None)  # a descriptor that asked nothing of a bucket
_REFUSED = DescriptorVerdict(True, None)  # refused by no limit (Verdict.refusal says why)


@dataclass(slots=True)  # per call: see _PER_CALL
class ChargeReport:
    tier: str
    model: str
    kind: str  # prompt_tokens, completion_tokens or total_tokens
    tokens: int  # as reported, before any weight
    status: ChargeStatus
    billing_rate: str | None = None  # the subscription's price per token, as maas-authz sent it


@dataclass(slots=True)  # per call: see _PER_CALL
class Verdict:
    over_limit: bool
    descriptors: tuple[DescriptorVerdict, ...]
    charges: tuple[ChargeReport, ...] = ()
    ignored: tuple[str, ...] = ()  # reasons descriptors were skipped
    outcomes: tuple[tuple[str, str], ...] = ()  # (tier, outcome) reported after responses
    # (tier, model, tokens) as estimated, before weights: reservations taken by admitted requests
    reserved: tuple[tuple[str, str, int], ...] = ()
    # (tier, model, tokens) before weights: the part of a settled reservation that was not used
    # (all of it for an answer charged nothing); only what the store applied
    refunded: tuple[tuple[str, str, int], ...] = ()
    # refused by no limit: "no_subscription", a model request with neither tier nor subscription
    refusal: str | None = None

    @property
    def binding(self) -> LimitState | None:
        """The enforced limit that refused, with the longest wait (what a 429 names)."""
        refused = [
            s for d in self.descriptors for s in d.limits if not s.sufficient and not s.limit.shadow
        ]
        return max(refused, key=lambda s: s.retry_after_ms, default=None)


@dataclass(slots=True)
class _Share:
    """One tokens bucket's share of an after-response call: weighted usage less reservation."""

    limit: Limit
    key: str
    at: int = 0  # the bucket's own time (store.py), for budgets
    unit_ms: int = 1
    used: int = 0  # weighted usage, summed over the call's charge descriptors
    reserved: int | None = None  # the weighted reservation given back, once per call

    @property
    def amount(self) -> int:
        # beyond this cap the debt floor is reached anyway; keeps Lua's doubles exact
        used = min(self.used, (DEBT_WINDOWS + 1) * self.limit.spec.limit)
        return (used - (self.reserved or 0)) * self.limit.spec.window_ms


@dataclass(slots=True)
class _Request:
    """One request settled in a call, before weights (for the refund metric)."""

    tier: str
    model: str
    used: int = 0
    reserved: int | None = None  # set when an enforced limit settled its reservation


class _Settlement:
    """The after-response path of a call (Limitador's Report beside its Check): the usage the
    model reported, less the reservation it was admitted with, once per bucket; never refused."""

    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms
        self.shares: dict[tuple[str, str], _Share] = {}  # (limit, counter key) -> share
        self.requests: dict[tuple[str, str, str], _Request] = {}  # (tier, user, model)
        # (tier, model, kind, tokens, billing rate)
        self.reported: list[tuple[str, str, str, int, str | None]] = []
        self.outcomes: list[tuple[str, str]] = []  # (tier, outcome) of the usage reader

    def outcome_descriptor(
        self,
        applicable: _Applicable,
        descriptor: Descriptor,
        outcome: str,
        request_id: str | None,
        pricing: Pricing | None,
    ) -> None:
        """The usage reader's report on an answer: counted; one charged nothing gets its whole
        reservation back. Only with a request id: the store then refunds it once, and never for
        a request it refused at admission (which reserved nothing)."""
        assert descriptor.tier is not None
        self.outcomes.append((descriptor.tier, outcome))
        if outcome != "charged" and descriptor.reservation and request_id:
            self.add(applicable.enforced_tokens, descriptor, "total_tokens", 0, pricing)

    def charge_descriptor(
        self,
        limits: Sequence[Limit],
        descriptor: Descriptor,
        settle_all: bool,
        pricing: Pricing | None,
    ) -> str | None:
        """A charge descriptor under the limits of its tier: None, or why it was ignored. With
        `settle_all` (a usage ledger), usage no tokens limit takes is settled all the same."""
        kind = descriptor.charge_kind or ""
        if kind not in CHARGE_KINDS:
            return "unknown_charge"
        tokens = [limit for limit in limits if limit.kind == "tokens"]
        if tokens or settle_all:
            self.charge(tokens, descriptor, kind, pricing)
        return None if tokens else "no_tokens_limit"

    def charge(
        self, limits: Sequence[Limit], descriptor: Descriptor, kind: str, pricing: Pricing | None
    ) -> None:
        """A charge descriptor: its hits are `kind` tokens used."""
        self.add(limits, descriptor, kind, descriptor.hits, pricing)
        self.reported.append(
            (
                descriptor.tier or "",
                descriptor.model or "",
                kind,
                descriptor.hits,
                descriptor.billing_rate,
            )
        )

    def add(
        self,
        limits: Sequence[Limit],
        descriptor: Descriptor,
        kind: str,
        count: int,
        pricing: Pricing | None,
    ) -> None:
        """A descriptor's usage (`count` tokens of `kind`) and the reservation it carries."""
        assert descriptor.tier is not None and descriptor.user is not None
        reservation = descriptor.reservation
        for limit in limits:
            budget = limit.budget
            if budget is None:
                key = limit.counter_key(descriptor.user, descriptor.model)
                share = self.shares.get((limit.name, key))
                if share is None:
                    share = self.shares[(limit.name, key)] = _Share(limit, key)
            else:  # settled in the period (or on the clock) of now
                suffix, at = budget.clock(self.now_ms)
                key = limit.budget_key(descriptor.user, descriptor.tier, suffix)
                share = self.shares.get((limit.name, key))
                if share is None:
                    share = _Share(limit, key, at, budget.unit_ms)
                    self.shares[(limit.name, key)] = share
            share.used += limit.tokens_to_charge(kind, count, pricing)
            if reservation is not None and not limit.shadow and share.reserved is None:
                share.reserved = _reserved(limit, reservation, pricing)
        model = descriptor.model or ""
        request = self.requests.setdefault(
            (descriptor.tier, descriptor.user, model), _Request(descriptor.tier, model)
        )
        request.used += count
        enforced = any(not limit.shadow for limit in limits)
        if request.reserved is None and reservation is not None and enforced:
            request.reserved = sum(reservation)

    def charges(self) -> list[Charge]:
        return [
            Charge(s.key, s.limit.spec, s.amount, s.at, s.unit_ms) for s in self.shares.values()
        ]

    def reports(self, status: ChargeStatus) -> tuple[ChargeReport, ...]:
        return tuple(ChargeReport(t, m, k, n, status, r) for t, m, k, n, r in self.reported)

    def refunds(self) -> tuple[tuple[str, str, int], ...]:
        """(tier, model, tokens) of every request whose reservation exceeded its usage."""
        return tuple(
            (r.tier, r.model, r.reserved - r.used)
            for r in self.requests.values()
            if r.reserved is not None and r.reserved > r.used
        )


@dataclass(slots=True)
class _Applicable:
    """The limits that apply to one (tier, model), with what every call would derive from them."""

    limits: tuple[Limit, ...]
    # enforced tokens limits: they take an admission's reservation and refund a failed answer's
    enforced_tokens: tuple[Limit, ...]
    money: bool = False  # a cost budget is among them: descriptors need their prices

    @classmethod
    def of(cls, limits: Sequence[Limit]) -> _Applicable:
        enforced = tuple(limit for limit in limits if limit.kind == "tokens" and not limit.shadow)
        money = any(limit.budget is not None and limit.budget.money for limit in limits)
        return cls(tuple(limits), enforced, money)

    def plan(
        self,
        admissions: list[Admission],
        descriptor: Descriptor,
        user: str,
        model: str | None,
        reservation: tuple[int, int] | None,
        *,
        now_ms: int,
        pricing: Pricing | None,
    ) -> None:
        """Appends what `descriptor` (for `user` and `model`, carrying `reservation`) asks of each
        limit's bucket, in the order of `limits`."""
        check_only = descriptor.check_only
        hits = 0 if check_only else descriptor.hits
        for limit in self.limits:
            spec = limit.spec
            if limit.kind == "tokens":
                # admission only needs some credit left; a reservation, when the descriptor
                # carries one, is taken now (possibly into debt) and settled against the real
                # usage afterwards
                take = 0
                if reservation is not None and not check_only and not limit.shadow:
                    take = _reserved(limit, reservation, pricing) * spec.window_ms
                need = 1
            else:
                need, take = (hits or 1) * spec.window_ms, hits * spec.window_ms
            budget = limit.budget
            if budget is None:
                key = limit.counter_key(user, model)
                admissions.append(Admission(key, spec, need, take, limit.shadow))
            else:
                suffix, at = budget.clock(now_ms)
                key = limit.budget_key(user, descriptor.tier or "", suffix)
                admissions.append(
                    Admission(key, spec, need, take, limit.shadow, at, budget.unit_ms)
                )


class _Admission:
    """The admission path of a call: what each descriptor asks of its limits' buckets, all
    taken together or not at all."""

    __slots__ = ("admissions", "reserving", "spans")

    def __init__(self) -> None:
        self.admissions: list[Admission] = []
        # per descriptor, the limits its admissions are for, in order (none: not an admission)
        self.spans: list[Sequence[Limit]] = []
        self.reserving: list[tuple[str, str, int]] = []  # reservations taken if admitted

    def skip(self) -> None:
        """A descriptor that asks nothing of a bucket on admission."""
        self.spans.append(())

    def add(
        self,
        applicable: _Applicable,
        descriptor: Descriptor,
        tier: str,
        user: str,
        *,
        now_ms: int,
        pricing: Pricing | None,
    ) -> None:
        model = descriptor.model
        reservation = descriptor.reservation
        if reservation is not None and not descriptor.check_only and applicable.enforced_tokens:
            self.reserving.append((tier, model or "", reservation[0] + reservation[1]))
        applicable.plan(
            self.admissions, descriptor, user, model, reservation, now_ms=now_ms, pricing=pricing
        )
        self.spans.append(applicable.limits)


class RateLimiter:
    def __init__(
        self,
        *,
        limits: Callable[[], LimitTable],
        store: BucketStore,
        clock: Clock,
        settle_all: bool = False,
    ) -> None:
        self._limits = limits
        # settle reported usage also where no tokens limit applies (a store charge of nothing,
        # which de-duplicates the request id): the usage ledger records every charged response
        self._settle_all = settle_all  # a callable: a reloaded table applies to the next call
        self._store = store
        self._clock = clock
        # (tier, model) -> the limits that apply, for the table they were read from
        self._table: LimitTable | None = None
        self._applicable: dict[tuple[str, str | None], _Applicable] = {}
        # (subscription, token_limits, model) -> its limits (None: an unusable token_limits
        # entry); the model only where subscription budgets name models
        self._subscribed: dict[tuple[str, str, str | None], _Applicable | None] = {}
        # (billing rate, model) -> a cost budget's prices in micro-units per token
        self._pricing: dict[tuple[str | None, str | None], Pricing | None] = {}

    def table(self) -> LimitTable:
        """The limits table in force."""
        return self._limits()

    def _limits_for(self, table: LimitTable, tier: str, model: str | None) -> _Applicable:
        if table is not self._table:  # a reload: start afresh
            self._reset(table)
        key = (tier, model)
        applicable = self._applicable.get(key)
        if applicable is None:
            applicable = _Applicable.of(table.for_tier(tier, model))
            if len(self._applicable) >= _MAX_APPLICABLE:  # models are whatever Envoy sends
                self._applicable.clear()
            self._applicable[key] = applicable
        return applicable

    def _reset(self, table: LimitTable) -> None:
        self._table, self._applicable, self._subscribed, self._pricing = table, {}, {}, {}

    def _limits_of_subscription(
        self, table: LimitTable, descriptor: Descriptor
    ) -> _Applicable | None:
        """The token limits a subscription's descriptor carries, with the budgets of the
        subscription, or None when it carries none that can be used (refused: a subscription
        is never taken for "no limit")."""
        assert descriptor.subscription is not None
        if table is not self._table:
            self._reset(table)
        by_model = any(budget.models for budget in table.subscription_budgets)
        subscription, text = descriptor.subscription, descriptor.token_limits or ""
        key = (subscription, text, descriptor.model if by_model else None)
        if key in self._subscribed:
            return self._subscribed[key]
        limits = subscription_limits(subscription, text) if text else None
        applicable = None
        if limits is not None:
            budgets = table.budgets_of_subscription(subscription, descriptor.model)
            applicable = _Applicable.of((*limits, *budgets))
        if len(self._subscribed) >= _MAX_APPLICABLE:
            self._subscribed.clear()
        self._subscribed[key] = applicable
        return applicable

    async def decide(self, domain: str, descriptors: Sequence[Descriptor]) -> Verdict:
        """One ShouldRateLimit call: its admission descriptors are admitted together, its
        after-response ones (charge, outcome) settled together; Envoy sends one kind per call."""
        table = self._limits()
        if domain != table.domain:
            raise UnknownDomain(f"unknown domain {domain!r}; this server serves {table.domain!r}")
        # wall time, not monotonic: replicas on other hosts share the buckets in Redis
        now_ms = round(self._clock.wall() * 1000)
        request_id = request_id_of(descriptors)
        ignored: list[str] = []
        admission = _Admission()
        settlement: _Settlement | None = None  # only calls after a response settle anything
        refusal: str | None = None  # an admission refused by no limit: the default deny
        for descriptor in descriptors:
            tier, user = descriptor.tier, descriptor.user
            settles = descriptor.outcome is not None or descriptor.charge_kind is not None
            if not tier or not user:
                ignored.append("no_tier" if not tier else "no_user")
                if user and descriptor.model and not settles:
                    refusal = "no_subscription"  # a model request that nothing entitles
                admission.skip()
                continue
            if descriptor.by_subscription:
                found = self._limits_of_subscription(table, descriptor)
                if found is None:
                    ignored.append("bad_token_limits")
                    if not settles:
                        refusal = "no_subscription"
                    admission.skip()
                    continue
                applicable = found
            else:
                applicable = self._limits_for(table, tier, descriptor.model)
            pricing = self._pricing_of(table, descriptor) if applicable.money else None
            outcome = descriptor.outcome
            if outcome is None and descriptor.charge_kind is None:
                admission.add(applicable, descriptor, tier, user, now_ms=now_ms, pricing=pricing)
                continue
            admission.skip()
            settlement = settlement or _Settlement(now_ms)
            if outcome is not None:
                settlement.outcome_descriptor(applicable, descriptor, outcome, request_id, pricing)
            else:
                unusable = settlement.charge_descriptor(
                    applicable.limits, descriptor, self._settle_all, pricing
                )
                if unusable:
                    ignored.append(unusable)

        if refusal is not None:  # before any bucket is touched: nothing taken anywhere
            return Verdict(
                True,
                tuple(_REFUSED for _ in descriptors),
                ignored=tuple(ignored),
                refusal=refusal,
            )
        admitted, verdicts = await self._admit(admission, now_ms, request_id)
        if settlement is None:
            return Verdict(
                not admitted,
                verdicts,
                ignored=tuple(ignored),
                reserved=tuple(admission.reserving) if admitted else (),
            )
        reports, refunded = await self._settle(settlement, now_ms, request_id)
        return Verdict(
            not admitted,
            verdicts,
            reports,
            tuple(ignored),
            tuple(settlement.outcomes),
            tuple(admission.reserving) if admitted else (),
            refunded,
        )

    def _pricing_of(self, table: LimitTable, descriptor: Descriptor) -> Pricing | None:
        """A cost budget's prices for the descriptor, in micro-units per (prompt, completion)
        token: the subscription's billing rate, else the limits file's price of the model."""
        key = (descriptor.billing_rate, descriptor.model)
        if key in self._pricing:
            return self._pricing[key]
        pricing: Pricing | None = None
        rate = parse_rate(descriptor.billing_rate)
        if rate is not None:
            per_token = Fraction(rate * _MICROS)
            pricing = (per_token, per_token)
        else:
            price = table.price_for(descriptor.model or "")
            if price is not None:  # per million tokens = micro-units per token
                pricing = (
                    Fraction(price.prompt_per_million),
                    Fraction(price.completion_per_million),
                )
        if len(self._pricing) >= _MAX_APPLICABLE:
            self._pricing.clear()
        self._pricing[key] = pricing
        return pricing

    async def _admit(
        self, admission: _Admission, now_ms: int, request_id: str | None
    ) -> tuple[bool, tuple[DescriptorVerdict, ...]]:
        """Takes every admission or none: (admitted, a verdict per descriptor)."""
        outcomes: Sequence[Outcome] = ()
        admitted = True
        if admission.admissions:
            result = await self._store.admit(admission.admissions, now_ms, request_id)
            admitted, outcomes = result.admitted, result.outcomes
        return admitted, _verdicts(admission.spans, admission.admissions, outcomes, now_ms)

    async def _settle(
        self, settlement: _Settlement, now_ms: int, request_id: str | None
    ) -> tuple[tuple[ChargeReport, ...], tuple[tuple[str, str, int], ...]]:
        """Applies the charges and refunds (once per request id): (what was reported and how the
        store took it, the refunds applied)."""
        if not settlement.shares and not settlement.reported:
            return (), ()
        status = (await self._store.charge(settlement.charges(), now_ms, request_id)).status
        refunded = settlement.refunds() if status is ChargeStatus.APPLIED else ()
        return settlement.reports(status), refunded


def _verdicts(
    spans: Sequence[Sequence[Limit]],
    admissions: Sequence[Admission],
    outcomes: Sequence[Outcome],
    now_ms: int,
) -> tuple[DescriptorVerdict, ...]:
    verdicts = []
    position = 0  # admissions and their outcomes are in the order of the descriptors' limits
    for limits in spans:
        if not limits:
            verdicts.append(_NOTHING_ADMITTED)
            continue
        states = []
        over_limit = False  # an enforced limit of the descriptor refused
        for limit in limits:
            outcome = outcomes[position]
            sufficient = outcome.sufficient
            if not sufficient and not limit.shadow:
                over_limit = True
            asked = admissions[position]
            if limit.budget is None:
                states.append(LimitState(limit, sufficient, outcome.level, asked.need))
            else:
                states.append(
                    BudgetState(limit, sufficient, outcome.level, asked.need, now_ms, asked.at)
                )
            position += 1
        verdicts.append(DescriptorVerdict(over_limit, _most_restrictive(states), tuple(states)))
    return tuple(verdicts)


def request_id_of(descriptors: Sequence[Descriptor]) -> str | None:
    """The call's request id: the first descriptor's that has one."""
    for descriptor in descriptors:
        request_id = descriptor.request_id
        if request_id:
            return request_id
    return None


def _reserved(limit: Limit, reservation: tuple[int, int], pricing: Pricing | None) -> int:
    """The weighted tokens a reservation takes from `limit` (the same on admission and on
    settlement), capped: a bucket at 1 stays above the debt floor after taking it."""
    return min(limit.weigh(*reservation, pricing), DEBT_WINDOWS * limit.spec.limit)


def _most_restrictive(states: Sequence[LimitState]) -> LimitState | None:
    """Refusing limits first (longest wait), then the enforced limit with the least room left."""
    if len(states) <= 1:
        return states[0] if states else None
    refusing: LimitState | None = None  # the enforced refusal with the longest wait
    tightest: LimitState | None = None  # the enforced limit with the least room
    for state in states:
        if state.limit.shadow:
            continue
        if not state.sufficient:
            if refusing is None or state.retry_after_ms > refusing.retry_after_ms:
                refusing = state
        elif refusing is None and (tightest is None or less_room(state, tightest)):
            tightest = state
    if refusing is not None:
        return refusing
    if tightest is not None:
        return tightest
    tightest = states[0]  # all shadow: the least room among them
    for state in states[1:]:
        if less_room(state, tightest):
            tightest = state
    return tightest


def less_room(state: LimitState, other: LimitState) -> bool:
    """Whether `state` has less room left than `other`, as fractions of their limits (compared
    exactly, in integers)."""
    return state.remaining * other.limit.spec.limit < other.remaining * state.limit.spec.limit
