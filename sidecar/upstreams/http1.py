"""One HTTP/1.1 keep-alive connection: an asyncio protocol around httptools.

A connection carries one exchange at a time (no pipelining): ``send`` writes
a prebuilt request and returns a future done at complete response headers
(``check`` then raises a failure), then the body is read with ``take`` /
``wait_body`` until the state is DONE.

Why httptools (llhttp) and not aiohttp's own parser: measured on this
machine, a typical nginx answer (5 headers, 106 B body) costs 1.4 µs with
httptools including the CIMultiDict of headers, against 2.3-2.8 µs for
``aiohttp._http_parser.HttpResponseParser``, which also hands every body to
a pure-Python StreamReader.

An answer is trusted only when it is framed exactly; anything else fails
the exchange (``UpstreamProtocolError``) or closes the connection, because
what an upstream sends may be kept as an immutable cache entry:

- llhttp runs strict (none of its leniencies): NUL, other control
  characters and DEL in a header value, a bare CR or LF, obs-fold
  continuation lines, duplicate Content-Length, Content-Length with
  Transfer-Encoding are all parse errors. Strict costs nothing extra.
- Limits are checked while bytes arrive, not only once llhttp completes a
  field: a head (status line and fields, informational heads included) may
  not exceed ``HEAD_LIMIT`` bytes, one line ``LINE_LIMIT``, the fields
  ``FIELD_LIMIT``. Nothing more than ``HEAD_LIMIT`` plus one read is ever
  parsed, so a megabyte header costs what 64 KiB cost.
- Bytes past the end of a message (in the same read or a later one) are
  never parsed as anything: the message they follow stands if its own
  framing was exact, and the connection is closed, never reused.
- A body delimited by the end of the connection ends only at a clean end
  (a FIN, or TLS close_notify). A reset, a TLS close without close_notify
  or the sidecar's own abort is a truncation.

Framing. Content-Length bodies: the segment that completes the headers goes
through the parser; later segments bypass it (``_remaining``) and are queued
as received, without a copy (the parser is then replaced before the next
request). Chunked bodies go through the parser. A body with neither is
delimited by EOF (never kept alive). HEAD, 1xx, 204 and 304 have no body;
httptools cannot be told "this answers a HEAD", so after a HEAD the parser
is replaced too.

The rest of a Content-Length body may instead be left in the socket for
the reader to move with splice(2) (``raw_body``; plain TCP only): the
transport stops reading until the body's last byte has been taken, and
nothing past that byte is read, so whatever follows it still poisons the
connection.

Flow control: above ``HIGH_WATER`` buffered body bytes the transport stops
reading; ``take`` hands over everything buffered and resumes it, so a
500 MiB zip crosses with at most ``HIGH_WATER`` + one read buffered here.

Timeouts are not timers per request: the pool's sweeper calls ``expire``
once ``deadline`` (time.monotonic) has passed; ``deadline`` is set only
while someone waits (headers, or the next body bytes).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import TYPE_CHECKING, Final, NoReturn

import httptools
from multidict import CIMultiDict, CIMultiDictProxy, istr

from sidecar.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamTruncated,
)

if TYPE_CHECKING:
    from sidecar.upstreams.pool import Pool

# 64 KiB, not 256: with 200 concurrent 50 MiB relays peak RSS fell from 272 to
# 168 MB while 1 MiB and 50 MiB relays kept their speed (bench/run.py, 1 rep).
HIGH_WATER: Final = 64 * 1024
NO_BODY_STATUSES: Final = frozenset({204, 304})
# Upstream heads: GOPROXY answers carry a handful of short fields; nginx's
# own defaults for what it accepts from an upstream are 4-8 KiB.
HEAD_LIMIT: Final = 64 * 1024
LINE_LIMIT: Final = 16 * 1024
FIELD_LIMIT: Final = 100
_FIELD_OVERHEAD: Final = 4  # ": " and CRLF around a name and its value
# istr keys: their lookups skip folding the key's case (every answer asks these).
_CONTENT_LENGTH: Final = istr("Content-Length")
_TRANSFER_ENCODING: Final = istr("Transfer-Encoding")

# Exchange states.
IDLE: Final = 0  # no request in flight
HEADERS: Final = 1  # request sent, waiting for the status line and headers
BODY: Final = 2  # headers parsed, body in progress
DONE: Final = 3  # whole message received (the buffer may still hold bytes)


class StaleConnection(UpstreamConnectError):
    """A reused keep-alive connection closed before any byte of the answer:
    the server dropped it while idle. Never escapes: the request is retried
    once on a fresh connection."""


class _Stop(Exception):
    """Raised in a parser callback to stop llhttp at once (``Connection.error``
    says why, if the exchange failed)."""


def new_parser(owner: Connection) -> httptools.HttpResponseParser:
    # Strict: no ``set_dangerous_leniencies`` (see the module docstring).
    return httptools.HttpResponseParser(owner)


# A parser holds its owner's callbacks, bound methods: a connection and its
# parser are a reference cycle, and a lost connection that kept its parser
# (with its error, its traceback's frames and its transport) was garbage only
# the cyclic GC frees: ~50 objects per failed attempt under a resetting
# upstream, and a keep-alive connection old enough to sit in an older
# generation is held until that generation's next pass.
_SPENT: Final = httptools.HttpResponseParser(object())  # an owner without callbacks


_BARE_READ: Final = 64 * 1024


class Connection(asyncio.BufferedProtocol):
    """A keep-alive connection to one origin and the state of its current exchange."""

    def __init__(self, pool: Pool | None, name: str) -> None:
        self.pool = pool  # None only for a bare connection (unit tests feed it by hand)
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
            None if pool is not None else memoryview(bytearray(_BARE_READ))
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
        self._head_bytes = 0  # bytes fed while waiting for a head
        self._head_size = 0  # status line and completed fields
        self._line = 0  # length of the head line still unfinished at the end of the last read
        self._status_line = 0  # reason phrase bytes of the current head
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

    def raw_body(self, idle: float) -> RawBody | None:
        """The rest of the body left in the socket, for the caller to move
        with splice(2) (where it has it: sidecar.server's ``splices``); None
        unless it is a Content-Length body with bytes still due, nothing
        buffered (``take`` first), on plain TCP."""
        transport = self.transport
        if (
            self.state != BODY
            or not self._remaining
            or self._buf
            or self.error is not None
            or self.closed
            or transport is None
            or transport.is_closing()
            or transport.get_extra_info("sslcontext") is not None
        ):
            return None
        sock = transport.get_extra_info("socket")
        if sock is None:
            return None
        # A duplicate: a loop refuses a reader on a transport's own descriptor.
        try:
            fd = os.dup(sock.fileno())
        except OSError:
            return None
        try:
            dup = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            return None
        transport.pause_reading()
        self._parser_dirty = True  # it stopped inside this body
        return RawBody(self, dup, idle)

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
            self._poison()  # bytes nobody asked for: the framing is lost
            return
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if self.state == DONE and self.error is None:
                self._poison()  # bytes after a complete message: it stands, the connection goes
            else:
                self._fail(UpstreamProtocolError(self.name, f"invalid HTTP response: {exc}"))
            return
        if self.state == HEADERS:
            self._check_partial_head(data)

    def _check_partial_head(self, data: bytes) -> None:
        """The head is still incomplete after ``data``: bound what it may still grow to."""
        self._head_bytes += len(data)
        newline = data.rfind(b"\n")
        self._line = self._line + len(data) if newline < 0 else len(data) - newline - 1
        if self._head_bytes > HEAD_LIMIT:
            self._fail(self._refusal(f"response head over {HEAD_LIMIT} bytes"))
        elif self._line > LINE_LIMIT:
            self._fail(self._refusal(f"response header line over {LINE_LIMIT} bytes"))

    def _refusal(self, why: str) -> UpstreamProtocolError:
        return UpstreamProtocolError(self.name, f"invalid HTTP response: {why}")

    def eof_received(self) -> bool:
        # A clean end of the stream (FIN; through TLS asyncio reports a bare
        # FIN like a close_notify). It completes a body that runs to EOF; a
        # reset or an abort never comes here, so it is a truncation below.
        if self.state == BODY and self._until_eof and self.error is None:
            self._complete()
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.keep_alive = False
        state = self.state
        if self.error is None:
            if state == HEADERS:
                self.error = self._lost_before_headers(exc)
            elif state == BODY:
                self.error = self._truncated(exc)
        self.deadline = 0.0
        self._wake()
        if self.pool is not None:
            self.pool.lost(self)
        self._parser = _SPENT  # no bytes come any more; see _SPENT
        self._parser_dirty = False

    def _lost_before_headers(self, exc: Exception | None) -> UpstreamError:
        why = (
            "server closed the connection" if exc is None else f"connection lost: {_os_reason(exc)}"
        )
        if self.requests > 1 and not self._got_bytes:
            return StaleConnection(self.name, why)
        return UpstreamConnectError(self.name, why + " before answering")

    def _truncated(self, exc: Exception | None) -> UpstreamTruncated:
        if self.length is not None:
            why = f"body ended after {self.received} of {self.length} bytes"
        elif self._until_eof:
            cause = "the sidecar closed it" if exc is None else _os_reason(exc)
            why = f"body without a length cut after {self.received} bytes ({cause})"
        else:
            why = f"chunked body ended after {self.received} bytes without its last chunk"
        return UpstreamTruncated(self.name, why)

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        self.abort()
        self._wake()

    def _poison(self) -> None:
        """Bytes past the end of the message: close the connection, keep the
        answer already received (its own framing was exact)."""
        self.keep_alive = False
        self.abort()

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
        self._remaining = 0
        if len(data) > remaining:  # more than announced: never served, the connection goes
            self._push(data[:remaining])
            self._complete()
            self._poison()
            return
        self._push(data)
        self._complete()

    def _complete(self) -> None:
        self.state = DONE
        self._wake()

    # -- httptools callbacks -----------------------------------------------------

    def on_message_begin(self) -> None:
        if self.state == DONE:
            raise _Stop  # a second message in the same read: never parsed

    def on_status(self, reason: bytes) -> None:
        # Called per segment of the reason phrase: summed until the head ends.
        self._status_line += len(reason)
        self._head_size += len(reason)
        if self._status_line > LINE_LIMIT:
            self.error = self._refusal(f"status line over {LINE_LIMIT} bytes")
            raise _Stop

    def on_header(self, name: bytes, value: bytes) -> None:
        raw = self._raw
        line = len(name) + len(value) + _FIELD_OVERHEAD
        size = self._head_size = self._head_size + line
        if line > LINE_LIMIT or size > HEAD_LIMIT or len(raw) >= FIELD_LIMIT:
            self.error = self._refusal(
                f"header line over {LINE_LIMIT} bytes"
                if line > LINE_LIMIT
                else f"response head over {HEAD_LIMIT} bytes"
                if size > HEAD_LIMIT
                else f"more than {FIELD_LIMIT} header fields"
            )
            raise _Stop
        raw.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if status < 200:  # 100 Continue, 103 Early Hints: the real answer follows
            self._raw = []
            self._status_line = 0
            self._informational = True
            return
        headers = self.headers = CIMultiDictProxy(CIMultiDict(self._raw))
        self.status = status
        # llhttp's verdict (version, Connection tokens); false when the body
        # runs to EOF.
        self.keep_alive = parser.should_keep_alive()
        length = headers.get(_CONTENT_LENGTH)
        self.length = int(length) if length is not None and length.isdigit() else None
        self.state = BODY
        if self.head or status in NO_BODY_STATUSES:
            if self.head:
                self._parser_dirty = True
            self.state = DONE
        elif self.length is not None:
            self._remaining = self.length
        elif "chunked" not in headers.get(_TRANSFER_ENCODING, "").lower():
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


class RawBody:
    """``Connection.raw_body``: the body's remaining bytes in the upstream
    socket (``fd``, a duplicate of it). The taker reports what it read
    (``took``) and passed on (``sent``), and gives the socket back with
    ``close``; the connection is reusable only if the body came whole and
    nothing followed it."""

    __slots__ = ("_conn", "_idle", "_sock", "fd", "sent")

    def __init__(self, conn: Connection, sock: socket.socket, idle: float) -> None:
        self._conn = conn
        self.sent = 0  # handed on by the taker (it counts)
        self._sock: socket.socket | None = sock
        self._idle = idle
        self.fd = sock.fileno()

    @property
    def remaining(self) -> int:
        return self._conn._remaining

    def took(self, n: int) -> None:
        conn = self._conn
        conn._remaining -= n
        conn.received += n
        if not conn._remaining:
            sock = self._sock
            try:
                if sock is not None and sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                    conn._poison()  # bytes nobody asked for follow the body
            except BlockingIOError:
                pass  # nothing follows: the connection may carry another exchange
            except OSError:
                conn.keep_alive = False
            conn._complete()

    async def readable(self) -> None:
        """Until the socket has bytes or ends; raises the connection's error (the
        pool sweeper's idle timeout, a lost connection)."""
        conn = self._conn
        loop = conn._loop
        waiter = conn._waiter = loop.create_future()
        conn.deadline = time.monotonic() + self._idle
        loop.add_reader(self.fd, conn._wake)
        try:
            await waiter
        finally:
            conn.deadline = 0.0
            loop.remove_reader(self.fd)
        if conn.error is not None:
            raise conn.error

    def ended(self, exc: OSError | None) -> NoReturn:
        """The socket ended (``exc`` None) or failed before the body's last byte."""
        conn = self._conn
        conn._fail(conn._truncated(exc))
        assert conn.error is not None
        raise conn.error

    def resume(self) -> None:
        """Nothing was taken after all: the transport reads the body again."""
        if self._drop():
            self._read_again()

    def close(self) -> None:
        """The socket back to the transport (reading again) if the body is whole,
        else the connection closed. Idempotent."""
        if not self._drop():
            return
        conn = self._conn
        if conn.state != DONE or conn.error is not None:
            conn.keep_alive = False
            conn.abort()
        else:
            self._read_again()

    def _drop(self) -> bool:
        """Close the duplicate; False if that was done already."""
        sock, self._sock = self._sock, None
        if sock is None:
            return False
        sock.close()
        return True

    def _read_again(self) -> None:
        conn = self._conn
        transport = conn.transport
        if transport is not None and not conn.closed and not transport.is_closing():
            transport.resume_reading()


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__
