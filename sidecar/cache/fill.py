"""One upstream body, fetched once, read by every client that asked for it.

The fetch runs in its own task, not in any client's handler, and goes on
to the end and is committed even when every reader has left: readers leave
at any moment, often right after the last byte (the go command closes
surplus keep-alive connections as soon as it has a body), and someone asked
for these bytes. The upstream timeouts and ``cache.max_bytes`` bound what is
fetched for nobody; a fill that can no longer be cached (degraded, below)
stops once nobody reads it. Mutable answers (lists, ``@latest``) are no
different: what is committed is the upstream's answer, fresh for
``mutable_ttl`` from then. Readers never talk to the upstream: they read
what has arrived so far and wait for more.

Where the bytes are::

    offset 0 ............ flushed ............ received
           [ temp file (pread in a thread)    ]
                    [ ring: recent chunks in memory      ]

The fetch appends each chunk to the ring, wakes the readers, and writes
the unflushed chunks to the temp file in batches (in a thread, hashing them
on the way). The ring keeps every unflushed chunk plus about ``RING_BYTES``
of flushed ones, so readers that keep up never touch the disk, and a late
joiner reads the file from the start, then catches up.

If the cache cannot take the body (disk full, I/O error, larger than
``cache.max_bytes``) the fill *degrades*: it stops writing, keeps serving
its readers from the file prefix and the ring, holds the ring to
``RING_BYTES`` by waiting for the slowest reader (backpressure, as a plain
proxy would), and accepts no new joiners once a byte they would need is
gone. A body is committed only if it arrived whole and was never degraded.

A fill with a ``gate`` (a ``.mod`` or ``.zip`` checked against the checksum
database, ``sidecar.proxy.integrity``) is stored, verified, then served:
readers get no byte until the whole body is on disk and the gate passed it.
A gate may take the bytes as they are written (its ``sink``, fed in the
same worker-thread step as the file), so that its check after the last byte
has little left to do. A body the gate refuses fails the fill like a cut
upstream (never served, never committed). A gated fill that degrades cannot
be checked: the gate decides whether its readers are released unchecked or
the fill fails.

A reader that starts once the whole body is on disk (released by its gate,
or joining a fill that already completed) is handed the stored file whole
(``FillReader.whole_file``) and sent like a hit, with sendfile; only readers
that follow a fill as it arrives read it chunk by chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import os
import threading
from bisect import bisect_right
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, TypeVar

from multidict import CIMultiDict

from sidecar.cache.layout import describe, write_all
from sidecar.errors import UpstreamConnectError, UpstreamError
from sidecar.goproxy import GoproxyRequest
from sidecar.upstreams import Upstream

log = logging.getLogger("sidecar.cache")

FLUSH_BYTES: Final = 256 * 1024  # write to disk in batches of about this much
RING_BYTES: Final = 1024 * 1024  # flushed bytes kept in memory for readers that keep up
# One pread of a reader that is behind, and one ring piece. 200 cold readers
# of a 50 MiB body peaked at 134-138 MB RSS with 64 KiB, 97-104 MB with 32 KiB,
# for 1.3 instead of 1.8 GB/s in all (bench/run.py --cases rss-200x50m).
READ_BYTES: Final = 32 * 1024

_T = TypeVar("_T")


class Sink(Protocol):
    """Takes a body's bytes in order, in a worker thread; never raises."""

    def feed(self, chunk: bytes) -> None: ...


class Gate(Protocol):
    """What a gated fill's body must pass before any reader gets a byte."""

    def sink(self) -> Sink | None:
        """What the body's bytes are fed to as they are written, if anything."""

    async def check(self, path: str) -> None:
        """Check the complete body at ``path``; raise UpstreamError to refuse it."""

    def unchecked(self, reason: str) -> None:
        """The body cannot be checked; raise UpstreamError to refuse it."""


class FillState(enum.Enum):
    RUNNING = "running"
    COMPLETE = "complete"  # the whole body arrived
    FAILED = "failed"  # the upstream failed or the fetch was cancelled


@dataclass(slots=True)
class TempFile:
    fd: int
    path: str
    blob: str  # the id it will have in blobs/
    hasher: Any = field(default_factory=hashlib.sha256)


class Body(Protocol):
    """What a fill reads: an upstream's answer (``UpstreamResponse``). A
    protocol, so that the unit tests can script a body's arrival chunk by
    chunk; compiled, a parameter of the class itself would refuse them."""

    @property
    def upstream(self) -> Upstream: ...

    @property
    def content_length(self) -> int | None: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    def chunks(self) -> AsyncIterator[bytes]: ...

    def release(self, reuse: bool = True) -> None: ...


