"""Prometheus metrics of maas-ratelimit. No user in any label."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip


class RateLimitMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter(
            "maas_ratelimit_decisions",
            "Limits evaluated on admission, by result (allowed, limited, shadow_limited)",
            ["result", "tier", "limit"],
            registry=registry,
        )
        self.calls = Counter(
            "maas_ratelimit_calls",
            "ShouldRateLimit calls by answer (ok, over_limit, failure_open, unavailable, error)",
            ["answer"],
            registry=registry,
        )
        self.call_seconds = Histogram(
            "maas_ratelimit_call_duration_seconds",
            "Time to answer ShouldRateLimit",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.tokens_charged = Counter(
            "maas_ratelimit_tokens_charged",
            "LLM tokens charged to token limits after responses",
            ["tier", "model"],
            registry=registry,
        )
        self.charges_skipped = Counter(
            "maas_ratelimit_charges_skipped",
            "Charges not applied, by reason (duplicate, denied_request, store_unavailable)",
            ["reason"],
            registry=registry,
        )
        self.descriptors_ignored = Counter(
            "maas_ratelimit_descriptors_ignored",
            "Descriptors no limit could apply to, by reason (no_tier, no_user, no_tokens_limit)",
            ["reason"],
            registry=registry,
        )
        self.store_seconds = Histogram(
            "maas_ratelimit_store_duration_seconds",
            "Bucket store operations",
            ["store", "op"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.store_errors = Counter(
            "maas_ratelimit_store_errors",
            "Bucket store operations that failed, by kind (connect, timeout, ...)",
            ["store", "kind"],
            registry=registry,
        )
        self.config_reloads = Counter(
            "maas_config_reloads",
            "Reloads of watched config files by result (applied, rejected, unreadable)",
            ["config", "result"],
            registry=registry,
        )
        self.buckets = Gauge(
            "maas_ratelimit_buckets",
            "Live buckets held in memory (memory store)",
            registry=registry,
        )
        self._decision_children: dict[tuple[str, str, str], Counter] = {}

    def decision(self, result: str, tier: str, limit: str) -> None:
        key = (result, tier, limit)
        child = self._decision_children.get(key)
        if child is None:
            child = self._decision_children[key] = self.decisions.labels(*key)
        child.inc()

    def track_buckets(self, count: Callable[[], int]) -> None:
        self.buckets.set_function(lambda: float(count()))
