"""The cache directory on disk: the only code that turns a key into a path.

::

    <cache.dir>/
      CACHEDIR.TAG                 backup tools skip the directory
      v1/
        index/<cache_key>          one small JSON record per entry (the commit point)
        blobs/<ab>/<abcdef…>       the bytes of an entry, named by a random 128-bit id
        tmp/<pid>-<id>.part        bodies being fetched; renamed into blobs/ when complete
        tmp/<pid>-<id>.meta        records being written; renamed into index/

Atomicity: a fill writes its body to ``tmp/`` and renames it into ``blobs/``;
only then is its record written to ``tmp/`` and renamed over ``index/<key>``.
A reader (the start-up scan, ``cache ls``) only trusts a record whose blob
exists with the recorded size; a blob no record names is an orphan, removed
at start. So a kill -9 at any moment leaves either the old entry, the new
entry, or no entry; never a partial one (the page cache outlives the process).

Nothing is fsynced. After a power loss a blob may be named with pages that
never reached the disk; no entry is trusted before its SHA-256 is checked
again (on its first serve after start-up), so such an entry is evicted and
fetched again, never served. Two fsyncs per entry cost most of a cache miss
(measured: ~1.7k misses/s with them on this machine's disk), and a cache can
afford to lose entries, not to serve wrong bytes.

A record also holds its blob's ``Identity`` (size, mtime_ns, inode, device)
as it was when its bytes were last hashed. Every hit compares it with one
``fstat`` of the descriptor it then sends from: a file replaced, rewritten
or touched since is hashed again before a byte of it is served. A same-size
write that also restores the mtime keeps the identity; the background scrub
(``sidecar.cache.scrub``) is what finds those.

Every function here does blocking I/O and runs in a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Final, NamedTuple

from sidecar.errors import CacheError, CacheIntegrityError, CacheWriteError

LAYOUT: Final = "v1"
FORMAT: Final = 1
MAX_KEY_LENGTH: Final = 1024
MAX_RECORD_BYTES: Final = 64 * 1024
HASH_CHUNK: Final = 1024 * 1024
CACHEDIR_TAG: Final = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by goproxy-sidecar.\n"
    "# For information about cache directory tags, see https://bford.info/cachedir/\n"
)

_BLOB_ID: Final = re.compile(r"[0-9a-f]{32}")
_SHA256: Final = re.compile(r"[0-9a-f]{64}")
# What GoproxyRequest promises for cache_key, checked again here: printable
# ASCII, no backslash, no empty, "." or ".." segment, relative.
_KEY_CHARS: Final = re.compile(r"[\x21-\x7e]+")
_TEMP: Final = re.compile(r"(\d+)-[0-9a-f]{32}\.(part|meta)")


class Identity(NamedTuple):
    """What ``fstat`` says about a blob: any write, replacement or ``touch``
    changes at least one of these (a write that restores the mtime aside)."""

    size: int
    mtime_ns: int
    ino: int
    dev: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        return cls(st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)

    @classmethod
    def parse(cls, raw: object) -> Identity | None:
        """From a record's JSON (a list of four integers; absent or null in
        records written before identities existed: None). CacheError if malformed."""
        if raw is None:
            return None
        if (
            not isinstance(raw, list)
            or len(raw) != len(cls._fields)
            or not all(type(v) is int and v >= 0 for v in raw)
        ):
            raise CacheError("malformed identity")
        return cls(*raw)


# A record's fields, in constructor (and JSON) order.
RECORD_FIELDS: Final = (
    "key",
    "kind",
    "blob",
    "size",
    "sha256",
    "content_type",
    "stored",
    "verified",
    "immutable",
    "upstream",
    "identity",
)


class Record:
    """What ``index/<key>`` holds about one entry. Never changed once made
    (``Final``: read-only attributes when compiled); ``evolve`` makes a copy.

    A plain class, not a frozen dataclass: a small cache miss makes one, and
    a frozen dataclass's ``__init__`` sets each field through
    ``object.__setattr__`` (2.5 µs interpreted; compiled, this constructor is
    a native call).
    """

    __slots__ = RECORD_FIELDS

    def __init__(
        self,
        key: str,
        kind: str,
        blob: str,
        size: int,
        sha256: str,
        content_type: str,
        stored: float,
        verified: float,
        immutable: bool,
        upstream: str,
        identity: Identity | None = None,
    ) -> None:
        self.key: Final = key
        self.kind: Final = kind
        self.blob: Final = blob
        self.size: Final = size
        self.sha256: Final = sha256
        self.content_type: Final = content_type
        self.stored: Final = stored  # unix time the body was stored
        self.verified: Final = verified  # unix time its SHA-256 was last checked against the bytes
        self.immutable: Final = immutable
        self.upstream: Final = upstream
        # The blob's identity when its bytes last matched sha256. None for a pack
        # row (no file) and in records of earlier versions: such an entry is
        # hashed on its first serve, and its identity recorded then.
        self.identity: Final = identity

    def _fields(self) -> tuple[object, ...]:
        return (
            self.key,
            self.kind,
            self.blob,
            self.size,
            self.sha256,
            self.content_type,
            self.stored,
            self.verified,
            self.immutable,
            self.upstream,
            self.identity,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Record):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        pairs = ", ".join(
            f"{name}={value!r}" for name, value in zip(RECORD_FIELDS, self._fields(), strict=True)
        )
        return f"Record({pairs})"

    def evolve(self, verified: float | None = None, identity: Identity | None = None) -> Record:
        """A copy with a new check time and/or blob identity (None: kept)."""
        return Record(
            self.key,
            self.kind,
            self.blob,
            self.size,
            self.sha256,
            self.content_type,
            self.stored,
            self.verified if verified is None else verified,
            self.immutable,
            self.upstream,
            self.identity if identity is None else identity,
        )

    def to_json(self) -> bytes:
        fields = dict(zip(RECORD_FIELDS, self._fields(), strict=True))
        return json.dumps({"format": FORMAT, **fields}, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Record:
        """Parse a record; raises CacheError for anything malformed."""
        try:
            raw = json.loads(data)
            fields = {name: raw[name] for name in _REQUIRED}
            if type(fields["size"]) is not int:  # compiled, ``true`` would become 1
                raise TypeError("size is not an integer")
            record = cls(**fields, identity=Identity.parse(raw.get("identity")))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CacheError(f"unreadable record: {exc}") from exc
        if raw.get("format") != FORMAT or not record.valid():
            raise CacheError("malformed record")
        return record

    def valid(self) -> bool:
        return (
            isinstance(self.key, str)
            and key_problem(self.key) is None
            and isinstance(self.blob, str)
            and _BLOB_ID.fullmatch(self.blob) is not None
            and isinstance(self.sha256, str)
            and _SHA256.fullmatch(self.sha256) is not None
            and type(self.size) is int
            and self.size >= 0
            and isinstance(self.kind, str)
            and isinstance(self.content_type, str)
            and isinstance(self.upstream, str)
            and isinstance(self.immutable, bool)
            and isinstance(self.stored, int | float)
            and isinstance(self.verified, int | float)
            and (self.identity is None or isinstance(self.identity, Identity))
        )


_REQUIRED: Final = RECORD_FIELDS[:-1]  # all but the identity


@dataclass(frozen=True, slots=True)
class Layout:
    """Paths under one cache directory (absolute, normalised)."""

    root: str
    # Directories already created and checked to stay inside the cache. The
    # realpath walk and makedirs behind that check were a third of a small
    # cache miss's CPU; a directory once checked is not checked again.
    known_dirs: set[str] = field(default_factory=set, compare=False, repr=False)

    @classmethod
    def at(cls, directory: str) -> Layout:
        return cls(os.path.abspath(directory))

    @property
    def base(self) -> str:
        return os.path.join(self.root, LAYOUT)

    @property
    def index(self) -> str:
        return os.path.join(self.base, "index")

    @property
    def blobs(self) -> str:
        return os.path.join(self.base, "blobs")

    @property
    def tmp(self) -> str:
        return os.path.join(self.base, "tmp")

    @property
    def pack(self) -> str:
        """The SQLite file of small entries (``sidecar.cache.pack``)."""
        return os.path.join(self.base, "small.db")

    @property
    def changes(self) -> str:
        """Replaced by ``cache purge|verify`` and ``warm``: a running sidecar re-reads the index."""
        return os.path.join(self.base, "changes")

    def record_path(self, key: str) -> str:
        """``index/<key>``; raises CacheError if the key could leave the index."""
        problem = key_problem(key)
        if problem is not None:
            raise CacheError(f"refused cache key {key!r}: {problem}")
        path = os.path.normpath(os.path.join(self.index, key))
        if not path.startswith(self.index + os.sep):  # defence in depth
            raise CacheError(f"refused cache key {key!r}: leaves the cache directory")
        return path

    def blob_path(self, blob: str) -> str:
        if _BLOB_ID.fullmatch(blob) is None:
            raise CacheError(f"refused blob id {blob!r}")
        return os.path.join(self.blobs, blob[:2], blob)

    def temp_path(self, blob: str, suffix: str) -> str:
        return os.path.join(self.tmp, f"{os.getpid()}-{blob}.{suffix}")

    def key_of(self, record_path: str) -> str:
        return os.path.relpath(record_path, self.index).replace(os.sep, "/")


def key_problem(key: str) -> str | None:
    """Why ``key`` is not a safe relative path below the index, or None."""
    if not key or len(key) > MAX_KEY_LENGTH:
        return "empty or too long"
    if _KEY_CHARS.fullmatch(key) is None or "\\" in key:
        return "forbidden character"
    if key[0] == "/" or any(seg in ("", ".", "..") for seg in key.split("/")):
        return "absolute path, empty or dot segment"
    return None


def new_blob_id() -> str:
    # Unique, not secret: a PRNG seeded from the OS at start-up avoids one
    # getrandom() per entry (5 % of a small miss); bytes to hex takes 0.3 µs
    # where formatting a 128-bit integer took 0.7.
    return _ids.getrandbits(128).to_bytes(16, "little").hex()


_ids = random.Random()


KNOWN_DIRS_LIMIT = 65_536


def make_dirs_inside(directory: str, root: str, known: set[str] | None = None) -> None:
    """``os.makedirs`` below ``root`` that never follows a symlink: each missing
    component is created with ``mkdir`` and each one on the way must be a real
    directory (``lstat``), so nothing can be created outside ``root``.

    Directories in ``known`` were checked before and are trusted; a small miss
    of a new module then costs a ``mkdir`` and an ``lstat`` per new component
    (resolving the whole path twice with ``realpath`` was a third of its CPU).
    """
    if known is None:
        known = set()
    elif directory in known:
        return
    missing = []
    current = directory
    while current not in known and current != root:
        if not current.startswith(root + os.sep):
            raise CacheWriteError(f"{directory}: leaves the cache directory")
        missing.append(current)
        current = os.path.dirname(current)
    if len(known) + len(missing) > KNOWN_DIRS_LIMIT:
        known.clear()  # bounded; forgetting only costs a re-check
    for path in reversed(missing):
        try:
            os.mkdir(path)
        except FileExistsError:
            pass
        except FileNotFoundError:
            if os.path.dirname(path) != root:
                raise
            os.makedirs(root, exist_ok=True)  # the root itself was removed: ours to recreate
            with contextlib.suppress(FileExistsError):
                os.mkdir(path)
        if not stat.S_ISDIR(os.lstat(path).st_mode):  # a symlink or a file
            raise CacheWriteError(f"{path}: not a directory (symlinks are not followed)")
        known.add(path)


# ---------------------------------------------------------------- writing


def prepare(layout: Layout) -> None:
    """Create the directory tree (and the CACHEDIR.TAG) if missing."""
    for directory in (layout.index, layout.blobs, layout.tmp):
        os.makedirs(directory, exist_ok=True)
    tag = os.path.join(layout.root, "CACHEDIR.TAG")
    if not os.path.exists(tag):
        with contextlib.suppress(OSError):
            write_atomic(layout, tag, CACHEDIR_TAG.encode())


def open_temp(layout: Layout, blob: str) -> tuple[int, str]:
    """A new, exclusive temp file for a body: (fd, path)."""
    path = layout.temp_path(blob, "part")
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    return os.open(path, flags, 0o644), path


def write_all(fd: int, chunks: list[bytes], hasher: hashlib._Hash) -> None:
    """Append ``chunks`` to ``fd`` and to the running SHA-256."""
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            written = os.write(fd, view)  # not in the slice: see tests/unit/test_compiled.py
            view = view[written:]
        hasher.update(chunk)


def commit(layout: Layout, fd: int, temp: str, record: Record) -> Record:
    """Make a complete body and its record visible, in the order readers tolerate;
    returns the record as written: with the blob's identity.

    The record is written last and is the commit point. Raises CacheWriteError
    (the temp file is then left to the caller).
    """
    blob = layout.blob_path(record.blob)
    target = layout.record_path(record.key)
    try:
        os.utime(fd, (record.stored, record.stored))
        # After the utime (it sets the mtime) and before the rename (which
        # changes neither inode nor mtime): what every later hit must find.
        record = record.evolve(identity=Identity.of(os.fstat(fd)))
        _place(layout, temp, blob, target)
    except OSError as exc:
        raise CacheWriteError(f"{record.key}: {describe(exc)}") from exc
    try:
        try:
            write_atomic(layout, target, record.to_json())
        except FileNotFoundError:  # its directory was removed since we remembered it
            layout.known_dirs.clear()
            make_dirs_inside(os.path.dirname(target), layout.index, layout.known_dirs)
            write_atomic(layout, target, record.to_json())
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(blob)
        raise CacheWriteError(f"{record.key}: {describe(exc)}") from exc
    return record


def commit_bytes(layout: Layout, data: bytes, record: Record) -> Record:
    """``open_temp`` + ``write_all`` + ``commit`` for a body already in memory,
    in one call (one worker-thread hop for a small miss); returns the record
    as written. Leaves nothing behind on failure; raises CacheWriteError."""
    try:
        fd, temp = open_temp(layout, record.blob)
    except OSError as exc:
        raise CacheWriteError(f"{record.key}: {describe(exc)}") from exc
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        except OSError as exc:
            raise CacheWriteError(f"{record.key}: {describe(exc)}") from exc
        return commit(layout, fd, temp, record)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    finally:
        os.close(fd)


def _place(layout: Layout, temp: str, blob: str, target: str) -> None:
    """Rename the body into blobs/, creating directories; once more from scratch
    if a directory remembered in ``known_dirs`` was removed behind our back."""
    for attempt in (1, 2):
        make_dirs_inside(os.path.dirname(target), layout.index, layout.known_dirs)
        make_dirs_inside(os.path.dirname(blob), layout.blobs, layout.known_dirs)
        try:
            os.rename(temp, blob)
            return
        except FileNotFoundError:
            if attempt == 2 or not os.path.exists(temp):
                raise
            layout.known_dirs.clear()


def write_atomic(layout: Layout, target: str, data: bytes) -> None:
    """Write ``data`` to a temp file and rename it over ``target``."""
    temp = layout.temp_path(new_blob_id(), "meta")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        try:
            write_all(fd, [data], hashlib.sha256())
        finally:
            os.close(fd)
        os.rename(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def mark_changed(layout: Layout) -> None:
    """Tell running sidecars that another process added or removed entries."""
    with contextlib.suppress(OSError):
        write_atomic(layout, layout.changes, f"{os.getpid()} {time.time()}\n".encode())


def change_stamp(layout: Layout) -> tuple[int, int] | None:
    """Identifies the last ``mark_changed``; None if there was none."""
    try:
        st = os.stat(layout.changes)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def rewrite_record(layout: Layout, record: Record) -> None:
    """Replace a record (e.g. a new ``verified`` time) if it still names the same blob."""
    current = read_record(layout, layout.record_path(record.key))
    if current is not None and current.blob == record.blob:
        write_atomic(layout, layout.record_path(record.key), record.to_json())


# ---------------------------------------------------------------- reading


def read_record(layout: Layout, path: str) -> Record | None:
    """The record at ``path`` if it is a sane one for this path, else None."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_RECORD_BYTES:
            return None
        with open(path, "rb") as f:
            record = Record.from_json(f.read(MAX_RECORD_BYTES))
    except (OSError, CacheError):
        return None
    return record if record.key == layout.key_of(path) else None


