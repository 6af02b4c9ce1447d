"""Bearer tokens, stored as their SHA-256 only.

A token file (or a variable's value) holds one ``NAME sha256:HEX`` per line,
HEX being the SHA-256 of the token: a leaked file or environment dump gives
no usable token. Tokens are long random strings, so a fast hash is enough
(no bcrypt: there is nothing to guess). ``token_line`` writes a line.

A presented token is hashed and compared with every stored hash with
``hmac.compare_digest``, always all of them, so the time taken does not
tell how close a guess came or which entry it matched.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field
from typing import Final

from sidecar.auth.htpasswd import read_credential_file
from sidecar.errors import AuthFileError

PREFIX: Final = "sha256:"
LINE: Final = re.compile(r"([A-Za-z0-9._@-]+)\s+sha256:([0-9a-fA-F]{64})")


@dataclass(frozen=True, slots=True)
class Tokens:
    """(name, SHA-256 digest) pairs from files and variables."""

    entries: tuple[tuple[str, bytes], ...] = field(default=(), repr=False)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(name for name, _ in self.entries)

    def match(self, token: str) -> str | None:
        """The name whose hash ``token`` has, or None."""
        digest = hashlib.sha256(token.encode()).digest()
        found: str | None = None
        for name, stored in self.entries:
            if hmac.compare_digest(digest, stored):
                found = name  # no early exit: every entry costs the same
        return found

    def __add__(self, other: Tokens) -> Tokens:
        return Tokens(self.entries + other.entries)


def parse_tokens(text: str, where: str) -> Tokens:
    """Lines of ``NAME sha256:HEX``; AuthFileError naming ``where``:line otherwise."""
    entries: list[tuple[str, bytes]] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = LINE.fullmatch(line)
        if match is None:
            # Never quote the line: it may be a token pasted where its hash belongs.
            raise AuthFileError(where, number, f"not a `NAME {PREFIX}HEX` line (64 hex digits)")
        name = match.group(1)
        if name in seen:
            raise AuthFileError(where, number, f"token name {name!r} is listed twice")
        seen.add(name)
        entries.append((name, bytes.fromhex(match.group(2))))
    return Tokens(tuple(entries))


def load_tokens(path: str) -> Tokens:
    return parse_tokens(read_credential_file(path), path)


def token_line(name: str, token: str) -> str:
    """The line a token file holds for ``token``."""
    return f"{name} {PREFIX}{hashlib.sha256(token.encode()).hexdigest()}"
