"""An upstream's answer, handed out at response headers; the body follows."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Final

from multidict import CIMultiDictProxy, istr

from sidecar.errors import UpstreamConnectError
from sidecar.upstreams.http1 import DONE, Connection, RawBody

if TYPE_CHECKING:
    from sidecar.upstreams.client import Upstream
    from sidecar.upstreams.pool import Pool

ERROR_BODY_LIMIT: Final = 1024
_CONTENT_ENCODING: Final = istr("Content-Encoding")  # its lookups skip case folding


def encoded(headers: CIMultiDictProxy[str]) -> str | None:
    """The Content-Encoding of an answer unless it is absent or identity."""
    value = headers.get(_CONTENT_ENCODING)
    if value is None:
        return None
    value = value.strip().lower()
    return None if value in ("", "identity") else value


class UpstreamResponse:
    """Headers of an answer; the body is read with ``chunks`` then ``release``.

    ``release`` must be called exactly once per response (more calls are
    no-ops): it gives the connection back to its pool (or closes it) and
    ends the request's ``Upstream.active``. ``headers`` is a case-insensitive
    mapping (``CIMultiDictProxy``).
    """

    __slots__ = (
        "_conn",
        "_counted",
        "_idle",
        "_pool",
        "_released",
        "content_length",
        "headers",
        "status",
        "ttfb",
        "upstream",
        "written",
    )

    def __init__(
        self, upstream: Upstream, conn: Connection, pool: Pool, idle: float, written: float
    ) -> None:
        """``written``: time.monotonic() when the request went out on ``conn``."""
        assert conn.headers is not None
        self.upstream = upstream
        self.status = conn.status
        self.headers = conn.headers
        self.content_length = conn.length
        self.ttfb = 0.0
        self.written = written
        self._conn: Connection | None = conn
        self._pool = pool
        self._idle = idle
        self._released = False
        # Set by Upstream.open when it hands the answer out (it is then part of
        # ``Upstream.active``); a followed redirect's answer never is.
        self._counted = False

    @property
    def buffered(self) -> int:
        """Body bytes received and not yet taken (bounded by flow control)."""
        return self._conn.buffered if self._conn is not None else 0

    @property
    def peak_buffered(self) -> int:
        return self._conn.peak_buffered if self._conn is not None else 0

    def arrived(self) -> bytes | None:
        """The whole body if all of it is here already (a small answer mostly
        comes in the read of its head), taken as ``chunks`` would yield it; None
        while more is to come."""
        conn = self._conn
        if conn is None or conn.state != DONE:
            return None
        return conn.take()

    def take(self) -> bytes:
        """The body bytes buffered so far (b"" if none), without waiting."""
        conn = self._conn
        return b"" if conn is None else conn.take()

    def raw_body(self) -> RawBody | None:
        """The rest of the body left in the upstream's socket for splice(2),
        after ``take``; None where that cannot be (see ``Connection.raw_body``)."""
        conn = self._conn
        return None if conn is None else conn.raw_body(self._idle)

    def chunks(self) -> Chunks:
        """Whatever is buffered, as it arrives; raises on a short or stalled body.

        UpstreamTruncated: the body ended before its Content-Length (or last
        chunk), or a body without either was cut by a reset;
        UpstreamTimeout: nothing arrived for ``timeouts.idle``.
        """
        conn = self._conn
        if conn is None:
            raise UpstreamConnectError(self.upstream.name, "response already released")
        return Chunks(self, conn)

    async def read_text(self, limit: int = ERROR_BODY_LIMIT) -> str:
        """A short prefix of the body, for error messages ("" if it cannot be
        read, or is encoded: compressed bytes are no message)."""
        conn = self._conn
        if conn is None or encoded(self.headers) is not None:
            return ""
        parts: list[bytes] = []
        size = 0
        try:
            while size < limit:
                data = conn.take()
                if data:
                    parts.append(data)
                    size += len(data)
                elif conn.state == DONE or conn.error is not None:
                    break
                else:
                    await conn.wait_body(self._idle)
        except asyncio.CancelledError:
            self.release(reuse=False)
            raise
        return b"".join(parts)[:limit].decode("utf-8", "replace").strip()

    def release(self, reuse: bool = True) -> None:
        """Give the connection back, or close it when ``reuse`` is False or the
        body was not read to its end. Idempotent."""
        if self._released:
            return
        self._released = True
        conn = self._conn
        if conn is not None:
            self._conn = None
            self._pool.release(conn, reuse)
        if self._counted:
            self.upstream._done()

    def __del__(self) -> None:
        # A caller that lost a response without releasing it would leak a pool
        # slot and inflate ``active`` (which feeds the saturation breaker).
        if not self._released:
            with contextlib.suppress(Exception):  # interpreter shutdown, closed loop
                self.release(reuse=False)


class Chunks:
    """``UpstreamResponse.chunks``: an iterator class, not an async generator,
    which mypyc cannot compile (this module runs on every request)."""

    __slots__ = ("_conn", "_response")

    def __init__(self, response: UpstreamResponse, conn: Connection) -> None:
        self._response = response
        self._conn = conn

    def __aiter__(self) -> Chunks:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        try:
            while True:
                data = conn.take()
                if data:
                    return data
                if conn.state == DONE:
                    raise StopAsyncIteration
                if conn.error is not None:
                    raise conn.error
                await conn.wait_body(self._response._idle)
        except asyncio.CancelledError:
            self._response.release(reuse=False)  # the client left: free the slot now
            raise
