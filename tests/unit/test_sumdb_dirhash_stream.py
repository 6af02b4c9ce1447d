"""sidecar.sumdb.zipstream against hash_zip: the zip's h1 hashed while it is written
equals the one hashed from the stored file, or the stream says "fall back" (None).

Zips from Python's zipfile (stored, deflated, mixed, data descriptors, zip64,
duplicate names), zips the real Go tooling writes (x/mod's zip.CreateFromDir
in the test checksum database, whose h1 Go's dirhash computes), and hostile
variants of them, fed in random chunk sizes.
"""

from __future__ import annotations

import asyncio
import io
import random
import struct
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from sidecar.cache.fill import Fill, FillState
from sidecar.errors import ZipHashError
from sidecar.sumdb.dirhash import hash_zip
from sidecar.sumdb.zipstream import ZipStream
from tests.sumdb.gosumdb import start_sumdb, sumdb_server_binary
from tests.unit.test_cache_fill import REQ, Source, start, temp

__all__ = ["sumdb_server_binary"]  # the session fixture, used below

FILES = [
    ("m@v1.0.0/go.mod", b"module m\n\ngo 1.21\n"),
    ("m@v1.0.0/a.go", b"package m\n\nfunc A() int { return 1 }\n" * 40),
    ("m@v1.0.0/sub/", b""),
    ("m@v1.0.0/sub/empty.txt", b""),
    ("m@v1.0.0/sub/noise.bin", random.Random(1).randbytes(9000)),
    ("m@v1.0.0/\u00e9t\u00e9.txt", b"utf-8 name\n"),
]
chunk_sizes = st.lists(st.integers(1, 5000), min_size=1, max_size=20)
SLOW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def build(
    files: list[tuple[str, bytes]],
    method: int = zipfile.ZIP_DEFLATED,
    *,
    methods: list[int] | None = None,
    seekable: bool = True,
    zip64: bool = False,
) -> bytes:
    """A zip as Python's zipfile writes it; unseekable output gets data descriptors."""
    raw = io.BytesIO()
    out: io.RawIOBase | io.BytesIO = raw if seekable else _Unseekable(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are asked for
        with zipfile.ZipFile(out, "w") as archive:
            for i, (name, data) in enumerate(files):
                info = zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0))
                info.compress_type = methods[i % len(methods)] if methods else method
                with archive.open(info, "w", force_zip64=zip64) as member:
                    member.write(data)
    return raw.getvalue()


class _Unseekable(io.RawIOBase):
    def __init__(self, sink: io.BytesIO) -> None:
        self._sink = sink

    def writable(self) -> bool:
        return True

    def write(self, data: object) -> int:
        return self._sink.write(data)  # type: ignore[arg-type]


def reference(data: bytes) -> str:
    """hash_zip's verdict: the h1, or "unreadable"."""
    try:
        return hash_zip(io.BytesIO(data))
    except ZipHashError:
        return "unreadable"


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="zipstream-") as tmp:
        yield Path(tmp)


def streamed(data: bytes, sizes: list[int], where: Path) -> str | None:
    """Feed ``data`` in pieces of ``sizes`` (cycled), store it, finish."""
    stream = ZipStream()
    at, i = 0, 0
    while at < len(data):
        size = sizes[i % len(sizes)]
        stream.feed(data[at : at + size])
        at, i = at + size, i + 1
    path = where / "body.zip"
    path.write_bytes(data)
    return stream.finish(str(path))


def agree(data: bytes, sizes: list[int], where: Path) -> str | None:
    """The property: the streamed h1 is hash_zip's, or the stream falls back."""
    got = streamed(data, sizes, where)
    assert got is None or got == reference(data)
    return got


# -- well-formed zips: streamed, and equal -------------------------------------------

WELL_FORMED = {
    "deflated": lambda: build(FILES),
    "stored": lambda: build(FILES, zipfile.ZIP_STORED),
    "mixed": lambda: build(FILES, methods=[zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]),
    "descriptors": lambda: build(FILES, seekable=False),
    "zip64": lambda: build(FILES, methods=[zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], zip64=True),
    "zip64_descriptors": lambda: build(FILES, seekable=False, zip64=True),
    "duplicates": lambda: build([*FILES, ("m@v1.0.0/a.go", b"package m // the last one\n")]),
    "empty_files": lambda: build([("m@v1/x", b""), ("m@v1/y", b"")]),
    "one_member": lambda: build([("m@v1/go.mod", b"module m\n")], zipfile.ZIP_STORED),
}


