"""The fill mechanics with a scripted body source: ring, file, degrade, readers leaving."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict

from sidecar.cache.fill import Fill, FillState, TempFile
from sidecar.cache.flight import Flights, NotFound
from sidecar.cache.index import Entry, Index
from sidecar.config import UpstreamConfig
from sidecar.errors import UpstreamTruncated
from sidecar.goproxy import parse_request_path
from sidecar.upstreams import Upstream
from tests.unit.test_cache_layout import record

REQ = parse_request_path("/example.com/m/@v/v1.0.0.zip")


class Source:
    """Stands in for UpstreamResponse: yields scripted chunks, gated by a queue."""

    def __init__(self, chunks: list[bytes], fail_after: int | None = None) -> None:
        # A real one (never started: the fill reads its name only).
        self.upstream = Upstream(UpstreamConfig(name="up0", url="http://127.0.0.1:9"), "primary")
        self.headers = {"Content-Type": "application/zip"}
        self.content_length = sum(map(len, chunks))
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        for c in chunks:
            self.queue.put_nowait(c)
        self.fail_after = fail_after
        self.released: bool | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        n = 0
        while True:
            if self.fail_after is not None and n == self.fail_after:
                raise UpstreamTruncated("up0", "cut")
            chunk = await self.queue.get()
            if chunk is None:
                return
            n += 1
            yield chunk

    def finish(self) -> None:
        self.queue.put_nowait(None)

    def release(self, reuse: bool = True) -> None:
        self.released = reuse


def temp(tmp_path: Path) -> TempFile:
    path = tmp_path / "fill.part"
    return TempFile(os.open(path, os.O_RDWR | os.O_CREAT), str(path), "ab" * 16)


def new_fill(src: Source, file: TempFile | None, limit: int = 10_000, **hooks: Any) -> Fill:
    """A fill of REQ with ``src`` standing in for the upstream response."""
    return Fill(
        REQ,
        src,  # type: ignore[arg-type]
        CIMultiDict(),
        file,
        limit=limit,
        # Small, so that a few bytes cross every flush, ring and read boundary.
        flush_bytes=10,
        ring_bytes=20,
        read_bytes=7,
        **hooks,
    )


def start(fill: Fill) -> asyncio.Task[bool]:
    task = asyncio.ensure_future(fill.run())
    fill.task = task  # type: ignore[assignment]
    return task


async def test_readers_get_every_byte_and_the_file_matches(tmp_path: Path) -> None:
    chunks = [bytes([i]) * 6 for i in range(20)]
    body = b"".join(chunks)
    src = Source(chunks)
    fill = new_fill(src, temp(tmp_path))
    first = fill.join()
    assert first is not None
    task = start(fill)
    got = [await first.next_chunk() for _ in range(5)]
    src.finish()
    assert await task is True
    late = fill.join()  # joins after the ring dropped the start: reads the file
    assert late is not None
    assert b"".join(got) + await first.read_all() == body
    assert await late.read_all() == body
    assert fill.state is FillState.COMPLETE and fill.received == fill.flushed == len(body)
    assert Path(tmp_path / "fill.part").read_bytes() == body
    assert fill.sha256() == hashlib.sha256(body).hexdigest()
    assert src.released is True
    first.close()
    late.close()
    await fill.end()
    assert not (tmp_path / "fill.part").exists()  # not committed: removed


async def test_failure_reaches_every_reader_and_nothing_is_kept(tmp_path: Path) -> None:
    ended: list[object] = []
    src = Source([b"a" * 8, b"b" * 8, b"c" * 8], fail_after=2)
    fill = new_fill(src, temp(tmp_path), on_end=ended.append)
    readers = [fill.join(), fill.join()]
    assert await start(fill) is False
    for reader in readers:
        assert reader is not None
        with pytest.raises(UpstreamTruncated):
            await reader.read_all()
        reader.close()
    assert fill.join() is None
    assert isinstance(ended[0], UpstreamTruncated) and src.released is False
    await fill.end()
    assert not (tmp_path / "fill.part").exists()


async def test_the_fetch_goes_on_to_the_end_when_every_reader_left(tmp_path: Path) -> None:
    ended: list[object] = []
    src = Source([b"x" * 5, b"y" * 5])
    fill = new_fill(src, temp(tmp_path), on_end=ended.append)
    a, b = fill.join(), fill.join()
    assert a is not None and b is not None
    task = start(fill)
    await a.next_chunk()
    a.close()
    b.close()
    await asyncio.sleep(0.01)
    assert not task.done() and fill.readers == 0  # nobody reads, and it still fetches
    src.finish()
    assert await task is True  # complete, and bound for the cache
    assert fill.state is FillState.COMPLETE and src.released is True and ended == [None]
    assert Path(tmp_path / "fill.part").read_bytes() == b"x" * 5 + b"y" * 5


async def test_a_reader_ends_at_the_announced_length_without_waiting_for_the_fetch(
    tmp_path: Path,
) -> None:
    src = Source([b"a" * 6, b"b" * 6])  # announces 12 bytes; the end is not signalled yet
    fill = new_fill(src, temp(tmp_path))
    reader = fill.join()
    assert reader is not None
    task = start(fill)
    assert await asyncio.wait_for(reader.read_all(), 5) == b"a" * 6 + b"b" * 6
    assert fill.state is FillState.RUNNING  # the client has its body before the fetch ends
    reader.close()
    src.finish()
    assert await task is True


async def test_a_fill_that_cannot_be_cached_stops_when_its_last_reader_leaves(
    tmp_path: Path,
) -> None:
    ended: list[object] = []
    src = Source([b"y" * 9] * 3)  # 27 bytes, over the limit: degraded, served only
    fill = new_fill(src, temp(tmp_path), limit=20, on_end=ended.append)
    reader = fill.join()
    assert reader is not None
    task = start(fill)
    assert len(await reader.next_chunk() or b"") == 7
    await asyncio.sleep(0.01)
    assert not fill.cacheable and not task.done()
    reader.close()  # the bytes would go nowhere now
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fill.state is FillState.FAILED and src.released is False
    assert ended == [None]  # the upstream did nothing wrong
    await fill.end()
    assert not (tmp_path / "fill.part").exists()


async def test_a_readerless_fill_stops_once_it_degrades(tmp_path: Path) -> None:
    src = Source([b"z" * 9])
    src.content_length = None  # unannounced: the limit is found on the way
    fill = new_fill(src, temp(tmp_path), limit=20)
    reader = fill.join()
    assert reader is not None
    task = start(fill)
    assert await reader.next_chunk() is not None
    reader.close()
    await asyncio.sleep(0.01)
    assert not task.done()  # still bound for the cache: it goes on
    src.queue.put_nowait(b"z" * 30)  # over the limit: nobody would get these bytes
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fill.state is FillState.FAILED


async def test_write_error_degrades_to_a_bounded_ring_with_backpressure(tmp_path: Path) -> None:
    errors: list[OSError] = []
    path = tmp_path / "ro.part"
    path.write_bytes(b"")
    ro = TempFile(os.open(path, os.O_RDONLY), str(path), "ab" * 16)  # every write fails
    chunks = [bytes([i]) * 5 for i in range(30)]
    src = Source(chunks)
    src.finish()
    fill = new_fill(src, ro, on_write_error=lambda key, exc: errors.append(exc))
    slow = fill.join()
    assert slow is not None
    task = start(fill)
    await asyncio.sleep(0.05)
    assert not task.done()  # waiting for the slow reader: the ring is full
    assert fill._ring_bytes <= 20 + 5 and fill.received == 25
    head = [await slow.next_chunk() for _ in range(2)]
    await asyncio.sleep(0.05)
    assert fill.received == 35  # room was made, and taken again
    assert fill.join() is None  # bytes a newcomer would need are gone
    assert b"".join(head) + await slow.read_all() == b"".join(chunks)  # type: ignore[arg-type]
    assert await task is False  # complete, but not bound for the cache
    assert len(errors) == 1 and not fill.cacheable
    slow.close()
    await fill.end()


async def test_larger_than_the_limit_is_served_but_not_cached(tmp_path: Path) -> None:
    src = Source([b"y" * 9] * 4)
    src.finish()
    fill = new_fill(src, temp(tmp_path), limit=20)
    reader = fill.join()
    assert reader is not None
    task = start(fill)
    assert await reader.read_all() == b"y" * 36
    assert await task is False
    reader.close()
    await fill.end()
    assert not (tmp_path / "fill.part").exists()


async def test_joiners_waiting_on_a_flight_get_readers_at_publish(tmp_path: Path) -> None:
    flights = Flights()
    flight, leader = flights.enter("k")
    assert leader and flights.enter("k") == (flight, False)
    waiting = [asyncio.ensure_future(flight.outcome()) for _ in range(3)]
    await asyncio.sleep(0)
    src = Source([b"z" * 50])
    src.finish()
    fill = new_fill(src, None)
    first = fill.join()
    flight.publish(fill)
    readers = [await w for w in waiting]
    task = start(fill)  # memory only (no temp file): it waits for its slowest reader
    bodies = await asyncio.gather(
        *(
            r.read_all()
            for r in [first, *readers]  # type: ignore[union-attr]
        )
    )
    assert bodies == [b"z" * 50] * 4
    assert await task is False
    for r in [first, *readers]:
        r.close()  # type: ignore[union-attr]


async def test_a_settled_flight_answers_joiners_and_leaves_the_table() -> None:
    flights = Flights()
    flight, _ = flights.enter("k")
    waiter = asyncio.ensure_future(flight.outcome())
    await asyncio.sleep(0)
    flight.settle(NotFound(404, "gone"))
    flights.leave(flight)
    assert await waiter == NotFound(404, "gone")
    assert len(flights) == 0 and flights.enter("k")[1] is True


def test_index_is_lru_with_byte_accounting() -> None:
    index = Index()
    entries = {
        k: Entry(record(key=f"example.com/{k}/@v/list", size=n), "p", 0.0, 0.0)
        for k, n in (("a", 10), ("b", 20), ("c", 30))
    }
    for e in entries.values():
        index.put(e)
    index.touch(entries["a"], 1.0)
    assert [e.key.split("/")[1] for e in index.lru()] == ["b", "c", "a"]
    assert index.bytes == 60 and len(index) == 3
    replacement = Entry(record(key="example.com/b/@v/list", size=5), "p2", 0.0, 0.0)
    assert index.put(replacement) is entries["b"]
    assert index.bytes == 45
    assert index.remove(entries["b"]) is False  # not the indexed one any more
    assert index.remove(replacement) is True and index.bytes == 40
    assert [e.key for e in index.touched()] == [entries["a"].key] and index.touched() == []