def records(layout: Layout) -> Iterator[tuple[str, Record | None]]:
    """Every (record path, parsed record or None when broken) under the index."""
    for directory, _dirs, files in os.walk(layout.index):  # symlinked dirs are not followed
        for name in files:
            path = os.path.join(directory, name)
            yield path, read_record(layout, path)


def blob_size(layout: Layout, blob: str) -> int | None:
    """Size of a regular blob file, or None if it is missing or not a regular file."""
    try:
        st = os.lstat(layout.blob_path(blob))
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


class Hashed(NamedTuple):
    """A file's bytes as read: their size and SHA-256, and the identity they had."""

    size: int
    sha256: str
    identity: Identity

    def problem(self, record: Record) -> str | None:
        """Why these bytes are not ``record``'s, or None if they are."""
        return mismatch(record, self.size, self.sha256)


def mismatch(record: Record, size: int, sha256: str) -> str | None:
    """Why bytes of this size and digest are not ``record``'s, or None if they are."""
    if size == record.size and sha256 == record.sha256:
        return None
    return f"size {size} (recorded {record.size}), sha256 {sha256[:12]}…"


def hash_fd(fd: int) -> Hashed:
    """Hash an open file from its first byte, in 1 MiB chunks (hashlib releases
    the GIL); ``pread`` leaves the descriptor's offset alone. CacheIntegrityError
    if the file changed while it was read: the digest then describes no version of it."""
    before = Identity.of(os.fstat(fd))
    hasher = hashlib.sha256()
    size = 0
    while chunk := os.pread(fd, HASH_CHUNK, size):
        size += len(chunk)
        hasher.update(chunk)
    if Identity.of(os.fstat(fd)) != before:
        raise CacheIntegrityError("changed while it was being hashed")
    return Hashed(size, hasher.hexdigest(), before)


