"""Where one request's outcome goes: the upstream's window and the metrics.

Each upstream has two windows, one per traffic class: module requests and
checksum-database requests are judged apart (``TrafficClass``), so an
upstream that cannot serve ``sumdb/`` keeps its module traffic.

Metric children are looked up once per label tuple and kept, because
``labels()`` costs more than the rest of the accounting together.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sidecar.breaker.state import SUMDB_KINDS
from sidecar.goproxy import KIND_LABEL, Kind
from sidecar.metrics import Metrics
from sidecar.stats.plain import PlainBuckets, PlainCount
from sidecar.stats.window import OUTCOME_ERROR, OUTCOME_TIMEOUT, Outcome, UpstreamWindow

# requests_total, request_duration_seconds and, for a hit or stale serve, its cache counter
Answers = tuple[PlainCount, PlainBuckets, PlainCount | None]


class Recorder:
    def __init__(
        self,
        metrics: Metrics,
        windows: Mapping[str, UpstreamWindow],
        sumdb_windows: Mapping[str, UpstreamWindow],
    ) -> None:
        self.metrics = metrics
        self.windows = windows  # module traffic (and the pool's admission figures)
        self.sumdb_windows = sumdb_windows  # checksum-database traffic
        self._children: dict[tuple[Any, ...], Any] = {}
        # One entry per (source, kind, outcome): every metric child a request's
        # end touches, looked up once.
        self._answers: dict[tuple[str, str, str], Answers] = {}
        # upstream_attempts_total's increment per (upstream, result), and
        # cache_misses_total's per kind: one dict lookup on every miss.
        self._attempts: dict[tuple[str, str], Callable[[], None]] = {}
        self._misses: dict[Kind, Callable[[], None]] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def attempt(
        self, upstream: str, kind: Kind, outcome: Outcome, ttfb: float | None, result: str
    ) -> None:
        """One request of ``kind`` sent to one upstream, with what came of it."""
        windows = self.sumdb_windows if kind in SUMDB_KINDS else self.windows
        window = windows.get(upstream)
        if window is not None:
            window.record(outcome, ttfb)
        key = (upstream, result)
        count = self._attempts.get(key)
        if count is None:
            count = self._attempts[key] = self.counter(self.metrics.upstream_attempts, *key)
        count()
        if outcome is OUTCOME_ERROR or outcome is OUTCOME_TIMEOUT:
            self._child(self.metrics.upstream_failures, upstream, result).inc()

    def missed(self, kind: Kind) -> None:
        """A request of ``kind`` the cache could not answer."""
        count = self._misses.get(kind)
        if count is None:
            count = self._misses[kind] = self.counter(self.metrics.cache_misses, KIND_LABEL[kind])
        count()

    def relayed(self, spliced: bool, sent: int) -> None:
        """A body relayed straight from an upstream: ``sent`` bytes handed to the client."""
        self._child(self.metrics.relayed_bytes, "splice" if spliced else "copy").inc(sent)

    def masked(self, upstream: str, kind: Kind) -> None:
        """A 404 of ``upstream`` that a later one answered with 200. A checksum
        request's goes to its own window's run only (the policy reroutes that class
        on it): a proxy that does not serve ``sumdb/`` (Athens with ``SumDBs = []``)
        answers 404 there by design, which is no fault to count in the metric, but
        every lookup sent there is a round trip the next upstream answers anyway."""
        if kind in SUMDB_KINDS:
            sumdb_window = self.sumdb_windows.get(upstream)
            if sumdb_window is not None:
                sumdb_window.record_masked()
            return
        window = self.windows.get(upstream)
        if window is not None:
            window.record_masked()
        self._child(self.metrics.masked_failures, upstream).inc()

    def integrity(self, upstream: str, kind: str) -> None:
        """A body of ``upstream`` did not match the checksum database (the failed
        attempt is recorded apart, by ``attempt``)."""
        window = self.windows.get(upstream)
        if window is not None:
            window.record_integrity()
        self._child(self.metrics.integrity_failures, upstream, kind).inc()

    def overflowed(self, upstream: str) -> None:
        """A request found no connection to ``upstream`` in time: admission, not health."""
        window = self.windows.get(upstream)
        if window is not None:
            window.record_overflow()
        self._child(self.metrics.upstream_overflows, upstream).inc()

    def answered(self, source: str, kind: str, outcome: str, seconds: float) -> None:
        """The client's request is over: who answered it, how, and how long it took
        (and a cache hit or stale serve counted as one)."""
        key = (source, kind, outcome)
        children = self._answers.get(key)
        if children is None:
            children = self._answers[key] = self._answers_for(key)
        count, durations, served = children
        count.value += 1.0
        durations.observe(seconds)
        if served is not None:
            served.value += 1.0

    def _answers_for(self, key: tuple[str, str, str]) -> Answers:
        metrics = self.metrics
        _, kind, outcome = key
        served = {"hit": metrics.cache_hits, "stale": metrics.cache_stale_serves}.get(outcome)
        return (
            metrics.requests.labels(*key),
            metrics.request_duration.labels(*key),
            None if served is None else served.labels(kind),
        )

    def counter(self, metric: Any, *labels: str) -> Callable[[], None]:
        child = self._child(metric, *labels)
        return child.inc  # type: ignore[no-any-return]


def queue_wait_sink(window: UpstreamWindow, histogram: PlainBuckets) -> Callable[[float], None]:
    """Where an upstream's admission gate reports each request's queue wait:
    the upstream's window (for the policy) and its histogram child (for Prometheus)."""
    record = window.record_queue_wait
    observe = histogram.observe
    counts = histogram.counts

    def sink(seconds: float) -> None:
        record(seconds)
        if seconds:
            observe(seconds)
        else:  # most requests: no wait, the first bucket (every bound is above 0)
            counts[0] += 1

    return sink
