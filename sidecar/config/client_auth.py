"""``client_auth``: the front door on the GOPROXY port (sidecar/auth/): who may
use the proxy and the sidecar's own endpoints. Named client_auth: upstreams[].auth
is the upstream's own credentials, a different thing.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import replace

from sidecar.config.common import PATH, POSITIVE, beside
from sidecar.config_kinds import (
    ENV_NAME,
    Boolean,
    Check,
    Choice,
    Integer,
    Items,
    Section,
    Strings,
    Text,
    section,
    setting,
)

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

    htpasswd: str | None = setting(PATH, default=None)
    tokens_file: str | None = setting(PATH, default=None)
    tokens_env: str | None = setting(ENV_NAME, default=None)

    def finish(self, check: Check) -> CredentialFiles:
        if self.tokens_env and self.tokens_env not in check.env:  # its name, never its value
            check.fail(f"environment variable {self.tokens_env} is not set", "tokens_env")
        return replace(
            self,
            htpasswd=beside(check, self.htpasswd),
            tokens_file=beside(check, self.tokens_file),
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
    window: float = setting(POSITIVE, default=DEFAULT_AUTH_FAILURE_WINDOW_S)
    table_size: int = setting(Integer(1), default=DEFAULT_AUTH_THROTTLE_TABLE)


@section
class CredentialCacheConfig:
    ttl: float = setting(POSITIVE, default=DEFAULT_CREDENTIAL_TTL_S)
    size: int = setting(Integer(1), default=DEFAULT_CREDENTIAL_CACHE)


@section
class ClientAuthConfig:
    """Client authentication on the GOPROXY port; off by default."""

    enabled: bool = setting(Boolean(), default=False)
    realm: str = setting(Text("a realm without quotes", r'[^"\\]+'), default=DEFAULT_AUTH_REALM)
    htpasswd: str | None = setting(PATH, default=None)
    tokens_file: str | None = setting(PATH, default=None)
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
    reload_interval: float = setting(POSITIVE, default=DEFAULT_CREDENTIAL_RELOAD_S)

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
            htpasswd=beside(check, self.htpasswd),
            tokens_file=beside(check, self.tokens_file),
        )

    @property
    def clients(self) -> CredentialFiles:
        return CredentialFiles(self.htpasswd, self.tokens_file, self.tokens_env)


def _names(check: Check, key: str, names: Iterable[str]) -> None:
    for i, name in enumerate(names):
        if not _IDENTITY.fullmatch(name):
            check.fail(f"not a name (no blanks, ':', '@' or '*'): {name!r}", f"{key}[{i}]")
