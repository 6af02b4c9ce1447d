"""What the request path needs from the local cache.

The proxy only sees this protocol; the disk store (``store.DiskCache``), its
index, the fills and the single-flight table live behind it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO, Protocol

from multidict import CIMultiDict

from sidecar.cache.fill import Fill, FillReader, Gate
from sidecar.cache.flight import Flight, NotFound, Whole
from sidecar.cache.index import Entry as CachedEntry
from sidecar.errors import UpstreamError
from sidecar.goproxy import GoproxyRequest
from sidecar.upstreams import UpstreamResponse

__all__ = ["CachedEntry", "FillReader", "Flight", "Gate", "ModuleCache", "NotFound", "Whole"]


class ModuleCache(Protocol):
    def lookup(self, req: GoproxyRequest, allow_stale: bool) -> CachedEntry | None:
        """A servable entry (fresh, or stale too when allowed) or None; no I/O."""

    def is_stale(self, entry: CachedEntry) -> bool:
        """True once a mutable entry is older than ``cache.mutable_ttl``."""

    def age(self, entry: CachedEntry) -> int:
        """Seconds since the entry was stored (the ``Age`` header)."""

    async def verify(self, entry: CachedEntry) -> bool:
        """SHA-256 checked on the first serve in this process (and after its file
        changed); a mismatch is evicted and False."""

    async def small_body(self, entry: CachedEntry) -> bytes | None:
        """A small verified entry's bytes from memory (read once), or None: use the file."""

    def acquire(self, entry: CachedEntry) -> bool:
        """Hold the entry's file while it is served; False if it was evicted meanwhile."""

    def release(self, entry: CachedEntry) -> None: ...

    async def open_blob(self, entry: CachedEntry) -> BinaryIO | None:
        """The held entry's file, open and checked (one ``fstat``) against what was
        hashed; None if it changed and no longer matches (evicted). The caller closes it."""

    def discard(self, entry: CachedEntry, reason: str) -> None:
        """The entry's file is not what was recorded: evict and count it."""

    def flight(self, req: GoproxyRequest) -> tuple[Flight, bool]:
        """Enter the single flight for ``req``: (flight, True if the caller leads it)."""

    def land(self, flight: Flight) -> None:
        """The leader is done walking the targets."""

    async def start_fill(
        self,
        req: GoproxyRequest,
        source: UpstreamResponse,
        headers: CIMultiDict[str],
        flight: Flight | None,
        on_end: Callable[[UpstreamError | None], None] | None = None,
        gate: Gate | None = None,
    ) -> FillReader | None:
        """Fetch the body once into the cache and return the caller's reader,
        or None when this body is not to be cached (the caller relays it).
        With a ``gate``, readers get no byte before the gate passed the whole body."""

    async def prefetch(
        self,
        req: GoproxyRequest,
        source: UpstreamResponse,
        gate: Gate | None = None,
        on_end: Callable[[UpstreamError | None], None] | None = None,
    ) -> Fill:
        """Fetch ``source``'s body into the cache with no client reading it."""

    def takes_small(self, size: int | None) -> bool:
        """True if a whole body of ``size`` bytes may be given to ``keep_small``."""

    def keep_small(
        self, req: GoproxyRequest, body: bytes, content_type: str, upstream: str
    ) -> None:
        """Cache a body already read whole; it is served from memory at once."""

    def summary(self) -> dict[str, int]:
        """``{"entries": ..., "bytes": ...}`` for the policy input."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...
