"""One HTTP/1.1 keep-alive connection: an asyncio protocol around httptools.

A connection carries one exchange at a time (no pipelining): ``send`` writes
a prebuilt request and returns a future done at complete response headers
(``check`` then raises a failure), then the body is read with ``take`` /
``wait_body`` until the state is DONE.

Why httptools (llhttp) and not aiohttp's own parser: measured on this
machine, a typical nginx answer (5 headers, 106 B body) costs 1.4 µs with
httptools including the CIMultiDict of headers, against 2.3-2.8 µs for
``aiohttp._http_parser.HttpResponseParser``, which also hands every body to
a pure-Python StreamReader. The same llhttp leniencies aiohttp enables for
responses are enabled here, so both accept the same servers.

Framing. Content-Length bodies: the segment that completes the headers goes
through the parser; later segments bypass it (``_remaining``) and are queued
as received, without a copy (the parser is then replaced before the next
request). Chunked bodies go through the parser. A body with neither is
delimited by EOF (never kept alive). HEAD, 1xx, 204 and 304 have no body;
httptools cannot be told "this answers a HEAD", so after a HEAD the parser
is replaced too.

Flow control: above ``HIGH_WATER`` buffered body bytes the transport stops
reading; ``take`` hands over everything buffered and resumes it, so a
500 MiB zip crosses with at most ``HIGH_WATER`` + one read buffered here.

Timeouts are not timers per request: the pool's sweeper calls ``expire``
once ``deadline`` (time.monotonic) has passed; ``deadline`` is set only
while someone waits (headers, or the next body bytes).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Final

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.errors import UpstreamConnectError, UpstreamError, UpstreamTimeout, UpstreamTruncated

if TYPE_CHECKING:
    from sidecar.upstreams.pool import Pool

# 64 KiB, not 256: with 200 concurrent 50 MiB relays peak RSS fell from 272 to
# 168 MB while 1 MiB and 50 MiB relays kept their speed (bench/run.py, 1 rep).
HIGH_WATER: Final = 64 * 1024
NO_BODY_STATUSES: Final = frozenset({204, 304})

# Exchange states.
IDLE: Final = 0  # no request in flight
HEADERS: Final = 1  # request sent, waiting for the status line and headers
BODY: Final = 2  # headers parsed, body in progress
DONE: Final = 3  # whole message received (the buffer may still hold bytes)


class StaleConnection(UpstreamConnectError):
    """A reused keep-alive connection closed before any byte of the answer:
    the server dropped it while idle. Never escapes: the request is retried
    once on a fresh connection."""


def new_parser(owner: Connection) -> httptools.HttpResponseParser:
    parser = httptools.HttpResponseParser(owner)
    # As aiohttp does for responses: tolerate what real servers send.
    parser.set_dangerous_leniencies(
        lenient_headers=True,
        lenient_optional_cr_before_lf=True,
        lenient_spaces_after_chunk_size=True,
    )
    return parser


_ONE_SHOT_READ: Final = 64 * 1024


class Connection(asyncio.BufferedProtocol):
    """A keep-alive connection to one origin and the state of its current exchange."""

    def __init__(self, pool: Pool | None, name: str) -> None:
        self.pool = pool  # None for a one-shot connection (a redirect to another origin)
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.slot = False  # holds one of its pool's ``limit`` slots
        self.requests = 0  # exchanges started on this connection
        self.idle_since = 0.0
        self.deadline = 0.0  # 0: nobody waits; else when ``expire`` must fire
        self.peak_buffered = 0  # largest body backlog seen (tests assert on it)
        self._parser = new_parser(self)
        self._parser_dirty = False
        self._loop = asyncio.get_running_loop()
        self._view: memoryview | None = (
            None if pool is not None else memoryview(bytearray(_ONE_SHOT_READ))
        )
        self._reset()

    def _reset(self) -> None:
        self.state = IDLE
        self.head = False
        self.error: UpstreamError | None = None
        self.status = 0
        self.headers: CIMultiDictProxy[str] | None = None
        self.length: int | None = None
        self.keep_alive = False
        self.received = 0  # body bytes received
        self.buffered = 0
        self._raw: list[tuple[str, str]] = []
        self._buf: list[bytes] = []
        self._waiter: asyncio.Future[None] | None = None
        self._got_bytes = False
        self._remaining = 0  # Content-Length bytes still due (bypass mode)
        self._until_eof = False
        self._paused = False
        self._informational = False

    # -- the exchange, caller side ---------------------------------------------

    @property
    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    @property
    def reusable(self) -> bool:
        """The answer was read to its end and the connection may carry another."""
        return self.state == DONE and self.keep_alive and not self._buf and not self.closed

    def recycle(self) -> None:
        """Back to the idle pool: forget the finished exchange."""
        self._reset()

    def send(self, request: bytes, head: bool, deadline: float) -> asyncio.Future[None]:
        """Write ``request``; the future is done at complete headers or a failure,
        then ``check`` raises the failure. (A future, not a coroutine: one
        coroutine frame less on every request.)"""
        if self.state != IDLE:
            self._reset()
        if self._parser_dirty:
            self._parser = new_parser(self)
            self._parser_dirty = False
        self.requests += 1
        self.state = HEADERS
        self.head = head
        self.deadline = deadline
        waiter = self._waiter = self._loop.create_future()
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            # Closed between its release and this request (a hand-over).
            self._fail(self._lost_before_headers(None))
            return waiter
        try:
            transport.write(request)
        except (OSError, RuntimeError) as exc:
            self._fail(self._lost_before_headers(exc))
        return waiter

    def check(self) -> None:
        """After ``send``'s future: raise the UpstreamError that ended the wait, if any."""
        self.deadline = 0.0
        if self.error is not None:
            raise self.error

    def take(self) -> bytes:
        """Everything buffered (b"" if nothing); resumes a paused transport."""
        buf = self._buf
        if not buf:
            return b""
        data = buf[0] if len(buf) == 1 else b"".join(buf)
        buf.clear()
        self.buffered = 0
        if self._paused:
            self._paused = False
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()
        return data

    async def wait_body(self, idle: float) -> None:
        """Wait until body bytes, the end, or an error arrive (at most ``idle`` s)."""
        waiter = self._waiter = self._loop.create_future()
        self.deadline = time.monotonic() + idle
        try:
            await waiter
        finally:
            self.deadline = 0.0

    def expire(self) -> None:
        """The sweeper found ``deadline`` passed: time the wait out, drop the connection."""
        if self.state == HEADERS:
            self.error = UpstreamTimeout(self.name, "first byte timeout")
        else:
            self.error = UpstreamTimeout(self.name, "idle timeout while reading the body")
        self.deadline = 0.0
        self.keep_alive = False
        self.abort()
        self._wake()

    def abort(self) -> None:
        self.keep_alive = False
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- asyncio.BufferedProtocol ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.pool is not None:
            self._view = self.pool.read_view()
        assert self._view is not None
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        assert self._view is not None
        self.data_received(bytes(self._view[:nbytes]))  # copied out: the buffer is shared

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == BODY and self._remaining:
            self._raw_body(data)
            return
        if state != HEADERS and state != BODY:
            # Bytes nobody asked for: the connection's framing is lost.
            self.keep_alive = False
            if state == IDLE:
                self.abort()
            return
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._fail(UpstreamConnectError(self.name, f"invalid HTTP response: {exc}"))

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.keep_alive = False
        state = self.state
        if self.error is None:
            if state == HEADERS:
                self.error = self._lost_before_headers(exc)
            elif state == BODY:
                if self._until_eof:
                    self.state = DONE
                else:
                    self.error = self._truncated()
        self.deadline = 0.0
        self._wake()
        if self.pool is not None:
            self.pool.lost(self)

    def _lost_before_headers(self, exc: Exception | None) -> UpstreamError:
        why = (
            "server closed the connection" if exc is None else f"connection lost: {_os_reason(exc)}"
        )
        if self.requests > 1 and not self._got_bytes:
            return StaleConnection(self.name, why)
        return UpstreamConnectError(self.name, why + " before answering")

    def _truncated(self) -> UpstreamTruncated:
        if self.length is not None:
            return UpstreamTruncated(
                self.name, f"body ended after {self.received} of {self.length} bytes"
            )
        return UpstreamTruncated(
            self.name, f"chunked body ended after {self.received} bytes without its last chunk"
        )

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        self.abort()
        self._wake()

    # -- body bytes ----------------------------------------------------------------

    def _push(self, data: bytes) -> None:
        self._buf.append(data)
        size = len(data)
        self.received += size
        buffered = self.buffered = self.buffered + size
        if buffered > self.peak_buffered:
            self.peak_buffered = buffered
        if buffered >= HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def _raw_body(self, data: bytes) -> None:
        """A Content-Length body after its first segment: no parser, no copy."""
        self._parser_dirty = True
        remaining = self._remaining
        if len(data) < remaining:
            self._remaining = remaining - len(data)
            self._push(data)
            return
        if len(data) > remaining:  # more than announced: do not trust the framing
            data = data[:remaining]
            self.keep_alive = False
        self._remaining = 0
        self._push(data)
        self._complete()

    def _complete(self) -> None:
        self.state = DONE
        self._wake()

    # -- httptools callbacks -----------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if status < 200:  # 100 Continue, 103 Early Hints: the real answer follows
            self._raw = []
            self._informational = True
            return
        headers = self.headers = CIMultiDictProxy(CIMultiDict(self._raw))
        self.status = status
        # llhttp's verdict (version, Connection tokens); false when the body
        # runs to EOF.
        self.keep_alive = parser.should_keep_alive()
        length = headers.get("Content-Length")
        self.length = int(length) if length is not None and length.isdigit() else None
        self.state = BODY
        if self.head or status in NO_BODY_STATUSES:
            if self.head:
                self._parser_dirty = True
            self.state = DONE
        elif self.length is not None:
            self._remaining = self.length
        elif "chunked" not in headers.get("Transfer-Encoding", "").lower():
            self._until_eof = True
            self.keep_alive = False
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.state != BODY:
            self.keep_alive = False  # a body after HEAD or DONE: framing lost
            return
        if self._remaining:
            self._remaining -= len(body)
        self._push(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        if self.state == BODY:
            self._remaining = 0
            self._complete()


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__
