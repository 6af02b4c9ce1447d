"""Client authentication settings: the ``client_auth:`` section, parsed.

Frozen like every other config type. Named ``client_auth`` because
``upstreams[].auth`` is the upstream's own credentials, a different thing.
Durations are float seconds.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

DEFAULT_REALM = "goproxy-sidecar"
# A brute-force guess costs one bcrypt (tens of ms); 10 in a minute is more
# than any person mistyping and far fewer than a guessing loop needs.
DEFAULT_MAX_FAILURES = 10
DEFAULT_FAILURE_WINDOW_S = 60.0
# Addresses tracked at once; past it the oldest is forgotten. 10,000 entries
# are about 2 MB whatever the number of addresses trying.
DEFAULT_THROTTLE_TABLE = 10_000
# A verified credential skips bcrypt for this long: a build's hundreds of
# requests cost one verification, and a removed user loses access within it
# (a reload of the files clears the cache at once).
DEFAULT_CREDENTIAL_TTL_S = 60.0
DEFAULT_CREDENTIAL_CACHE = 4096
DEFAULT_RELOAD_INTERVAL_S = 2.0
# Identities from trusted networks belong to this group (``@networks``).
NETWORKS_GROUP = "networks"


class EndpointAccess(enum.Enum):
    OPEN = "open"
    AUTHENTICATED = "authenticated"
    ADMIN = "admin"  # only the separate admin credential


OPEN = EndpointAccess.OPEN
AUTHENTICATED = EndpointAccess.AUTHENTICATED


@dataclass(frozen=True, slots=True)
class EndpointRules:
    """Who may read each of the sidecar's own endpoints. Probes stay open so a
    kubelet needs no credential; the rest show upstreams, routing and load."""

    metrics: EndpointAccess = AUTHENTICATED
    healthz: EndpointAccess = OPEN
    readyz: EndpointAccess = OPEN
    status: EndpointAccess = AUTHENTICATED
    breakers: EndpointAccess = AUTHENTICATED
    routes: EndpointAccess = AUTHENTICATED

    def for_path(self, path: str) -> EndpointAccess:
        """The rule of ``/name``; an endpoint not listed needs authentication."""
        rule = getattr(self, path.lstrip("/"), AUTHENTICATED)
        return rule if isinstance(rule, EndpointAccess) else AUTHENTICATED


@dataclass(frozen=True, slots=True)
class CredentialFiles:
    """Where credentials come from. ``htpasswd``: bcrypt entries only.
    ``tokens_file`` / ``tokens_env`` (a variable's name): lines of
    ``NAME sha256:HEX``, the token's SHA-256, never the token itself."""

    htpasswd: str | None = None
    tokens_file: str | None = None
    tokens_env: str | None = None

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(p for p in (self.htpasswd, self.tokens_file) if p)

    @property
    def empty(self) -> bool:
        return not (self.htpasswd or self.tokens_file or self.tokens_env)


@dataclass(frozen=True, slots=True)
class AccessRule:
    """Modules matching ``modules`` (routing globs) may be fetched only by
    identities in ``allow``: a name, ``@group``, or ``*`` (any identity)."""

    modules: tuple[str, ...]
    allow: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ThrottleConfig:
    max_failures: int = DEFAULT_MAX_FAILURES
    window: float = DEFAULT_FAILURE_WINDOW_S
    table_size: int = DEFAULT_THROTTLE_TABLE


@dataclass(frozen=True, slots=True)
class CredentialCacheConfig:
    ttl: float = DEFAULT_CREDENTIAL_TTL_S
    size: int = DEFAULT_CREDENTIAL_CACHE


@dataclass(frozen=True, slots=True)
class ClientAuthConfig:
    enabled: bool = False
    realm: str = DEFAULT_REALM
    htpasswd: str | None = None
    tokens_file: str | None = None
    tokens_env: str | None = None
    admin: CredentialFiles = field(default_factory=CredentialFiles)
    trusted_networks: tuple[str, ...] = ()
    # Proxies in front (a TLS terminator, an ingress): a request from one of
    # these is the client named last in its X-Forwarded-For, for the throttle
    # and trusted_networks. From any other address the header is ignored.
    forwarded_by: tuple[str, ...] = ()
    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (group, members), in file order
    access: tuple[AccessRule, ...] = ()
    endpoints: EndpointRules = field(default_factory=EndpointRules)
    throttle: ThrottleConfig = field(default_factory=ThrottleConfig)
    credential_cache: CredentialCacheConfig = field(default_factory=CredentialCacheConfig)
    reload_interval: float = DEFAULT_RELOAD_INTERVAL_S

    @property
    def clients(self) -> CredentialFiles:
        return CredentialFiles(self.htpasswd, self.tokens_file, self.tokens_env)
