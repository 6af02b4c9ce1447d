"""sidecar.sumdb.note and .gosumdb against x/mod's vectors (sumdb/note/note_test.go)
and the go command's GOSUMDB rules (cmd/go/internal/modfetch/sumdb.go)."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sidecar.errors import SumdbKeyError, SumdbVerifyError
from sidecar.sumdb.gosumdb import SUM_GOLANG_ORG_KEY, parse_gosumdb
from sidecar.sumdb.note import Signature, open_note, parse_verifier_key

PETER_KEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
ENOCH_KEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
PETER_B64 = (
    "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM="
)
ENOCH_B64 = (
    "rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ="
)
PETER_SIG = f"— PeterNeumann {PETER_B64}\n"
ENOCH_SIG = f"— EnochRoot {ENOCH_B64}\n"
PETER = Signature("PeterNeumann", 0xC74F20A3, PETER_B64)
ENOCH = Signature("EnochRoot", 0xAF0CFE78, ENOCH_B64)


# --- verifier keys ---------------------------------------------------------------


def test_verifier_key_golden() -> None:
    verifier = parse_verifier_key(PETER_KEY)
    assert (verifier.name, verifier.key_hash, verifier.text) == (
        "PeterNeumann",
        0xC74F20A3,
        PETER_KEY,
    )


def test_every_mangled_verifier_key_is_refused() -> None:
    refused = 0
    for i in range(len(PETER_KEY) + 1):
        for j in range(i + 1, len(PETER_KEY) + 1):
            if (i, j) != (0, len(PETER_KEY)):
                with pytest.raises(SumdbKeyError):
                    parse_verifier_key(PETER_KEY[i:j])
                refused += 1
    for i, c in enumerate(PETER_KEY):
        with pytest.raises(SumdbKeyError):
            parse_verifier_key(PETER_KEY[:i] + chr(ord(c) + 1) + PETER_KEY[i + 1 :])
        refused += 1
    assert refused == len(PETER_KEY) * (len(PETER_KEY) + 1) // 2 - 1 + len(PETER_KEY)


@pytest.mark.parametrize(
    ("vkey", "why"),
    [
        # wrong key length, with the key hash adjusted to match
        ("PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==", "length"),
        # unknown algorithm, with the key hash adjusted to match
        ("PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "algorithm"),
    ],
)
def test_verifier_key_with_a_right_hash_but_a_bad_key(vkey: str, why: str) -> None:
    with pytest.raises(SumdbKeyError, match=why):
        parse_verifier_key(vkey)


def test_sum_golang_org_key() -> None:
    verifier = parse_verifier_key(SUM_GOLANG_ORG_KEY)
    assert (verifier.name, verifier.key_hash) == ("sum.golang.org", 0x033DE0AE)
    # A wrong copy that was once handed around for this key: refused (its tail is not
    # even base64); a copy with one key byte changed is caught by the key hash.
    mistyped = "sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ky18htTTVvhrnO2qSd"
    with pytest.raises(SumdbKeyError):
        parse_verifier_key(mistyped)
    with pytest.raises(SumdbKeyError, match="key hash"):
        parse_verifier_key(SUM_GOLANG_ORG_KEY.replace("s3Ux", "s3Uy"))


def generated_key(name: str) -> tuple[Ed25519PrivateKey, str]:
    """A verifier key made from scratch by the format note.go documents."""
    private = Ed25519PrivateKey.generate()
    public = b"\x01" + private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    digest = hashlib.sha256(name.encode() + b"\n" + public).digest()
    return private, f"{name}+{digest[:4].hex()}+{base64.b64encode(public).decode()}"


def sign(private: Ed25519PrivateKey, name: str, key_hash: int, text: str) -> str:
    raw = key_hash.to_bytes(4, "big") + private.sign(text.encode())
    return f"{text}\n— {name} {base64.b64encode(raw).decode()}\n"


def test_a_key_and_note_made_from_the_documented_format_verify() -> None:
    private, vkey = generated_key("example.com/db")
    verifier = parse_verifier_key(vkey)
    note = open_note(sign(private, verifier.name, verifier.key_hash, "hello\n").encode(), verifier)
    assert note.text == "hello\n"
    other, _ = generated_key("example.com/db")
    forged = sign(other, verifier.name, verifier.key_hash, "hello\n").encode()
    with pytest.raises(SumdbVerifyError, match="invalid signature"):
        open_note(forged, verifier)


# --- opening notes (TestOpen) -----------------------------------------------------


def test_open_verifies_the_known_key_and_keeps_others_unverified() -> None:
    peter = parse_verifier_key(PETER_KEY)
    note = open_note((TEXT + "\n" + PETER_SIG + ENOCH_SIG).encode(), peter)
    assert note.text == TEXT
    assert note.signatures == (PETER, ENOCH)
    enoch = parse_verifier_key(ENOCH_KEY)
    assert open_note((TEXT + "\n" + PETER_SIG + ENOCH_SIG).encode(), enoch).signatures == (
        ENOCH,
        PETER,
    )


def test_open_refuses_a_note_the_known_key_did_not_sign() -> None:
    with pytest.raises(SumdbVerifyError, match="no signature"):
        open_note((TEXT + "\n" + ENOCH_SIG).encode(), parse_verifier_key(PETER_KEY))


def test_open_refuses_too_many_signatures() -> None:
    with pytest.raises(SumdbVerifyError, match="malformed"):
        open_note((TEXT + "\n" + PETER_SIG * 101).encode(), parse_verifier_key(PETER_KEY))
    assert open_note((TEXT + "\n" + PETER_SIG * 100).encode(), parse_verifier_key(PETER_KEY))


def test_open_refuses_an_invalid_signature_by_the_known_key() -> None:
    bad = PETER_SIG[:60] + "ABCD" + PETER_SIG[60:]
    with pytest.raises(SumdbVerifyError, match="invalid signature for key PeterNeumann\\+c74f20a3"):
        open_note((TEXT + "\n" + bad).encode(), parse_verifier_key(PETER_KEY))


def test_open_ignores_duplicated_and_unknown_bad_signatures() -> None:
    enoch_bad = ENOCH_SIG[:60] + "ABCD" + ENOCH_SIG[60:]
    message = TEXT + "\n" + PETER_SIG + PETER_SIG + ENOCH_SIG + ENOCH_SIG + enoch_bad
    note = open_note(message.encode(), parse_verifier_key(PETER_KEY))
    assert note.signatures[0] == PETER
    assert PETER not in note.signatures[1:]


@pytest.mark.parametrize(
    "message",
    [
        TEXT,
        TEXT + "\n",
        TEXT + "\n" + PETER_SIG[:-1],
        "\x01" + TEXT + "\n" + PETER_SIG,
        TEXT + "\n" + f"— Bad Name {PETER_B64}",
        TEXT + "\n" + PETER_SIG + "Unexpected line.\n",
    ],
)
def test_open_refuses_malformed_notes(message: str) -> None:
    with pytest.raises(SumdbVerifyError, match="malformed"):
        open_note(message.encode(), parse_verifier_key(PETER_KEY))


def test_open_refuses_invalid_utf8() -> None:
    with pytest.raises(SumdbVerifyError, match="malformed"):
        open_note(b"\xff" + (TEXT + "\n" + PETER_SIG).encode(), parse_verifier_key(PETER_KEY))


# --- GOSUMDB ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "name", "url"),
    [
        ("", "sum.golang.org", None),
        ("sum.golang.org", "sum.golang.org", None),
        (SUM_GOLANG_ORG_KEY, "sum.golang.org", None),
        ("sum.golang.google.cn", "sum.golang.org", "https://sum.golang.google.cn"),
        ("sum.golang.org https://sum.example/", "sum.golang.org", "https://sum.example"),
        (f"{PETER_KEY.replace('PeterNeumann', 'x')}", None, None),
    ],
)
def test_parse_gosumdb(value: str, name: str | None, url: str | None) -> None:
    if name is None:  # a name change breaks the key hash
        with pytest.raises(SumdbKeyError):
            parse_gosumdb(value)
        return
    parsed = parse_gosumdb(value)
    assert parsed is not None
    assert (parsed.name, parsed.url) == (name, url)


def test_parse_gosumdb_own_database_and_off() -> None:
    _, vkey = generated_key("sumdb.corp.example/go")
    parsed = parse_gosumdb(f"{vkey} http://127.0.0.1:8099")
    assert parsed is not None
    assert (parsed.name, parsed.url) == ("sumdb.corp.example/go", "http://127.0.0.1:8099")
    assert parse_gosumdb("off") is None


@pytest.mark.parametrize(
    "value",
    [
        "sum.golang.org https://a https://b",  # too many fields
        "example.com",  # a name with no known key
        "sum.golang.org ftp://sum.example",  # not an http(s) URL
    ],
)
def test_parse_gosumdb_rejects(value: str) -> None:
    with pytest.raises(SumdbKeyError):
        parse_gosumdb(value)


@pytest.mark.parametrize("name", ["db.example/", "db.example?x", "user@db.example", "/db"])
def test_parse_gosumdb_rejects_funny_names(name: str) -> None:
    _, vkey = generated_key(name)
    with pytest.raises(SumdbKeyError, match="host"):
        parse_gosumdb(vkey)
