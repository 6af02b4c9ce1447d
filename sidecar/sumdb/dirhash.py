"""The ``h1:`` hashes of go.sum and the checksum database (golang.org/x/mod/sumdb/dirhash).

``h1:`` is base64(SHA-256(summary)), where the summary has one line per file,
sorted by name: the hex SHA-256 of the file's content, two spaces, the name,
a newline (``sha256sum $(find . -type f | sort) | sha256sum``). A module zip is
hashed over its entries' names (``module@version/...``) as stored, whatever the
compression or timestamps; a ``/go.mod`` line is the hash of a single file
named ``go.mod``.

:func:`hash_zip` reads the whole zip and blocks: callers run it in a worker
thread (``asyncio.to_thread``). It streams each member through SHA-256 in
fixed pieces, so memory does not grow with the zip (500 MiB at most).
:func:`hash_entries` is its summary step alone, fed with digests taken some
other way (``sidecar.sumdb.zipstream``: while the zip is written).
"""

from __future__ import annotations

import base64
import hashlib
import os
import zipfile
from collections.abc import Callable, Iterable
from typing import IO, Final

from sidecar.errors import ZipHashError

H1_PREFIX: Final = "h1:"
GOMOD_NAME: Final = b"go.mod"
# Pieces read from a zip member; large enough that hashing, not Python, is the cost.
READ_PIECE: Final = 1 << 20
# The go command refuses a module whose files add up to more (x/mod zip.MaxZipFile):
# hashing stops there, so a small zip of huge members costs no more than a real one.
MAX_CONTENT: Final = 500 << 20
# Bit 11 of a zip entry's flags: the name is UTF-8 (else the bytes are taken as is).
_UTF8_FLAG: Final = 0x800
_GO_METHODS: Final = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED})


def hash1(files: Iterable[tuple[bytes, str]]) -> str:
    """``h1:`` of (name, hex SHA-256 of content) pairs, in any order (dirhash.Hash1)."""
    summary = hashlib.sha256()
    # Names compare as bytes, as Go's sort.Strings does; a stable sort keeps duplicates'
    # order, which cannot change the summary since equal names carry equal content.
    for name, hex_digest in sorted(files, key=lambda pair: pair[0]):
        if b"\n" in name:
            raise ZipHashError(f"file name with a newline: {name!r}")
        summary.update(b"%s  %s\n" % (hex_digest.encode("ascii"), name))
    return H1_PREFIX + base64.b64encode(summary.digest()).decode("ascii")


def hash_gomod(data: bytes) -> str:
    """The ``h1:`` of a go.mod, as a go.sum ``<module> <version>/go.mod`` line has it."""
    return hash1([(GOMOD_NAME, hashlib.sha256(data).hexdigest())])


def hash_zip(source: str | os.PathLike[str] | IO[bytes]) -> str:
    """The ``h1:`` of a module zip (dirhash.HashZip); blocking, run it in a thread.

    Raises ZipHashError when the bytes are not a readable zip: an upstream that
    served them served a wrong answer, whatever the checksum database says.
    """
    try:
        with zipfile.ZipFile(source) as archive:
            return hash_entries(archive.infolist(), lambda info: _digest(archive, info))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError) as exc:
        raise ZipHashError(f"not a readable zip: {exc}") from exc
    except (ValueError, RuntimeError) as exc:  # encrypted members, bad names, bad CRC
        raise ZipHashError(f"unreadable zip member: {exc}") from exc


def hash_entries(infos: list[zipfile.ZipInfo], digest: Callable[[zipfile.ZipInfo], str]) -> str:
    """The ``h1:`` of a zip whose central directory lists ``infos``, given the hex
    SHA-256 of a member's content (``digest``, asked only for members Go reads).

    Raises ZipHashError for a zip the go command refuses whatever its content.
    """
    total = sum(info.file_size for info in infos)
    if total > MAX_CONTENT:
        raise ZipHashError(f"{total} bytes of files: more than a module may hold ({MAX_CONTENT})")
    # Go's HashZip opens each name through a map, so every line for a duplicated
    # name hashes the LAST entry of that name.
    last = {raw_name(info): info for info in infos}
    digests = {name: digest(info) for name, info in last.items()}
    return hash1((raw_name(info), digests[raw_name(info)]) for info in infos)


def _digest(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> str:
    # Go's archive/zip reads only stored and deflated members: a zip that only
    # Python could read is one the go command rejects, whatever its hash.
    if info.compress_type not in _GO_METHODS:
        raise ZipHashError(f"compression method {info.compress_type} of {info.filename!r}")
    content = hashlib.sha256()
    with archive.open(info) as member:
        while piece := member.read(READ_PIECE):
            content.update(piece)
    return content.hexdigest()


def raw_name(info: zipfile.ZipInfo) -> bytes:
    """The entry's name as the bytes stored in the zip, which is what Go hashes.

    zipfile decodes a name as UTF-8 when flag bit 11 is set and as cp437 otherwise;
    cp437 maps every byte, so encoding it back restores the stored bytes. The
    original (unsanitised) name is used: Go does not drop anything after a NUL.
    """
    if info.flag_bits & _UTF8_FLAG:
        return info.orig_filename.encode("utf-8")
    return info.orig_filename.encode("cp437")
