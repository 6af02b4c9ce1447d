"""Client authentication on the GOPROXY port (``client_auth:``, off by default).

    settings.py     the section's frozen dataclasses
    htpasswd.py     bcrypt htpasswd files (weak formats refused)
    tokens.py       bearer tokens, stored as SHA-256
    credentials.py  clients' and admins' credentials, loaded together
    networks.py     trusted client networks
    access.py       identities and groups -> module globs
    throttle.py     failures per client address, bounded
    credcache.py    verified credentials for a short TTL, bounded
    gate.py         the front door every request passes
    reloader.py     the files reloaded on change

The upstreams' own credentials (``upstreams[].auth``) are another matter: a
client's ``Authorization`` header is never forwarded upstream.
"""

from __future__ import annotations

from sidecar.auth.credentials import fingerprint, load_credentials
from sidecar.auth.gate import INTERNAL, FrontDoor
from sidecar.auth.reloader import CredentialReloader
from sidecar.auth.settings import ClientAuthConfig
from sidecar.metrics import Metrics

__all__ = ["INTERNAL", "ClientAuthConfig", "CredentialReloader", "FrontDoor", "open_door"]


def open_door(cfg: ClientAuthConfig, metrics: Metrics) -> tuple[FrontDoor, CredentialReloader]:
    """The front door with its files loaded (blocking; AuthFileError if one is
    refused: a sidecar that cannot authenticate must not start open)."""
    seen = fingerprint(cfg)
    door = FrontDoor(cfg, load_credentials(cfg), metrics)
    return door, CredentialReloader(door, metrics, seen)