class Fill:
    """The fetch of one body for one cache key; see the module docstring."""

    def __init__(
        self,
        req: GoproxyRequest,
        source: Body,
        headers: CIMultiDict[str],
        temp: TempFile | None,
        *,
        limit: int,
        keep: bool = False,
        on_end: Callable[[UpstreamError | None], None] | None = None,
        on_write_error: Callable[[str, OSError], None] | None = None,
        gate: Gate | None = None,
        flush_bytes: int = FLUSH_BYTES,
        ring_bytes: int = RING_BYTES,
        read_bytes: int = READ_BYTES,
    ) -> None:
        self.req = req
        self.key = req.cache_key
        self.source = source
        self.upstream = source.upstream.name
        self.headers = headers
        self.content_length = source.content_length
        self.content_type = source.headers.get("Content-Type", "")
        self.state = FillState.RUNNING
        self.error: UpstreamError | None = None
        self.received = 0
        self.flushed = 0
        self.committed = False
        self.task: asyncio.Task[None] | None = None
        self._temp = temp  # None once degraded: nothing more is written
        self._fd = temp.fd if temp is not None else None  # still read after a degrade
        self._temp_path = temp.path if temp is not None else None
        self._limit = limit
        # Smaller in tests, to cross every boundary with a few bytes.
        self._flush_bytes = flush_bytes
        self._ring_max = ring_bytes
        self._read_bytes = read_bytes
        self._keep = keep  # a `warm` fill has no readers and must not be stopped for it
        self._abandoned = False  # stopped because nobody would get the bytes
        self._on_end = on_end
        self._on_write_error = on_write_error
        self._starts: list[int] = []
        self._bufs: list[bytes] = []
        self._head = 0
        self._ring_bytes = 0
        self._pending: list[bytes] = []
        self._readers: set[FillReader] = set()
        self._waiters: list[asyncio.Future[None]] = []
        self._space: asyncio.Future[None] | None = None
        self._io_busy = 0
        self._ended = False
        self._gate = gate
        self._sink = gate.sink() if gate is not None else None
        self.file_reads = 0  # readers handed the whole stored file (FillReader.whole_file)

    # -- readers ---------------------------------------------------------------

    @property
    def cacheable(self) -> bool:
        return self._temp is not None

    @property
    def held(self) -> bool:
        """Readers wait: the body is not yet whole and checked."""
        return self._gate is not None and self.state is FillState.RUNNING

    @property
    def readers(self) -> int:
        return len(self._readers)

    def join(self) -> FillReader | None:
        """A reader from offset 0, or None if this fill can no longer serve one."""
        if self._ended or self.state is FillState.FAILED:
            return None
        if self._ring_start() > self.flushed or (self.flushed and self._fd is None):
            return None  # degraded, and bytes a newcomer needs are gone
        reader = FillReader(self)
        self._readers.add(reader)
        return reader

    def _ring_start(self) -> int:
        return self._starts[self._head] if self._head < len(self._starts) else self.received

    def _chunk_at(self, offset: int) -> bytes | memoryview | None:
        """The ring's bytes from ``offset`` to the end of their chunk, if still held.
        A view, not a copy: 200 readers each holding a copied tail of a 256 KiB
        chunk were tens of megabytes."""
        if offset < self._ring_start():
            return None
        i = bisect_right(self._starts, offset, self._head) - 1
        start, buf = self._starts[i], self._bufs[i]
        return buf if offset == start else memoryview(buf)[offset - start :]

    async def _read_file(self, offset: int) -> bytes:
        fd = self._fd
        if fd is None:
            raise UpstreamConnectError(self.upstream, "fill data no longer available")
        size = min(self._read_bytes, self.flushed - offset)
        try:
            data = await self.io(os.pread, fd, size, offset)
        except OSError as exc:
            raise UpstreamConnectError(self.upstream, f"reading the fill: {describe(exc)}") from exc
        if not data:
            raise UpstreamConnectError(self.upstream, "fill file shorter than written")
        return data

    async def _changed(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        await fut

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def _advanced(self) -> None:
        """A reader moved on or left: a degraded fetch waiting for room may go on."""
        space = self._space
        if space is not None and not space.done():
            space.set_result(None)

    def _left(self, reader: FillReader) -> None:
        self._readers.discard(reader)
        self._advanced()
        if not self._readers:
            self._stop_if_unwanted()
            self._maybe_close()

    def _stop_if_unwanted(self) -> None:
        """Nobody reads and the body is not bound for the cache: the bytes would go nowhere."""
        if (
            self._temp is None
            and not self._readers
            and not self._keep
            and self.state is FillState.RUNNING
        ):
            self._abandoned = True
            self.cancel()

    # -- the fetch -------------------------------------------------------------

    async def run(self) -> bool:
        """Fetch the whole body. True if it arrived complete and is still bound for the cache."""
        try:
            if self._gate is not None and self._temp is None:
                self._ungate("no temp file to keep it in")
            async for chunk in self.source.chunks():
                # Ring pieces of at most READ_BYTES: each reader holds the piece
                # it is sending, and 200 readers spread over a 50 MiB body each
                # holding its own 256 KiB read were ~50 MB of peak RSS. Copies
                # also because the ring keeps references (no reused buffers).
                for start in range(0, len(chunk), self._read_bytes):
                    await self._take(bytes(chunk[start : start + self._read_bytes]))
            if self._temp is not None and self._pending:
                await self._flush()
            if self._gate is not None and self._temp_path is not None:
                await self._gate.check(self._temp_path)
        except UpstreamError as exc:
            self.source.release(reuse=False)
            self._finish(FillState.FAILED, exc)
            if self._on_end is not None:
                self._on_end(exc)
            return False
        except BaseException:
            self.source.release(reuse=False)
            self._finish(FillState.FAILED, UpstreamConnectError(self.upstream, "fetch cancelled"))
            if self._abandoned and self._on_end is not None:
                self._on_end(None)  # the upstream was answering fine: no failure of its own
            raise
        self.source.release()
        self._finish(FillState.COMPLETE, None)
        if self._on_end is not None:
            self._on_end(None)
        return self._temp is not None

    def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()

    async def _take(self, chunk: bytes) -> None:
        self._starts.append(self.received)
        self._bufs.append(chunk)
        self._ring_bytes += len(chunk)
        self.received += len(chunk)
        self._wake()
        if self._temp is not None:
            if self.received > self._limit:
                self._degrade(None)
            else:
                self._pending.append(chunk)
                if self.received - self.flushed >= self._flush_bytes:
                    await self._flush()
        if self._temp is None:
            await self._make_room()

    async def _flush(self) -> None:
        temp = self._temp
        assert temp is not None
        chunks, self._pending = self._pending, []
        try:
            await self.io(_write, temp, chunks, self._sink)
        except OSError as exc:
            self._degrade(exc)
            return
        self.flushed += sum(len(c) for c in chunks)
        self._trim()

    def _trim(self) -> None:
        """Drop flushed chunks beyond the ring budget (readers behind use the file)."""
        while (
            self._ring_bytes > self._ring_max
            and self._head < len(self._bufs)
            and self._starts[self._head] + len(self._bufs[self._head]) <= self.flushed
        ):
            self._drop_head()

    def _drop_head(self) -> None:
        self._ring_bytes -= len(self._bufs[self._head])
        self._head += 1
        if self._head >= 256:
            del self._starts[: self._head], self._bufs[: self._head]
            self._head = 0

    def _degrade(self, exc: OSError | None) -> None:
        """Stop caching this body; keep serving the readers it has, if any."""
        self._temp, self._pending = None, []
        self._stop_if_unwanted()
        if exc is not None:
            if self._on_write_error is not None:
                self._on_write_error(self.key, exc)
        else:
            log.info(
                "not cached: larger than cache.max_bytes",
                extra={"key": self.key, "limit": self._limit},
            )
        if self._gate is not None:
            why = describe(exc) if exc is not None else "larger than cache.max_bytes"
            self._ungate(f"not kept whole: {why}")

    def _ungate(self, reason: str) -> None:
        """A gated body that cannot be checked: the gate refuses it (raises) or
        its readers get it unchecked, as a plain proxy would serve it."""
        assert self._gate is not None
        self._gate.unchecked(reason)
        self._gate = self._sink = None
        self._wake()

    async def _make_room(self) -> None:
        """Degraded: hold the ring to its budget by waiting for the slowest reader."""
        while True:
            floor = max(self.flushed, min((r.offset for r in self._readers), default=self.received))
            while (
                self._head < len(self._bufs)
                and self._starts[self._head] + len(self._bufs[self._head]) <= floor
            ):
                self._drop_head()
            if self._ring_bytes <= self._ring_max or not self._readers:
                return
            self._space = asyncio.get_running_loop().create_future()
            try:
                await self._space
            finally:
                self._space = None

    def _finish(self, state: FillState, error: UpstreamError | None) -> None:
        self.state, self.error = state, error
        self._wake()
        self._advanced()

    # -- file lifetime -----------------------------------------------------------

    def sha256(self) -> str:
        assert self._temp is not None
        return str(self._temp.hasher.hexdigest())

    @property
    def temp(self) -> TempFile | None:
        return self._temp

    async def io(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run blocking file work in a thread. Shielded: a cancelled caller does not
        stop it, and the fd is not closed before it is done (no write can land
        in a reused descriptor)."""
        fut = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        self._io_busy += 1
        fut.add_done_callback(self._io_done)
        return await asyncio.shield(fut)

    def _io_done(self, fut: asyncio.Future[Any]) -> None:
        self._io_busy -= 1
        if not fut.cancelled():
            fut.exception()  # retrieved: a cancelled caller may never look at it
        self._maybe_close()

    async def end(self) -> None:
        """The fetch is over and no new reader may join: drop the temp file if unused."""
        self._ended = True
        if not self.committed and self._temp_path is not None:
            path, self._temp_path = self._temp_path, None
            with contextlib.suppress(OSError):
                await self.io(_unlink, path)
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self._ended and not self._readers and not self._io_busy and self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


class FillReader:
    """One client's position in a fill."""

    __slots__ = ("_closed", "fill", "offset")

    def __init__(self, fill: Fill) -> None:
        self.fill = fill
        self.offset = 0
        self._closed = False

    async def next_chunk(self) -> bytes | memoryview | None:
        """The next bytes, waiting for them if needed; None at the end of the body.

        Raises the fill's UpstreamError if the fetch failed: the body is not whole.
        """
        fill = self.fill
        while True:
            if fill.error is not None:
                raise fill.error
            if fill.held:  # stored, verified, then served
                await fill._changed()
                continue
            offset = self.offset
            if offset < fill.received:
                data = fill._chunk_at(offset)
                if data is None:
                    data = await fill._read_file(offset)
                self.offset = offset + len(data)
                fill._advanced()
                return data
            # The announced length reached is the end for this client: it has
            # every byte, and its answer need not wait for the last disk write.
            if fill.state is FillState.COMPLETE or offset == fill.content_length:
                return None
            await fill._changed()

    async def whole_file(self) -> BodyFile | None:
        """The whole body as one stored file to send, once this reader may have
        it, if every byte of it is on disk and none was read yet; None: read it
        with ``next_chunk``. Raises the fill's UpstreamError if the fetch failed.

        A gated fill's readers all start here, at once: read in 32 KiB steps
        through worker threads, a 50 MiB zip took 0.2-0.3 s more than the
        sendfile of a hit."""
        fill = self.fill
        while fill.held:
            await fill._changed()
        if fill.error is not None:
            raise fill.error
        fd = fill._fd
        if self.offset or fill.state is not FillState.COMPLETE or not fill.cacheable or fd is None:
            return None
        fill.file_reads += 1
        return BodyFile(self, fd, fill.received)

    async def read_all(self) -> bytes:
        parts = []
        while (chunk := await self.next_chunk()) is not None:
            parts.append(chunk)
        return b"".join(parts)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.fill._left(self)


class BodyFile:
    """A fill's complete stored body, for one reader to send whole (sendfile,
    or reads where the loop has none); closing it is that reader leaving.

    It shares the fill's descriptor, which stays open while the fill has
    readers: the commit's rename and an eviction's unlink do not touch it.
    Reads are positional, so concurrent readers never move one another's
    offset (a ``dup`` would share it); nothing writes to a complete fill.
    """

    __slots__ = ("_closed", "_fd", "_lock", "_pos", "_reader", "size")

    mode = "rb"  # asyncio's sendfile takes binary files only

    def __init__(self, reader: FillReader, fd: int, size: int) -> None:
        self._reader = reader
        self._fd = fd
        self.size = size
        self._pos = 0
        self._closed = False
        # A read runs in a worker thread (the copy without sendfile): a close
        # waits for it, so the fill cannot close the fd under it.
        self._lock = threading.Lock()

    def fileno(self) -> int:
        return self._fd

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET:
            raise ValueError("a body file seeks from its start only")
        self._pos = offset
        return offset

    def read(self, size: int = -1) -> bytes:
        with self._lock:
            if self._closed:
                raise ValueError("read of a closed body file")
            want = max(0, self.size - self._pos) if size < 0 else size
            data = os.pread(self._fd, want, self._pos)
            self._pos += len(data)
            return data

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._reader.close()


def _write(temp: TempFile, chunks: list[bytes], sink: Sink | None) -> None:
    """Worker thread: append to the temp file; the gate's sink takes the same bytes."""
    write_all(temp.fd, chunks, temp.hasher)
    if sink is not None:
        for chunk in chunks:
            sink.feed(chunk)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
