"""What the request path needs from the local cache.

The proxy only sees this protocol; the disk store, its index and the
single-flight machinery live behind it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sidecar.goproxy import GoproxyRequest


@dataclass(frozen=True, slots=True)
class CachedEntry:
    path: Path
    size: int
    content_type: str
    stale: bool


class CacheFill(Protocol):
    """The tee for one upstream body: chunks in, an entry out only if complete."""

    async def write(self, chunk: bytes) -> None: ...

    async def commit(self) -> None: ...

    def abort(self) -> None: ...


class ModuleCache(Protocol):
    def lookup(self, req: GoproxyRequest, allow_stale: bool) -> CachedEntry | None:
        """A servable entry (fresh, or stale when allowed) or None; no I/O."""

    async def verify(self, entry: CachedEntry) -> bool:
        """Size and, first time since start, SHA-256 match; evicts on mismatch."""

    def begin_fill(
        self, req: GoproxyRequest, content_length: int | None, content_type: str
    ) -> CacheFill | None:
        """Start teeing an upstream body, or None when this answer is not cached."""

    def follow(self, req: GoproxyRequest) -> AsyncIterator[bytes] | None:
        """Bytes of a fill already in flight for ``req`` (single flight), or None."""
