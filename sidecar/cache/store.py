"""The disk cache: index, verification, fills, eviction, start-up and shutdown.

Request path (event loop, no file system call): ``lookup`` is a dict access.
Everything that touches the disk runs in a worker thread: the start-up scan,
hashing, temp files, commits, deletions, access-time persistence.

What is served is what was fetched: an entry's bytes are hashed on its first
serve after start; a blob is then checked on every hit with one ``fstat`` of
the descriptor it is sent from (``open_blob``), and hashed again before a byte
goes out if it changed; bytes read from a pack row or a small file are hashed
as they are read; the scrub (``sidecar.cache.scrub``) re-hashes everything
over time for what an ``fstat`` cannot see.

Start-up sweeps the temp files of dead processes (synchronously: it is one
directory listing), then scans the index in the background; until the scan
is merged every lookup misses and requests are simply proxied.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Final

from multidict import CIMultiDict

from sidecar.cache.fill import Fill, FillReader, Gate, TempFile
from sidecar.cache.flight import Flight, Flights
from sidecar.cache.index import Entry, Index, expiry
from sidecar.cache.layout import (
    Identity,
    Layout,
    Record,
    blob_size,
    change_stamp,
    commit,
    describe,
    hash_file,
    mismatch,
    new_blob_id,
    open_blob,
    open_temp,
    orphan_blobs,
    prepare,
    read_record,
    read_small,
    records,
    remove_entry,
    rewrite_record,
    sweep_temp,
)
from sidecar.cache.pack import MAX_BODY as PACK_MAX
from sidecar.cache.pack import Pack
from sidecar.cache.scrub import Scrub
from sidecar.cache.writeback import Pending, WriteBehind
from sidecar.config import CacheConfig
from sidecar.errors import CacheError, CacheIntegrityError, UpstreamError
from sidecar.goproxy import KIND_LABEL, GoproxyRequest
from sidecar.metrics import Metrics
from sidecar.upstreams import UpstreamResponse

log = logging.getLogger("sidecar.cache")

PERSIST_INTERVAL_S: Final = 60.0  # how often access times are written to the blobs' atime
CHANGES_POLL_S: Final = 1.0  # how soon a running sidecar sees `cache purge` or `warm`
SMALL_BODY_MAX: Final = 4096  # .info / .mod / list answers: served from memory
SMALL_BODIES_BUDGET: Final = 32 * 1024 * 1024  # memory all small bodies may hold
ORPHAN_GRACE_S: Final = 60.0  # an unnamed blob younger than this may be another process's commit


@dataclass(slots=True)
class ScanResult:
    # (record, last access, packed)
    entries: list[tuple[Record, float, bool]] = field(default_factory=list)
    dropped: int = 0
    orphans: int = 0


class DiskCache:
    """The sidecar's local cache; the proxy sees it through ``ModuleCache``."""

    def __init__(
        self, config: CacheConfig, metrics: Metrics, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        self.layout = Layout.at(config.dir)
        self.metrics = metrics
        self.max_bytes = config.max_bytes
        self.ttl = config.mutable_ttl
        self.flights = Flights()
        self._clock = clock
        self._index = Index()
        self._tasks: set[asyncio.Task[Any]] = set()  # loader, maintenance: cancelled at stop
        self._chores: set[asyncio.Task[Any]] = set()  # file deletions: awaited at stop
        self._fills: set[asyncio.Task[Any]] = set()
        self._pressure: asyncio.Event | None = None
        self._loaded: asyncio.Event | None = None
        self._started_at = 0.0
        self._small_bytes = 0  # held by Entry.body of small entries
        # Read at scrape time: setting two gauges on every commit was a few
        # percent of a small miss.
        metrics.cache_bytes.set_function(lambda: self._index.bytes)
        metrics.cache_entries.set_function(lambda: len(self._index))
        self.pack = Pack(self.layout.pack)
        self._writeback = WriteBehind(self.layout, self.pack, self._written)
        self.scrub = Scrub(self, config.scrub_rate, metrics) if config.scrub_rate > 0 else None

    # -- request path ------------------------------------------------------------

    def lookup(self, req: GoproxyRequest, allow_stale: bool) -> Entry | None:
        entry = self._index.get(req.cache_key)
        if entry is None:
            return None
        now = self._clock()
        if not allow_stale and entry.expires <= now:
            return None
        self._index.touch(entry, now)
        return entry

    def is_stale(self, entry: Entry) -> bool:
        return entry.expires <= self._clock()

    def age(self, entry: Entry) -> int:
        return max(0, int(self._clock() - entry.record.stored))  # (every hit: no property)

    async def verify(self, entry: Entry) -> bool:
        """True if servable: hashed (in a thread) on its first serve in this process
        and again after its blob changed; one hash for all concurrent callers.
        Evicts a mismatch."""
        if entry.verified:
            return True
        if entry.removed:
            return False
        if entry.verifying is None or entry.verifying.done():
            entry.verifying = asyncio.ensure_future(self._verify(entry))
        return await asyncio.shield(entry.verifying)

    async def _verify(self, entry: Entry) -> bool:
        try:
            if entry.packed:
                self._hold(entry, await asyncio.to_thread(_row, self.pack, entry.record))
                entry.verified = True
                return True
            hashed = await asyncio.to_thread(hash_file, entry.path)
        except OSError as exc:
            reason = describe(exc)
        except CacheError as exc:
            reason = str(exc)
        else:
            problem = hashed.problem(entry.record)
            if problem is None:
                self.trust(entry, hashed.identity)
                return True
            reason = problem
        self.discard(entry, reason)
        return False

    def trust(self, entry: Entry, identity: Identity) -> None:
        """A file entry's bytes, with this identity, just matched its record: it is
        served on one ``fstat`` while the blob keeps that identity. A new identity
        (an old record without one, a touched or copied file) is written to the
        record too, so the check holds across restarts."""
        entry.verified = True
        if identity == entry.record.identity or entry.removed:
            return
        entry.record = entry.record.evolve(identity=identity)
        if entry.on_disk:
            self._chore(asyncio.to_thread(_rewrite_quietly, self.layout, entry.record))

    def _hold(self, entry: Entry, data: bytes) -> None:
        if (
            entry.body is None
            and not entry.removed
            and self._small_bytes + len(data) <= SMALL_BODIES_BUDGET
        ):
            entry.body = data
            self._small_bytes += len(data)

    async def small_body(self, entry: Entry) -> bytes | None:
        """The bytes of a small verified entry, kept in memory after the first read.

        .info and .mod hits are most of a build's requests; one write from
        memory costs about half of a sendfile response for them (measured:
        16.9k vs 10.5k req/s). Bounded by SMALL_BODIES_BUDGET in all.
        """
        if entry.body is not None:
            return entry.body
        if entry.packed:  # no file to send: from the row, kept if the budget allows
            try:
                data = await asyncio.to_thread(_row, self.pack, entry.record)
            except CacheError as exc:
                self.discard(entry, str(exc))
                return None
            self._hold(entry, data)
            return data
        if entry.size > SMALL_BODY_MAX or self._small_bytes + entry.size > SMALL_BODIES_BUDGET:
            return None
        try:
            data, identity = await asyncio.to_thread(read_small, entry.path, entry.record)
        except OSError as exc:
            self.discard(entry, describe(exc))
            return None
        except CacheIntegrityError as exc:
            self.discard(entry, str(exc))
            return None
        self.trust(entry, identity)
        self._hold(entry, data)
        return data

    async def open_blob(self, entry: Entry) -> BinaryIO | None:
        """The entry's blob, open for sending, checked with one ``fstat`` of that
        descriptor against the identity its bytes last matched the record with.

        A blob that changed since (rewritten, replaced, touched) is hashed again
        before it is returned; None if it no longer matches, or cannot be opened:
        the entry is then evicted and the caller fetches it again. Call between
        ``acquire`` and ``release``; the caller closes the file.
        """
        # Twice at most: a descriptor opened just before a concurrent hit re-hashed
        # a replaced file holds the old file; the second open gets the new one.
        for _attempt in range(2):
            opened = await self._open(entry)
            if opened is None:
                return None
            fobj, found = opened
            if entry.verified and found == entry.record.identity:
                return fobj  # the hit path: one fstat, compared here
            try:
                if found != entry.record.identity:
                    entry.verified = False  # changed on disk since its bytes were hashed
                good = await self.verify(entry)
            except BaseException:
                fobj.close()
                raise
            if good and found == entry.record.identity:
                return fobj  # the bytes just hashed are the ones this descriptor holds
            fobj.close()
            if not good:
                return None  # evicted
        self.discard(entry, "keeps changing on disk")
        return None

    async def _open(self, entry: Entry) -> tuple[BinaryIO, Identity] | None:
        fut = asyncio.get_running_loop().run_in_executor(None, open_blob, entry.path)
        try:
            return await asyncio.shield(fut)
        except OSError as exc:
            self.discard(entry, describe(exc))
            return None
        except asyncio.CancelledError:
            fut.add_done_callback(_close_opened)
            raise

    def acquire(self, entry: Entry) -> bool:
        """Hold the entry's blob while it is served; False if it is gone already
        (or packed: a row has no file to send)."""
        if entry.removed or entry.packed:
            return False
        entry.readers += 1
        return True

    def release(self, entry: Entry) -> None:
        entry.readers -= 1
        if entry.readers == 0 and entry.removed and entry.on_disk:
            self._remove_files(entry)

    def discard(self, entry: Entry, reason: str) -> None:
        """An entry's bytes are not what was recorded: evict it, count it, say so."""
        if not entry.removed:
            self.metrics.cache_integrity_failures.inc()
            log.warning(
                "cache entry failed verification; evicted, will be fetched again",
                extra={"key": entry.key, "reason": reason},
            )
        self._drop(entry)

    def flight(self, req: GoproxyRequest) -> tuple[Flight, bool]:
        """Enter the single flight for ``req``: (flight, True if the caller leads it)."""
        flight, leader = self.flights.enter(req.cache_key)
        if not leader:
            self.metrics.cache_fill_joins.inc()
        return flight, leader

    def land(self, flight: Flight) -> None:
        self.flights.leave(flight)

    async def start_fill(
        self,
        req: GoproxyRequest,
        source: UpstreamResponse,
        headers: CIMultiDict[str],
        flight: Flight | None,
        on_end: Callable[[UpstreamError | None], None] | None = None,
        gate: Gate | None = None,
    ) -> FillReader | None:
        """Fetch ``source``'s body once into the cache; the caller gets the first reader.

        None when the body is announced larger than the cache: proxy it plainly.
        """
        if source.content_length is not None and source.content_length > self.max_bytes:
            return None
        try:
            fill = await self._new_fill(req, source, headers, on_end, keep=False, gate=gate)
        except BaseException:
            source.release(reuse=False)
            raise
        reader = fill.join()
        assert reader is not None  # a fresh fill always takes its first reader
        self._launch(fill)
        if flight is not None:
            self.flights.attach(flight, fill)
        return reader

    def takes_small(self, size: int | None) -> bool:
        """True if a body of ``size`` bytes may be kept with ``keep_small``."""
        return size is not None and size <= self.max_bytes and self._writeback.running

    def keep_small(
        self, req: GoproxyRequest, body: bytes, content_type: str, upstream: str
    ) -> None:
        """Cache a whole body already in memory: indexed and served from memory
        now, committed to disk by the write-behind queue (``cache.writeback``)."""
        now = self._clock()
        size = len(body)
        record = Record(
            req.cache_key,
            KIND_LABEL[req.kind],
            new_blob_id(),
            size,
            hashlib.sha256(body).hexdigest(),
            sys.intern(content_type),  # one copy for 100 k entries, not 100 k
            now,
            now,
            req.immutable,
            upstream,
        )
        packed = size <= PACK_MAX
        entry = Entry(
            record,
            "" if packed else self.layout.blob_path(record.blob),  # a row has no file
            expiry(record, self.ttl),
            now,
            verified=True,
            on_disk=False,
            packed=packed,
            body=body,
        )
        if not self._writeback.add(entry, body):
            if self._writeback.running:
                self.metrics.cache_write_skips.inc()  # the disk is behind
            return
        self._small_bytes += size
        old = self._index.put(entry)
        if old is not None:
            self._retire(old)
        self._changed()

    def _written(self, item: Pending) -> None:
        entry = item.entry
        if item.error is not None:
            self._write_error(entry.key, item.error)
            self._drop(entry)  # it is only in memory: forget it, fetch it again
            return
        entry.on_disk = item.written
        if item.record is not None:
            entry.record = item.record  # with its blob's identity
        if entry.removed:
            if entry.on_disk and entry.readers == 0:
                self._remove_files(entry)  # evicted or replaced while it was written
            return
        if entry.size > SMALL_BODY_MAX or self._small_bytes > SMALL_BODIES_BUDGET:
            entry.body = None  # served from its file from now on
            self._small_bytes -= entry.size

    async def written(self) -> None:
        """Until the small entries cached so far are on disk (tests, ``stop``)."""
        await self._writeback.drained()

    async def prefetch(
        self,
        req: GoproxyRequest,
        source: UpstreamResponse,
        gate: Gate | None = None,
        on_end: Callable[[UpstreamError | None], None] | None = None,
    ) -> Fill:
        """Fetch a body into the cache with no client reading it (``warm``, HEAD)."""
        fill = await self._new_fill(req, source, CIMultiDict(), on_end, keep=True, gate=gate)
        self._launch(fill)
        return fill

    def summary(self) -> dict[str, int]:
        return {"entries": len(self._index), "bytes": self._index.bytes}

    # -- fills -------------------------------------------------------------------

    async def _new_fill(
        self,
        req: GoproxyRequest,
        source: UpstreamResponse,
        headers: CIMultiDict[str],
        on_end: Callable[[UpstreamError | None], None] | None,
        keep: bool,
        gate: Gate | None = None,
    ) -> Fill:
        temp = await self._open_temp(req.cache_key)
        return Fill(
            req,
            source,
            headers,
            temp,
            limit=self.max_bytes,
            keep=keep,
            on_end=on_end,
            on_write_error=self._write_error,
            gate=gate,
        )

    async def _open_temp(self, key: str) -> TempFile | None:
        blob = new_blob_id()
        fut = asyncio.get_running_loop().run_in_executor(None, open_temp, self.layout, blob)
        try:
            fd, path = await asyncio.shield(fut)
        except OSError as exc:
            self._write_error(key, exc)
            return None
        except asyncio.CancelledError:
            fut.add_done_callback(_close_abandoned)
            raise
        return TempFile(fd, path, blob)

    def _launch(self, fill: Fill) -> None:
        task = asyncio.get_running_loop().create_task(self._run_fill(fill))
        fill.task = task
        self._fills.add(task)
        task.add_done_callback(self._fills.discard)

    async def _run_fill(self, fill: Fill) -> None:
        # No await in a finally: compiled (sidecar/compiled.py), the exception
        # it re-raises is read from the thread's state, which the tasks that run
        # during the await change (a cancelled fill re-raised another task's
        # SumdbUnavailable). The exception is kept here and raised by name.
        cancelled: BaseException | None = None
        try:
            if await fill.run():
                await self._commit(fill)
        except Exception:
            log.exception("cache fill failed unexpectedly", extra={"key": fill.key})
        except BaseException as exc:
            cancelled = exc
        self.flights.finished(fill)
        await fill.end()
        if cancelled is not None:
            raise cancelled

    async def _commit(self, fill: Fill) -> None:
        temp = fill.temp
        assert temp is not None
        now = self._clock()
        record = Record(
            key=fill.key,
            kind=fill.req.kind.value,
            blob=temp.blob,
            size=fill.received,
            sha256=fill.sha256(),
            content_type=fill.content_type,
            stored=now,
            verified=now,
            immutable=fill.req.immutable,
            upstream=fill.upstream,
        )
        try:
            record = await fill.io(commit, self.layout, temp.fd, temp.path, record)
        except CacheError as exc:
            self._write_error(fill.key, exc)
            return
        fill.committed = True
        entry = Entry(
            record, self.layout.blob_path(temp.blob), expiry(record, self.ttl), now, verified=True
        )
        old = self._index.put(entry)
        if old is not None:
            self._retire(old)
        self._changed()

    def _write_error(self, key: str, exc: OSError | CacheError) -> None:
        self.metrics.cache_write_errors.inc()
        error = describe(exc) if isinstance(exc, OSError) else str(exc)
        log.warning(
            "cache write failed; proxying without caching", extra={"key": key, "error": error}
        )

    # -- eviction and removal ------------------------------------------------------

    def _changed(self) -> None:
        if self._index.bytes > self.max_bytes and self._pressure is not None:
            self._pressure.set()

    def _drop(self, entry: Entry) -> None:
        if self._index.remove(entry):
            self._changed()
        self._retire(entry)

    def _retire(self, entry: Entry) -> None:
        """Out of the index: delete its files now, or when its last reader is done."""
        if entry.removed:
            return
        entry.removed = True
        if entry.body is not None:
            self._small_bytes -= len(entry.body)
            entry.body = None
        if entry.readers == 0 and entry.on_disk:
            self._remove_files(entry)  # else the write-behind removes them once written

    def _remove_files(self, entry: Entry) -> None:
        if entry.packed:
            self._chore(asyncio.to_thread(_unpack_quietly, self.pack, entry.key, entry.record.blob))
        else:
            self._chore(
                asyncio.to_thread(_remove_quietly, self.layout, entry.key, entry.record.blob)
            )

    def _chore(self, work: Coroutine[Any, Any, None]) -> None:
        """File work that must finish even at shutdown (``stop`` awaits it)."""
        task = asyncio.get_running_loop().create_task(work)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    # -- scrub (sidecar.cache.scrub) -------------------------------------------------

    def file_entries(self) -> list[Entry]:
        return [e for e in self._index.lru() if not e.packed]

    def discard_row(self, key: str, blob: str, reason: str) -> None:
        entry = self._index.get(key)
        if entry is not None and entry.packed and entry.record.blob == blob:
            self.discard(entry, reason)
            return
        # Not indexed (any more, or not yet): the row alone goes.
        self.metrics.cache_integrity_failures.inc()
        log.warning("cache row failed verification; removed", extra={"key": key, "reason": reason})
        self._chore(asyncio.to_thread(_unpack_quietly, self.pack, key, blob))

    def evict(self) -> int:
        """Drop least recently used entries until the bound holds; returns how many."""
        excess = self._index.bytes - self.max_bytes
        if excess <= 0:
            return 0
        victims: list[Entry] = []
        for entry in self._index.lru():
            if excess <= 0:
                break
            if entry.readers == 0:
                victims.append(entry)
                excess -= entry.size
        for entry in victims:
            self._index.remove(entry)
            self._retire(entry)
        self.metrics.cache_evictions.inc(len(victims))
        self._changed()
        if victims:
            log.debug(
                "cache evicted",
                extra={"entries": len(victims), "bytes": self._index.bytes, "max": self.max_bytes},
            )
        return len(victims)

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        self._pressure = asyncio.Event()
        self._loaded = asyncio.Event()
        self._started_at = self._clock()
        try:
            swept = await asyncio.to_thread(_prepare_and_sweep, self.layout)
        except OSError as exc:
            self.metrics.cache_write_errors.inc()
            log.error(
                "cache directory unusable; proxying without caching until restart",
                extra={"dir": self.layout.root, "error": describe(exc)},
            )
            self._loaded.set()
        else:
            self._spawn(self._load(swept))
        self._spawn(self._maintain())
        if self.scrub is not None:
            self._spawn(self.scrub.run())
        self._writeback.start()
        self._changed()

    async def wait_loaded(self) -> None:
        assert self._loaded is not None, "DiskCache.start() was not awaited"
        await self._loaded.wait()

    async def stop(self) -> None:
        await self._writeback.stop()
        for task in (*self._fills, *self._tasks):
            task.cancel()
        await asyncio.gather(*self._fills, *self._tasks, return_exceptions=True)
        await asyncio.gather(*self._chores, return_exceptions=True)
        await self._persist_access()
        self.pack.close()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _load(self, swept: int) -> None:
        assert self._loaded is not None
        try:
            result = await asyncio.to_thread(
                scan, self.layout, self.pack, self._started_at - ORPHAN_GRACE_S
            )
        except OSError as exc:
            log.error("cache scan failed; starting empty", extra={"error": describe(exc)})
            result = ScanResult()
        # Most recent first, each put at the LRU end: entries committed while
        # the scan ran stay the most recently used.
        for record, last_access, packed in sorted(result.entries, key=lambda e: e[1], reverse=True):
            entry = Entry(
                record,
                "" if packed else self.layout.blob_path(record.blob),
                expiry(record, self.ttl),
                last_access,
                packed=packed,
            )
            if self._index.get(record.key) is not None:
                self._retire(entry)  # replaced while we scanned: only its blob goes
            else:
                self._index.put(entry, oldest=True)
        self._changed()
        self._loaded.set()
        log.info(
            "cache loaded",
            extra={
                "dir": self.layout.root,
                "entries": len(self._index),
                "bytes": self._index.bytes,
                "dropped": result.dropped,
                "orphans": result.orphans,
                "temp_swept": swept,
            },
        )

    async def _maintain(self) -> None:
        """Evict when a commit pushed the cache over its bound; persist access times;
        re-read the index when another process (``cache purge``, ``warm``) changed it."""
        assert self._pressure is not None and self._loaded is not None
        persisted = time.monotonic()
        await self._loaded.wait()
        stamp = await asyncio.to_thread(change_stamp, self.layout)
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CHANGES_POLL_S):
                    await self._pressure.wait()
            if self._pressure.is_set():
                self._pressure.clear()
                self.evict()
            if time.monotonic() - persisted >= PERSIST_INTERVAL_S:
                persisted = time.monotonic()
                await self._persist_access()
            latest = await asyncio.to_thread(change_stamp, self.layout)
            if latest != stamp:
                stamp = latest
                await self._reconcile()

    async def _reconcile(self) -> None:
        """Forget entries whose record another process removed; adopt ones it added."""
        known: dict[str, str] = {}  # file entries: key -> blob
        packed: dict[str, str] = {}  # pack rows
        for e in self._index.lru():
            if e.on_disk:
                (packed if e.packed else known)[e.key] = e.record.blob
        try:
            gone, added = await asyncio.to_thread(diff_index, self.layout, known)
            gone_packed, added_packed = await asyncio.to_thread(diff_pack, self.pack, packed)
        except (OSError, CacheError) as exc:
            error = describe(exc) if isinstance(exc, OSError) else str(exc)
            log.warning("cache index re-read failed", extra={"error": error})
            return
        for key in gone:
            entry = self._index.get(key)
            if entry is not None and entry.on_disk and entry.record.blob == known[key]:
                self._drop(entry)
        for key in gone_packed:
            entry = self._index.get(key)
            if entry is not None and entry.on_disk and entry.record.blob == packed[key]:
                self._drop(entry)
        adopted = 0
        for record, is_packed in [(r, False) for r in added] + [(r, True) for r in added_packed]:
            if self._index.get(record.key) is None:
                path = "" if is_packed else self.layout.blob_path(record.blob)
                self._index.put(
                    Entry(record, path, expiry(record, self.ttl), record.stored, packed=is_packed)
                )
                adopted += 1
        self._changed()
        log.info(
            "cache index changed by another process",
            extra={
                "dropped": len(gone) + len(gone_packed),
                "adopted": adopted,
                "entries": len(self._index),
            },
        )

    async def _persist_access(self) -> None:
        touched = self._index.touched()
        files = [(e.path, e.last_access) for e in touched if not e.packed]
        packed = [(e.key, e.record.blob, e.last_access) for e in touched if e.packed]
        if files:
            await asyncio.to_thread(_set_atimes, files)
        if packed:
            try:
                await asyncio.to_thread(self.pack.touch_many, packed)
            except CacheError as exc:
                log.warning("cache access times not saved", extra={"error": str(exc)})


