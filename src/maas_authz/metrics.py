"""Prometheus metrics of maas-authz. Labels never carry a token or a user."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram

from maas_authz.subscriptions import InvalidObject, ObjectKey
from maas_common.cache import CacheEvent
from maas_common.metrics import LATENCY_BUCKETS, LabelledCounter, config_reload_counter


class AuthzMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter(
            "maas_authz_decisions",
            "Check decisions by result (allowed/denied), reason and tier",
            ["result", "reason", "tier"],
            registry=registry,
        )
        self.check_seconds = Histogram(
            "maas_authz_check_duration_seconds",
            "Time to decide a Check, from request to response",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.cache_events = Counter(
            "maas_authz_cache_events",
            "Cache lookups (hit, miss, coalesced) and removals (expired, evicted)",
            ["cache", "event"],
            registry=registry,
        )
        self.kubernetes_seconds = Histogram(
            "maas_authz_kubernetes_request_duration_seconds",
            "Kubernetes API calls, by call",
            ["call"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.kubernetes_errors = Counter(
            "maas_authz_kubernetes_errors",
            "Kubernetes API calls that failed, by call and kind (timeout, connect, http_NNN, ...)",
            ["call", "kind"],
            registry=registry,
        )
        self.objects_skipped = Counter(
            "maas_authz_subscription_objects_skipped",
            "MaaSModelRef / MaaSAuthPolicy / MaaSSubscription objects left out as unusable, by "
            "kind (each object version once; the log line names the object and the field)",
            ["kind"],
            registry=registry,
        )
        self.watch_errors = Counter(
            "maas_authz_watch_errors",
            "List/watch failures of the subscription informers, by informer and kind",
            ["informer", "kind"],
            registry=registry,
        )
        self.key_lookup_seconds = Histogram(
            "maas_authz_api_key_lookup_duration_seconds",
            "sk-oai- key lookups in the key store (postgresql, maas-api), by source and outcome "
            "(found, not_found, http_200, timeout, connect, ...)",
            ["source", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.stale_keys = Counter(
            "maas_authz_api_key_stale_served",
            "sk-oai- keys let through on an earlier verdict because the key store failed "
            "(api_keys.cache.stale_if_error)",
            registry=registry,
        )
        self.access_log_entries = Counter(
            "maas_authz_access_log_entries",
            "Envoy access log entries received for the decisions view, by result (recorded, "
            "skipped: unreadable)",
            ["result"],
            registry=registry,
        )
        self.admin_requests = Counter(
            "maas_authz_admin_requests",
            "Operator API requests by route and outcome (ok, unauthenticated, forbidden, "
            "bad_request, unavailable)",
            ["route", "outcome"],
            registry=registry,
        )
        self.config_reloads = config_reload_counter(registry)
        self._decisions = LabelledCounter(self.decisions)

    def object_skipped(self, problem: InvalidObject) -> None:
        key = problem.key
        self.objects_skipped.labels(key.kind if isinstance(key, ObjectKey) else "unknown").inc()

    def key_lookup_observer(self, source: str) -> Callable[[float, str], None]:
        def observe(seconds: float, outcome: str) -> None:
            self.key_lookup_seconds.labels(source, outcome).observe(seconds)

        return observe

    def stale_key_served(self) -> None:
        self.stale_keys.inc()

    def watch_error(self, informer: str, kind: str) -> None:
        self.watch_errors.labels(informer, kind).inc()

    def decision(self, result: str, reason: str, tier: str) -> None:
        self._decisions.inc(result, reason, tier)

    def cache_observer(self, cache: str) -> CacheObserver:
        return CacheObserver(self.cache_events, cache)

    def observe_kubernetes(self, call: str, seconds: float, outcome: str) -> None:
        self.kubernetes_seconds.labels(call).observe(seconds)
        if outcome != "ok":
            self.kubernetes_errors.labels(call, outcome).inc()


class CacheObserver:
    def __init__(self, counter: Counter, cache: str) -> None:
        self._children = {
            event: counter.labels(cache, event)
            for event in ("hit", "miss", "coalesced", "expired", "evicted")
        }

    def __call__(self, event: CacheEvent) -> None:
        self._children[event].inc()