@pytest.mark.parametrize("kind", sorted(WELL_FORMED))
@given(sizes=chunk_sizes)
@SLOW
def test_a_well_formed_zip_is_hashed_while_written(
    kind: str, sizes: list[int], scratch: Path
) -> None:
    data = WELL_FORMED[kind]()
    assert streamed(data, sizes, scratch) == hash_zip(io.BytesIO(data))


def test_duplicate_names_hash_the_last_entry_in_both_paths(scratch: Path) -> None:
    first = build([("m@v1/a", b"first"), ("m@v1/a", b"last")])
    only_last = build([("m@v1/a", b"last"), ("m@v1/a", b"last")])
    assert streamed(first, [100], scratch) == hash_zip(io.BytesIO(first))
    assert streamed(first, [100], scratch) == hash_zip(io.BytesIO(only_last))


@given(sizes=chunk_sizes)
@SLOW
def test_a_tampered_member_changes_the_hash_in_both_paths(sizes: list[int], scratch: Path) -> None:
    genuine = build(FILES, seekable=False)
    files = list(FILES)
    files[1] = (files[1][0], files[1][1].replace(b"return 1", b"return 2"))
    tampered = build(files, seekable=False)
    want, got = streamed(genuine, sizes, scratch), streamed(tampered, sizes, scratch)
    assert want == hash_zip(io.BytesIO(genuine))
    assert got == hash_zip(io.BytesIO(tampered))
    assert got != want


# -- zips that Go writes, hashed by Go ---------------------------------------------


@pytest.fixture(scope="module")
def go_zips(
    sumdb_server_binary: Path, tmp_path_factory: pytest.TempPathFactory
) -> list[tuple[bytes, str]]:
    """(zip, Go's h1) of modules zipped by x/mod's zip.CreateFromDir (data descriptors)."""
    work = tmp_path_factory.mktemp("go-zips")
    rng = random.Random(15)
    listing = []
    for n in range(3):
        src = work / "src" / f"v1.0.{n}"
        (src / "internal" / "deep").mkdir(parents=True)
        (src / "go.mod").write_text("module example.com/streamed\n\ngo 1.21\n")
        (src / "lib.go").write_text("package streamed\n\n// text\n" * (50 + n * 2000))
        (src / "internal" / "deep" / "blob.bin").write_bytes(rng.randbytes(20_000 * (n + 1)))
        (src / "internal" / "empty.txt").write_bytes(b"")
        listing.append(f"example.com/streamed v1.0.{n} {src}\n")
    (work / "modules.txt").write_text("".join(listing))
    with start_sumdb(sumdb_server_binary, work / "modules.txt", proxy_dir=work / "proxy") as db:
        records = dict(db.modules)
    out = []
    for n in range(3):
        data = (work / "proxy" / "example.com" / "streamed" / "@v" / f"v1.0.{n}.zip").read_bytes()
        out.append((data, records[f"example.com/streamed@v1.0.{n}"].zip))
    return out


@given(sizes=chunk_sizes)
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
def test_go_module_zips_stream_to_gos_own_hash(
    sizes: list[int], go_zips: list[tuple[bytes, str]], scratch: Path
) -> None:
    for data, go_h1 in go_zips:
        assert streamed(data, sizes, scratch) == go_h1 == hash_zip(io.BytesIO(data))


# -- hostile or broken zips: equal, or a fallback ------------------------------------


def _local_header_offsets(data: bytes) -> list[int]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return [info.header_offset for info in archive.infolist()]


def _patch(data: bytes, at: int, fmt: str, *values: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, at, *values)
    return bytes(out)


def test_prepended_junk_falls_back(scratch: Path) -> None:
    data = b"#!/bin/sh\nexit 0\n" + build(FILES)
    assert reference(data).startswith("h1:")  # zipfile reads it, as Go does
    assert agree(data, [999], scratch) is None


def test_a_local_name_unlike_the_central_name_falls_back(scratch: Path) -> None:
    data = build(FILES, zipfile.ZIP_STORED)
    at = _local_header_offsets(data)[0] + 30
    data = data[:at] + b"n" + data[at + 1 :]  # "m@v1..." in the header only
    assert reference(data) == "unreadable"
    assert agree(data, [999], scratch) is None


@pytest.mark.parametrize("field_at", [18, 22])  # compressed size, size
def test_local_sizes_that_lie_fall_back(field_at: int, scratch: Path) -> None:
    for method in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        data = build(FILES, method)
        at = _local_header_offsets(data)[1] + field_at
        (size,) = struct.unpack_from("<I", data, at)
        assert agree(_patch(data, at, "<I", size - 1), [999], scratch) is None


