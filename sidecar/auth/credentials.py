"""Every credential the sidecar accepts, loaded together from the files.

Clients and admins come from separate sources (``client_auth`` and
``client_auth.admin``); a name may not be in both, so an identity is an
admin by its credential, never by a name that happens to match.
``fingerprint`` hashes what ``load_credentials`` reads, for the reloader.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.auth.htpasswd import Htpasswd, load_htpasswd
from sidecar.auth.tokens import Tokens, load_tokens, parse_tokens
from sidecar.config import ClientAuthConfig, CredentialFiles
from sidecar.errors import AuthFileError

NO_FILE = Htpasswd("", {})


@dataclass(frozen=True, slots=True)
class Source:
    """One side's credentials (clients or admins)."""

    htpasswd: Htpasswd = NO_FILE
    tokens: Tokens = field(default_factory=Tokens)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self.htpasswd.hashes) | self.tokens.names


@dataclass(frozen=True, slots=True)
class Credentials:
    clients: Source
    admins: Source

    def verify_basic(self, user: str, password: str) -> bool | None:
        """Blocking (bcrypt). None: wrong; else whether the user is an admin."""
        side, admin = (self.admins, True) if user in self.admins.htpasswd else (self.clients, False)
        return admin if side.htpasswd.verify(user, password) else None

    def verify_token(self, token: str) -> tuple[str, bool] | None:
        """(name, admin) of a token, or None. Both sides are always compared."""
        admin = self.admins.tokens.match(token)
        client = self.clients.tokens.match(token)
        if admin is not None:
            return admin, True
        return (client, False) if client is not None else None

    @property
    def count(self) -> int:
        return len(self.clients.names) + len(self.admins.names)


def load_credentials(cfg: ClientAuthConfig) -> Credentials:
    """Blocking (reads files, hashes a dummy); AuthFileError naming file:line."""
    clients = _load_source(cfg.clients)
    admins = _load_source(cfg.admin)
    both = sorted(clients.names & admins.names)
    if both:
        where = cfg.admin.htpasswd or cfg.admin.tokens_file or f"${cfg.admin.tokens_env}"
        raise AuthFileError(
            where, None, f"{both[0]!r} is both a client and an admin: give the admin its own name"
        )
    return Credentials(clients, admins)


def _load_source(files: CredentialFiles) -> Source:
    htpasswd = load_htpasswd(files.htpasswd) if files.htpasswd else NO_FILE
    tokens = load_tokens(files.tokens_file) if files.tokens_file else Tokens()
    if files.tokens_env:
        value = os.environ.get(files.tokens_env)
        if value is None:
            raise AuthFileError(f"${files.tokens_env}", None, "the variable is not set")
        tokens = tokens + parse_tokens(value.replace(",", "\n"), f"${files.tokens_env}")
    # A name in both the htpasswd and the tokens is one identity with two ways in.
    return Source(htpasswd, tokens)


def fingerprint(cfg: ClientAuthConfig) -> str:
    """A hash of every credential file's content (a missing one included)."""
    digest = hashlib.sha256()
    for path in cfg.clients.paths + cfg.admin.paths:
        digest.update(path.encode() + b"\0")
        try:
            digest.update(Path(path).read_bytes())
        except OSError as exc:
            digest.update(f"unreadable: {exc}".encode())
        digest.update(b"\0")
    return digest.hexdigest()
