"""``upstreams[]``: where modules are fetched from, and how (pool, timeouts,
credentials, hedging).
"""

from __future__ import annotations

from dataclasses import field, replace

from sidecar.config.common import POSITIVE
from sidecar.config_kinds import (
    ENV_NAME,
    NAME,
    Boolean,
    Check,
    Duration,
    Fraction,
    HttpUrl,
    Integer,
    Section,
    section,
    setting,
)
from sidecar.units import format_duration

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


@section
class BasicAuth:
    """Credentials are read from the environment at load time; never logged."""

    username_env: str = setting(ENV_NAME)
    password_env: str = setting(ENV_NAME)
    username: str = field(repr=False, default="")  # from the environment, by finish
    password: str = field(repr=False, default="")

    def finish(self, check: Check) -> BasicAuth:
        for name, var in (("username_env", self.username_env), ("password_env", self.password_env)):
            if var and var not in check.env:  # the variable's name, never its value
                check.fail(f"environment variable {var} is not set", name)
        env = check.env
        return replace(
            self, username=env.get(self.username_env, ""), password=env.get(self.password_env, "")
        )


@section
class AuthConfig:
    netrc: bool = setting(Boolean(), default=False)
    basic: BasicAuth | None = setting(Section(BasicAuth), default=None)

    def finish(self, check: Check) -> AuthConfig:
        if self.netrc and self.basic is not None:
            check.fail("use either netrc: true or basic, not both")
        return self


@section
class PoolConfig:
    """Admission per upstream (``sidecar.upstreams.admission``): at most
    ``max_connections`` requests in flight, ``max_pending`` more queued, each
    for at most ``max_wait`` seconds; past that a request overflows."""

    max_connections: int = setting(Integer(1), default=DEFAULT_POOL_MAX_CONNECTIONS)
    max_pending: int = setting(Integer(0), default=DEFAULT_POOL_MAX_PENDING)
    max_wait: float = setting(POSITIVE, default=DEFAULT_POOL_MAX_WAIT_S)


@section
class TimeoutsConfig:
    connect: float = setting(POSITIVE, default=DEFAULT_CONNECT_TIMEOUT_S)
    first_byte: float = setting(POSITIVE, default=DEFAULT_FIRST_BYTE_TIMEOUT_S)
    idle: float = setting(POSITIVE, default=DEFAULT_IDLE_TIMEOUT_S)


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


@section
class HedgeConfig:
    """Hedging away from one upstream: after ``delay`` (None: ``auto``, the
    upstream's own TTFB p95, at least ``floor``), within a token bucket that
    gains ``budget`` per request, holds at most ``burst``."""

    enabled: bool = setting(Boolean(), default=True)
    delay: float | None = setting(Duration(positive=True, auto=True), default=None)
    floor: float = setting(POSITIVE, default=DEFAULT_HEDGE_FLOOR_S)
    budget: float = setting(Fraction(), default=DEFAULT_HEDGE_BUDGET)
    burst: int = setting(Integer(1), default=DEFAULT_HEDGE_BURST)


@section
class UpstreamConfig:
    name: str = setting(NAME)
    url: str = setting(HttpUrl())  # normalised: no trailing slash
    pool: PoolConfig = setting(Section(PoolConfig), default=PoolConfig())
    timeouts: TimeoutsConfig = setting(Section(TimeoutsConfig), default=TimeoutsConfig())
    auth: AuthConfig = setting(Section(AuthConfig), default=AuthConfig())
    private_ok: bool = setting(Boolean(), default=False)
    hedge: HedgeConfig = setting(Section(HedgeConfig), default=HedgeConfig())

    def finish(self, check: Check) -> UpstreamConfig:
        first_byte = self.timeouts.first_byte
        for key, value in (("delay", self.hedge.delay), ("floor", self.hedge.floor)):
            if value is not None and value >= first_byte:
                check.fail(
                    f"must be shorter than timeouts.first_byte ({format_duration(first_byte)}), "
                    f"got {format_duration(value)}",
                    f"hedge.{key}",
                )
        return self
