"""Signed notes and verifier keys (golang.org/x/mod/sumdb/note).

A verifier key is ``<name>+<hash>+<base64 key>``: the key is an algorithm byte
(1 = Ed25519) and 32 bytes of public key, and ``<hash>`` is the first four
bytes, in hex, of SHA-256(name + "\\n" + key). A signed note is a text ending in
a newline, a blank line, then signature lines ``— <name> <base64(hash4 + sig)>``
where the signature covers the text including its final newline.

:func:`open_note` follows ``note.Open`` with one known key: a note is accepted
when that key signed it; signatures by other keys are ignored; a bad signature
by that key, or anything malformed, raises SumdbVerifyError.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass, field
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sidecar.errors import SumdbKeyError, SumdbVerifyError

ALG_ED25519: Final = 1
ED25519_KEY_SIZE: Final = 32
# note.Open refuses a note with more signatures than this (parsing cost).
MAX_SIGNATURES: Final = 100
SIG_PREFIX: Final = "— "  # em dash, space
# What Go's unicode.IsSpace matches, or a plus. Not Python's \s, which also takes
# \x1c-\x1f as space.
_BAD_NAME_CHAR: Final = re.compile(
    "[\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000+]"
)
# ASCII control characters other than newline, which notes must not contain.
_CONTROL: Final = re.compile(r"[\x00-\x09\x0b-\x1f]")


def is_valid_name(name: str) -> bool:
    """Non-empty, no Unicode space and no plus (note.isValidName)."""
    return name != "" and _BAD_NAME_CHAR.search(name) is None


def key_hash(name: str, key: bytes) -> int:
    """The 32-bit key hash: first four bytes of SHA-256(name + "\\n" + alg + key)."""
    digest = hashlib.sha256(name.encode("utf-8") + b"\n" + key).digest()
    return int.from_bytes(digest[:4], "big")


def b64decode_strict(text: str) -> bytes | None:
    """Go's base64.StdEncoding.DecodeString: padded standard alphabet, else None."""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return None


@dataclass(frozen=True, slots=True)
class Verifier:
    """One server's public key, parsed from a verifier key string."""

    name: str
    key_hash: int
    text: str  # the verifier key as given
    public_key: Ed25519PublicKey = field(compare=False, repr=False)

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            self.public_key.verify(signature, message)
        except InvalidSignature:
            return False
        return True


def parse_verifier_key(vkey: str) -> Verifier:
    """note.NewVerifier: raises SumdbKeyError for a malformed key or a wrong key hash."""
    name, _, rest = vkey.partition("+")
    hash16, _, key64 = rest.partition("+")
    key = b64decode_strict(key64)
    if len(hash16) != 8 or not _is_hex(hash16) or key is None or not key:
        raise SumdbKeyError(f"malformed verifier key {vkey!r}")
    if not is_valid_name(name):
        raise SumdbKeyError(f"malformed verifier key {vkey!r}: bad name")
    if int(hash16, 16) != key_hash(name, key):
        raise SumdbKeyError(f"invalid verifier key {vkey!r}: the key hash does not match")
    if key[0] != ALG_ED25519:
        raise SumdbKeyError(f"verifier key {vkey!r}: unknown algorithm {key[0]}")
    if len(key) != 1 + ED25519_KEY_SIZE:
        raise SumdbKeyError(f"malformed verifier key {vkey!r}: wrong key length")
    try:
        public_key = Ed25519PublicKey.from_public_bytes(key[1:])
    except ValueError as exc:
        raise SumdbKeyError(f"verifier key {vkey!r}: {exc}") from exc
    return Verifier(name, int(hash16, 16), vkey, public_key)


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


@dataclass(frozen=True, slots=True)
class Signature:
    name: str
    key_hash: int
    base64: str


@dataclass(frozen=True, slots=True)
class Note:
    """A note whose signature by the known key was verified."""

    text: str
    signatures: tuple[Signature, ...]  # the verified one first; others unverified


def open_note(message: bytes, verifier: Verifier) -> Note:
    """Parse ``message`` and verify its signature by ``verifier`` (note.Open)."""
    text, sig_block = _split(message)
    verified: Signature | None = None
    others: list[Signature] = []
    lines = sig_block.split("\n")[:-1]
    if len(lines) > MAX_SIGNATURES:
        raise SumdbVerifyError("malformed note: too many signatures")
    for line in lines:
        sig, raw = _parse_signature_line(line)
        if sig.name != verifier.name or sig.key_hash != verifier.key_hash:
            others.append(sig)
            continue
        if verified is not None:
            continue  # note.Open drops repeated signatures by one key
        if not verifier.verify(text.encode("utf-8"), raw):
            raise SumdbVerifyError(
                f"invalid signature for key {verifier.name}+{verifier.key_hash:08x}"
            )
        verified = sig
    if verified is None:
        raise SumdbVerifyError(f"note has no signature by {verifier.name}+{verifier.key_hash:08x}")
    return Note(text, (verified, *others))


def _split(message: bytes) -> tuple[str, str]:
    """(text with its final newline, signature block); raises for malformed notes."""
    try:
        decoded = message.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SumdbVerifyError("malformed note: not UTF-8") from exc
    if _CONTROL.search(decoded) is not None:
        raise SumdbVerifyError("malformed note: control character")
    split = decoded.rfind("\n\n")
    if split < 0:
        raise SumdbVerifyError("malformed note: no signature block")
    text, sigs = decoded[: split + 1], decoded[split + 2 :]
    if not sigs.endswith("\n"):
        raise SumdbVerifyError("malformed note: signature block does not end in a newline")
    return text, sigs


def _parse_signature_line(line: str) -> tuple[Signature, bytes]:
    if not line.startswith(SIG_PREFIX):
        raise SumdbVerifyError(f"malformed note: not a signature line {line[:80]!r}")
    name, _, b64 = line[len(SIG_PREFIX) :].partition(" ")
    raw = b64decode_strict(b64)
    if raw is None or not is_valid_name(name) or not b64 or len(raw) < 5:
        raise SumdbVerifyError(f"malformed note: bad signature line {line[:80]!r}")
    return Signature(name, int.from_bytes(raw[:4], "big"), b64), raw[4:]
