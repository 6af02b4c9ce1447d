"""The sidecar asking itself: a GET answered by its own request path.

The integrity checker's checksum-database answers (``sumdb/<name>/lookup``,
``/tile``) go through the same handler as a client's: routing, breakers of
the checksum traffic class, single flight and the cache (tiles are immutable,
kept like any client's). An ``Exchange`` over a ``Capture`` instead of a
socket collects the response, which is then parsed back.

With ``verify.url`` set, the database is asked directly (``direct_fetch``),
through an ``Upstream`` of its own: no routing, no breaker, no cache (the
verifier keeps what it authenticated in memory). ``walk_fetch`` asks the
upstreams in order, for the CLI (``cache verify --sumdb``), which runs
without a sidecar.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import IO, Any, Final

from sidecar.config import UpstreamConfig
from sidecar.errors import SumdbUnavailable, UpstreamBusy, UpstreamError
from sidecar.server import Exchange
from sidecar.server.exchange import DateHeader, SpliceSource
from sidecar.sumdb.lookup import Fetch
from sidecar.upstreams import Upstream

# The most of a checksum-database answer kept (a tile is 8 KiB at height 8;
# a lookup a few hundred bytes).
ANSWER_MAX: Final = 1 << 20


class Capture:
    """Stands in for a client connection: keeps what is written to it."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closing = False
        self.date = DateHeader()
        self.peer = ""  # the sidecar itself: no client address
        self.credential: Any = None

    def write(self, data: bytes | memoryview) -> None:
        if len(self.out) + len(data) > ANSWER_MAX + 64 * 1024:
            raise ConnectionResetError("answer too large")
        self.out += data

    async def drain(self) -> None:
        return None

    def check_open(self) -> None:
        return None

    def abort(self) -> None:
        return None

    async def sendfile(self, fobj: IO[bytes], offset: int, count: int) -> None:
        if count > ANSWER_MAX:
            raise ConnectionResetError("answer too large")
        self.out += await asyncio.to_thread(_pread, fobj, offset, count)

    @property
    def splices(self) -> bool:
        return False  # no socket: the answer is kept here

    async def splice(self, source: SpliceSource) -> bool:
        return False


def _pread(fobj: IO[bytes], offset: int, count: int) -> bytes:
    fobj.seek(offset)
    return fobj.read(count)


def handler_fetch(handle: Callable[[Exchange], Awaitable[None]]) -> Fetch:
    """A verifier's ``fetch`` (of ``sumdb/<name>/...`` paths) through ``handle``,
    the proxy's request path."""

    async def fetch(path: str) -> bytes:
        capture = Capture()
        target = f"/{path}"
        ex = Exchange(capture, "GET", target, [], True, True)
        await handle(ex)
        status, body = parse_response(bytes(capture.out))
        if status != 200:
            text = body[:200].decode("utf-8", "replace").strip()
            raise SumdbUnavailable(f"{target}: {status} {text}")
        return body

    return fetch


def direct_fetch(url: str, name: str) -> tuple[Fetch, Upstream]:
    """A verifier's ``fetch`` from the database ``name`` at ``url`` (``<url>/lookup/...``
    for ``sumdb/<name>/lookup/...``), and the Upstream to start and close with the sidecar."""
    upstream = Upstream(UpstreamConfig(name="sumdb", url=url), "sumdb")
    prefix = f"sumdb/{name}/"

    async def fetch(path: str) -> bytes:
        return await read_answer(upstream, path.removeprefix(prefix))

    return fetch, upstream


def walk_fetch(upstreams: list[Upstream]) -> Fetch:
    """A verifier's ``fetch`` through the upstreams' own ``sumdb/<name>/`` paths, in
    order, as a comma-separated GOPROXY (for tools that run without a sidecar)."""

    async def fetch(path: str) -> bytes:
        problems = []
        for upstream in upstreams:
            try:
                return await read_answer(upstream, path)
            except SumdbUnavailable as exc:
                problems.append(str(exc))
        raise SumdbUnavailable("; ".join(problems) or f"{path}: no upstream")

    return fetch


async def read_answer(upstream: Upstream, path: str) -> bytes:
    """The 200 body of ``path`` from ``upstream``; SumdbUnavailable otherwise."""
    where = f"{upstream.name}: {path}"
    try:
        resp = await upstream.open(path)
    except (UpstreamError, UpstreamBusy) as exc:
        raise SumdbUnavailable(f"{where}: {exc}") from exc
    try:
        if resp.status != 200:
            raise SumdbUnavailable(f"{where}: {resp.status} {await resp.read_text(200)}")
        parts, size = [], 0
        async for chunk in resp.chunks():
            size += len(chunk)
            if size > ANSWER_MAX:
                raise SumdbUnavailable(f"{where}: answer too large")
            parts.append(bytes(chunk))
    except UpstreamError as exc:
        raise SumdbUnavailable(f"{where}: {exc}") from exc
    finally:
        resp.release()
    return b"".join(parts)


def parse_response(raw: bytes) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.1 response as the server wrote it."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return 502, b"no answer"
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    chunked = any(
        line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower()
        for line in lines[1:]
    )
    return status, _dechunk(body) if chunked else body


def _dechunk(data: bytes) -> bytes:
    out: list[bytes] = []
    pos = 0
    while True:
        end = data.index(b"\r\n", pos)
        size = int(data[pos:end].split(b";", 1)[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(data[end + 2 : end + 2 + size])
        pos = end + 2 + size + 2
