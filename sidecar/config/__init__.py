"""The configuration, declared once.

Each section of sidecar.yaml is a frozen dataclass in this package (one module
a topic, every name re-exported here; the top-level ``Config`` below); each key
a field declared with ``setting(kind, default=...)`` (``sidecar.config_kinds``).
The loader (``sidecar.config_loader``) parses, validates, fills defaults, refuses
unknown keys and reads ``SIDECAR_*`` overrides from these declarations alone,
so adding a key is adding a field. A section's ``finish`` holds what one key
cannot say alone: rules between keys and values from the environment
(GOPRIVATE, GOSUMDB, credentials). Durations are float seconds, sizes int bytes.
"""

from __future__ import annotations

from collections.abc import Mapping

from sidecar.config.cache import (
    CACHE_DIR_NAME,
    DEFAULT_CACHE_MAX_BYTES,
    DEFAULT_CACHE_SCRUB_RATE,
    DEFAULT_MUTABLE_TTL_S,
    CacheConfig,
    default_cache_dir,
)
from sidecar.config.client_auth import (
    ANYONE,
    AUTHENTICATED,
    DEFAULT_AUTH_FAILURE_WINDOW_S,
    DEFAULT_AUTH_MAX_FAILURES,
    DEFAULT_AUTH_REALM,
    DEFAULT_AUTH_THROTTLE_TABLE,
    DEFAULT_CREDENTIAL_CACHE,
    DEFAULT_CREDENTIAL_RELOAD_S,
    DEFAULT_CREDENTIAL_TTL_S,
    NETWORKS_GROUP,
    OPEN,
    AccessRule,
    ClientAuthConfig,
    CredentialCacheConfig,
    CredentialFiles,
    EndpointAccess,
    EndpointRules,
    GroupConfig,
    ThrottleConfig,
)
from sidecar.config.common import POSITIVE
from sidecar.config.policy import (
    DEFAULT_OPA_URL,
    DEFAULT_POLICY_DECISION,
    DEFAULT_POLICY_INTERVAL_S,
    DEFAULT_REJECT_STATUS,
    DEFAULT_STATS_SLICE_S,
    DEFAULT_STATS_WINDOW_S,
    MAX_STATS_SLICES,
    PolicyConfig,
    PolicyEngineKind,
    PolicyMode,
    StatsConfig,
)
from sidecar.config.routing import (
    RouteRule,
    RoutingConfig,
)
from sidecar.config.tls import (
    TlsConfig,
    TlsVersion,
)
from sidecar.config.upstreams import (
    DEFAULT_BACKUP_URL,
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_FIRST_BYTE_TIMEOUT_S,
    DEFAULT_HEDGE_BUDGET,
    DEFAULT_HEDGE_BURST,
    DEFAULT_HEDGE_FLOOR_S,
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_POOL_MAX_CONNECTIONS,
    DEFAULT_POOL_MAX_PENDING,
    DEFAULT_POOL_MAX_WAIT_S,
    DEFAULT_PRIMARY_URL,
    AuthConfig,
    BasicAuth,
    HedgeConfig,
    PoolConfig,
    TimeoutsConfig,
    UpstreamConfig,
)
from sidecar.config.verify import (
    DEFAULT_VERIFY_KEY,
    DEFAULT_VERIFY_MODE,
    DEFAULT_WHEN_UNAVAILABLE,
    VerifyConfig,
    VerifyMode,
    WhenUnavailable,
)
from sidecar.config_kinds import (
    Check,
    Duration,
    Items,
    Listen,
    Section,
    section,
    setting,
    suggest_name,
)

__all__ = [
    "ANYONE",
    "AUTHENTICATED",
    "CACHE_DIR_NAME",
    "DEFAULT_AUTH_FAILURE_WINDOW_S",
    "DEFAULT_AUTH_MAX_FAILURES",
    "DEFAULT_AUTH_REALM",
    "DEFAULT_AUTH_THROTTLE_TABLE",
    "DEFAULT_BACKUP_URL",
    "DEFAULT_CACHE_MAX_BYTES",
    "DEFAULT_CACHE_SCRUB_RATE",
    "DEFAULT_CONNECT_TIMEOUT_S",
    "DEFAULT_CREDENTIAL_CACHE",
    "DEFAULT_CREDENTIAL_RELOAD_S",
    "DEFAULT_CREDENTIAL_TTL_S",
    "DEFAULT_FIRST_BYTE_TIMEOUT_S",
    "DEFAULT_HEDGE_BUDGET",
    "DEFAULT_HEDGE_BURST",
    "DEFAULT_HEDGE_FLOOR_S",
    "DEFAULT_IDLE_TIMEOUT_S",
    "DEFAULT_LISTEN",
    "DEFAULT_MUTABLE_TTL_S",
    "DEFAULT_OPA_URL",
    "DEFAULT_POLICY_DECISION",
    "DEFAULT_POLICY_INTERVAL_S",
    "DEFAULT_POOL_MAX_CONNECTIONS",
    "DEFAULT_POOL_MAX_PENDING",
    "DEFAULT_POOL_MAX_WAIT_S",
    "DEFAULT_PRIMARY_URL",
    "DEFAULT_REJECT_STATUS",
    "DEFAULT_SEND_TIMEOUT_S",
    "DEFAULT_SHUTDOWN_GRACE_S",
    "DEFAULT_STATS_SLICE_S",
    "DEFAULT_STATS_WINDOW_S",
    "DEFAULT_VERIFY_KEY",
    "DEFAULT_VERIFY_MODE",
    "DEFAULT_WHEN_UNAVAILABLE",
    "MAX_STATS_SLICES",
    "NETWORKS_GROUP",
    "OPEN",
    "AccessRule",
    "AuthConfig",
    "BasicAuth",
    "CacheConfig",
    "ClientAuthConfig",
    "Config",
    "CredentialCacheConfig",
    "CredentialFiles",
    "EndpointAccess",
    "EndpointRules",
    "GroupConfig",
    "HedgeConfig",
    "PolicyConfig",
    "PolicyEngineKind",
    "PolicyMode",
    "PoolConfig",
    "RouteRule",
    "RoutingConfig",
    "StatsConfig",
    "ThrottleConfig",
    "TimeoutsConfig",
    "TlsConfig",
    "TlsVersion",
    "UpstreamConfig",
    "VerifyConfig",
    "VerifyMode",
    "WhenUnavailable",
    "default_cache_dir",
    "default_config",
    "load_config",
]

DEFAULT_LISTEN = "127.0.0.1:3001"
DEFAULT_SHUTDOWN_GRACE_S = 10.0
DEFAULT_SEND_TIMEOUT_S = 60.0  # nginx's send_timeout


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
    send_timeout: float = setting(POSITIVE, default=DEFAULT_SEND_TIMEOUT_S)
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
