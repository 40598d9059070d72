"""Prometheus metrics of maas-ratelimit. No user in any label."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from maas_common.metrics import LATENCY_BUCKETS, LabelledCounter, config_reload_counter


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
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tokens_charged = Counter(
            "maas_ratelimit_tokens_charged",
            "LLM tokens charged after responses, as reported (before weights), by kind "
            "(prompt_tokens, completion_tokens, total_tokens)",
            ["tier", "model", "kind"],
            registry=registry,
        )
        self.tokens_reserved = Counter(
            "maas_ratelimit_tokens_reserved",
            "LLM tokens reserved on admission (the usage reader's estimate, prompt + completion), "
            "before weights, by admitted requests",
            ["tier", "model"],
            registry=registry,
        )
        self.tokens_refunded = Counter(
            "maas_ratelimit_tokens_refunded",
            "Reserved LLM tokens given back after responses, before weights: the estimate less "
            "the usage when the usage was smaller, all of it for answers charged nothing",
            ["tier", "model"],
            registry=registry,
        )
        self.responses = Counter(
            "maas_ratelimit_usage_responses",
            "Responses the usage reader reported on, by outcome: charged, or why nothing was "
            "(no_usage, upstream_error, client_error, rate_limited, incomplete)",
            ["tier", "outcome"],
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
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.store_errors = Counter(
            "maas_ratelimit_store_errors",
            "Bucket store operations that failed, by kind (connect, timeout, ...)",
            ["store", "kind"],
            registry=registry,
        )
        self.config_reloads = config_reload_counter(registry)
        self.buckets = Gauge(
            "maas_ratelimit_buckets",
            "Live buckets held in memory (memory store)",
            registry=registry,
        )
        # children cached by label values: what the hot path counts with (see LabelledCounter)
        self._decisions = LabelledCounter(self.decisions)
        self.answers = LabelledCounter(self.calls)
        self.charged = LabelledCounter(self.tokens_charged)
        self.reserved = LabelledCounter(self.tokens_reserved)
        self.refunded = LabelledCounter(self.tokens_refunded)
        self.reported = LabelledCounter(self.responses)
        self.skipped = LabelledCounter(self.charges_skipped)
        self.ignored = LabelledCounter(self.descriptors_ignored)

    def decision(self, result: str, tier: str, limit: str) -> None:
        self._decisions.inc(result, tier, limit)

    def track_buckets(self, count: Callable[[], int]) -> None:
        self.buckets.set_function(lambda: float(count()))
