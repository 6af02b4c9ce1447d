"""Typed, immutable configuration.

The YAML file (see DESIGN.md) is parsed exactly once into these frozen
dataclasses by ``sidecar.config_loader``; plain dicts exist only there.
Durations are float seconds, sizes int bytes.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

DEFAULT_LISTEN = "127.0.0.1:3001"
DEFAULT_PRIMARY_URL = "http://127.0.0.1:3000"
DEFAULT_BACKUP_URL = "https://proxy.golang.org"
DEFAULT_POOL_MAX_CONNECTIONS = 64
# Envoy's max_pending_requests default: enough that a burst of 1,024 clients
# against the smallest sensible pool queues instead of overflowing.
DEFAULT_POOL_MAX_PENDING = 1024
# Well past the queue a healthy burst builds: 1,024 clients on 8 connections to
# a 3 ms upstream wait 0.9 s on average, 1.3 s at p99 on a 2-core machine (the
# README's "Busy is not sick"), and twice that when other work shares the
# cores; a third of the first-byte timeout, so an upstream that cannot keep
# up still overflows to the next target well before a client would give up.
DEFAULT_POOL_MAX_WAIT_S = 5.0
DEFAULT_CONNECT_TIMEOUT_S = 2.0
DEFAULT_FIRST_BYTE_TIMEOUT_S = 15.0
DEFAULT_IDLE_TIMEOUT_S = 30.0
DEFAULT_CACHE_MAX_BYTES = 10 * 1024**3
DEFAULT_MUTABLE_TTL_S = 60.0
DEFAULT_CACHE_SCRUB_RATE = 8 * 1024**2  # bytes/s: ~1 % of a core hashing, a trickle of disk reads
DEFAULT_POLICY_DECISION = "sidecar/breaker/decisions"
DEFAULT_OPA_URL = "http://127.0.0.1:8181"
DEFAULT_POLICY_INTERVAL_S = 1.0
DEFAULT_REJECT_STATUS = 503
DEFAULT_STATS_WINDOW_S = 120.0
DEFAULT_STATS_SLICE_S = 10.0
DEFAULT_SHUTDOWN_GRACE_S = 10.0
DEFAULT_SEND_TIMEOUT_S = 60.0  # nginx's send_timeout
# sum.golang.org's published key (cmd/go/internal/modfetch/key.go): the database the
# go command trusts when GOSUMDB is unset.
DEFAULT_VERIFY_KEY = "sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8"


class PolicyEngineKind(enum.Enum):
    EMBEDDED = "embedded"
    OPA = "opa"


class PolicyMode(enum.Enum):
    ENFORCE = "enforce"
    SHADOW = "shadow"


@dataclass(frozen=True, slots=True)
class BasicAuth:
    """Credentials are read from the environment at load time; never logged."""

    username_env: str
    password_env: str
    username: str = field(repr=False, default="")
    password: str = field(repr=False, default="")


@dataclass(frozen=True, slots=True)
class AuthConfig:
    netrc: bool = False
    basic: BasicAuth | None = None


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """Admission per upstream (``sidecar.upstreams.admission``): at most
    ``max_connections`` requests in flight, ``max_pending`` more queued, each
    for at most ``max_wait`` seconds; past that a request overflows."""

    max_connections: int = DEFAULT_POOL_MAX_CONNECTIONS
    max_pending: int = DEFAULT_POOL_MAX_PENDING
    max_wait: float = DEFAULT_POOL_MAX_WAIT_S


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    connect: float = DEFAULT_CONNECT_TIMEOUT_S
    first_byte: float = DEFAULT_FIRST_BYTE_TIMEOUT_S
    idle: float = DEFAULT_IDLE_TIMEOUT_S


# Hedged requests (sidecar.proxy.hedge). The floor of the automatic delay: a
# cached answer from an Athens beside the sidecar takes 1-20 ms and the public
# proxy's round trip 30-150 ms from most networks, so a request still silent
# after 200 ms is unusual for either, and a hedge sent earlier than the
# backup's own round trip seldom wins anything.
DEFAULT_HEDGE_FLOOR_S = 0.2
# At most this share of requests is hedged, over time. A p95 delay hedges about
# 5 % of a healthy upstream's requests ("The Tail at Scale"); 10 % leaves room
# for that and caps what a slow upstream adds to the next one's load (Envoy's
# retry budget allows 20 % of active requests).
DEFAULT_HEDGE_BUDGET = 0.1
# Tokens a fresh bucket holds: the first requests of a cold build through a
# primary that hangs from the start are hedged before any budget has accrued.
DEFAULT_HEDGE_BURST = 10


@dataclass(frozen=True, slots=True)
class HedgeConfig:
    """Hedging away from one upstream: after ``delay`` (None: ``auto``, the
    upstream's own TTFB p95, at least ``floor``), within a token bucket that
    gains ``budget`` per request, holds at most ``burst``."""

    enabled: bool = True
    delay: float | None = None
    floor: float = DEFAULT_HEDGE_FLOOR_S
    budget: float = DEFAULT_HEDGE_BUDGET
    burst: int = DEFAULT_HEDGE_BURST


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    url: str  # normalised: no trailing slash
    pool: PoolConfig = PoolConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    auth: AuthConfig = AuthConfig()
    private_ok: bool = False
    hedge: HedgeConfig = HedgeConfig()


@dataclass(frozen=True, slots=True)
class CacheConfig:
    dir: str
    max_bytes: int = DEFAULT_CACHE_MAX_BYTES
    mutable_ttl: float = DEFAULT_MUTABLE_TTL_S
    enabled: bool = True
    scrub_rate: int = DEFAULT_CACHE_SCRUB_RATE  # bytes/s the background scrub may read; 0: off


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    engine: PolicyEngineKind = PolicyEngineKind.EMBEDDED
    paths: tuple[str, ...] = ()  # empty: the policies shipped inside the package
    decision: str = DEFAULT_POLICY_DECISION
    opa_url: str = DEFAULT_OPA_URL
    interval: float = DEFAULT_POLICY_INTERVAL_S
    mode: PolicyMode = PolicyMode.ENFORCE
    reject_status: int = DEFAULT_REJECT_STATUS


@dataclass(frozen=True, slots=True)
class StatsConfig:
    window: float = DEFAULT_STATS_WINDOW_S
    slice: float = DEFAULT_STATS_SLICE_S


class VerifyMode(enum.Enum):
    ENFORCE = "enforce"  # a mismatch is never served: the next upstream is tried
    REPORT = "report"  # a mismatch is served as today, and counted and logged
    OFF = "off"


class WhenUnavailable(enum.Enum):
    SERVE = "serve"  # the go command checks again; counted and logged
    REFUSE = "refuse"


# Enforce: a checksum mismatch is a wrong answer the go command would refuse
# anyway (SECURITY ERROR), so serving it only turns one upstream's fault into
# every client's failed build, and caching it makes that last until a purge.
DEFAULT_VERIFY_MODE = VerifyMode.ENFORCE
DEFAULT_WHEN_UNAVAILABLE = WhenUnavailable.SERVE


@dataclass(frozen=True, slots=True)
class VerifyConfig:
    """Checking .mod and .zip bodies against the checksum database (issue 15).

    ``key`` and ``url`` come from ``verify.key`` / ``verify.url``, else from
    ``GOSUMDB`` in the environment; ``skip`` holds ``verify.skip`` and
    ``GONOSUMDB`` (modules matched by ``routing.private``, GOPRIVATE included,
    are skipped too)."""

    mode: VerifyMode = DEFAULT_VERIFY_MODE
    key: str = DEFAULT_VERIFY_KEY  # a verifier key <name>+<hash>+<key>
    url: str | None = None  # None: through the upstreams' sumdb/<name>/ path
    skip: tuple[str, ...] = ()
    unavailable: WhenUnavailable = DEFAULT_WHEN_UNAVAILABLE

    @property
    def name(self) -> str:
        return self.key.split("+", 1)[0]


@dataclass(frozen=True, slots=True)
class RouteRule:
    match: str
    upstreams: tuple[str, ...] | None = None  # None: every upstream
    deny: bool = False
    cache: bool = True


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    private: tuple[str, ...] = ()
    rules: tuple[RouteRule, ...] = ()


@dataclass(frozen=True, slots=True)
class Config:
    listen: str
    upstreams: tuple[UpstreamConfig, ...]
    cache: CacheConfig
    policy: PolicyConfig = PolicyConfig()
    stats: StatsConfig = StatsConfig()
    routing: RoutingConfig = RoutingConfig()
    verify: VerifyConfig = VerifyConfig()
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE_S
    send_timeout: float = DEFAULT_SEND_TIMEOUT_S  # a client taking no bytes is dropped

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])


def load_config(path: str | None, env: Mapping[str, str] | None = None) -> Config:
    """Parse and validate sidecar.yaml (None: the embedded default); ConfigErrors names
    every bad key. The loader lives in ``sidecar.config_loader``."""
    from sidecar.config_loader import load_config as load

    return load(path, env)


def default_config(env: Mapping[str, str] | None = None) -> Config:
    """The embedded default (DESIGN.md), with SIDECAR_* overrides applied."""
    from sidecar.config_loader import default_config as default

    return default(env)