# ---------------------------------------------------------------- worker threads


def _prepare_and_sweep(layout: Layout) -> int:
    prepare(layout)
    return sweep_temp(layout)


def scan(layout: Layout, pack: Pack, orphan_before: float) -> ScanResult:
    """Every sane entry with its last access; broken records and orphan blobs are removed."""
    result = ScanResult()
    try:
        rows = pack.records()
    except CacheError as exc:
        rows = []
        _set_aside(pack, exc)
    for packed_record, key, last_access in rows:
        if packed_record is None:
            with contextlib.suppress(CacheError):
                pack.delete(key)
            result.dropped += 1
        else:
            result.entries.append((packed_record, max(last_access, packed_record.stored), True))
    known: set[str] = set()
    for path, record in records(layout):
        if record is None or blob_size(layout, record.blob) != record.size:
            with contextlib.suppress(OSError):
                os.unlink(path)
            if record is not None:
                _remove_quietly(layout, record.key, record.blob)
            result.dropped += 1
            continue
        known.add(record.blob)
        try:
            atime = os.stat(layout.blob_path(record.blob)).st_atime
        except OSError:
            atime = record.stored
        result.entries.append((record, max(atime, record.stored), False))
    for path in orphan_blobs(layout, known, orphan_before):
        with contextlib.suppress(OSError):
            os.unlink(path)
            result.orphans += 1
    return result


