"""The background scrub: every cached entry hashed again, over time, at a bounded rate.

A hit checks its blob with one ``fstat`` (``layout.open_blob``): that finds a
file replaced, rewritten or touched since its bytes were last hashed, not a
same-size write that restores the mtime, not bit rot under an unchanged
inode, and not a pack row changed through SQLite while its entry is served
from memory. The scrub reads everything again at ``cache.scrub_rate`` bytes
per second, so such an entry is found within one pass and evicted (logged,
counted); the next request fetches it again.

A pass walks the pack's rows in key order, a page per worker-thread hop, then
the file entries the index held when the pass began, 1 MiB per hop, and after
each hop sleeps as long as those bytes take at the rate: a leaky bucket that
never saves up a burst. Each hop opens the file afresh and compares its
identity with the first hop's, so no descriptor outlives a hop and a stop
(a task cancellation) ends the scrub between two hops. Passes start at most
once per ``PASS_INTERVAL_S``: a small cache is not read again every few seconds.
The first starts ``FIRST_PASS_DELAY_S`` after start-up: until then every entry
is hashed on its first serve anyway, and a restart's scan and refills come first.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

from sidecar.cache.index import Entry
from sidecar.cache.layout import HASH_CHUNK, Hashed, Identity, describe
from sidecar.cache.pack import Pack
from sidecar.errors import CacheError
from sidecar.metrics import Metrics

log = logging.getLogger("sidecar.cache")

PASS_INTERVAL_S: Final = 3600.0
FIRST_PASS_DELAY_S: Final = 600.0
PAGE_ROWS: Final = 256  # pack rows hashed per worker-thread hop
# What one row costs against the rate, at least: reading it costs about a page
# of SQLite whatever its size, and 100 k rows of 200 bytes must not be a
# CPU-bound burst of queries.
ROW_COST_BYTES: Final = 4096


class Scrubbed(Protocol):
    """What the scrub needs from the store (``DiskCache``)."""

    pack: Pack

    async def wait_loaded(self) -> None: ...

    def file_entries(self) -> list[Entry]:
        """The file entries indexed now (not pack rows)."""

    def trust(self, entry: Entry, identity: Identity) -> None:
        """The entry's bytes, with this identity, just matched its record."""

    def discard(self, entry: Entry, reason: str) -> None:
        """Evict an entry whose bytes are not what was recorded; count and log it."""

    def discard_row(self, key: str, blob: str, reason: str) -> None:
        """The same for a pack row: its entry if it is indexed, else the row alone."""


@dataclass(slots=True)
class PassResult:
    ok: int = 0
    corrupt: int = 0
    bytes: int = 0


@dataclass(slots=True)
class _Page:
    last: str  # key of the last row read ("" when there were none)
    rows: int
    bytes: int
    bad: list[tuple[str, str, str]]  # (key, blob, reason)


class Scrub:
    def __init__(
        self,
        cache: Scrubbed,
        rate: int,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        delay: float = FIRST_PASS_DELAY_S,
        interval: float = PASS_INTERVAL_S,
    ) -> None:
        self._cache = cache
        self._rate = rate
        self._metrics = metrics
        self._clock = clock
        self._delay = delay
        self._interval = interval
        self._due = 0.0  # monotonic time the bytes read so far are paid for

    async def run(self) -> None:
        """Pass after pass until cancelled (``DiskCache.stop``)."""
        await self._cache.wait_loaded()
        await asyncio.sleep(self._delay)
        while True:
            started = time.monotonic()
            try:
                await self.run_pass()
            except Exception:  # a bug: keep the sidecar serving, try again next time
                log.exception("cache scrub pass failed")
            await asyncio.sleep(max(0.0, self._interval - (time.monotonic() - started)))

    async def run_pass(self) -> PassResult:
        """Hash every pack row and every file entry once; corrupt ones are evicted."""
        started = time.monotonic()
        result = PassResult()
        await self._rows(result)
        for entry in self._cache.file_entries():
            await self._file(entry, result)
        self._metrics.cache_scrub_last_pass.set(self._clock())
        log.info(
            "cache scrub pass done",
            extra={
                "ok": result.ok,
                "corrupt": result.corrupt,
                "bytes": result.bytes,
                "seconds": round(time.monotonic() - started, 3),
            },
        )
        return result

    async def _rows(self, result: PassResult) -> None:
        after = ""
        while True:
            try:
                page = await asyncio.to_thread(_check_rows, self._cache.pack, after)
            except CacheError as exc:
                log.warning("cache scrub could not read the pack", extra={"error": str(exc)})
                return
            if page.rows == 0:
                return
            after = page.last
            for key, blob, reason in page.bad:
                self._cache.discard_row(key, blob, f"found by the scrub: {reason}")
            self._counted(result, page.rows - len(page.bad), len(page.bad), page.bytes)
            await self._pace(max(page.bytes, page.rows * ROW_COST_BYTES))

    async def _file(self, entry: Entry, result: PassResult) -> None:
        if entry.removed or not entry.on_disk:
            return
        hasher = hashlib.sha256()
        first: Identity | None = None
        offset = 0
        try:
            while first is None or offset < first.size:
                n, identity = await asyncio.to_thread(_hash_piece, entry.path, offset, hasher)
                if first is None:
                    first = identity
                elif identity != first or n == 0:
                    return  # written while we read it: the next pass (or hit) judges it
                offset += n
                self._metrics.cache_scrub_bytes.inc(n)
                result.bytes += n
                await self._pace(n)
        except OSError as exc:
            problem: str | None = describe(exc)
        else:
            assert first is not None
            problem = Hashed(offset, hasher.hexdigest(), first).problem(entry.record)
        if entry.removed:
            return  # evicted or replaced meanwhile: not ours to judge any more
        if problem is None:
            assert first is not None
            self._cache.trust(entry, first)
            self._counted(result, 1, 0, 0)
        else:
            self._cache.discard(entry, f"found by the scrub: {problem}")
            self._counted(result, 0, 1, 0)

    def _counted(self, result: PassResult, ok: int, corrupt: int, nbytes: int) -> None:
        result.ok += ok
        result.corrupt += corrupt
        result.bytes += nbytes
        entries = self._metrics.cache_scrub_entries
        if ok:
            entries.labels("ok").inc(ok)
        if corrupt:
            entries.labels("corrupt").inc(corrupt)
        if nbytes:
            self._metrics.cache_scrub_bytes.inc(nbytes)

    async def _pace(self, cost: int) -> None:
        now = time.monotonic()
        self._due = max(self._due, now) + cost / self._rate
        await asyncio.sleep(self._due - now)


# ---------------------------------------------------------------- worker threads


def _hash_piece(path: str, offset: int, hasher: hashlib._Hash) -> tuple[int, Identity]:
    """Hash up to 1 MiB of ``path`` from ``offset``: (bytes read, the file's identity)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        identity = Identity.of(os.fstat(fd))
        chunk = os.pread(fd, HASH_CHUNK, offset)
    finally:
        os.close(fd)
    hasher.update(chunk)
    return len(chunk), identity


def _check_rows(pack: Pack, after: str) -> _Page:
    """Hash the next page of pack rows against the SHA-256 each row records."""
    page = _Page(after, 0, 0, [])
    for key, blob, size, sha256, body in pack.page(after, PAGE_ROWS):
        page.last = key
        page.rows += 1
        page.bytes += len(body)
        if len(body) != size or hashlib.sha256(body).hexdigest() != sha256:
            page.bad.append((key, blob, f"size {len(body)} (recorded {size}) or sha256 mismatch"))
    return page
