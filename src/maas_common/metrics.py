"""Metric pieces both servers use: the registry, latency buckets, reload counts, label caching,
and lock-free counters and histograms for a single process's hot path."""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from maas_common.reload import ReloadResult

# From 100 µs (a cached decision) to 2.5 s (a struggling backend).
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip

# `*_created` series double every counter's output and no dashboard of ours reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]


def new_registry() -> CollectorRegistry:
    """A registry of the server's own, with the standard process and Python collectors."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def config_reload_counter(registry: CollectorRegistry) -> Counter:
    return Counter(
        "maas_config_reloads",
        "Reloads of watched config files by result (applied, rejected, unreadable)",
        ["config", "result"],
        registry=registry,
    )


def reload_observer(counter: Counter, config: str) -> Callable[[ReloadResult], None]:
    return lambda result: counter.labels(config, result).inc()


class LabelledCounter:
    """Counter children cached by label values: `.labels()` costs a lock and a dict walk per call,
    which the hot path should not pay."""

    def __init__(self, counter: Counter) -> None:
        self._counter = counter
        self._children: dict[tuple[str, ...], Counter] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._counter.labels(*labels)
        child.inc(amount)


# --- Hot-path metrics for one process -------------------------------------------------------------
# prometheus_client takes a lock per increment and walks a Python loop per histogram observation:
# about 0.6 µs a count and 0.7 µs an observation, several per call. These keep plain numbers that
# the event loop updates (one dict or list update) and turn them into metric families only when
# scraped. In prometheus_client's multiprocess mode (maas-authz's workers, which run the limiter
# in the one-hop topology) they are prometheus_client's own metrics instead, whose value files
# the supervisor sums: the same names, labels and methods.
_MULTIPROCESS = "PROMETHEUS_MULTIPROC_DIR" in os.environ


class FastCounter(Collector):
    """A labelled counter: `inc(*labels)` is one dict update; exported on scrape."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry
    ) -> None:
        self._name, self._documentation, self._labelnames = name, documentation, list(labelnames)
        self._values: dict[tuple[str, ...], float] = {}
        if _MULTIPROCESS:  # a worker: counted in its value files, which the supervisor sums
            counter = Counter(name, documentation, labelnames, registry=registry)
            self.inc = LabelledCounter(counter).inc  # type: ignore[method-assign]
            return
        registry.register(self)

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        values = self._values
        values[labels] = values.get(labels, 0.0) + amount

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        # dict(...) copies in C without releasing the GIL: safe against the loop's updates
        # while /metrics renders in a worker thread
        for labels, value in dict(self._values).items():
            family.add_metric(list(labels), value)
        yield family

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)


class FastHistogram(Collector):
    """A histogram with optional labels: `child(*labels).observe(seconds)` is a bisect and two
    list updates; exported on scrape like prometheus_client's Histogram."""

    def __init__(
        self,
        name: str,
        documentation: str,
        registry: CollectorRegistry,
        *,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        self._name, self._documentation, self._labelnames = name, documentation, list(labelnames)
        self._bounds = tuple(buckets)
        self._children: dict[tuple[str, ...], HistogramChild] = {}
        if _MULTIPROCESS:  # a worker: observed in its value files (the registry is not read)
            shared = Histogram(name, documentation, labelnames, registry=None, buckets=self._bounds)
            self.child = lambda *labels: shared.labels(*labels) if labels else shared  # type: ignore[method-assign,assignment]
            return
        registry.register(self)

    def child(self, *labels: str) -> HistogramChild:
        if len(labels) != len(self._labelnames):
            raise ValueError(f"{self._name} takes labels {self._labelnames}, got {labels}")
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = HistogramChild(self._bounds)
        return child

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for labels, child in list(self._children.items()):
            counts, total = child.snapshot()
            cumulative, buckets = 0, []
            for bound, count in zip((*self._bounds, float("inf")), counts, strict=True):
                cumulative += count
                buckets.append((_bound_text(bound), cumulative))
            family.add_metric(list(labels), buckets, total)
        yield family

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)


class HistogramChild:
    __slots__ = ("_bounds", "_counts", "_sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        self._counts[bisect_left(self._bounds, seconds)] += 1  # le: a value on a bound counts in
        self._sum += seconds

    def snapshot(self) -> tuple[list[int], float]:
        return list(self._counts), self._sum


def _bound_text(bound: float) -> str:
    text: str = floatToGoString(bound)  # type: ignore[no-untyped-call]  # as prometheus_client writes `le`
    return text


OTHER = "other"  # the label value for whatever a BoundedLabel no longer admits


class BoundedLabel:
    """Label values from the wire, bounded: a series per value would let any client grow
    /metrics without limit (a fuzzed ShouldRateLimit once made 738 series of random tiers).

    A value in `known()` (the configured names) is itself; up to `spare` other values that
    `admits` accepts are admitted as they come, for good (e.g. subscriptions, which only the
    authorization server knows); anything else is OTHER. `known` is re-read when its result
    changes identity (a reloaded configuration).
    """

    def __init__(
        self,
        known: Callable[[], frozenset[str]],
        spare: int = 0,
        admits: Callable[[str], bool] = lambda _value: True,
    ) -> None:
        self._known_source = known
        self._known: frozenset[str] | None = None
        self._spare = spare
        self._admits = admits
        self._seen: dict[str, str] = {}  # value -> its label (a cache)
        self._spares: set[str] = set()  # values admitted beyond the known ones, for good

    def __call__(self, value: str) -> str:
        known = self._known_source()
        if known is not self._known:
            self._known, self._seen = known, {}  # a reload: known names may have changed
        label = self._seen.get(value)
        if label is not None:
            return label
        if value in known or value in self._spares:
            label = value
        elif len(self._spares) < self._spare and self._admits(value):
            self._spares.add(value)
            label = value
        else:
            label = OTHER
        if len(self._seen) < 4 * (len(known) + self._spare) + 64:  # the cache is bounded too
            self._seen[value] = label
        return label
