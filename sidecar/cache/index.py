"""The in-memory index: every committed entry, in least-recently-used order.

Only the event loop touches it, so it needs no lock; a lookup is one dict
access and one ``move_to_end``. Access times live here and are written to
the blobs' atime lazily (see ``DiskCache``), so a restart keeps the LRU order.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from collections.abc import Iterator

from sidecar.cache.layout import Record


class Entry:
    """One committed entry. ``path`` is its blob ("" when packed: a row, no file);
    ``expires`` is inf when immutable.

    A plain class, not a dataclass: compiled, a dataclass keeps the
    interpreted ``__init__`` the dataclasses module generates (5 k
    instructions per small miss against 0.3 k for this one). Identity
    equality, as before (``eq=False``).
    """

    __slots__ = (
        "body",
        "expires",
        "last_access",
        "on_disk",
        "packed",
        "path",
        "readers",
        "record",
        "removed",
        "touched",
        "verified",
        "verifying",
    )

    def __init__(
        self,
        record: Record,
        path: str,
        expires: float,
        last_access: float,
        verified: bool = False,
        on_disk: bool = True,
        packed: bool = False,
        body: bytes | None = None,
    ) -> None:
        self.record = record
        self.path = path
        self.expires = expires
        self.last_access = last_access
        # Its bytes matched the SHA-256 in this process, while its blob had
        # record.identity: a hit that finds another identity hashes it again.
        self.verified = verified
        self.readers = 0  # requests serving it right now: its blob must stay put
        self.removed = False  # out of the index; its files go when the last reader is done
        self.touched = False  # accessed since access times were last persisted
        self.on_disk = on_disk  # False while a small entry waits in the write-behind queue
        self.packed = packed  # stored in the pack (v1/small.db), not as blob + record files
        self.verifying: asyncio.Future[bool] | None = None
        self.body = body  # small bodies, served from memory

    def __repr__(self) -> str:
        return f"Entry({self.record.key!r}, {self.path!r})"

    @property
    def key(self) -> str:
        return self.record.key

    @property
    def size(self) -> int:
        return self.record.size

    @property
    def content_type(self) -> str:
        return self.record.content_type

    @property
    def stored(self) -> float:
        return self.record.stored


def expiry(record: Record, mutable_ttl: float) -> float:
    return math.inf if record.immutable else record.stored + mutable_ttl


class Index:
    def __init__(self) -> None:
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Entry | None:
        return self._entries.get(key)

    def touch(self, entry: Entry, now: float) -> None:
        entry.last_access = now
        entry.touched = True
        self._entries.move_to_end(entry.key)

    def put(self, entry: Entry, *, oldest: bool = False) -> Entry | None:
        """Insert as most (or least) recently used; returns the entry it replaced."""
        record = entry.record  # not Entry's properties: a call each, on every miss
        key = record.key
        entries = self._entries
        old = entries.pop(key, None)
        if old is not None:
            self.bytes -= old.record.size
        entries[key] = entry
        if oldest:
            entries.move_to_end(key, last=False)
        self.bytes += record.size
        return old

    def remove(self, entry: Entry) -> bool:
        """Drop ``entry`` if it is still the one indexed under its key."""
        if self._entries.get(entry.key) is not entry:
            return False
        del self._entries[entry.key]
        self.bytes -= entry.size
        return True

    def lru(self) -> Iterator[Entry]:
        """Least recently used first; do not remove entries while iterating."""
        return iter(self._entries.values())

    def touched(self) -> list[Entry]:
        """Entries accessed since the last call, for persisting access times."""
        out = [e for e in self._entries.values() if e.touched]
        for entry in out:
            entry.touched = False
        return out
