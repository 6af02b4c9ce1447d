"""Every Prometheus metric the sidecar exports, on one registry built per app.

Names follow ``goproxy_sidecar_<subject>_<unit>``; labels are small fixed
sets (upstream name, request kind, outcome, traffic class) and never a module
path, so the series count is bounded by the config, not by traffic. ``class``
is ``module`` or ``sumdb``: each upstream has one breaker per traffic class.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import accumulate

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from sidecar.stats.plain import PlainBuckets, PlainCount

PREFIX = "goproxy_sidecar"

# Upper bounds in seconds: cache hits are sub-millisecond, zips can take minutes.
REQUEST_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
# A healthy pool waits nothing or a few ms; pool.max_wait defaults to 5 s.
QUEUE_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
POLICY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """Holds the metric objects; one instance per running app."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        p = PREFIX
        # --- requests
        self.requests = PlainCounter(
            f"{p}_requests",
            "Client requests answered, by the upstream (or 'cache', 'sidecar') that produced "
            "the answer, request kind and outcome (ok, hit, stale, not_found, failed, rejected, "
            "unavailable, overflow: every upstream it may use was busy, client_abort: the "
            "client left before the last byte; one that closes right after it is ok or hit).",
            ["upstream", "kind", "outcome"],
            r,
        )
        self.request_duration = PlainHistogram(
            f"{p}_request_duration_seconds",
            "Time from request to the end of the response "
            "body, by answering upstream, request kind and outcome.",
            ["upstream", "kind", "outcome"],
            REQUEST_BUCKETS,
            r,
        )
        self.upstream_attempts = PlainCounter(
            f"{p}_upstream_attempts",
            "Requests sent to an upstream, by result (ok, not_found, failure class).",
            ["upstream", "result"],
            r,
        )
        self.upstream_failures = PlainCounter(
            f"{p}_upstream_failures",
            "Upstream failures by class (timeout, connect, status, truncated, auth).",
            ["upstream", "failure"],
            r,
        )
        self.masked_failures = Counter(
            f"{p}_masked_failures",
            "404s to module requests from an upstream that a later upstream answered "
            "with 200 (Athens answers 404 when its own fetch failed). Checksum-database "
            "requests are not counted: a proxy without sumdb/ answers 404 by design.",
            ["upstream"],
            registry=r,
        )
        self.integrity_failures = Counter(
            f"{p}_integrity_failures",
            "Bodies (.mod, .zip) an upstream served that do not match the checksum "
            "database (kind: mod, zip, or zip_unreadable for a zip that cannot be "
            "hashed). In verify mode enforce none was served or cached; the request "
            "went on to the next upstream. Any non-zero rate is a wrong upstream.",
            ["upstream", "kind"],
            registry=r,
        )
        self.verify_unavailable = Counter(
            f"{p}_verify_unavailable",
            "Bodies that could not be checked against the checksum database (lookup "
            "failed, database answer did not verify, body too large to keep), by "
            "what was done (verify.unavailable: served or refused).",
            ["kind", "action"],
            registry=r,
        )
        self.invalid_requests = Counter(
            f"{p}_invalid_requests",
            "Requests refused before reaching any upstream "
            "(not a valid GOPROXY request), by status.",
            ["status"],
            registry=r,
        )
        self.rejected_requests = Counter(
            f"{p}_rejected_requests",
            "Requests answered with the reject status by the breaker (load shedding, "
            "reason policy), with 503 because every upstream was busy (reason overflow), "
            "or because no target could serve (reason no_target).",
            ["upstream", "reason"],
            registry=r,
        )
        # --- upstream health, as the policy sees it
        self.ttfb_p99 = Gauge(
            f"{p}_upstream_ttfb_p99_seconds",
            "P99 time to first byte over the stats window, by traffic class "
            "(module, sumdb: checksum-database requests).",
            ["upstream", "class"],
            registry=r,
        )
        self.error_rate = Gauge(
            f"{p}_upstream_error_rate",
            "Failed requests / requests over the stats window, by traffic class.",
            ["upstream", "class"],
            registry=r,
        )
        self.pool_in_use = Gauge(
            f"{p}_upstream_pool_in_use",
            "Connections in use to the upstream.",
            ["upstream"],
            registry=r,
        )
        self.pool_limit = Gauge(
            f"{p}_upstream_pool_limit",
            "Connection pool size of the upstream.",
            ["upstream"],
            registry=r,
        )
        self.pool_waiting = Gauge(
            f"{p}_upstream_pool_waiting",
            "Requests waiting for a pooled connection.",
            ["upstream"],
            registry=r,
        )
        # --- admission (sidecar.upstreams.admission): the sidecar's own load, not health
        self.upstream_overflows = Counter(
            f"{p}_upstream_overflows",
            "Requests that found no connection to this upstream in time (pending queue "
            "full, or pool.max_wait ran out) and went to the next target, the cache or a "
            "503. Not an upstream failure: the pool is too small for the load.",
            ["upstream"],
            registry=r,
        )
        self.upstream_queue_wait = PlainHistogram(
            f"{p}_upstream_queue_wait_seconds",
            "Time a request waited for a connection to this upstream (0 when one was "
            "free); waits that ran out at pool.max_wait included.",
            ["upstream"],
            QUEUE_WAIT_BUCKETS,
            r,
            created=False,
        )
        self.pool_saturation = Gauge(
            f"{p}_upstream_pool_saturation",
            "(in use + waiting) / limit of the pool.",
            ["upstream"],
            registry=r,
        )
        # --- hedged requests (sidecar.proxy.hedge)
        self.hedges = Counter(
            f"{p}_hedges",
            "Requests to this upstream that had no response headers within the hedge "
            "delay, by result: won (the same request sent to the next allowed upstream "
            "was served), lost (it was sent, and this upstream's answer, or none, was "
            "used), budget_exhausted (not sent then: the hedge budget was spent; a breaker "
            "that opens later still moves the request, counted again as won or lost).",
            ["upstream", "result"],
            registry=r,
        )
        self.hedge_delay = Gauge(
            f"{p}_hedge_delay_seconds",
            "How long a request to this upstream waits for headers before it is hedged, "
            "by traffic class (hedge.delay, or with auto the upstream's TTFB p95 within "
            "hedge.floor and timeouts.first_byte / 5).",
            ["upstream", "class"],
            registry=r,
        )
        # --- breakers
        self.breaker_state = Gauge(
            f"{p}_breaker_state",
            "1 for the breaker's current state, 0 for the others "
            "(a StateSet: closed, open, half-open); one breaker per upstream and "
            "traffic class (module, sumdb).",
            ["upstream", "class", "state"],
            registry=r,
        )
        self.breaker_transitions = Counter(
            f"{p}_breaker_transitions",
            "Breaker state changes, by upstream and traffic class.",
            ["upstream", "class", "from_state", "to_state", "reason"],
            registry=r,
        )
        self.breaker_alert = Gauge(
            f"{p}_breaker_alert",
            "1 while the policy asks for an alert on this upstream's traffic class.",
            ["upstream", "class"],
            registry=r,
        )
        self.decisions = Counter(
            f"{p}_policy_decisions",
            "Per-upstream decisions returned by the policy, by traffic class and "
            "action (counted in shadow mode too).",
            ["upstream", "class", "action"],
            registry=r,
        )
        self.probes = Counter(
            f"{p}_breaker_probes",
            "Half-open probe requests by origin (client, self) and result.",
            ["upstream", "origin", "result"],
            registry=r,
        )
        # --- policy engine
        self.policy_evaluations = Counter(
            f"{p}_policy_evaluations", "Policy evaluations attempted.", ["engine"], registry=r
        )
        self.policy_failures = Counter(
            f"{p}_policy_failures",
            "Policy evaluations that failed (error, timeout, bad "
            "output); the last good decision stays in force.",
            ["engine", "reason"],
            registry=r,
        )
        self.policy_duration = Histogram(
            f"{p}_policy_evaluation_duration_seconds",
            "Time of one policy evaluation.",
            ["engine"],
            buckets=POLICY_BUCKETS,
            registry=r,
        )
        self.policy_reloads = Counter(
            f"{p}_policy_reloads", "Policy reloads by result (ok, failed).", ["result"], registry=r
        )
        self.policy_stale = Gauge(
            f"{p}_policy_decisions_stale",
            "1 when the last good decision is older than the "
            "staleness bound and every upstream falls back to allow.",
            registry=r,
        )
        self.policy_last_success = Gauge(
            f"{p}_policy_last_success_timestamp_seconds",
            "Unix time of the last successful policy evaluation.",
            registry=r,
        )
        # --- cache
        self.cache_hits = PlainCounter(
            f"{p}_cache_hits", "Requests served from the local cache.", ["kind"], r
        )
        self.cache_misses = PlainCounter(
            f"{p}_cache_misses",
            "Cacheable requests not found in the local cache.",
            ["kind"],
            r,
        )
        self.cache_stale_serves = PlainCounter(
            f"{p}_cache_stale_serves",
            "Expired mutable entries served because no upstream "
            "answered or the breaker said cache.",
            ["kind"],
            r,
        )
        self.cache_bytes = Gauge(f"{p}_cache_bytes", "Bytes held by the local cache.", registry=r)
        self.cache_entries = Gauge(
            f"{p}_cache_entries", "Entries held by the local cache.", registry=r
        )
        self.cache_evictions = Counter(
            f"{p}_cache_evictions", "Entries evicted to keep cache.max_bytes.", registry=r
        )
        self.cache_integrity_failures = Counter(
            f"{p}_cache_integrity_failures",
            "Cached entries whose size or SHA-256 did not "
            "match; they are evicted and fetched again.",
            registry=r,
        )
        self.cache_scrub_bytes = Counter(
            f"{p}_cache_scrub_bytes",
            "Bytes of cached entries read again and hashed by the background scrub "
            "(at most cache.scrub_rate per second); flat while the scrub is off or idle "
            "between passes.",
            registry=r,
        )
        self.cache_scrub_entries = Counter(
            f"{p}_cache_scrub_entries",
            "Cached entries the background scrub hashed again, by result: ok, or corrupt "
            "(bytes no longer match the SHA-256 recorded at write time: bit rot, a file "
            "edited on disk; evicted, logged, fetched again on the next request).",
            ["result"],
            registry=r,
        )
        self.cache_scrub_last_pass = Gauge(
            f"{p}_cache_scrub_last_pass_timestamp_seconds",
            "Unix time the background scrub last finished a pass over every cached entry "
            "(0: none yet). A pass takes about cache bytes / cache.scrub_rate and starts "
            "at most once an hour; older than that plus an hour means the scrub is off or "
            "stuck.",
            registry=r,
        )
        for result in ("ok", "corrupt"):
            self.cache_scrub_entries.labels(result)
        self.cache_write_errors = Counter(
            f"{p}_cache_write_errors",
            "Failed cache writes (disk full, I/O); the request is proxied without caching.",
            registry=r,
        )
        self.cache_write_skips = Counter(
            f"{p}_cache_write_skips",
            "Small answers served without caching because the disk writer was "
            "behind (its queue full).",
            registry=r,
        )
        self.cache_fill_joins = Counter(
            f"{p}_cache_single_flight_joins",
            "Requests that joined an upstream fetch already "
            "in flight instead of starting their own.",
            registry=r,
        )
        self.relayed_bytes = Counter(
            f"{p}_relayed_bytes",
            "Body bytes relayed from an upstream straight to a client (no cache, no "
            "check before serving), by mode: splice (moved by the kernel from socket to "
            "socket) or copy (through the sidecar: TLS on either side, a chunked body).",
            ["mode"],
            registry=r,
        )
        # --- routing
        self.route_refusals = Counter(
            f"{p}_route_refusals",
            "Requests refused by routing rules (deny, private module with no allowed target).",
            ["reason"],
            registry=r,
        )
        # --- client authentication (client_auth)
        self.client_auth_failures = Counter(
            f"{p}_client_auth_failures",
            "Client requests refused by the front door, by reason: missing (no credential, "
            "401), malformed (401), bad_credentials (wrong user, password or token, 401), "
            "throttled (too many failures from the address, 429), forbidden (an identity a "
            "module rule does not allow, 403), admin_required (an endpoint for the admin "
            "credential, 403). Never labelled by user or address.",
            ["reason"],
            registry=r,
        )
        self.client_auth_reloads = Counter(
            f"{p}_client_auth_reloads",
            "Reloads of the client credential files (htpasswd, tokens) by result: ok, or "
            "failed (the file was refused and the previous credentials stay in service).",
            ["result"],
            registry=r,
        )
        self.tls_reloads = Counter(
            f"{p}_tls_reloads",
            "Reloads of the listener's certificate and key (tls) by result: ok, or failed "
            "(the pair was refused and the previous one stays in service).",
            ["result"],
            registry=r,
        )
        self.tls_certificate_expiry = Gauge(
            f"{p}_tls_certificate_expiry_timestamp_seconds",
            "When the certificate in service on the listener (tls) expires, in Unix time.",
            registry=r,
        )


