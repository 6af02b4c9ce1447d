"""A fill's whole stored body handed to a reader as a file (FillReader.whole_file):
gated readers once the gate passed, late joiners of a complete fill; readers
that follow a running fill still get chunks."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from multidict import CIMultiDict

from sidecar.cache.fill import Fill, FillState, Sink
from sidecar.errors import UpstreamIntegrityError
from tests.unit.test_cache_fill import REQ, Source, start, temp

BODY = [bytes([i]) * 9 for i in range(12)]


class Gate:
    """Passes the body if it is ``want`` (read back from the stored file)."""

    def __init__(self, want: bytes) -> None:
        self.want = want
        self.checked = asyncio.Event()

    def sink(self) -> Sink | None:
        return None

    async def check(self, path: str) -> None:
        self.checked.set()
        if Path(path).read_bytes() != self.want:
            raise UpstreamIntegrityError("up0", "m@v", "zip", "h1:want", "h1:got")

    def unchecked(self, reason: str) -> None:
        raise AssertionError(reason)


def new_fill(src: Source, tmp_path: Path, gate: Gate | None = None) -> Fill:
    return Fill(REQ, src, CIMultiDict(), temp(tmp_path), limit=10_000, gate=gate)  # type: ignore[arg-type]


async def test_gated_readers_are_each_handed_the_stored_file(tmp_path: Path) -> None:
    body = b"".join(BODY)
    src = Source(BODY)
    fill = new_fill(src, tmp_path, Gate(body))
    readers = [fill.join() for _ in range(4)]
    task = start(fill)
    waiting = [asyncio.ensure_future(r.whole_file()) for r in readers if r is not None]
    await asyncio.sleep(0.01)
    assert not any(w.done() for w in waiting)  # held: nothing before the check
    src.finish()
    assert await task is True
    files = await asyncio.gather(*waiting)
    assert fill.file_reads == 4
    # Concurrent readers do not move one another: positional reads of one fd.
    for f in files:
        assert f is not None and f.size == len(body)
        f.seek(5)
    assert all(f.read(20) == body[5:25] for f in files if f is not None)
    # The commit renames the file, an eviction unlinks it: the fd still reads.
    moved = tmp_path / "blob"
    os.rename(tmp_path / "fill.part", moved)
    os.unlink(moved)
    for f in files:
        assert f is not None
        f.seek(0)
        assert f.read() == body
        f.close()
        with pytest.raises(ValueError):
            f.read(1)
    assert fill.readers == 0
    await fill.end()


async def test_a_refused_body_reaches_gated_readers_as_the_failure(tmp_path: Path) -> None:
    src = Source(BODY)
    fill = new_fill(src, tmp_path, Gate(b"something else"))
    reader = fill.join()
    assert reader is not None
    task = start(fill)
    src.finish()
    assert await task is False
    with pytest.raises(UpstreamIntegrityError):
        await reader.whole_file()
    assert fill.file_reads == 0
    reader.close()
    await fill.end()


async def test_readers_of_a_running_fill_stream_and_late_joiners_get_the_file(
    tmp_path: Path,
) -> None:
    body = b"".join(BODY)
    src = Source(BODY)
    fill = new_fill(src, tmp_path)
    early = fill.join()
    assert early is not None
    task = start(fill)
    assert await early.whole_file() is None  # still arriving: chunk by chunk
    first = await early.next_chunk()
    src.finish()
    assert await task is True and fill.state is FillState.COMPLETE
    late = fill.join()
    assert late is not None
    whole = await late.whole_file()
    assert whole is not None
    assert await early.whole_file() is None  # it already has bytes: it goes on streaming
    assert bytes(first or b"") + await early.read_all() == body
    assert whole.read() == body
    whole.close()
    early.close()
    assert fill.file_reads == 1 and fill.readers == 0
    await fill.end()
