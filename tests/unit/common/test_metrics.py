"""FastCounter and FastHistogram export exactly what prometheus_client's own types would."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from maas_common.metrics import LATENCY_BUCKETS, OTHER, BoundedLabel, FastCounter, FastHistogram

OBSERVATIONS = [0.00005, 0.0001, 0.0001001, 0.0003, 0.002, 0.0025, 0.7, 2.5, 3.0, 40.0]


def test_a_counter_exports_like_prometheus_client() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = FastCounter("calls", "Calls by answer", ["answer", "tier"], ours)
    reference = Counter("calls", "Calls by answer", ["answer", "tier"], registry=theirs)
    for answer, tier, amount in [("ok", "free", 1), ("ok", "free", 2.5), ("over", "premium", 1)]:
        fast.inc(answer, tier, amount=amount)
        reference.labels(answer, tier).inc(amount)
    assert generate_latest(ours) == generate_latest(theirs)
    assert ours.get_sample_value("calls_total", {"answer": "ok", "tier": "free"}) == 3.5
    assert ours.get_sample_value("calls_total", {"answer": "ok", "tier": "premium"}) is None


def test_a_counter_without_samples_exports_only_its_help() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    FastCounter("calls", "Calls", ["answer"], ours)
    Counter("calls", "Calls", ["answer"], registry=theirs)
    assert generate_latest(ours) == generate_latest(theirs)


@pytest.mark.parametrize("labelnames", [(), ("store", "op")])
def test_a_histogram_exports_like_prometheus_client(labelnames: tuple[str, ...]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = FastHistogram("op_seconds", "Op time", ours, labelnames=labelnames)
    reference = Histogram(
        "op_seconds", "Op time", labelnames, registry=theirs, buckets=LATENCY_BUCKETS
    )
    labels = ("redis", "admit")[: len(labelnames)]
    for seconds in OBSERVATIONS:
        fast.child(*labels).observe(seconds)
        (reference.labels(*labels) if labels else reference).observe(seconds)
    assert generate_latest(ours) == generate_latest(theirs)


def test_a_value_on_a_bucket_bound_counts_in_that_bucket() -> None:
    registry = CollectorRegistry()
    FastHistogram("t", "t", registry, buckets=(1.0, 2.0)).child().observe(1.0)
    assert registry.get_sample_value("t_bucket", {"le": "1.0"}) == 1
    assert registry.get_sample_value("t_count") == 1


def test_a_histogram_child_needs_all_its_labels() -> None:
    histogram = FastHistogram("t", "t", CollectorRegistry(), labelnames=["store", "op"])
    with pytest.raises(ValueError, match=r"takes labels \['store', 'op'\]"):
        histogram.child("redis")


def test_scraping_from_another_thread_while_the_loop_counts() -> None:
    # /metrics renders in a worker thread (asyncio.to_thread) while the event loop increments
    registry = CollectorRegistry()
    counter = FastCounter("c", "c", ["n"], registry)
    histogram = FastHistogram("h", "h", registry, labelnames=["n"])
    stop = threading.Event()
    errors: list[BaseException] = []

    def scrape() -> None:
        try:
            while not stop.is_set():
                generate_latest(registry)
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=scrape)
    thread.start()
    for i in range(20_000):  # new label values keep resizing the dicts being copied
        counter.inc(str(i % 5_000))
        histogram.child(str(i % 500)).observe(0.001)
    stop.set()
    thread.join()
    assert errors == []
    assert registry.get_sample_value("c_total", {"n": "42"}) == 4
    assert registry.get_sample_value("h_count", {"n": "7"}) == 40


def test_bounded_label_admits_known_names_then_a_few_others_for_good() -> None:
    known = [frozenset({"free", "premium"})]
    label = BoundedLabel(lambda: known[0], spare=2, admits=lambda v: "/" in v)
    assert label("free") == "free"
    assert label("random") == OTHER  # not of the admitted form
    assert label("ns/a") == "ns/a"
    assert label("ns/b") == "ns/b"
    assert label("ns/c") == OTHER  # the spares are taken
    assert label("premium") == "premium"
    known[0] = frozenset({"gold"})  # a reload
    assert label("free") == OTHER
    assert label("gold") == "gold"
    assert label("ns/a") == "ns/a"  # admitted before the reload: still itself
    assert label("ns/c") == OTHER