def test_a_member_only_in_the_stream_falls_back(scratch: Path) -> None:
    """Two local members for one name, the central directory naming the second:
    a member the directory does not list is not trusted, whatever it holds."""
    genuine = build([("m@v1/a.go", b"genuine")], zipfile.ZIP_STORED)
    evil = build([("m@v1/a.go", b"tampered")], zipfile.ZIP_STORED)
    with zipfile.ZipFile(io.BytesIO(genuine)) as archive:
        cd_at = archive.start_dir
    with zipfile.ZipFile(io.BytesIO(evil)) as archive:
        evil_cd = archive.start_dir
    central = bytearray(evil[evil_cd:])
    struct.pack_into("<I", central, 42, cd_at)  # the entry's local header offset
    struct.pack_into("<I", central, len(central) - 6, cd_at + evil_cd)  # EOCD: where it starts
    data = genuine[:cd_at] + evil[:evil_cd] + bytes(central)
    assert reference(data) == hash_zip(io.BytesIO(evil))
    assert agree(data, [7], scratch) is None


def test_a_wrong_central_crc_falls_back(scratch: Path) -> None:
    data = build(FILES)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        cd_at = archive.start_dir
    data = _patch(data, cd_at + 16, "<I", 0x12345678)
    assert reference(data) == "unreadable"
    assert agree(data, [999], scratch) is None


def test_encrypted_and_other_methods_fall_back(scratch: Path) -> None:
    data = build(FILES, zipfile.ZIP_STORED)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        cd_at = archive.start_dir
    flagged = _patch(_patch(data, 6, "<H", 1), cd_at + 8, "<H", 1)  # bit 0: encrypted
    assert reference(flagged) == "unreadable"
    assert agree(flagged, [999], scratch) is None
    bzip = build(FILES, zipfile.ZIP_BZIP2)
    assert reference(bzip) == "unreadable"
    assert agree(bzip, [999], scratch) is None


def test_stored_data_with_a_descriptor_falls_back(scratch: Path) -> None:
    data = build(FILES, zipfile.ZIP_STORED, seekable=False)
    assert reference(data).startswith("h1:")
    assert agree(data, [999], scratch) is None


@given(cut=st.integers(0, 100_000), sizes=chunk_sizes)
@SLOW
def test_a_truncated_zip_falls_back(cut: int, sizes: list[int], scratch: Path) -> None:
    data = build(FILES, seekable=False)
    data = data[: cut % len(data)]
    assert agree(data, sizes, scratch) is None


def test_a_file_other_than_the_one_fed_falls_back(scratch: Path) -> None:
    data = build(FILES)
    stream = ZipStream()
    stream.feed(data)
    (scratch / "other.zip").write_bytes(data + b"\0")
    assert stream.finish(str(scratch / "other.zip")) is None


@given(
    flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)), min_size=1, max_size=4),
    kind=st.sampled_from(["deflated", "stored", "descriptors", "zip64", "mixed"]),
    sizes=chunk_sizes,
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_corrupted_bytes_never_make_the_paths_disagree(
    flips: list[tuple[int, int]], kind: str, sizes: list[int], scratch: Path
) -> None:
    data = bytearray(WELL_FORMED[kind]())
    for at, xor in flips:
        data[at % len(data)] ^= xor
    agree(bytes(data), sizes, scratch)


# -- the fill feeds the gate's sink ---------------------------------------------------


class StreamGate:
    """A gate that keeps what the streamed hash said about the stored body."""

    def __init__(self) -> None:
        self.stream = ZipStream()
        self.result: str | None = None

    def sink(self) -> ZipStream:
        return self.stream

    async def check(self, path: str) -> None:
        self.result = await asyncio.to_thread(self.stream.finish, path)

    def unchecked(self, reason: str) -> None:
        raise AssertionError(reason)


async def test_a_gated_fill_feeds_every_byte_in_order(tmp_path: Path) -> None:
    data = build(FILES, seekable=False)
    chunks = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    src = Source(chunks)
    gate = StreamGate()
    fill = Fill(
        REQ,
        src,  # type: ignore[arg-type]
        CIMultiDict(),
        temp(tmp_path),
        limit=1 << 20,
        gate=gate,
        flush_bytes=700,  # many writes, each fed as written
        read_bytes=300,
    )
    task = start(fill)
    src.finish()
    assert await task
    assert fill.state is FillState.COMPLETE
    assert gate.stream.fed == len(data)
    assert gate.result == hash_zip(io.BytesIO(data))