class PlainCounter(Collector):
    """A labelled counter whose children are plain numbers, exported at scrape
    time exactly as prometheus_client's ``Counter`` would (``_total`` and
    ``_created``).

    For the per-request counters: ``Counter.inc`` takes a lock and checks its
    argument on every call (about a microsecond here); the event loop is the
    only writer, so a float addition is enough.
    """

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self._children: dict[tuple[str, ...], PlainCount] = {}
        registry.register(self)

    def labels(self, *values: str) -> PlainCount:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = PlainCount()
        return child

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(list(values), child.value, created=child.created)
        yield family


class PlainHistogram(Collector):
    """A labelled histogram whose children are plain counts per bucket, exported
    at scrape time as prometheus_client's ``Histogram`` would (``_created``
    only where ``created``: the queue waits never had it).

    ``Histogram.observe`` costs about a microsecond (a lock and a float per
    bucket); a child here costs a bisect and two additions.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: tuple[float, ...],
        registry: CollectorRegistry,
        created: bool = True,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self.buckets = buckets
        self._created = created
        self._children: dict[tuple[str, ...], PlainBuckets] = {}
        registry.register(self)

    def labels(self, *values: str) -> PlainBuckets:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = PlainBuckets(self.buckets)
        return child

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        bounds = [*map(floatToGoString, self.buckets), "+Inf"]
        for values, child in list(self._children.items()):
            cumulative = accumulate(child.counts)
            family.add_metric(list(values), list(zip(bounds, cumulative, strict=True)), child.total)
            if self._created:
                labels = dict(zip(self.labelnames, values, strict=True))
                family.add_sample(f"{self.name}_created", labels, child.created)
        yield family