def hash_file(path: str) -> Hashed:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        return hash_fd(fd)
    finally:
        os.close(fd)


def open_blob(path: str) -> tuple[BinaryIO, Identity]:
    """Open a blob to send it, with the identity of that very descriptor (one
    ``fstat``). The caller compares it with the identity the bytes were last
    hashed with and sends from this file, so nothing can be swapped in between
    check and send. Raises OSError."""
    f = open(path, "rb")  # noqa: SIM115 - returned open, the sender closes it
    try:
        return f, Identity.of(os.fstat(f.fileno()))
    except BaseException:
        f.close()
        raise


def read_small(path: str, record: Record) -> tuple[bytes, Identity]:
    """A small blob's bytes, hashed (a few µs for 4 KiB) before they are kept in
    memory, and its identity. Raises OSError, or CacheIntegrityError when they
    are not the record's."""
    with open(path, "rb") as f:
        identity = Identity.of(os.fstat(f.fileno()))
        data = f.read(record.size + 1)  # bounded: a grown file is not read whole
    problem = Hashed(len(data), hashlib.sha256(data).hexdigest(), identity).problem(record)
    if problem is not None:
        raise CacheIntegrityError(problem)
    return data, identity


# ---------------------------------------------------------------- removing


def remove_entry(layout: Layout, key: str, blob: str, *, record: bool = True) -> None:
    """Remove a blob and, unless it now names another blob, its record; record first."""
    if record:
        path = layout.record_path(key)
        current = read_record(layout, path)
        if current is None or current.blob == blob:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(layout.blob_path(blob))


def sweep_temp(layout: Layout) -> int:
    """Remove temp files of dead processes (and of an earlier life of this pid)."""
    removed = 0
    try:
        names = os.listdir(layout.tmp)
    except FileNotFoundError:
        return 0
    for name in names:
        m = _TEMP.fullmatch(name)
        if m is not None and int(m.group(1)) != os.getpid() and pid_alive(int(m.group(1))):
            continue  # another live process (a `warm` run) owns it
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
            os.unlink(os.path.join(layout.tmp, name))
            removed += 1
    return removed


def orphan_blobs(layout: Layout, known: set[str], older_than: float) -> Iterator[str]:
    """Blob files no record names, last written before ``older_than`` (unix time)."""
    for directory, _dirs, files in os.walk(layout.blobs):
        for name in files:
            if name in known:
                continue
            path = os.path.join(directory, name)
            try:
                if os.lstat(path).st_mtime < older_than:
                    yield path
            except OSError:
                continue


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(exc: OSError) -> str:
    """A short cause for logs: the errno name and text, never a traceback."""
    name = errno.errorcode.get(exc.errno or 0, "error")
    return f"{name}: {exc.strerror or exc}"
