"""Cache operations that need no running sidecar: list, purge, verify.

They read and write the directory with the same atomic steps as the
sidecar (records are only ever replaced by rename, a record goes before its
blob; pack rows change in transactions), so running them beside a live
sidecar is safe: ``ls`` only reads; ``purge`` and ``verify`` remove entries
and then ``mark_changed``, and a running sidecar re-reads its index.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote

from sidecar.cache.layout import (
    Layout,
    Record,
    blob_size,
    hash_file,
    mark_changed,
    read_record,
    records,
    remove_entry,
    rewrite_record,
)
from sidecar.cache.pack import Pack
from sidecar.errors import CacheIntegrityError
from sidecar.goproxy import escape_path, escape_version, parse_request_path

FILE_KINDS = ("info", "mod", "zip")


@dataclass(frozen=True, slots=True)
class Listed:
    record: Record
    present: bool  # its blob exists with the recorded size


def list_entries(layout: Layout) -> list[Listed]:
    """Every readable record, files and pack, sorted by key; a record's blob is
    checked by size only (a packed entry's body is in its row)."""
    out = [
        Listed(r, blob_size(layout, r.blob) == r.size)
        for _path, r in records(layout)
        if r is not None
    ]
    out += [Listed(r, True) for r, _key, _t in Pack(layout.pack).records() if r is not None]
    out.sort(key=lambda item: item.record.key)
    return out


# ---------------------------------------------------------------- purge


def module_keys(layout: Layout, module: str, version: str | None) -> list[str]:
    """Cache keys of ``module`` (every version, list, @latest) or of one version.

    Checksum-database lookups of the module are included. Nested modules
    (``module/sub``) are not: they are other modules. Raises RequestError for
    an invalid module path or version.
    """
    esc = escape_path(module)
    pack = Pack(layout.pack)
    if version is not None:
        escv = escape_version(version)
        keys = [_file_key(esc, escv, ext) for ext in FILE_KINDS]
        lookup = f"{esc}@{escv}"
    else:
        keys = [*_files_in(layout, f"{esc}/@v"), *pack.keys(f"{esc}/@v/"), f"{esc}/@latest"]
        lookup = f"{esc}@"
    exact = version is not None
    lookups = _sumdb_lookups(layout, lookup, exact=exact)
    lookups += [k for k in pack.keys("sumdb/") if _is_lookup_of(k, lookup, exact=exact)]
    return sorted(set(keys)) + sorted(set(lookups))


def _is_lookup_of(key: str, target: str, *, exact: bool) -> bool:
    """``sumdb/<db>/lookup/<target...>``: a checksum lookup of ``target``."""
    parts = key.split("/", 3)
    if len(parts) != 4 or parts[2] != "lookup":
        return False
    return parts[3] == target if exact else parts[3].startswith(target)


def _file_key(esc_module: str, esc_version: str, ext: str) -> str:
    return parse_request_path(f"/{esc_module}/@v/{quote(esc_version, safe='')}.{ext}").cache_key


def _files_in(layout: Layout, key_dir: str) -> list[str]:
    directory = os.path.join(layout.index, key_dir)
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return [f"{key_dir}/{n}" for n in names if os.path.isfile(os.path.join(directory, n))]


def _sumdb_lookups(layout: Layout, target: str, *, exact: bool) -> list[str]:
    sumdb = os.path.join(layout.index, "sumdb")
    prefix_dir, _, name = target.rpartition("/")
    out = []
    for db in _listdir(sumdb):
        key_dir = f"sumdb/{db}/lookup" + (f"/{prefix_dir}" if prefix_dir else "")
        for key in _files_in(layout, key_dir):
            leaf = key.rsplit("/", 1)[1]
            if (leaf == name) if exact else leaf.startswith(name):
                out.append(key)
    return out


def _listdir(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []


def purge(layout: Layout, keys: list[str]) -> tuple[int, int]:
    """Remove these entries (record first, then blob); returns (entries, bytes)."""
    removed = size = 0
    pack = Pack(layout.pack)
    for key in keys:
        record = read_record(layout, layout.record_path(key))
        if record is not None:
            remove_entry(layout, key, record.blob)
            removed += 1
            size += record.size
        in_pack = pack.record(key)
        if in_pack is not None and pack.delete(key):
            removed += 1
            size += in_pack.size
    pack.close()
    if removed:
        mark_changed(layout)
    return removed, size


# ---------------------------------------------------------------- verify


@dataclass(slots=True)
class VerifyReport:
    checked: int = 0
    bytes: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)  # (key or path, reason)


def verify_all(layout: Layout, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Hash every entry; evict and report each one whose bytes do not match its record."""
    report = VerifyReport()
    items = list(records(layout))
    pack = Pack(layout.pack)
    rows = pack.records()
    total = len(items) + len(rows)
    for n, (path, record) in enumerate(items, 1):
        problem = _check(layout, path, record)
        report.checked += 1
        if record is not None:
            report.bytes += record.size
        if problem is not None:
            report.bad.append((record.key if record else layout.key_of(path), problem))
        if progress is not None:
            progress(n, total)
    for n, (packed, key, _t) in enumerate(rows, len(items) + 1):
        problem = _check_packed(pack, key, packed)
        report.checked += 1
        if packed is not None:
            report.bytes += packed.size
        if problem is not None:
            report.bad.append((key, problem))
        if progress is not None:
            progress(n, total)
    pack.close()
    if report.bad:
        mark_changed(layout)
    return report


def _check(layout: Layout, path: str, record: Record | None) -> str | None:
    if record is None:
        _unlink(path)
        return "unreadable record (removed)"
    try:
        hashed = hash_file(layout.blob_path(record.blob))
    except OSError as exc:
        remove_entry(layout, record.key, record.blob)
        return f"blob unreadable: {exc.strerror or exc} (evicted)"
    except CacheIntegrityError as exc:
        remove_entry(layout, record.key, record.blob)
        return f"blob {exc} (evicted)"
    problem = hashed.problem(record)
    if problem is not None:
        remove_entry(layout, record.key, record.blob)
        return f"{problem} (evicted)"
    # The bytes are right: whatever changed the file's identity (a copy, a
    # restore from backup, a touch) is recorded, so hits stop re-hashing it.
    rewrite_record(layout, record.evolve(verified=time.time(), identity=hashed.identity))
    return None


def _check_packed(pack: Pack, key: str, record: Record | None) -> str | None:
    if record is None:
        pack.delete(key)
        return "unreadable record in the pack (removed)"
    body = pack.body(key, record.blob)
    if body is None:
        return None  # replaced or removed since the listing: not this entry any more
    if len(body) != record.size or hashlib.sha256(body).hexdigest() != record.sha256:
        pack.delete(key, record.blob)
        return f"size {len(body)} (recorded {record.size}) or sha256 mismatch (evicted)"
    pack.rewrite(record.evolve(verified=time.time()))
    return None


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
