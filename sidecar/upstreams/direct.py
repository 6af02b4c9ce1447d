"""The default backend: HTTP/1.1 keep-alive straight to an http or https upstream.

Per request the work is: pop an idle connection, write one prebuilt byte
string (method + base path + path + the constant header block built once per
upstream), wait for the headers, hand the body over as it is buffered. No
URL objects, no per-request header dicts, no timer handles.

A reused connection that the server closed while it sat idle shows up as
EOF or a reset before the first byte of the answer; the request is then sent
once more on a fresh connection (GET and HEAD are idempotent), so a stale
keep-alive never becomes a failure the breaker counts.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Final
from urllib.parse import quote, urlsplit

from sidecar.config import TimeoutsConfig
from sidecar.errors import UpstreamConnectError
from sidecar.upstreams.base import ERROR_BODY_LIMIT, USER_AGENT, Backend, UpstreamResponse
from sidecar.upstreams.http1 import DONE, Connection, StaleConnection
from sidecar.upstreams.pool import Origin, Pool

if TYPE_CHECKING:
    from sidecar.upstreams.client import Upstream

# RFC 3986 pchar and "/": what a request target may carry unescaped.
_UNSAFE: Final = re.compile(r"[^A-Za-z0-9\-._~!$&'()*+,;=:@/]")
_SAFE_CHARS: Final = "/!$&'()*+,;=:@~"


def encode_path(path: str) -> bytes:
    """A decoded GOPROXY path as request-target bytes (escaped only if needed)."""
    if _UNSAFE.search(path):
        path = quote(path, safe=_SAFE_CHARS)
    return path.encode("ascii")


def encode_target(url: str) -> bytes:
    """Path and query of an absolute URL (already escaped by whoever sent it)."""
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return quote(target, safe=_SAFE_CHARS + "%?").encode("ascii")


def header_block(origin: Origin, authorization: str | None, keep_alive: bool) -> bytes:
    """Everything after the request target: constant for an upstream."""
    lines = [
        " HTTP/1.1",
        f"Host: {origin.host_header()}",
        f"User-Agent: {USER_AGENT}",
        # Identity keeps Content-Length meaningful for truncation checks and
        # makes cached bytes independent of what a client negotiated.
        "Accept-Encoding: identity",
        "Connection: keep-alive" if keep_alive else "Connection: close",
    ]
    if authorization is not None:
        lines.append(f"Authorization: {authorization}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class Http1Response(UpstreamResponse):
    """An answer on a pooled (or one-shot) connection."""

    __slots__ = ("_conn", "_idle", "_pool")

    def __init__(self, upstream: Upstream, conn: Connection, pool: Pool, idle: float) -> None:
        assert conn.headers is not None
        super().__init__(upstream, conn.status, conn.headers, conn.length)
        self._conn: Connection | None = conn
        self._pool = pool
        self._idle = idle

    @property
    def buffered(self) -> int:
        """Body bytes received and not yet taken (bounded by flow control)."""
        return self._conn.buffered if self._conn is not None else 0

    @property
    def peak_buffered(self) -> int:
        return self._conn.peak_buffered if self._conn is not None else 0

    async def chunks(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None:
            raise UpstreamConnectError(self.upstream.name, "response already released")
        try:
            while True:
                data = conn.take()
                if data:
                    yield data
                    continue
                if conn.state == DONE:
                    return
                if conn.error is not None:
                    raise conn.error
                await conn.wait_body(self._idle)
        except asyncio.CancelledError:
            self.release(reuse=False)  # the client left: free the slot now
            raise

    async def read_text(self, limit: int = ERROR_BODY_LIMIT) -> str:
        conn = self._conn
        if conn is None:
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

    def _finish(self, reuse: bool) -> None:
        conn = self._conn
        if conn is not None:
            self._conn = None
            self._pool.release(conn, reuse)


class DirectBackend(Backend):
    """Pooled HTTP/1.1 to one origin; one-shot connections for redirects elsewhere."""

    def __init__(
        self,
        name: str,
        url: str,
        limit: int,
        timeouts: TimeoutsConfig,
        authorization: str | None,
    ) -> None:
        self.name = name
        origin = Origin.of(url)
        base = urlsplit(url).path.rstrip("/")
        self._base = quote(base, safe=_SAFE_CHARS + "%").encode("ascii") + b"/"
        tick = min(timeouts.connect, timeouts.first_byte, timeouts.idle) / 8
        self.pool = Pool(name, origin, limit, timeouts.connect, timeouts.idle, tick)
        self._idle = timeouts.idle
        self._tail = header_block(origin, authorization, keep_alive=True)
        self._get = b"GET " + self._base
        self._head = b"HEAD " + self._base

    def describe(self) -> str:
        return "http1"

    async def start(self) -> None:
        self.pool.start()

    async def close(self) -> None:
        await self.pool.close()

    def send(
        self, upstream: Upstream, method: str, path: str, deadline: float
    ) -> Awaitable[UpstreamResponse]:
        if method == "GET":
            prefix = self._get
        elif method == "HEAD":
            prefix = self._head
        else:
            prefix = method.encode("ascii") + b" " + self._base
        request = prefix + encode_path(path) + self._tail
        return self._pooled(upstream, request, method == "HEAD", deadline)

    async def send_url(
        self, upstream: Upstream, method: str, url: str, deadline: float
    ) -> UpstreamResponse:
        origin = Origin.of(url)
        start = method.encode("ascii") + b" " + encode_target(url)
        if origin == self.pool.origin:
            return await self._pooled(upstream, start + self._tail, method == "HEAD", deadline)
        # Another origin: no credentials, no pooling (a redirect target is
        # per-artifact, typically a signed storage URL).
        request = start + header_block(origin, None, keep_alive=False)
        pool = self.pool
        conn = await pool.open(deadline, origin)
        try:
            await conn.send(request, method == "HEAD", deadline)
            conn.check()
        except BaseException:
            pool.release(conn, reuse=False)
            raise
        return Http1Response(upstream, conn, pool, self._idle)

    async def _pooled(
        self, upstream: Upstream, request: bytes, head: bool, deadline: float
    ) -> Http1Response:
        pool = self.pool
        conn = pool.acquire_nowait()
        if conn is None:
            conn = await pool.acquire(deadline)
        try:
            await conn.send(request, head, deadline)
            conn.check()
        except StaleConnection:
            conn = await pool.replace(conn, deadline)
            try:
                await conn.send(request, head, deadline)
                conn.check()
            except BaseException:
                pool.release(conn, reuse=False)
                raise
        except BaseException:
            pool.release(conn, reuse=False)
            raise
        return Http1Response(upstream, conn, pool, self._idle)
