"""sidecar.sumdb.dirhash against x/mod's vectors (sumdb/dirhash/hash_test.go) and
go.sum lines of real modules as sum.golang.org records them."""

from __future__ import annotations

import base64
import hashlib
import io
import tracemalloc
import zipfile
from pathlib import Path

import pytest

from sidecar.errors import ZipHashError
from sidecar.sumdb.dirhash import hash1, hash_gomod, hash_zip

# go.mod files of real module versions and their go.sum hashes (sum.golang.org
# records 469 and 942, also checked end to end in test_sumdb_lookup.py).
SAMPLER_GOMOD = (
    b'module "rsc.io/sampler"\n\nrequire "golang.org/x/text" v0.0.0-20170915032832-14c0d48ead0c\n'
)
SAMPLER_GOMOD_H1 = "h1:T1hPZKmBbMNahiBKFy5HrXp6adAjACjK9JXDnKaTXpA="
QUOTE_GOMOD = b'module "rsc.io/quote"\n\nrequire "rsc.io/sampler" v1.3.0\n'
QUOTE_GOMOD_H1 = "h1:LzX7hefJvL54yjefDEDHNONDjII0t9xZLPXsUe+TKr0="


def h(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def htop(summary: str) -> str:
    return "h1:" + base64.b64encode(hashlib.sha256(summary.encode()).digest()).decode()


def make_zip(entries: list[tuple[str, bytes]], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buf.getvalue()


def test_hash1_golden() -> None:
    want = htop(f"{h(b'data for abc')}  abc\n{h(b'data for xyz')}  xyz\n")
    files = [(b"xyz", h(b"data for xyz")), (b"abc", h(b"data for abc"))]
    assert hash1(files) == want


def test_hash1_refuses_a_newline_in_a_name() -> None:
    with pytest.raises(ZipHashError):
        hash1([(b"xyz", h(b"")), (b"a\nbc", h(b""))])


def test_hash_zip_golden() -> None:
    data = make_zip([("prefix/xyz", b"data for xyz"), ("prefix/abc", b"data for abc")])
    want = htop(f"{h(b'data for abc')}  prefix/abc\n{h(b'data for xyz')}  prefix/xyz\n")
    assert hash_zip(io.BytesIO(data)) == want


@pytest.mark.parametrize(
    ("gomod", "want"), [(SAMPLER_GOMOD, SAMPLER_GOMOD_H1), (QUOTE_GOMOD, QUOTE_GOMOD_H1)]
)
def test_hash_gomod_of_real_modules(gomod: bytes, want: str) -> None:
    assert hash_gomod(gomod) == want


def test_hash_zip_ignores_compression_and_times(tmp_path: Path) -> None:
    entries = [("m@v1.0.0/go.mod", b"module m\n"), ("m@v1.0.0/a.go", b"package a\n" * 1000)]
    stored = make_zip(entries, zipfile.ZIP_STORED)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in reversed(entries):
            archive.writestr(zipfile.ZipInfo(name, date_time=(2001, 2, 3, 4, 5, 6)), data)
    assert stored != buf.getvalue()
    path = tmp_path / "m.zip"
    path.write_bytes(stored)
    assert hash_zip(path) == hash_zip(io.BytesIO(buf.getvalue()))


def test_hash_zip_changes_with_one_byte() -> None:
    good = make_zip([("m@v1.0.0/a.go", b"package a\n")])
    bad = make_zip([("m@v1.0.0/a.go", b"package b\n")])
    assert hash_zip(io.BytesIO(good)) != hash_zip(io.BytesIO(bad))


def test_hash_zip_counts_directory_entries_like_go() -> None:
    data = make_zip([("m@v1.0.0/d/", b""), ("m@v1.0.0/d/f", b"x")])
    want = htop(f"{h(b'')}  m@v1.0.0/d/\n{h(b'x')}  m@v1.0.0/d/f\n")
    assert hash_zip(io.BytesIO(data)) == want


def test_hash_zip_hashes_the_last_of_duplicated_names_like_go() -> None:
    with pytest.warns(UserWarning, match="Duplicate name"):
        data = make_zip([("m@v1/a", b"first"), ("m@v1/a", b"second")])
    want = htop(f"{h(b'second')}  m@v1/a\n{h(b'second')}  m@v1/a\n")
    assert hash_zip(io.BytesIO(data)) == want


def test_hash_zip_uses_the_stored_name_bytes() -> None:
    name = "m@v1/é.go"  # stored as UTF-8 with flag bit 11
    data = make_zip([(name, b"x")])
    assert hash_zip(io.BytesIO(data)) == htop(f"{h(b'x')}  {name}\n")


@pytest.mark.parametrize(
    "data",
    [
        b"not a zip at all",
        make_zip([("m@v1/a", b"x" * 100)])[:-30],  # truncated central directory
        make_zip([("m@v1/a", b"x" * 100)], zipfile.ZIP_BZIP2),  # Go cannot read it
    ],
)
def test_hash_zip_refuses_unreadable_zips(data: bytes) -> None:
    with pytest.raises(ZipHashError):
        hash_zip(io.BytesIO(data))


def test_hash_zip_refuses_a_corrupted_member() -> None:
    data = bytearray(make_zip([("m@v1/a", b"abcdefgh" * 64)], zipfile.ZIP_STORED))
    data[data.index(b"abcdefgh") + 3] ^= 1  # CRC-32 no longer matches
    with pytest.raises(ZipHashError):
        hash_zip(io.BytesIO(bytes(data)))


def test_hash_zip_streams_large_members(tmp_path: Path) -> None:
    """A 64 MiB member is hashed in pieces: memory stays far below its size."""
    size = 64 << 20
    path = tmp_path / "big.zip"
    piece = bytes(range(256)) * 4096
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive,
        archive.open("m@v1/big", "w", force_zip64=True) as member,
    ):
        for _ in range(size // len(piece)):
            member.write(piece)
    tracemalloc.start()
    try:
        result = hash_zip(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    content = hashlib.sha256(bytes(range(256)) * 4096 * (size // (256 * 4096))).hexdigest()
    assert result == htop(f"{content}  m@v1/big\n")
    assert peak < 8 << 20, f"peak {peak} bytes while hashing a {size}-byte member"


def test_hash_zip_refuses_more_content_than_a_module_may_hold() -> None:
    """A zip whose directory declares more than 500 MiB of files (a zip bomb) is
    refused from its directory, before any member is inflated."""
    data = bytearray(make_zip([("m@v1/a", b"x"), ("m@v1/b", b"y")]))
    central = data.index(b"PK\x01\x02")  # first central directory entry
    data[central + 24 : central + 28] = (600 << 20).to_bytes(4, "little")  # its size
    with pytest.raises(ZipHashError, match="more than a module may hold"):
        hash_zip(io.BytesIO(bytes(data)))
