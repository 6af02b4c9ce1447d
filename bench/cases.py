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

    @property
    def unique(self) -> bool:
        return not self.path


INFO_SIZE = len(info_body())

CASES: tuple[Case, ...] = (
    Case(
        "small-uncached",
        WRK,
        ("direct", "nginx", "nginx-cache", "sidecar", "sidecar-nocache"),
        INFO_SIZE,
        "unique .info URL per request (never cached), 64 connections",
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
        "one .info URL of a canonical version, served from the proxy's cache",
        path=static_info_path(0),
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
    Case(
        "zip50m-uncached",
        WRK,
        ("direct", "nginx", "sidecar-nocache"),
        ZIP50M.size,
        "50 MiB zip relayed from the upstream (no cache), 4 connections",
        path=ZIP50M.path(),
        connections=4,
    ),
    Case(
        "zip50m-hit",
        WRK,
        ("direct", "nginx-cache", "sidecar"),
        ZIP50M.size,
        "50 MiB zip served from the proxy's cache, 4 connections",
        path=ZIP50M.path(),
        connections=4,
        hit=True,
        ref_nginx="nginx-cache",
    ),
    Case(
        "rss-200x50m",
        PARALLEL,
        ("sidecar-nocache", "sidecar"),
        ZIP50M.size,
        "200 concurrent downloads of one 50 MiB zip; peak RSS of the proxy "
        "(sidecar: a version never asked before, so a cold cache)",
        path=ZIP50M.path(),
        count=200,
        fresh_per_rep=True,
    ),
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
