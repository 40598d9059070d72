"""Prometheus metrics of maas-ratelimit. No user in any label.

The per-call metrics are maas_common's FastCounter / FastHistogram: one dict or list update on
the hot path instead of prometheus_client's lock per increment (maas-ratelimit is one process).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

from prometheus_client import CollectorRegistry, Counter, Gauge

from maas_common.metrics import BoundedLabel, FastCounter, FastHistogram, config_reload_counter
from maas_ratelimit.limits import Limit, LimitTable

_RATES: dict[str, float] = {}  # billing_rate text -> per-token price
# what a model or a subscription is on the wire: a Kubernetes object's "namespace/name"
_OBJECT_REF = re.compile(
    r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?"
)
# the usage reader's outcomes (envoy/lua/usage.lua M.outcome, and "incomplete")
OUTCOMES = frozenset(
    {"charged", "no_usage", "upstream_error", "client_error", "rate_limited", "incomplete"}
)
MAX_SUBSCRIPTIONS, MAX_MODELS = 256, 512  # label values beyond the configured names


def _is_object_ref(value: str) -> bool:
    return _OBJECT_REF.fullmatch(value) is not None


class WireLabels:
    """Label values taken from descriptors, bounded to the configured names: tiers, limit names
    and models of the limits table, plus, as they come, up to MAX_SUBSCRIPTIONS subscriptions
    (and their limits) and MAX_MODELS models that have the form of an object reference; every
    other value is counted as "other"."""

    def __init__(self, table: Callable[[], LimitTable]) -> None:
        self.tier = BoundedLabel(lambda: table().tiers, MAX_SUBSCRIPTIONS, _is_object_ref)
        self.limit = BoundedLabel(
            lambda: table().names,
            MAX_SUBSCRIPTIONS * 2,
            lambda name: _is_object_ref(name.rpartition("/")[0]),
        )
        self.model = BoundedLabel(
            lambda: table().models, MAX_MODELS, lambda model: not model or _is_object_ref(model)
        )
        self.outcome = BoundedLabel(lambda: OUTCOMES)
        self._by_limit: dict[str, tuple[str, str]] = {}  # limit name -> (tier, limit) labels
        self._table: LimitTable | None = None  # the table _by_limit is for

    def of_limit(self, limit: Limit) -> tuple[str, str]:
        """(tier, limit) labels of a limit: one dict probe on the hot path (a limit's name fixes
        its tier; the labels go with the bounded ones, so a reload resets them there)."""
        labels = self._by_limit.get(limit.name)
        if labels is None:
            labels = (self.tier(limit.tier), self.limit(limit.name))
            if len(self._by_limit) >= 4 * MAX_SUBSCRIPTIONS:
                self._by_limit.clear()
            self._by_limit[limit.name] = labels
        return labels

    def reset_if(self, table: LimitTable) -> None:
        """Forget the per-limit labels when the table changed (a reload)."""
        if table is not self._table:
            self._table, self._by_limit = table, {}


class RateLimitMetrics:
    def __init__(
        self, registry: CollectorRegistry, *, config_reloads: Counter | None = None
    ) -> None:
        self.decisions = FastCounter(
            "maas_ratelimit_decisions",
            "Limits evaluated on admission, by result (allowed, limited, shadow_limited)",
            ["result", "tier", "limit"],
            registry,
        )
        self.answers = FastCounter(
            "maas_ratelimit_calls",
            "ShouldRateLimit calls by answer (ok, over_limit, peek, failure_open, unavailable, "
            "invalid_request, error)",
            ["answer"],
            registry,
        )
        self.call_seconds = FastHistogram(
            "maas_ratelimit_call_duration_seconds", "Time to answer ShouldRateLimit", registry
        )
        self.charged = FastCounter(
            "maas_ratelimit_tokens_charged",
            "LLM tokens charged after responses, as reported (before weights), by kind "
            "(prompt_tokens, completion_tokens, total_tokens)",
            ["tier", "model", "kind"],
            registry,
        )
        self.reserved = FastCounter(
            "maas_ratelimit_tokens_reserved",
            "LLM tokens reserved on admission (the usage reader's estimate, prompt + completion), "
            "before weights, by admitted requests",
            ["tier", "model"],
            registry,
        )
        self.refunded = FastCounter(
            "maas_ratelimit_tokens_refunded",
            "Reserved LLM tokens given back after responses, before weights: the estimate less "
            "the usage when the usage was smaller, all of it for answers charged nothing",
            ["tier", "model"],
            registry,
        )
        self.cost = FastCounter(
            "maas_ratelimit_cost_charged",
            "Cost of the LLM tokens charged, at the subscription's billingRate (perToken), by "
            "subscription (the tier label) and model",
            ["tier", "model"],
            registry,
        )
        self.reported = FastCounter(
            "maas_ratelimit_usage_responses",
            "Responses the usage reader reported on, by outcome: charged, or why nothing was "
            "(no_usage, upstream_error, client_error, rate_limited, incomplete)",
            ["tier", "outcome"],
            registry,
        )
        self.skipped = FastCounter(
            "maas_ratelimit_charges_skipped",
            "Charges not applied, by reason (duplicate, denied_request, store_unavailable)",
            ["reason"],
            registry,
        )
        self.ignored = FastCounter(
            "maas_ratelimit_descriptors_ignored",
            "Descriptors no limit could apply to, by reason (no_tier, no_user, no_tokens_limit)",
            ["reason"],
            registry,
        )
        self.store_seconds = FastHistogram(
            "maas_ratelimit_store_duration_seconds",
            "Bucket store operations",
            registry,
            labelnames=["store", "op"],
        )
        self.store_errors = FastCounter(
            "maas_ratelimit_store_errors",
            "Bucket store operations that failed, by kind (connect, timeout, ...)",
            ["store", "kind"],
            registry,
        )
        # the server's own where it has one (maas-authz in the one-hop topology)
        self.config_reloads = config_reloads or config_reload_counter(registry)
        self.buckets = Gauge(
            "maas_ratelimit_buckets",
            "Live buckets held in memory (memory store)",
            registry=registry,
        )

    def charge_cost(self, tier: str, model: str, tokens: int, billing_rate: str) -> None:
        rate = _RATES.get(billing_rate)
        if rate is None:
            try:
                rate = float(Decimal(billing_rate))
            except InvalidOperation:
                rate = -1.0
            if not (rate >= 0 and math.isfinite(rate)):
                rate = -1.0  # unusable: counted nowhere (maas-authz only sends valid rates)
            if len(_RATES) < 1024:
                _RATES[billing_rate] = rate
        if rate >= 0:
            self.cost.inc(tier, model, amount=tokens * rate)

    def track_buckets(self, count: Callable[[], int]) -> None:
        self.buckets.set_function(lambda: float(count()))
