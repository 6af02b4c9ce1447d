"""Small entries packed in one SQLite file (``v1/small.db``) instead of two files each.

``.info``, ``.mod``, list and sumdb answers are most of a build's entries and
are tiny. As files, each one costs a blob and a record: two file creations
and two renames, about 280 µs of kernel CPU on this project's ext4 (a file
creation alone is ~70 µs), which capped committed small misses at ~3.5 k/s
and, on a pinned core, stole that time from the event loop. One SQLite
transaction per write-behind batch costs 2-16 µs per entry.

Same guarantees as the file layout: a row is written whole or not at all
(a transaction); nothing is fsynced (WAL, ``synchronous=NORMAL``), so a power
loss can lose recent rows, and the SHA-256 in the record is checked again
the first time an entry is served after a start.

A row has no file identity to check per hit: it changes only through SQLite.
Every read of a body from a row is hashed (a few µs for 4 KiB, against the
query and thread hop around it); a body kept in memory is the one that was
hashed, and the background scrub re-hashes every row, so a row changed behind
such a copy is found and evicted too. Any process may use the
file (the sidecar, ``cache purge|verify|ls``): WAL lets readers and the one
writer proceed together, ``busy_timeout`` covers the rest.

Methods block: call them from worker threads. One connection per ``Pack``,
serialised by a lock (sqlite3 releases the GIL while it works).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable
from typing import Any, Final

from sidecar.cache.layout import Record
from sidecar.errors import CacheError, CacheWriteError

MAX_BODY: Final = 4096  # larger bodies stay files: served with sendfile, not from a row
BUSY_TIMEOUT_MS: Final = 5000

# The record's fields as columns (no JSON to encode per row: that was a third
# of a commit), plus the body and the last access time.
_RECORD_COLUMNS: Final = (
    "key, kind, blob, size, sha256, content_type, stored, verified, immutable, upstream"
)
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    blob TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    content_type TEXT NOT NULL,
    stored REAL NOT NULL,
    verified REAL NOT NULL,
    immutable INTEGER NOT NULL,
    upstream TEXT NOT NULL,
    body BLOB NOT NULL,
    last_access REAL NOT NULL
)
"""
_INSERT: Final = (
    f"INSERT OR REPLACE INTO entries ({_RECORD_COLUMNS}, body, last_access) "
    f"VALUES ({', '.join('?' * 12)})"
)


class Pack:
    def __init__(self, path: str) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _conn(self, create: bool) -> sqlite3.Connection | None:
        if self._db is None:
            if not create and not os.path.exists(self.path):
                return None  # readers never create it (`cache ls` on an empty dir)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(_SCHEMA)
            self._db = db
        return self._db

    def put_many(self, items: Iterable[tuple[Record, bytes]]) -> None:
        """Store every (record, body) in one transaction; CacheWriteError if it failed."""
        rows = [
            (
                r.key,
                r.kind,
                r.blob,
                r.size,
                r.sha256,
                r.content_type,
                r.stored,
                r.verified,
                # An int: sqlite3 binds int, float, str and bytearray as they
                # are, and looks every other type up in its adapter registry
                # first (a bool took a tenth of a row's insert).
                int(r.immutable),
                r.upstream,
                body,
                r.stored,
            )
            for r, body in items
        ]
        with self._lock:
            try:
                db = self._conn(create=True)
                assert db is not None
                db.execute("BEGIN IMMEDIATE")
                try:
                    db.executemany(_INSERT, rows)
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise CacheWriteError(f"{self.path}: {exc}") from exc

    def body(self, key: str, blob: str) -> bytes | None:
        """The body stored for ``key`` if it is still this entry (``blob``)."""
        row = self._one("SELECT body FROM entries WHERE key = ? AND blob = ?", (key, blob))
        return None if row is None else bytes(row[0])

    def delete(self, key: str, blob: str | None = None) -> bool:
        """Remove ``key`` (only if it is still ``blob``, when given); True if a row went."""
        if blob is None:
            return self._change("DELETE FROM entries WHERE key = ?", (key,))
        return self._change("DELETE FROM entries WHERE key = ? AND blob = ?", (key, blob))

    def rewrite(self, record: Record) -> bool:
        """Replace a row's record (a new ``verified`` time) if it is still that entry."""
        return self._change(
            "UPDATE entries SET verified = ? WHERE key = ? AND blob = ?",
            (record.verified, record.key, record.blob),
        )

    def touch_many(self, items: Iterable[tuple[str, str, float]]) -> None:
        """Persist last access times: (key, blob, time)."""
        rows = [(t, k, b) for k, b, t in items]
        with self._lock:
            try:
                db = self._conn(create=False)
                if db is not None:
                    db.executemany(
                        "UPDATE entries SET last_access = ? WHERE key = ? AND blob = ?", rows
                    )
            except sqlite3.Error as exc:
                raise CacheWriteError(f"{self.path}: {exc}") from exc

    def records(self) -> list[tuple[Record | None, str, float]]:
        """Every row as (record or None when unreadable, key, last access)."""
        rows = self._all(f"SELECT {_RECORD_COLUMNS}, last_access FROM entries")
        return [(_record(row[:-1]), str(row[0]), float(row[-1])) for row in rows]

    def record(self, key: str) -> Record | None:
        """The record of ``key``'s row; None if there is none or it is unreadable."""
        row = self._one(f"SELECT {_RECORD_COLUMNS} FROM entries WHERE key = ?", (key,))
        return None if row is None else _record(row)

    def page(self, after: str, limit: int) -> list[tuple[str, str, int, str, bytes]]:
        """Up to ``limit`` rows with keys after ``after``, in key order, as
        (key, blob, size, sha256, body): the scrub's walk through the pack."""
        rows = self._all(
            "SELECT key, blob, size, sha256, body FROM entries WHERE key > ? ORDER BY key LIMIT ?",
            (after, limit),
        )
        return [(str(k), str(b), int(n), str(h), bytes(body)) for k, b, n, h, body in rows]

    def keys(self, prefix: str) -> list[str]:
        """Keys that start with ``prefix``."""
        rows = self._all(
            "SELECT key FROM entries WHERE substr(key, 1, ?) = ?", (len(prefix), prefix)
        )
        return [key for (key,) in rows]

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _one(self, sql: str, args: tuple[object, ...]) -> tuple[Any, ...] | None:
        rows = self._all(sql, args)
        return rows[0] if rows else None

    def _all(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                db = self._conn(create=False)
                return [] if db is None else list(db.execute(sql, args).fetchall())
            except sqlite3.Error as exc:
                raise CacheError(f"{self.path}: {exc}") from exc

    def _change(self, sql: str, args: tuple[object, ...]) -> bool:
        with self._lock:
            try:
                db = self._conn(create=False)
                return db is not None and db.execute(sql, args).rowcount > 0
            except sqlite3.Error as exc:
                raise CacheWriteError(f"{self.path}: {exc}") from exc


def _record(row: tuple[Any, ...]) -> Record | None:
    """A row's record columns as a Record; None if they do not make a sane one."""
    key, kind, blob, size, sha256, ctype, stored, verified, immutable, upstream = row
    try:
        record = Record(
            key, kind, blob, size, sha256, ctype, stored, verified, bool(immutable), upstream
        )
    except TypeError:  # compiled, a field of the wrong type is refused at once
        return None
    return record if record.valid() else None
