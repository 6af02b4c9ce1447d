"""Which checksum database to trust: ``GOSUMDB`` as the go command reads it.

``GOSUMDB`` is ``off``, a known database name (``sum.golang.org``), a full
verifier key ``<name>+<hash>+<key>``, or either followed by a URL to reach the
database directly (``"<key> <url>"``). Empty means the go command's default,
``sum.golang.org`` (its go.env), and ``sum.golang.google.cn`` is that same
database reached through another host (cmd/go/internal/modfetch/sumdb.go).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from sidecar.errors import SumdbKeyError
from sidecar.sumdb.note import Verifier, parse_verifier_key

DEFAULT_GOSUMDB: Final = "sum.golang.org"
# sum.golang.org's published key, as cmd/go/internal/modfetch/key.go has it.
SUM_GOLANG_ORG_KEY: Final = "sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8"
KNOWN_KEYS: Final = {"sum.golang.org": SUM_GOLANG_ORG_KEY}
ALIASES: Final = {"sum.golang.google.cn": "sum.golang.org https://sum.golang.google.cn"}


@dataclass(frozen=True, slots=True)
class Gosumdb:
    """A trusted checksum database: its key, and its URL when one was given."""

    verifier: Verifier
    url: str | None = None  # None: reach it through the proxies' sumdb/<name>/ path

    @property
    def name(self) -> str:
        return self.verifier.name


def parse_gosumdb(value: str) -> Gosumdb | None:
    """The database a GOSUMDB value names; None for ``off``. Raises SumdbKeyError."""
    value = ALIASES.get(value.strip(), value.strip()) or DEFAULT_GOSUMDB
    if value == "off":
        return None
    fields = value.split()
    if len(fields) > 2:
        raise SumdbKeyError(f"invalid GOSUMDB {value!r}: too many fields")
    verifier = parse_verifier_key(KNOWN_KEYS.get(fields[0], fields[0]))
    _check_name(verifier.name)
    url = _check_url(fields[1]) if len(fields) == 2 else None
    return Gosumdb(verifier, url)


def _check_name(name: str) -> None:
    """The name must be host[/path], as the go command insists ('no funny business')."""
    parts = urlsplit("https://" + name)
    funny = any(c in name for c in "?#@%\\") or name.endswith("/")
    if funny or not parts.netloc:
        raise SumdbKeyError(f"invalid sumdb name (must be host[/path]): {name!r}")


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SumdbKeyError(f"invalid GOSUMDB URL {url!r}: want http(s)://host[/path]")
    return url.rstrip("/")
