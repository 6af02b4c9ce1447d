"""What `check` says about client authentication, and `check --auth USER
--route MODULE`: what that identity may fetch, and by which rule."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields

from sidecar.auth.access import Access, Identity
from sidecar.auth.credentials import Credentials, load_credentials
from sidecar.auth.gate import NETWORK
from sidecar.auth.networks import TrustedNetworks
from sidecar.config import NETWORKS_GROUP, ClientAuthConfig
from sidecar.errors import SidecarError
from sidecar.routing import Router


def summary(cfg: ClientAuthConfig) -> tuple[str, Credentials]:
    """The files loaded and every rule compiled (AuthFileError / ConfigError if not)."""
    credentials = load_credentials(cfg)
    Access(cfg.access, cfg.groups)
    networks = TrustedNetworks(cfg.trusted_networks)
    endpoints = ", ".join(
        f"{f.name} {getattr(cfg.endpoints, f.name).value}" for f in fields(cfg.endpoints)
    )
    line = (
        f"client_auth ok: {len(credentials.clients.names)} client(s), "
        f"{len(credentials.admins.names)} admin(s), {len(networks.networks)} trusted "
        f"network(s), {len(cfg.access)} access rule(s); endpoints: {endpoints}"
    )
    return line, credentials


def explain(
    cfg: ClientAuthConfig,
    credentials: Credentials,
    router: Router,
    user: str,
    modules: Sequence[str],
) -> list[str]:
    """One line per module: ``auth USER MODULE: allowed|denied (why)``."""
    identity = _identity(cfg, credentials, user)
    access = Access(cfg.access, cfg.groups)
    lines = []
    for module in modules:
        route = router.route(module)
        decision = access.decide(identity, module, route.private)
        verdict = "may fetch" if decision.allowed else "may not fetch"
        if route.deny:
            verdict, why = "may not fetch", f"denied by routing rule {route.rule}"
        else:
            why = decision.why
        lines.append(f"auth {identity.describe()}: {verdict} {module} ({why})")
    return lines


def _identity(cfg: ClientAuthConfig, credentials: Credentials, user: str) -> Identity:
    if user == f"@{NETWORKS_GROUP}":
        if not cfg.trusted_networks:
            raise SidecarError("--auth @networks: client_auth.trusted_networks is empty")
        return NETWORK
    access = Access(cfg.access, cfg.groups)
    if user in credentials.admins.names:
        return Identity(user, access.groups_of(user), admin=True)
    if user in credentials.clients.names:
        return Identity(user, access.groups_of(user))
    raise SidecarError(
        f"--auth {user!r}: no such user or token name in the client_auth files "
        f"(or @{NETWORKS_GROUP} for trusted networks)"
    )
