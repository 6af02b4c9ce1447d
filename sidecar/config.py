"""The configuration, declared once.

Each section of sidecar.yaml is a frozen dataclass below; each key a field
declared with ``setting(kind, default=...)`` (``sidecar.config_kinds``). The
loader (``sidecar.config_loader``) parses, validates, fills defaults, refuses
unknown keys and reads ``SIDECAR_*`` overrides from these declarations alone,
so adding a key is adding a field. A section's ``finish`` holds what one key
cannot say alone: rules between keys and values from the environment
(GOPRIVATE, GOSUMDB, credentials). Durations are float seconds, sizes int bytes.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import field, replace

from sidecar.config_kinds import (
    ENV_NAME,
    NAME,
    RULE_PATH,
    Boolean,
    Check,
    Choice,
    Duration,
    Fraction,
    HttpUrl,
    Integer,
    Items,
    Listen,
    Rate,
    Section,
    Size,
    Strings,
    Text,
    glob_problem,
    section,
    setting,
    suggest_name,
)
from sidecar.errors import SumdbKeyError
from sidecar.units import format_duration

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
DEFAULT_STATS_SLICE_S = 5.0
MAX_STATS_SLICES = 1000
DEFAULT_SHUTDOWN_GRACE_S = 10.0
DEFAULT_SEND_TIMEOUT_S = 60.0  # nginx's send_timeout
# sum.golang.org's published key (cmd/go/internal/modfetch/key.go): the database the
# go command trusts when GOSUMDB is unset.
DEFAULT_VERIFY_KEY = "sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8"
CACHE_DIR_NAME = "goproxy-sidecar"

_POSITIVE = Duration(positive=True)


class PolicyEngineKind(enum.Enum):
    EMBEDDED = "embedded"
    OPA = "opa"


class PolicyMode(enum.Enum):
    ENFORCE = "enforce"
    SHADOW = "shadow"


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
    max_wait: float = setting(_POSITIVE, default=DEFAULT_POOL_MAX_WAIT_S)


@section
class TimeoutsConfig:
    connect: float = setting(_POSITIVE, default=DEFAULT_CONNECT_TIMEOUT_S)
    first_byte: float = setting(_POSITIVE, default=DEFAULT_FIRST_BYTE_TIMEOUT_S)
    idle: float = setting(_POSITIVE, default=DEFAULT_IDLE_TIMEOUT_S)


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
    floor: float = setting(_POSITIVE, default=DEFAULT_HEDGE_FLOOR_S)
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


@section
class CacheConfig:
    # Relative to the working directory: a config file often sits in a read-only ConfigMap.
    dir: str = setting(Text(), absent="")
    max_bytes: int = setting(Size(), default=DEFAULT_CACHE_MAX_BYTES)
    mutable_ttl: float = setting(Duration(positive=False), default=DEFAULT_MUTABLE_TTL_S)
    enabled: bool = setting(Boolean(), default=True)
    # bytes/s the background scrub may read; 0: off
    scrub_rate: int = setting(Rate(), default=DEFAULT_CACHE_SCRUB_RATE)

    def finish(self, check: Check) -> CacheConfig:
        directory = self.dir or default_cache_dir(check.env)
        return replace(self, dir=os.path.abspath(os.path.expanduser(directory)))


def default_cache_dir(env: Mapping[str, str]) -> str:
    """``$XDG_CACHE_HOME/goproxy-sidecar``, else ``~/.cache/goproxy-sidecar``."""
    xdg = env.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec says to ignore a relative value
        return os.path.join(xdg, CACHE_DIR_NAME)
    home = env.get("HOME") or os.path.expanduser("~")
    return os.path.join(home, ".cache", CACHE_DIR_NAME)


@section
class PolicyConfig:
    engine: PolicyEngineKind = setting(Choice(PolicyEngineKind), default=PolicyEngineKind.EMBEDDED)
    # empty: the policies shipped inside the package
    paths: tuple[str, ...] = setting(Strings(paths=True), default=())
    decision: str = setting(RULE_PATH, default=DEFAULT_POLICY_DECISION)
    opa_url: str = setting(HttpUrl(), default=DEFAULT_OPA_URL)
    interval: float = setting(_POSITIVE, default=DEFAULT_POLICY_INTERVAL_S)
    mode: PolicyMode = setting(Choice(PolicyMode), default=PolicyMode.ENFORCE)
    reject_status: int = setting(Integer(400, 599), default=DEFAULT_REJECT_STATUS)

    def finish(self, check: Check) -> PolicyConfig:
        # Relative to the config file's directory: policies ship beside their config.
        base = check.base_dir
        paths = (os.path.normpath(os.path.join(base, os.path.expanduser(p))) for p in self.paths)
        return replace(self, paths=tuple(paths))


@section
class StatsConfig:
    window: float = setting(_POSITIVE, default=DEFAULT_STATS_WINDOW_S)
    slice: float = setting(_POSITIVE, default=DEFAULT_STATS_SLICE_S)

    def finish(self, check: Check) -> StatsConfig:
        if check.refused:  # an unreadable value: no follow-up complaint about the pair
            return self
        slices = self.window / self.slice
        width, window = format_duration(self.slice), format_duration(self.window)
        if abs(slices - round(slices)) > 1e-6 * max(1.0, slices):
            check.fail(f"must be a whole multiple of stats.slice ({width}), got {window}", "window")
        elif round(slices) > MAX_STATS_SLICES:
            longest = format_duration(self.slice * MAX_STATS_SLICES)
            check.fail(
                f"at most {MAX_STATS_SLICES} slices of {width} ({longest}), got {window}", "window"
            )
        return self


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


@section
class VerifyConfig:
    """Checking .mod and .zip bodies against the checksum database (issue 15).

    ``key`` and ``url`` come from ``verify.key`` / ``verify.url``, else from
    ``GOSUMDB`` in the environment; ``skip`` holds ``verify.skip`` and
    ``GONOSUMDB`` (modules matched by ``routing.private``, GOPRIVATE included,
    are skipped too)."""

    mode: VerifyMode = setting(
        Choice(VerifyMode, false=VerifyMode.OFF), default=DEFAULT_VERIFY_MODE
    )
    key: str = setting(Text(), default=DEFAULT_VERIFY_KEY)  # a verifier key <name>+<hash>+<key>
    url: str | None = setting(HttpUrl(), default=None)  # None: through the upstreams' sumdb/<name>/
    skip: tuple[str, ...] = setting(Strings(glob=True), default=())
    unavailable: WhenUnavailable = setting(
        Choice(WhenUnavailable), default=DEFAULT_WHEN_UNAVAILABLE
    )

    @property
    def name(self) -> str:
        return self.key.split("+", 1)[0]

    def finish(self, check: Check) -> VerifyConfig:
        """verify.key, else GOSUMDB as the go command reads it (``off`` turns checking off)."""
        # Imported here: the checksum database's parser pulls in cryptography, which
        # only loading a config needs, not every module that imports these types.
        from sidecar.sumdb.gosumdb import parse_gosumdb

        given = "key" in check.present and "key" not in check.refused
        where, value = (
            (check.key("key"), self.key) if given else ("GOSUMDB", check.env.get("GOSUMDB", ""))
        )
        mode = self.mode
        try:
            database = parse_gosumdb(value)
        except SumdbKeyError as exc:
            check.fail_at(where, str(exc))
            database = parse_gosumdb("")
        if database is None:
            if given:
                check.fail("'off' is a mode: set verify.mode: off", "key")
            mode, database = VerifyMode.OFF, parse_gosumdb("")
        assert database is not None
        from_env = _env_globs(check, "GONOSUMDB")
        return replace(
            self,
            mode=mode,
            key=database.verifier.text,
            url=self.url or database.url,
            skip=tuple(dict.fromkeys((*self.skip, *from_env))),
        )


@section
class RouteRule:
    match: str = setting(Text(glob=True))
    upstreams: tuple[str, ...] | None = setting(  # None: every upstream
        Strings(empty="expected at least one upstream (omit the key to allow every upstream)"),
        default=None,
    )
    deny: bool = setting(Boolean(), default=False)
    cache: bool = setting(Boolean(), default=True)

    def finish(self, check: Check) -> RouteRule:
        if self.deny and "upstreams" in check.present:
            check.fail("a rule with deny: true takes no upstreams")
        return self


@section
class RoutingConfig:
    private: tuple[str, ...] = setting(Strings(glob=True), default=())
    rules: tuple[RouteRule, ...] = setting(Items(RouteRule), default=())

    def finish(self, check: Check) -> RoutingConfig:
        from_env = [*_env_globs(check, "GOPRIVATE"), *_env_globs(check, "GONOPROXY")]
        return replace(self, private=tuple(dict.fromkeys((*self.private, *from_env))))


def _env_globs(check: Check, var: str) -> list[str]:
    """The patterns of a GOPRIVATE-style variable, each bad one named ``VAR[i]``."""
    # Indexed like the go command splits it, empty entries included, so
    # GOPRIVATE[2] is the third comma-separated item as the user wrote it.
    globs = [item.strip() for item in check.env.get(var, "").split(",")]
    for i, glob in enumerate(globs):
        problem = glob_problem(glob) if glob else None
        if problem:
            check.fail_at(f"{var}[{i}]", problem)
    return [glob for glob in globs if glob]


# ---------------------------------------------------------------- client_auth
# The front door on the GOPROXY port (sidecar/auth/). Named client_auth:
# upstreams[].auth is the upstream's own credentials, a different thing.

DEFAULT_AUTH_REALM = "goproxy-sidecar"
# A brute-force guess costs one bcrypt (tens of ms); 10 in a minute is more
# than any person mistyping and far fewer than a guessing loop needs.
DEFAULT_AUTH_MAX_FAILURES = 10
DEFAULT_AUTH_FAILURE_WINDOW_S = 60.0
# Addresses tracked at once; past it the oldest is forgotten. 10,000 entries
# are about 2 MB whatever the number of addresses trying.
DEFAULT_AUTH_THROTTLE_TABLE = 10_000
# A verified credential skips bcrypt for this long: a build's hundreds of
# requests cost one verification, and a removed user loses access within it
# (a reload of the files clears the cache at once).
DEFAULT_CREDENTIAL_TTL_S = 60.0
DEFAULT_CREDENTIAL_CACHE = 4096
DEFAULT_CREDENTIAL_RELOAD_S = 2.0
# Identities from trusted networks belong to this group (``@networks``).
NETWORKS_GROUP = "networks"
ANYONE = "*"
_PATH = Text("a file path")
_IDENTITY = re.compile(r"[^\s:@*][^\s:]*")  # a user, token or group name


class EndpointAccess(enum.Enum):
    OPEN = "open"
    AUTHENTICATED = "authenticated"
    ADMIN = "admin"  # only the separate admin credential


OPEN = EndpointAccess.OPEN
AUTHENTICATED = EndpointAccess.AUTHENTICATED
_RULE = Choice(EndpointAccess)


@section
class EndpointRules:
    """Who may read each of the sidecar's own endpoints. Probes stay open so a
    kubelet needs no credential; the rest show upstreams, routing and load."""

    metrics: EndpointAccess = setting(_RULE, default=AUTHENTICATED)
    healthz: EndpointAccess = setting(_RULE, default=OPEN)
    readyz: EndpointAccess = setting(_RULE, default=OPEN)
    status: EndpointAccess = setting(_RULE, default=AUTHENTICATED)
    breakers: EndpointAccess = setting(_RULE, default=AUTHENTICATED)
    routes: EndpointAccess = setting(_RULE, default=AUTHENTICATED)

    def for_path(self, path: str) -> EndpointAccess:
        """The rule of ``/name``; an endpoint not listed needs authentication."""
        rule = getattr(self, path.lstrip("/"), AUTHENTICATED)
        return rule if isinstance(rule, EndpointAccess) else AUTHENTICATED


@section
class CredentialFiles:
    """Where credentials come from. ``htpasswd``: bcrypt entries only.
    ``tokens_file`` / ``tokens_env`` (a variable's name): lines of
    ``NAME sha256:HEX``, the token's SHA-256, never the token itself."""

    htpasswd: str | None = setting(_PATH, default=None)
    tokens_file: str | None = setting(_PATH, default=None)
    tokens_env: str | None = setting(ENV_NAME, default=None)

    def finish(self, check: Check) -> CredentialFiles:
        if self.tokens_env and self.tokens_env not in check.env:  # its name, never its value
            check.fail(f"environment variable {self.tokens_env} is not set", "tokens_env")
        return replace(
            self,
            htpasswd=_beside(check, self.htpasswd),
            tokens_file=_beside(check, self.tokens_file),
        )

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(p for p in (self.htpasswd, self.tokens_file) if p)

    @property
    def empty(self) -> bool:
        return not (self.htpasswd or self.tokens_file or self.tokens_env)


@section
class GroupConfig:
    name: str = setting(Text("a group name without blanks, ':', '@' or '*'", _IDENTITY.pattern))
    members: tuple[str, ...] = setting(Strings())

    def finish(self, check: Check) -> GroupConfig:
        if self.name == NETWORKS_GROUP:
            check.fail("is built in (clients of trusted_networks): choose another name", "name")
        _names(check, "members", self.members)
        return self


@section
class AccessRule:
    """Modules matching ``modules`` (routing globs) may be fetched only by
    identities in ``allow``: a name, ``@group``, or ``*`` (any identity)."""

    modules: tuple[str, ...] = setting(
        Strings(glob=True, empty="expected at least one module pattern")
    )
    allow: tuple[str, ...] = setting(Strings(empty="expected at least one name, @group or *"))

    def finish(self, check: Check) -> AccessRule:
        for i, entry in enumerate(self.allow):
            if entry != ANYONE and not _IDENTITY.fullmatch(entry.removeprefix("@")):
                check.fail(f"expected a name, @group or *, got {entry!r}", f"allow[{i}]")
        return self


@section
class ThrottleConfig:
    max_failures: int = setting(Integer(1), default=DEFAULT_AUTH_MAX_FAILURES)
    window: float = setting(_POSITIVE, default=DEFAULT_AUTH_FAILURE_WINDOW_S)
    table_size: int = setting(Integer(1), default=DEFAULT_AUTH_THROTTLE_TABLE)


@section
class CredentialCacheConfig:
    ttl: float = setting(_POSITIVE, default=DEFAULT_CREDENTIAL_TTL_S)
    size: int = setting(Integer(1), default=DEFAULT_CREDENTIAL_CACHE)


@section
class ClientAuthConfig:
    """Client authentication on the GOPROXY port; off by default."""

    enabled: bool = setting(Boolean(), default=False)
    realm: str = setting(Text("a realm without quotes", r'[^"\\]+'), default=DEFAULT_AUTH_REALM)
    htpasswd: str | None = setting(_PATH, default=None)
    tokens_file: str | None = setting(_PATH, default=None)
    tokens_env: str | None = setting(ENV_NAME, default=None)
    admin: CredentialFiles = setting(Section(CredentialFiles), default=CredentialFiles())
    trusted_networks: tuple[str, ...] = setting(Strings(), default=())
    # Proxies in front (a TLS terminator, an ingress): a request from one of
    # these is the client named last in its X-Forwarded-For, for the throttle
    # and trusted_networks. From any other address the header is ignored.
    forwarded_by: tuple[str, ...] = setting(Strings(), default=())
    groups: tuple[GroupConfig, ...] = setting(Items(GroupConfig, unique="name"), default=())
    access: tuple[AccessRule, ...] = setting(Items(AccessRule), default=())
    endpoints: EndpointRules = setting(Section(EndpointRules), default=EndpointRules())
    throttle: ThrottleConfig = setting(Section(ThrottleConfig), default=ThrottleConfig())
    credential_cache: CredentialCacheConfig = setting(
        Section(CredentialCacheConfig), default=CredentialCacheConfig()
    )
    reload_interval: float = setting(_POSITIVE, default=DEFAULT_CREDENTIAL_RELOAD_S)

    def finish(self, check: Check) -> ClientAuthConfig:
        if self.tokens_env and self.tokens_env not in check.env:
            check.fail(f"environment variable {self.tokens_env} is not set", "tokens_env")
        for key in ("trusted_networks", "forwarded_by"):
            for i, cidr in enumerate(getattr(self, key)):
                try:
                    ipaddress.ip_network(cidr, strict=True)
                except ValueError as exc:
                    check.fail(f"not a network in CIDR form: {cidr!r} ({exc})", f"{key}[{i}]")
        known = {g.name for g in self.groups} | {NETWORKS_GROUP}
        # A refused groups list leaves nothing to check the rules' @groups against.
        for i, rule in enumerate(self.access if "groups" not in check.refused else ()):
            for group in (a[1:] for a in rule.allow if a.startswith("@")):
                if group not in known:
                    check.fail(
                        f"no such group: @{group} (see client_auth.groups)", f"access[{i}].allow"
                    )
        if self.enabled and self.clients.empty and self.admin.empty and not self.trusted_networks:
            check.fail("enabled with no htpasswd, tokens or trusted_networks: nobody could get in")
        return replace(
            self,
            htpasswd=_beside(check, self.htpasswd),
            tokens_file=_beside(check, self.tokens_file),
        )

    @property
    def clients(self) -> CredentialFiles:
        return CredentialFiles(self.htpasswd, self.tokens_file, self.tokens_env)


def _names(check: Check, key: str, names: Iterable[str]) -> None:
    for i, name in enumerate(names):
        if not _IDENTITY.fullmatch(name):
            check.fail(f"not a name (no blanks, ':', '@' or '*'): {name!r}", f"{key}[{i}]")


def _beside(check: Check, path: str | None) -> str | None:
    """A credential file is relative to the config file's directory: it usually
    lives beside it, in the same Secret (no config file: the working directory)."""
    if not path:
        return path
    return os.path.normpath(os.path.join(check.base_dir, os.path.expanduser(path)))


# ---------------------------------------------------------------- tls
# HTTPS on the GOPROXY port (sidecar/server/tls.py): the go command sends
# .netrc/GOAUTH credentials over HTTPS only.


class TlsVersion(enum.Enum):
    # nginx's ssl_protocols names: an unquoted YAML 1.2 would be a float
    TLS1_2 = "TLSv1.2"
    TLS1_3 = "TLSv1.3"


@section
class TlsConfig:
    """The listener's certificate chain and key (PEM); off while unset."""

    certificate: str | None = setting(_PATH, default=None)
    key: str | None = setting(_PATH, default=None)
    min_version: TlsVersion = setting(Choice(TlsVersion), default=TlsVersion.TLS1_2)

    def finish(self, check: Check) -> TlsConfig:
        for name, other in (("certificate", "key"), ("key", "certificate")):
            if getattr(self, other) and not getattr(self, name):
                check.fail(f"required with tls.{other}", name)
        done = replace(
            self, certificate=_beside(check, self.certificate), key=_beside(check, self.key)
        )
        if done.enabled and not check.refused:
            # Refused at load, like a bad credential file: not at the first handshake.
            from sidecar.errors import TlsError
            from sidecar.server.tls import load_context

            try:
                load_context(done)
            except TlsError as exc:
                check.fail(exc.message, exc.key)
        return done

    @property
    def enabled(self) -> bool:
        return bool(self.certificate and self.key)


@section
class Config:
    listen: str = setting(Listen(), absent=DEFAULT_LISTEN)
    upstreams: tuple[UpstreamConfig, ...] = setting(
        Items(
            UpstreamConfig,
            required="required: at least one upstream",
            empty="expected at least one upstream, got an empty list",
            unique="name",
        )
    )
    cache: CacheConfig = setting(Section(CacheConfig))
    policy: PolicyConfig = setting(Section(PolicyConfig), default=PolicyConfig())
    stats: StatsConfig = setting(Section(StatsConfig), default=StatsConfig())
    routing: RoutingConfig = setting(Section(RoutingConfig), default=RoutingConfig())
    verify: VerifyConfig = setting(Section(VerifyConfig), default=VerifyConfig())
    shutdown_grace: float = setting(Duration(positive=False), default=DEFAULT_SHUTDOWN_GRACE_S)
    # a client taking no bytes for this long is dropped
    send_timeout: float = setting(_POSITIVE, default=DEFAULT_SEND_TIMEOUT_S)
    client_auth: ClientAuthConfig = setting(Section(ClientAuthConfig), default=ClientAuthConfig())
    tls: TlsConfig = setting(Section(TlsConfig), default=TlsConfig())

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])

    def finish(self, check: Check) -> Config:
        names = [upstream.name for upstream in self.upstreams]
        for i, rule in enumerate(self.routing.rules):
            for j, name in enumerate(rule.upstreams or ()):
                if name not in names:
                    check.fail(
                        f"unknown upstream {name!r}{suggest_name(name, names)}",
                        f"routing.rules[{i}].upstreams[{j}]",
                    )
        return self


def load_config(path: str | None, env: Mapping[str, str] | None = None) -> Config:
    """Parse and validate sidecar.yaml (None: the embedded default); ConfigErrors names
    every bad key. The loader lives in ``sidecar.config_loader``."""
    from sidecar.config_loader import load_config as load

    return load(path, env)


def default_config(env: Mapping[str, str] | None = None) -> Config:
    """The embedded default (DESIGN.md), with SIDECAR_* overrides applied."""
    from sidecar.config_loader import default_config as default

    return default(env)
