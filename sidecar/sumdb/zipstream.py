"""A module zip's ``h1:`` hashed while the zip is written, not after (issue 15).

A gated fill stores the whole zip before a client gets a byte; hashing it
only then (``hash_zip``: inflate and SHA-256 every member) kept the client
waiting for one more pass over the file. :class:`ZipStream` is fed the bytes
in order as the fill writes them (in the fill's worker thread), follows the
local file headers, inflates each member as it lands and keeps one record
per member: where its header is, its name and flags, method, sizes, CRC and
the SHA-256 of its content.

:meth:`ZipStream.finish` then reads the central directory of the stored file
(zipfile, as ``hash_zip`` does) and uses the records only if every entry is a
member streamed at exactly the offset the entry names, with the same name
bytes, flags, method, sizes and CRC. A record is a function of the bytes at
its offset alone: the local header there, then the compressed data right
after its name and extra field (where Go and zipfile read it), a deflate
stream that ends exactly at the entry's compressed size, the entry's size and
CRC out of it. So matched records are what ``hash_zip`` reads, and the same
summary code (``hash_entries``) makes the ``h1:``. Anything else (junk,
encrypted or odd flags, other methods, stored data of unknown size, a data
descriptor that is not exactly one of its four forms, sizes that lie, a
member or entry without its twin, more than a module may hold) and
``finish`` returns None: the caller hashes the stored file with ``hash_zip``.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zipfile
from dataclasses import dataclass
from typing import Any, Final

# ISA-L's inflate and CRC-32, not zlib's: a module zip is inflated and hashed in
# full before its first byte is served, and for golang.org/x/text v0.14.0 (9.2 MB,
# 41 MB inflated) inflate + CRC + SHA-256 took 137 ms with zlib, 77 ms with isal
# and 87 ms with zlib-ng (inflate alone 92 / 41 / 49 ms; CRC 11 / 3 / 3 ms). Like
# zlib, it releases the GIL while it inflates.
from isal import isal_zlib

from sidecar.sumdb.dirhash import MAX_CONTENT, READ_PIECE, hash_entries, raw_name

LOCAL_SIG: Final = b"PK\x03\x04"
CENTRAL_SIG: Final = b"PK\x01\x02"
DESCRIPTOR_SIG: Final = b"PK\x07\x08"
_LOCAL: Final = struct.Struct("<4sHHHHHIIIHH")  # a local file header, 30 bytes
_DESC32: Final = struct.Struct("<III")  # crc, compressed, size
_DESC64: Final = struct.Struct("<IQQ")
# The longest data descriptor (signature + zip64 sizes) and the next signature.
_DESCRIPTOR_WINDOW: Final = 4 + _DESC64.size + 4
_DATA_DESCRIPTOR: Final = 0x8  # flag bit 3: CRC and sizes follow the data
# Flag bits that change nothing zipfile or Go read: deflate options (1, 2),
# UTF-8 names (11). Bit 3 is handled; any other (encryption, patches) stops.
_HARMLESS_FLAGS: Final = 0x0806
_ZIP64_EXTRA: Final = 0x0001
_UNKNOWN32: Final = 0xFFFFFFFF

_HEADER, _DATA, _DESCRIPTOR, _CENTRAL, _STOPPED = range(5)


class _Stop(Exception):
    """The stream cannot be followed with certainty: the stored file is hashed instead."""


@dataclass(frozen=True, slots=True)
class Member:
    """One streamed member, as its bytes say."""

    offset: int  # of its local header
    name: bytes
    flags: int
    method: int
    compressed: int
    size: int
    crc: int
    digest: str  # hex SHA-256 of the content


@dataclass(slots=True)
class _Open:
    """The member whose data is arriving."""

    offset: int
    name: bytes
    flags: int
    method: int
    data_at: int
    local: tuple[int, int, int]  # crc, compressed, size from the local header
    inflater: Any  # isal_zlib decompressobj, None for stored data
    left: int  # stored bytes still to come
    sha: Any
    crc: int = 0
    size: int = 0

    @property
    def described(self) -> bool:
        return bool(self.flags & _DATA_DESCRIPTOR)


class ZipStream:
    """Digests of a zip's members, fed its bytes in order; see the module docstring.

    Not thread-safe: one thread feeds it at a time, then one calls ``finish``.
    """

    def __init__(self) -> None:
        self.fed = 0  # bytes fed, whatever was made of them
        self._phase = _HEADER
        self._at = 0  # stream offset of the next byte a phase takes
        self._buf = bytearray()  # header or descriptor bytes taken, not yet parsed
        self._open: _Open | None = None
        self._members: dict[int, Member] = {}
        self._central_at = -1
        self._content = 0  # bytes of content so far (MAX_CONTENT bounds the work)

    @property
    def stopped(self) -> bool:
        return self._phase == _STOPPED

    def feed(self, chunk: bytes | memoryview) -> None:
        """Take the next bytes of the zip. Never raises: a stream it cannot follow
        is given up, and ``finish`` then says so."""
        self.fed += len(chunk)
        if self._phase in (_CENTRAL, _STOPPED):
            return
        view = memoryview(chunk)
        try:
            while view and self._phase not in (_CENTRAL, _STOPPED):
                before = len(view)
                view = self._step(view)
                self._at += before - len(view)
        # Any surprise, even a bug here, only costs the fallback: a full hash.
        except Exception:
            self._stop()

    def finish(self, path: str | os.PathLike[str]) -> str | None:
        """The ``h1:`` of the complete zip stored at ``path`` (fed whole), or None
        when the streamed digests cannot be trusted to be what ``hash_zip`` reads."""
        if self._phase != _CENTRAL:
            return None
        # Any doubt, an unreadable zip included, is settled by hash_zip itself.
        try:
            if os.path.getsize(path) != self.fed:
                return None
            with zipfile.ZipFile(path) as archive:
                infos = archive.infolist()
                if archive.start_dir != self._central_at or not self._twins(infos):
                    return None
                return hash_entries(infos, lambda info: self._members[info.header_offset].digest)
        except Exception:
            return None

    def _twins(self, infos: list[zipfile.ZipInfo]) -> bool:
        """Each entry names a streamed member, each member has one entry, alike."""
        if len(infos) != len(self._members):
            return False
        if len({info.header_offset for info in infos}) != len(infos):
            return False
        for info in infos:
            member = self._members.get(info.header_offset)
            if member is None or (
                member.name,
                member.flags,
                member.method,
                member.compressed,
                member.size,
                member.crc,
            ) != (
                raw_name(info),
                info.flag_bits,
                info.compress_type,
                info.compress_size,
                info.file_size,
                info.CRC,
            ):
                return False
        return True

    def _stop(self) -> None:
        self._phase, self._open = _STOPPED, None
        self._buf.clear()

    def _step(self, view: memoryview) -> memoryview:
        if self._phase == _HEADER:
            return self._header(view)
        if self._phase == _DATA:
            return self._data(view)
        return self._descriptor(view)

    def _take(self, view: memoryview, need: int) -> memoryview:
        """Move bytes of ``view`` into the buffer until it holds ``need``."""
        more = need - len(self._buf)
        if more > 0:
            self._buf += view[:more]
            return view[more:]
        return view

    # -- headers ------------------------------------------------------------------

    def _header(self, view: memoryview) -> memoryview:
        start = self._at - len(self._buf)  # the buffer holds this header from its start
        view = self._take(view, 4)
        if len(self._buf) < 4:
            return view
        signature = bytes(self._buf[:4])
        if signature == CENTRAL_SIG:
            self._phase, self._central_at = _CENTRAL, start
            return view
        if signature != LOCAL_SIG:
            raise _Stop("not a local file header")
        view = self._take(view, _LOCAL.size)
        if len(self._buf) < _LOCAL.size:
            return view
        fields = _LOCAL.unpack_from(self._buf)
        name_len, extra_len = fields[9], fields[10]
        end = _LOCAL.size + name_len + extra_len
        view = self._take(view, end)
        if len(self._buf) < end:
            return view
        name = bytes(self._buf[_LOCAL.size : _LOCAL.size + name_len])
        extra = bytes(self._buf[_LOCAL.size + name_len : end])
        self._buf.clear()
        self._begin(start, start + end, fields, name, extra)
        return view

    def _begin(
        self, start: int, data_at: int, fields: tuple[Any, ...], name: bytes, extra: bytes
    ) -> None:
        flags, method, crc, compressed, size = fields[2], fields[3], fields[6], fields[7], fields[8]
        if flags & ~(_HARMLESS_FLAGS | _DATA_DESCRIPTOR):
            raise _Stop("flags")
        if method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _Stop("method")
        if _UNKNOWN32 in (compressed, size):
            size, compressed = _zip64_sizes(extra)
        described = bool(flags & _DATA_DESCRIPTOR)
        if method == zipfile.ZIP_STORED and (described or compressed != size):
            raise _Stop("stored data of unknown length")  # nothing marks where it ends
        deflated = method == zipfile.ZIP_DEFLATED
        self._open = _Open(
            offset=start,
            name=name,
            flags=flags,
            method=method,
            data_at=data_at,
            local=(crc, compressed, size),
            inflater=isal_zlib.decompressobj(-isal_zlib.MAX_WBITS) if deflated else None,
            left=0 if deflated else size,
            sha=hashlib.sha256(),
        )
        self._phase = _DATA
        if not deflated and size == 0:
            self._end(data_at)

    # -- data -----------------------------------------------------------------------

    def _data(self, view: memoryview) -> memoryview:
        member = self._open
        assert member is not None
        if member.inflater is None:
            piece = view[: member.left]
            self._content_of(member, piece)
            member.left -= len(piece)
            if member.left == 0:
                self._end(self._at + len(piece))
            return view[len(piece) :]
        inflater = member.inflater
        data: bytes | memoryview = view
        while True:
            # Bounded output per call: a small deflate bomb cannot take the memory.
            self._content_of(member, inflater.decompress(data, READ_PIECE))
            if inflater.eof:
                rest = len(inflater.unused_data)
                self._end(self._at + len(view) - rest)
                return view[len(view) - rest :]
            data = inflater.unconsumed_tail
            if not data:
                return view[len(view) :]

    def _content_of(self, member: _Open, piece: bytes | memoryview) -> None:
        member.sha.update(piece)
        member.crc = isal_zlib.crc32(piece, member.crc)
        member.size += len(piece)
        self._content += len(piece)
        if self._content > MAX_CONTENT:
            raise _Stop("more content than a module may hold")
        if not member.described and member.size > member.local[2]:
            raise _Stop("more content than the local header says")

    def _end(self, data_end: int) -> None:
        """The member's data ended at stream offset ``data_end``."""
        member = self._open
        assert member is not None
        actual = (member.crc, data_end - member.data_at, member.size)
        if member.described:
            if member.local not in (actual, (0, 0, 0)):
                raise _Stop("local header and data disagree")
        elif member.local != actual:
            raise _Stop("local header and data disagree")
        self._members[member.offset] = Member(
            member.offset,
            member.name,
            member.flags,
            member.method,
            actual[1],
            actual[2],
            actual[0],
            member.sha.hexdigest(),
        )
        self._phase = _DESCRIPTOR if member.described else _HEADER

    def _descriptor(self, view: memoryview) -> memoryview:
        """A data descriptor in one of its four forms (signature or not, 32- or 64-bit
        sizes), told apart by its values and the signature right after it."""
        view = self._take(view, _DESCRIPTOR_WINDOW)
        if len(self._buf) < _DESCRIPTOR_WINDOW:
            return view
        member = self._open
        assert member is not None
        actual = (member.crc, member.size)
        lengths = []
        for base in (0, 4):
            if base and self._buf[:4] != DESCRIPTOR_SIG:
                continue
            for form in (_DESC32, _DESC64):
                crc, compressed, size = form.unpack_from(self._buf, base)
                end = base + form.size
                if (
                    (crc, size) == actual
                    and compressed == self._members[member.offset].compressed
                    and bytes(self._buf[end : end + 4]) in (LOCAL_SIG, CENTRAL_SIG)
                ):
                    lengths.append(end)
        if len(lengths) != 1:
            raise _Stop("data descriptor")
        del self._buf[: lengths[0]]  # what is left starts the next header
        self._open, self._phase = None, _HEADER
        return view


def _zip64_sizes(extra: bytes) -> tuple[int, int]:
    """(size, compressed) from a local header's zip64 extra field."""
    at = 0
    while at + 4 <= len(extra):
        kind, length = struct.unpack_from("<HH", extra, at)
        if kind == _ZIP64_EXTRA:
            if length < 16 or at + 4 + length > len(extra):
                break
            size, compressed = struct.unpack_from("<QQ", extra, at + 4)
            return int(size), int(compressed)
        at += 4 + length
    raise _Stop("zip64 sizes missing")
