"""Verified credentials, kept for a short TTL so bcrypt runs once per build.

The key is the SHA-256 of the whole ``Authorization`` value (scheme, user
and password, or the token): one hash of bytes already in hand, no decoding
on a hit, and the password itself is never kept. An entry lives ``ttl``
seconds from its verification; the table holds at most ``size`` entries, the
least recently used going first. ``clear`` (a reload of the credential
files) forgets every one, so a removed user is refused at once.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from sidecar.config import CredentialCacheConfig

V = TypeVar("V")


class CredentialCache(Generic[V]):
    def __init__(
        self, cfg: CredentialCacheConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = cfg.ttl
        self.size = cfg.size
        self._clock = clock
        self._table: OrderedDict[bytes, tuple[float, V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def get(self, key: bytes) -> V | None:
        entry = self.entry(key)
        return None if entry is None else entry[1]

    def entry(self, key: bytes) -> tuple[float, V] | None:
        """(expiry, value) of a live entry."""
        entry = self._table.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._table[key]
            return None
        self._table.move_to_end(key)
        return entry

    def put(self, key: bytes, value: V) -> None:
        self._table[key] = (self._clock() + self.ttl, value)
        self._table.move_to_end(key)
        while len(self._table) > self.size:
            self._table.popitem(last=False)

    def clear(self) -> None:
        self._table.clear()
