"""A rate limit decision with what it records: metrics, the usage ledger, the failure policy.

Shared by both topologies: maas-ratelimit's gRPC adapter (service.py) and, in the one-hop
topology, maas-authz's Check and access log (maas_authz/one_hop.py) call the same object, so a
decision is counted and billed the same way whoever asked for it.

A call whose descriptors are all check-only admissions (hits_addend 0, no charge, no outcome) is
a peek: nothing is consumed, and it is counted apart from decisions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

from maas_common.clock import Clock
from maas_common.errors import BackendUnavailable
from maas_common.logs import LogThrottle
from maas_ratelimit.descriptors import Descriptor
from maas_ratelimit.limiter import RateLimiter, Verdict, request_id_of
from maas_ratelimit.limits import LimitTable
from maas_ratelimit.metrics import RateLimitMetrics, WireLabels
from maas_ratelimit.store import ChargeStatus
from maas_ratelimit.usage_ledger import UsageLedger

log = logging.getLogger(__name__)
FailureMode = Literal["open", "closed"]


def is_peek(descriptors: Sequence[Descriptor]) -> bool:
    """Every descriptor a check-only admission: an after-response report (outcome, charge) with
    hits 0 is a report, never a peek."""
    if not descriptors or not descriptors[0].check_only:  # nearly every call: one test
        return False
    return all(d.check_only and d.outcome is None and d.charge_kind is None for d in descriptors)


class LimitAccounting:
    """RateLimiter.decide, counted; charges applied once go on the ledger's journal before the
    caller answers. Raises what the limiter raises (UnknownDomain, BackendUnavailable): the
    caller applies `failure_mode` after `store_failed`."""

    def __init__(
        self,
        limiter: RateLimiter,
        metrics: RateLimitMetrics,
        *,
        failure_mode: FailureMode,
        clock: Clock,
        ledger: UsageLedger | None = None,
    ) -> None:
        self.limiter = limiter
        self.metrics = metrics
        self.failure_mode = failure_mode
        self._ledger = ledger
        self._clock = clock
        self._failure_log = LogThrottle(clock, seconds=5.0)
        self._labels = WireLabels(limiter.table)

    def table(self) -> LimitTable:
        return self.limiter.table()

    async def peek(self, domain: str, descriptors: Sequence[Descriptor]) -> Verdict:
        verdict = await self.limiter.decide(domain, descriptors)
        self.metrics.answers.inc("peek")
        return verdict

    async def decide(self, domain: str, descriptors: Sequence[Descriptor]) -> Verdict:
        verdict = await self.limiter.decide(domain, descriptors)
        self._record(verdict)
        charges = verdict.charges
        # charged once per request id (the store said so): on the ledger's journal before the
        # answer goes back
        if self._ledger is not None and charges and charges[0].status is ChargeStatus.APPLIED:
            self._ledger.record(
                descriptors, charges, request_id_of(descriptors), round(self._clock.wall() * 1000)
            )
        return verdict

    def count_outcome(self, tier: str, outcome: str) -> None:
        """An outcome the usage reader would report (the one-hop topology's own 429s, which no
        after-response call reports)."""
        labels = self._labels
        self.metrics.reported.inc(labels.tier(tier), labels.outcome(outcome))

    def store_failed(self, exc: BackendUnavailable, *, charges: bool) -> FailureMode:
        """Logs (a line per 5 s) and counts a store that could not answer; `charges`: the call
        carried usage, now not charged. Returns the failure mode to apply."""
        self._failure_log.log(
            log,
            logging.WARNING,
            "rate limit store failed, failing %s: %s",
            self.failure_mode,
            exc,
            extra={"backend": exc.backend, "kind": exc.kind},
        )
        if charges:
            self.metrics.skipped.inc("store_unavailable")
        self.metrics.answers.inc("failure_open" if self.failure_mode == "open" else "unavailable")
        return self.failure_mode

    def _record(self, verdict: Verdict) -> None:
        metrics = self.metrics
        metrics.answers.inc("over_limit" if verdict.over_limit else "ok")
        decisions = metrics.decisions
        # every label value that came from a descriptor goes through `labels` (bounded)
        labels = self._labels
        labels.reset_if(self.limiter.table())
        tier_of, model_of, of_limit = labels.tier, labels.model, labels.of_limit
        for descriptor in verdict.descriptors:
            for state in descriptor.limits:
                decisions.inc(state.result, *of_limit(state.limit))
        for charge in verdict.charges:
            if charge.status is ChargeStatus.APPLIED:
                tier, model = tier_of(charge.tier), model_of(charge.model)
                metrics.charged.inc(tier, model, charge.kind, amount=charge.tokens)
                if charge.billing_rate is not None:
                    metrics.charge_cost(tier, model, charge.tokens, charge.billing_rate)
            else:
                metrics.skipped.inc(charge.status.value)
        for tier, outcome in verdict.outcomes:
            metrics.reported.inc(tier_of(tier), labels.outcome(outcome))
        for tier, model, tokens in verdict.reserved:
            metrics.reserved.inc(tier_of(tier), model_of(model), amount=tokens)
        for tier, model, tokens in verdict.refunded:
            metrics.refunded.inc(tier_of(tier), model_of(model), amount=tokens)
        for reason in verdict.ignored:
            metrics.ignored.inc(reason)