def diff_index(layout: Layout, known: dict[str, str]) -> tuple[list[str], list[Record]]:
    """Keys of ``known`` (key → blob) whose record is gone or names another blob,
    and the sane records on disk that ``known`` lacks or has with another blob."""
    gone: list[str] = []
    added: list[Record] = []
    seen: set[str] = set()
    for directory, _dirs, files in os.walk(layout.index):
        for name in files:
            path = os.path.join(directory, name)
            key = layout.key_of(path)
            if key in known:
                seen.add(key)
                continue
            record = read_record(layout, path)
            if record is not None and blob_size(layout, record.blob) == record.size:
                added.append(record)
    for key, blob in known.items():
        if key not in seen:
            gone.append(key)
        else:
            record = read_record(layout, layout.record_path(key))
            if record is not None and record.blob != blob:  # purged, then warmed again
                gone.append(key)
                if blob_size(layout, record.blob) == record.size:
                    added.append(record)
    return gone, added


def diff_pack(pack: Pack, known: dict[str, str]) -> tuple[list[str], list[Record]]:
    """``diff_index`` for the pack: keys of ``known`` whose row is gone or holds
    another entry, and the rows ``known`` lacks."""
    rows = {key: record for record, key, _t in pack.records() if record is not None}
    gone = [key for key, blob in known.items() if key not in rows or rows[key].blob != blob]
    added = [r for key, r in rows.items() if known.get(key) != r.blob]
    return gone, added


