"""htpasswd files, bcrypt entries only (``htpasswd -B``).

Every other format Apache accepts is refused at load, naming file:line:
``{SHA}`` (unsalted SHA-1), ``$apr1$`` (MD5), DES ``crypt`` and plain text
are all cheap enough to brute-force from a leaked file. Refusing the whole
file rather than the line keeps a half-migrated file from silently locking
users out.

``verify`` is blocking (bcrypt costs milliseconds to hundreds of them): the
caller runs it in a thread. An unknown user is checked against a dummy hash
of the same cost, so the time taken does not tell which names exist.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import bcrypt

from sidecar.errors import AuthFileError

# $2a$ / $2b$ / $2y$ (Apache writes 2y), two-digit cost, 53 characters of salt and hash.
BCRYPT: Final = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
# bcrypt reads at most 72 bytes; Apache cuts longer passwords there, and so do we
# (the bcrypt package raises instead).
BCRYPT_MAX: Final = 72
WEAK: Final = (
    ("{SHA}", "an unsalted SHA-1 ({SHA}) hash"),
    ("$apr1$", "an MD5 ($apr1$) hash"),
    ("$1$", "an MD5-crypt ($1$) hash"),
    ("$5$", "a SHA-256-crypt ($5$) hash"),
    ("$6$", "a SHA-512-crypt ($6$) hash"),
)
FIX: Final = "only bcrypt is accepted: recreate it with `htpasswd -B`"
USER: Final = re.compile(r"[^\s:]+")


@dataclass(frozen=True, slots=True)
class Htpasswd:
    """User name -> bcrypt hash, from one file."""

    path: str
    hashes: dict[str, bytes] = field(repr=False)
    dummy: bytes = field(repr=False, default=b"")

    def __contains__(self, user: str) -> bool:
        return user in self.hashes

    def verify(self, user: str, password: str) -> bool:
        """Blocking; as slow for an unknown user as for a known one."""
        hashed = self.hashes.get(user)
        secret = password.encode()[:BCRYPT_MAX]
        if hashed is None:
            if self.dummy:
                bcrypt.checkpw(secret, self.dummy)
            return False
        return bcrypt.checkpw(secret, hashed)  # compares in constant time


def read_credential_file(path: str) -> str:
    """The text of a credential file (htpasswd, tokens); AuthFileError naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise AuthFileError(path, None, f"cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise AuthFileError(path, None, "not UTF-8 text") from exc


def load_htpasswd(path: str) -> Htpasswd:
    """Parse ``path``; AuthFileError naming file:line for anything but bcrypt."""
    text = read_credential_file(path)
    hashes: dict[str, bytes] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not USER.fullmatch(user):
            raise AuthFileError(path, number, "not a `user:hash` line")
        if user in hashes:
            raise AuthFileError(path, number, f"user {user!r} is listed twice")
        hashes[user] = _bcrypt_hash(path, number, user, hashed.strip())
    return Htpasswd(path, hashes, _dummy(hashes))


def _bcrypt_hash(path: str, number: int, user: str, hashed: str) -> bytes:
    if BCRYPT.fullmatch(hashed):
        return hashed.encode("ascii")
    kind = next((name for prefix, name in WEAK if hashed.startswith(prefix)), None)
    if kind is None:
        kind = "a DES crypt hash" if len(hashed) == 13 else "a plain-text password or unknown hash"
    raise AuthFileError(path, number, f"user {user!r} has {kind}: {FIX}")


def _dummy(hashes: dict[str, bytes]) -> bytes:
    """A hash of the file's highest cost, for unknown users to be checked against."""
    if not hashes:
        return b""
    cost = max(int(h[4:6]) for h in hashes.values())
    return bcrypt.hashpw(b"no such user", bcrypt.gensalt(rounds=cost))
