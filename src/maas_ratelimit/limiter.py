"""The rate limit decision, free of protobuf: descriptors in, a verdict per descriptor out.

For each descriptor the limits of its tier (and model) apply:
- `requests` limits take `hits` on admission; a check-only descriptor takes nothing but still
  needs room for one more;
- `tokens` limits need remaining credit (> 0) on admission and take nothing then; the real usage
  arrives later in a `charge` descriptor and is taken then, never refused, possibly into debt.
All limits of all descriptors of one call are decided together and atomically (one store
operation): if any enforced limit is short, nothing is taken anywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from maas_common.clock import Clock
from maas_ratelimit.bucket import DEBT_WINDOWS, ms_until, ms_until_full, remaining_tokens
from maas_ratelimit.descriptors import CHARGE_KINDS, Descriptor
from maas_ratelimit.limits import Limit, LimitTable
from maas_ratelimit.store import Admission, BucketStore, Charge, ChargeStatus, Outcome

Result = Literal["allowed", "limited", "shadow_limited"]


class UnknownDomain(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class LimitState:
    limit: Limit
    sufficient: bool
    remaining: int  # whole tokens left after this call
    reset_ms: int  # until the bucket is full again
    retry_after_ms: int  # until it would have had enough (0 when sufficient)

    @property
    def result(self) -> Result:
        if self.sufficient:
            return "allowed"
        return "shadow_limited" if self.limit.shadow else "limited"


@dataclass(frozen=True, slots=True)
class DescriptorVerdict:
    over_limit: bool
    reported: LimitState | None  # the most restrictive limit, or None when none applied
    limits: tuple[LimitState, ...] = ()


@dataclass(frozen=True, slots=True)
class ChargeReport:
    tier: str
    model: str
    kind: str  # prompt_tokens, completion_tokens or total_tokens
    tokens: int  # as reported, before any weight
    status: ChargeStatus


@dataclass(frozen=True)
class Verdict:
    over_limit: bool
    descriptors: tuple[DescriptorVerdict, ...]
    charges: tuple[ChargeReport, ...] = ()
    ignored: tuple[str, ...] = field(default=())  # reasons descriptors were skipped
    outcomes: tuple[tuple[str, str], ...] = ()  # (tier, outcome) reported after responses

    @property
    def binding(self) -> LimitState | None:
        """The enforced limit that refused, with the longest wait (what a 429 names)."""
        refused = [
            s for d in self.descriptors for s in d.limits if not s.sufficient and not s.limit.shadow
        ]
        return max(refused, key=lambda s: s.retry_after_ms, default=None)


class RateLimiter:
    def __init__(
        self, *, limits: Callable[[], LimitTable], store: BucketStore, clock: Clock
    ) -> None:
        self._limits = limits  # a callable: a reloaded table applies to the next call
        self._store = store
        self._clock = clock

    async def decide(self, domain: str, descriptors: Sequence[Descriptor]) -> Verdict:
        table = self._limits()
        if domain != table.domain:
            raise UnknownDomain(f"unknown domain {domain!r}; this server serves {table.domain!r}")
        # wall time, not monotonic: replicas on other hosts share the buckets in Redis
        now_ms = round(self._clock.wall() * 1000)
        ignored: list[str] = []

        # plan: which buckets each descriptor touches
        admissions: list[Admission] = []
        owners: list[tuple[int, Limit]] = []  # admission index -> (descriptor index, limit)
        charges: list[Charge] = []
        charge_reports: list[tuple[str, str, str, int]] = []
        usage_outcomes: list[tuple[str, str]] = []
        request_id = next((d.request_id for d in descriptors if d.request_id), None)
        for index, descriptor in enumerate(descriptors):
            tier, user = descriptor.tier, descriptor.user
            if not tier or not user:
                ignored.append("no_tier" if not tier else "no_user")
                continue
            if descriptor.outcome is not None:
                usage_outcomes.append((tier, descriptor.outcome))
                continue
            limits = table.for_tier(tier, descriptor.model)
            if descriptor.is_charge:
                kind = descriptor.charge_kind or ""
                if kind not in CHARGE_KINDS:
                    ignored.append("unknown_charge")
                    continue
                tokens = [limit for limit in limits if limit.kind == "tokens"]
                if not tokens:
                    ignored.append("no_tokens_limit")
                    continue
                for limit in tokens:
                    key = limit.counter_key(user, descriptor.model)
                    weighted = limit.tokens_to_charge(kind, descriptor.hits)
                    # beyond this the debt floor is reached anyway; keeps Lua's doubles exact
                    weighted = min(weighted, (DEBT_WINDOWS + 1) * limit.spec.limit)
                    charges.append(Charge(key, limit.spec, weighted * limit.spec.window_ms))
                charge_reports.append((tier, descriptor.model or "", kind, descriptor.hits))
                continue
            for limit in limits:
                admissions.append(_admission(limit, descriptor))
                owners.append((index, limit))

        outcomes: Sequence[Outcome] = ()
        admitted = True
        if admissions:
            result = await self._store.admit(admissions, now_ms, request_id)
            admitted, outcomes = result.admitted, result.outcomes
        reports: tuple[ChargeReport, ...] = ()
        if charges:
            status = (await self._store.charge(charges, now_ms, request_id)).status
            reports = tuple(ChargeReport(t, m, k, n, status) for t, m, k, n in charge_reports)

        per_descriptor: list[list[LimitState]] = [[] for _ in descriptors]
        for admission, outcome, (index, limit) in zip(admissions, outcomes, owners, strict=True):
            spec = limit.spec
            per_descriptor[index].append(
                LimitState(
                    limit=limit,
                    sufficient=outcome.sufficient,
                    remaining=remaining_tokens(outcome.level, spec),
                    reset_ms=ms_until_full(outcome.level, spec),
                    retry_after_ms=(
                        0 if outcome.sufficient else ms_until(outcome.level, admission.need, spec)
                    ),
                )
            )
        verdicts = tuple(
            DescriptorVerdict(
                over_limit=any(not s.sufficient and not s.limit.shadow for s in states),
                reported=_most_restrictive(states),
                limits=tuple(states),
            )
            for states in per_descriptor
        )
        return Verdict(not admitted, verdicts, reports, tuple(ignored), tuple(usage_outcomes))


def _admission(limit: Limit, descriptor: Descriptor) -> Admission:
    assert descriptor.user is not None
    key = limit.counter_key(descriptor.user, descriptor.model)
    window = limit.spec.window_ms
    if limit.kind == "tokens":
        # post-paid: admission only needs some credit left; usage is charged after the response
        return Admission(key, limit.spec, need=1, take=0, shadow=limit.shadow)
    hits = 0 if descriptor.check_only else descriptor.hits
    return Admission(key, limit.spec, need=max(hits, 1) * window, take=hits * window,
                     shadow=limit.shadow)  # fmt: skip


def _most_restrictive(states: Sequence[LimitState]) -> LimitState | None:
    """Refusing limits first (longest wait), then the enforced limit with the least room left."""
    if not states:
        return None
    refused = [s for s in states if not s.sufficient and not s.limit.shadow]
    if refused:
        return max(refused, key=lambda s: s.retry_after_ms)
    enforced = [s for s in states if not s.limit.shadow] or list(states)
    return min(enforced, key=lambda s: s.remaining / s.limit.spec.limit)
