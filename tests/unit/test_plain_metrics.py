"""The plain counters and histograms of sidecar.metrics export exactly what
prometheus_client's own Counter and Histogram export for the same events
(only the _created timestamps differ)."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from sidecar.metrics import REQUEST_BUCKETS, PlainCounter, PlainHistogram

LABELS = ["upstream", "kind", "outcome"]
EVENTS = [
    (("cache", "info", "hit"), 0.0001),
    (("cache", "info", "hit"), 0.0005),  # on a bound: counted in it, as Histogram does
    (("origin", "zip", "ok"), 3.0),
    (("origin", "mod", "failed"), 400.0),  # above every bound: +Inf only
]


def _exposition(registry: CollectorRegistry) -> str:
    # _created is when a child was made: the one figure that may differ.
    return re.sub(r"(_created\{[^}]*\}) \S+", r"\1 T", generate_latest(registry).decode())


def test_plain_counter_and_histogram_export_what_prometheus_client_exports() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    counter = Counter("x_requests", "Requests.", LABELS, registry=theirs)
    histogram = Histogram("x_seconds", "Time.", LABELS, buckets=REQUEST_BUCKETS, registry=theirs)
    plain_counter = PlainCounter("x_requests", "Requests.", LABELS, ours)
    plain_histogram = PlainHistogram("x_seconds", "Time.", LABELS, REQUEST_BUCKETS, ours)
    for labels, seconds in EVENTS:
        counter.labels(*labels).inc()
        histogram.labels(*labels).observe(seconds)
        plain_counter.labels(*labels).inc()
        plain_histogram.labels(*labels).observe(seconds)
    expected = _exposition(theirs)
    assert (
        'x_seconds_bucket{kind="info",le="0.0005",outcome="hit",upstream="cache"} 2.0' in expected
    )
    assert _exposition(ours) == expected


def test_a_histogram_without_created_exports_no_created_series() -> None:
    registry = CollectorRegistry()
    waits = PlainHistogram("x_wait_seconds", "Waits.", ["upstream"], (0.1, 1.0), registry, False)
    waits.labels("origin").observe(0.5)
    text = generate_latest(registry).decode()
    assert 'x_wait_seconds_bucket{le="1.0",upstream="origin"} 1.0' in text
    assert "_created" not in text
