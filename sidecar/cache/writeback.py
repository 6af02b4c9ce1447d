"""Write-behind for small bodies: served from memory at once, put on disk in batches.

A small cache miss (.info, .mod, list answers: most of a build's requests)
used to go through a fill: a task, a temp file opened in one worker-thread
hop, written in another, committed in a third. Those hops, not the bytes,
were most of its cost (about 380 µs of CPU for a 100-byte ``.info``). Here
the body is already whole in memory when the client is answered, so the
entry goes into the index at once (served from memory) and one writer task
commits the queued bodies in batches, one worker-thread hop per batch.

Durability is unchanged: bodies of up to 4 KiB go to the pack
(``cache.pack``, one SQLite transaction per batch), larger ones are committed
with the same temp file → rename → record order as a fill, the record being
the commit point, so a crash loses queued entries (they are fetched again),
never leaves half of one visible. The queue is bounded (``BACKLOG_*``): when the disk cannot keep
up, further small answers are served without being cached, and counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final

from sidecar.cache.index import Entry
from sidecar.cache.layout import Layout, Record, commit_bytes
from sidecar.cache.pack import Pack
from sidecar.errors import CacheError

log = logging.getLogger("sidecar.cache")

BACKLOG_BYTES: Final = 8 * 1024 * 1024  # bodies waiting for the disk, at most
# Entries waiting, at most. A file pair costs ~280 µs of kernel CPU on this
# machine's ext4, so a storm of unique misses can outrun the writer; beyond
# this the excess is served uncached (and counted) rather than held in memory.
BACKLOG_ITEMS: Final = 2048
BATCH_ITEMS: Final = 256  # bodies committed per worker-thread hop, at most
# A short wait before taking a batch that is not full: at 10 k misses/s one
# transaction then carries ~20 entries instead of 2-3 (a commit has a fixed cost).
COALESCE_S: Final = 0.002
STOP_WAIT_S: Final = 10.0  # a graceful shutdown waits this long for the queue


class Pending:
    """One small entry waiting for the disk, then what its write did.

    A plain class: compiled, a dataclass keeps an interpreted ``__init__``
    (2 k instructions per small miss; this one is 0.2 k)."""

    __slots__ = ("body", "entry", "error", "record", "written")

    def __init__(self, entry: Entry, body: bytes) -> None:
        self.entry = entry
        self.body = body
        self.written = False
        self.error: CacheError | None = None
        self.record: Record | None = None  # as committed to a file: with the blob's identity


class WriteBehind:
    """The queue of small entries indexed but not yet on disk, and its writer."""

    def __init__(
        self,
        layout: Layout,
        pack: Pack,
        on_written: Callable[[Pending], None],
        backlog_bytes: int = BACKLOG_BYTES,
        backlog_items: int = BACKLOG_ITEMS,
    ) -> None:
        self._layout = layout
        self._pack = pack
        self._on_written = on_written
        self._limit = backlog_bytes
        self._max_items = backlog_items
        self._queue: list[Pending] = []
        self._bytes = 0  # queued and being written
        self._items = 0  # queued and being written
        self._wakeup: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None

    def add(self, entry: Entry, body: bytes) -> bool:
        """Queue ``entry`` for the disk; False if full or stopped (not cached)."""
        if self._task is None or self._wakeup is None or self._idle is None:
            return False
        size = len(body)
        items = self._items
        if self._bytes + size > self._limit or items >= self._max_items:  # no room left
            return False
        self._queue.append(Pending(entry, body))
        self._bytes += size
        self._items = items + 1
        # idle is set exactly while nothing is queued or being written: only
        # the add that ends an idle spell clears it (an Event call is a Python
        # call, and this runs on every small miss).
        if not items:
            self._idle.clear()
        self._wakeup.set()
        return True

    def start(self) -> None:
        self._wakeup, self._idle = asyncio.Event(), asyncio.Event()
        self._idle.set()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def drained(self) -> None:
        """Until every body queued so far is committed (or has failed)."""
        if self._idle is not None:
            await self._idle.wait()

    async def stop(self) -> None:
        """Commit what is queued, then stop: a graceful shutdown keeps its misses."""
        task, self._task = self._task, None
        if task is None:
            return
        try:
            await asyncio.wait_for(self.drained(), STOP_WAIT_S)
        except TimeoutError:
            log.warning(
                "cache writer still busy at shutdown; queued entries are not kept",
                extra={"entries": self._items},
            )
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        assert self._wakeup is not None and self._idle is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            if len(self._queue) < BATCH_ITEMS:
                await asyncio.sleep(COALESCE_S)
            self._wakeup.clear()
            while self._queue:
                batch = self._queue[:BATCH_ITEMS]
                del self._queue[:BATCH_ITEMS]
                live = [p for p in batch if not p.entry.removed]  # evicted while queued
                if live:
                    # Shielded: a stop() that cancels us mid-batch must not leave
                    # a batch half written with its callbacks never run.
                    try:
                        await asyncio.shield(
                            loop.run_in_executor(None, _write, self._layout, self._pack, live)
                        )
                    except Exception as exc:  # a bug, not a disk error: keep writing
                        log.exception("cache writer failed", extra={"entries": len(live)})
                        for item in live:
                            if not item.written and item.error is None:
                                item.error = CacheError(f"cache writer failed: {exc!r}")
                for item in batch:
                    self._bytes -= len(item.body)
                    self._items -= 1
                    self._on_written(item)
            self._idle.set()


def _write(layout: Layout, pack: Pack, batch: list[Pending]) -> None:
    """Worker thread: packed entries in one transaction, the others as files;
    one failure does not stop the others."""
    packed = [item for item in batch if item.entry.packed]
    if packed:
        try:
            pack.put_many((item.entry.record, item.body) for item in packed)
        except CacheError as exc:
            for item in packed:
                item.error = exc
        else:
            for item in packed:
                item.written = True
    for item in batch:
        if item.entry.packed:
            continue
        try:
            item.record = commit_bytes(layout, item.body, item.entry.record)
        except CacheError as exc:
            item.error = exc
        else:
            item.written = True