def _set_aside(pack: Pack, exc: CacheError) -> None:
    """An unreadable pack (not SQLite, corrupt): keep it for a post-mortem under
    another name and start a new one. Its entries are fetched again."""
    pack.close()
    aside = f"{pack.path}.broken-{int(time.time())}"
    with contextlib.suppress(OSError):
        os.rename(pack.path, aside)
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(OSError):
            os.unlink(pack.path + suffix)
    log.error("cache pack unreadable; set aside", extra={"error": str(exc), "moved_to": aside})


def _unpack_quietly(pack: Pack, key: str, blob: str) -> None:
    try:
        pack.delete(key, blob)
    except CacheError as exc:
        log.warning("cache entry removal failed", extra={"key": key, "error": str(exc)})


def _row(pack: Pack, record: Record) -> bytes:
    """A packed entry's body, hashed as it is read (a few µs for 4 KiB: a row
    changed through SQLite is never served); CacheError if missing or wrong."""
    data = pack.body(record.key, record.blob)
    if data is None:
        raise CacheError("missing from the pack")
    problem = mismatch(record, len(data), hashlib.sha256(data).hexdigest())
    if problem is not None:
        raise CacheIntegrityError(problem)
    return data


def _rewrite_quietly(layout: Layout, record: Record) -> None:
    try:
        rewrite_record(layout, record)
    except (OSError, CacheError) as exc:
        log.warning("cache record not updated", extra={"key": record.key, "error": str(exc)})


def _remove_quietly(layout: Layout, key: str, blob: str) -> None:
    try:
        remove_entry(layout, key, blob)
    except (OSError, CacheError) as exc:
        log.warning("cache entry removal failed", extra={"key": key, "error": str(exc)})


def _set_atimes(items: list[tuple[str, float]]) -> None:
    # The mtime is set to what it is now, never to what it was recorded as:
    # that would hide a change from the identity check of the next hit.
    for path, atime in items:
        with contextlib.suppress(OSError):
            os.utime(path, ns=(int(atime * 1e9), os.stat(path).st_mtime_ns))


def _close_opened(fut: asyncio.Future[tuple[BinaryIO, Identity]]) -> None:
    """A blob opened for a request that was cancelled meanwhile."""
    if not fut.cancelled() and fut.exception() is None:
        fut.result()[0].close()


def _close_abandoned(fut: asyncio.Future[tuple[int, str]]) -> None:
    """A temp file opened for a request that was cancelled meanwhile."""
    if fut.cancelled() or fut.exception() is not None:
        return
    fd, path = fut.result()
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(path)
