"""The benchmark cases: what each asks for, through which contenders, for how long.

Contenders:
  direct           wrk straight at the upstream nginx (the ceiling)
  nginx            nginx reverse proxy, upstream keepalive, 64 KiB buffers, no cache
  nginx-cache      the same with proxy_cache (the reference for cache hits)
  sidecar          goproxy-sidecar, cache enabled
  sidecar-nocache  goproxy-sidecar with ``cache: {enabled: false}``: a pure proxy,
                   the fair match for plain nginx on uncached zips

"Ratio to nginx" compares with ``ref_nginx``: plain nginx for uncached cases,
nginx-cache for cache hits.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.tree import ZIP1M, ZIP50M, info_body, static_info_path

WRK, RATE, PARALLEL = "wrk", "rate", "parallel"
CONTENDERS = ("direct", "nginx", "nginx-cache", "sidecar", "sidecar-nocache")


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    kind: str  # WRK | RATE | PARALLEL
    contenders: tuple[str, ...]
    size: int  # expected body bytes of one answer
    what: str
    path: str = ""  # fixed request path; "" for unique .info paths
    connections: int = 64
    hit: bool = False  # warm the cache first and check the answers are hits
    ref_nginx: str = "nginx"
    count: int = 0  # PARALLEL: concurrent downloads
    rate: float = 0.0  # RATE: requests per second
    fresh_per_rep: bool = False  # restart servers each repetition (clean VmHWM, cold cache)
    rtt_ms: float = 0.0  # added upstream round-trip time (toxiproxy latency toxic)
    urls: int = 0  # WRK: cycle over this many static .info paths instead of ``path``
    timeout_s: float = 10.0  # wrk's per-request timeout
    # Bytes, not requests, for many large bodies: a run ends with downloads
    # half done, and wrk counts their bytes but not them.
    ratio_key: str = "rps"
    min_duration_s: float = 0.0  # at least this long, whatever --duration says

    @property
    def unique(self) -> bool:
        return not self.path


INFO_SIZE = len(info_body())
SMALL_HIT_URLS = 1000


def _zip50m(hit: bool, connections: int) -> Case:
    suffix = "" if connections == 4 else f"-c{connections}"
    if hit:
        return Case(
            f"zip50m-hit{suffix}",
            WRK,
            ("direct", "nginx-cache", "sidecar"),
            ZIP50M.size,
            f"50 MiB zip served from the proxy's cache, {connections} connections",
            path=ZIP50M.path(),
            connections=connections,
            hit=True,
            ref_nginx="nginx-cache",
            timeout_s=120.0,
            ratio_key="mbps",
            min_duration_s=10.0 if connections > 4 else 0.0,
        )
    return Case(
        f"zip50m-uncached{suffix}",
        WRK,
        ("direct", "nginx", "sidecar-nocache"),
        ZIP50M.size,
        f"50 MiB zip relayed from the upstream (no cache), {connections} connections",
        path=ZIP50M.path(),
        connections=connections,
        timeout_s=120.0,
        ratio_key="mbps",
        min_duration_s=10.0 if connections > 4 else 0.0,
    )


def _rss(count: int, hit: bool) -> Case:
    what = (
        "served from the proxy's cache (warmed by the probe)"
        if hit
        else "a version never asked before (a cold cache: one fill, every client its reader)"
    )
    return Case(
        f"rss-{count}x50m-{'hit' if hit else 'miss'}",
        PARALLEL,
        ("nginx-cache", "sidecar"),
        ZIP50M.size,
        f"{count} concurrent downloads of one 50 MiB zip, {what}; peak RSS of the proxy",
        path=ZIP50M.path(),
        count=count,
        hit=hit,
        ref_nginx="nginx-cache",
        fresh_per_rep=True,
    )


CASES: tuple[Case, ...] = (
    Case(
        "small-uncached",
        WRK,
        ("direct", "nginx", "nginx-cache", "sidecar", "sidecar-nocache"),
        INFO_SIZE,
        "unique .info URL per request, 64 connections: misses for the caching proxies "
        "(each one filled and kept), a plain relay for nginx and sidecar-nocache",
    ),
    *(
        Case(
            f"miss-rtt{rtt}",
            WRK,
            ("nginx-cache", "sidecar"),
            INFO_SIZE,
            f"unique .info URL per request, cache on (each one a miss, filled and kept); "
            f"upstream {rtt} ms away (toxiproxy), 64 connections",
            ref_nginx="nginx-cache",
            rtt_ms=float(rtt),
        )
        for rtt in (2, 20)
    ),
    Case(
        "small-hit",
        WRK,
        ("direct", "nginx-cache", "sidecar"),
        INFO_SIZE,
        f"{SMALL_HIT_URLS:,} static .info URLs cycled, 64 connections, served from the "
        "proxy's cache (the warm-up run fills it)",
        path=static_info_path(0),
        urls=SMALL_HIT_URLS,
        hit=True,
        ref_nginx="nginx-cache",
    ),
    Case(
        "zip1m-uncached",
        WRK,
        ("direct", "nginx", "sidecar-nocache"),
        ZIP1M.size,
        "1 MiB zip relayed from the upstream (no cache), 64 connections",
        path=ZIP1M.path(),
    ),
    Case(
        "zip1m-hit",
        WRK,
        ("direct", "nginx-cache", "sidecar"),
        ZIP1M.size,
        "1 MiB zip served from the proxy's cache, 64 connections",
        path=ZIP1M.path(),
        hit=True,
        ref_nginx="nginx-cache",
    ),
    _zip50m(hit=False, connections=4),
    _zip50m(hit=False, connections=100),
    _zip50m(hit=True, connections=4),
    _zip50m(hit=True, connections=100),
    _rss(100, hit=True),
    _rss(200, hit=True),
    _rss(100, hit=False),
    _rss(200, hit=False),
    Case(
        "added-latency",
        RATE,
        ("direct", "nginx", "sidecar"),
        INFO_SIZE,
        "fixed 1000 req/s of unique .info URLs (open loop, latency from the due "
        "time); p50/p99 minus direct's",
        rate=1000.0,
    ),
)
CASE_NAMES = (*(c.name for c in CASES), "micro")


@dataclass(frozen=True, slots=True)
class Timing:
    reps: int
    duration_s: float  # one measured wrk run (whole seconds: wrk's unit)
    warmup_s: float  # per contender before its first run, whole seconds
    rate_duration_s: float  # the fixed-rate client


FULL = Timing(reps=3, duration_s=10.0, warmup_s=2.0, rate_duration_s=10.0)
QUICK = Timing(reps=1, duration_s=2.0, warmup_s=1.0, rate_duration_s=3.0)
