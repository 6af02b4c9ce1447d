"""One client connection: HTTP/1.1 parsing (llhttp via httptools), keep-alive,
pipelining, backpressure, and cancelling the handler when the client leaves.

Requests on a connection are answered strictly in order, one at a time;
pipelined ones wait in a short queue. A request the server can answer without
waiting (``Server.answer_now``, a small cache hit held in memory) is answered
inside ``data_received``, without a task; anything else runs as one task per
request.

What one client can cost is bounded while its bytes arrive: a request head is
measured as it is parsed (not when a field completes), reading pauses while
the queue is full or the client is not taking its answers, and a client that
takes no bytes for ``send_timeout_s`` is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import struct
import sys
from collections import deque
from typing import TYPE_CHECKING, Any, Final, cast

import httptools

from sidecar.server.exchange import TEXT_PLAIN, DateHeader, Exchange

if TYPE_CHECKING:
    from sidecar.server.listener import AnswerNow, Server

log = logging.getLogger("sidecar.server")

MAX_TARGET: Final = 8190  # bytes of request-target; aiohttp's and nginx's order of size
MAX_HEADERS: Final = 16384  # bytes of all header names and values together
MAX_HEADER_COUNT: Final = 100
# llhttp is fed at most this much at a time, so a head still arriving is
# measured between slices: an unterminated line costs one slice past the limit,
# not the whole line (httptools joins a field's pieces, quadratic in its size).
SLICE: Final = 2048
# A message's bytes other than its body, raw, as they arrive (less the
# request-target, limited apart): the fields' own bytes plus ": " and CRLF
# per line, the request line's method and version, chunk framing and
# trailers, and the part of the slice the message began in that came before
# it. A head within the limits above always fits.
MAX_HEADER_SECTION: Final = MAX_HEADERS + 4 * MAX_HEADER_COUNT + 64 + SLICE
PIPELINE_DEPTH: Final = 16
SEND_CHECKS: Final = 4  # progress checks per send timeout while the client takes nothing
FILE_CHUNK: Final = 256 * 1024  # read size when the loop has no sendfile (uvloop)
# After a refusal, what the client still sends is read and dropped for a
# moment: closing with unread input resets the connection, and a client still
# sending could lose the refusal. Bounded in time and bytes.
LINGER_S: Final = 2.0
LINGER_BYTES: Final = 1024 * 1024
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
# RFC 9112 3.2 / RFC 3986 3.2.2: uri-host [":" port]; empty is allowed.
_HOST: Final = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(?::[0-9]*)?")
_ABSOLUTE: Final = re.compile(rb"[Hh][Tt][Tt][Pp][Ss]?://([^/?#]*)(.*)", re.DOTALL)
_METHODS: Final = {m.encode(): m for m in ("GET", "HEAD")}  # decoded once
_TCP_INFO: Final = getattr(socket, "TCP_INFO", None)
_BYTES_ACKED: Final = slice(120, 128)  # tcpi_bytes_acked in Linux's struct tcp_info
_RESET: Final = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets


class _Refused(Exception):
    """A request that cannot be parsed or is over a limit: answered, then closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Connection(asyncio.Protocol):
    __slots__ = (
        "_continue",
        "_current",
        "_drain",
        "_dropped",
        "_halted",
        "_head_seen",
        "_header_bytes",
        "_headers",
        "_held",
        "_host",
        "_linger",
        "_loop",
        "_parser",
        "_paused",
        "_queue",
        "_reading",
        "_send_mark",
        "_send_progress_at",
        "_send_timer",
        "_sending_file",
        "_server",
        "_target",
        "_target_bytes",
        "_task",
        "_transport",
        "_valid_host",
        "closed",
        "closing",
        "idle_since",
        "received",
    )

    def __init__(self, server: Server) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        # The message being parsed.
        self._target: list[bytes] = []
        self._target_bytes = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._host: bytes | None = None
        self._valid_host = b""  # the last Host value that passed the check
        # Expect: 100-continue: None (not asked), False (sent), True (owed).
        self._continue: bool | None = None
        # Bytes of the message being parsed that are not body bytes (request
        # line, headers, chunk framing, trailers; over by at most one slice);
        # None between messages.
        self._head_seen: int | None = None
        self._held = b""  # bytes not parsed yet because the queue is full
        # Exchanges waiting their turn; a _Refused one is answered, then the connection closes.
        self._queue: deque[Exchange | _Refused] = deque()
        self._task: asyncio.Task[None] | None = None
        self._current: Exchange | None = None
        self._paused = False  # the transport's write buffer is over its high-water mark
        self._drain: asyncio.Future[None] | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._send_mark = 0
        self._send_progress_at = 0.0
        self._sending_file = False
        self._reading = True
        self._halted = False  # nothing more is parsed: a broken request or an upgrade came
        self._linger: asyncio.TimerHandle | None = None
        self._dropped = 0  # bytes read and dropped while lingering
        self.received = 0  # bytes read from the client
        self.closed = False
        self.closing = False  # answer what is in progress, then close
        # When the last answer ended (or the connection opened); 0.0 while a
        # request is being answered. A client that sends half a request and
        # stalls is closed like an idle one.
        self.idle_since = self._loop.time()

    # -- asyncio.Protocol -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self._transport = cast(asyncio.Transport, transport)
        self._server.connections.add(self)
        if self._server.closing:
            self.closing = True
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._server.connections.discard(self)
        self._queue.clear()
        self._held = b""
        self._unwatch_sending()
        if self._linger is not None:
            self._linger.cancel()
        if self._task is not None:
            self._task.cancel()  # the client left: stop its upstream fetch too
        self._wake_writer()

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self._halted:
            self._drop(data)
            return
        if len(data) > SLICE:
            self._parse(data)
        else:  # _feed, inline: this is every small request
            try:
                self._parser.feed_data(data)
            except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
                self._parse_failed(exc)
            else:
                if self._head_seen is not None:
                    self._head_arrived(len(data))
        self._pump()

    def pause_writing(self) -> None:
        # The client is not taking its answers: read no more requests from it
        # until it does, and drop it if it takes nothing for send_timeout_s.
        self._paused = True
        self._pause_reading()
        self._watch_sending()

    def resume_writing(self) -> None:
        self._paused = False
        if not self._sending_file:
            self._unwatch_sending()
        self._wake_writer()
        self._pump()

    # -- parsing ----------------------------------------------------------
    def _parse(self, data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(data), SLICE):
            if self._halted:
                return
            if len(self._queue) >= PIPELINE_DEPTH:
                self._held = data[start:]  # at most one read: reading is paused
                self._pause_reading()
                return
            self._feed(view[start : start + SLICE])

    def _feed(self, piece: bytes | memoryview) -> None:
        try:
            self._parser.feed_data(piece)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._parse_failed(exc)
        else:
            if self._head_seen is not None:
                self._head_arrived(len(piece))

    def _head_arrived(self, size: int) -> None:
        seen = self._head_seen = cast(int, self._head_seen) + size
        if seen - self._target_bytes > MAX_HEADER_SECTION:
            self._refuse(_Refused(431, "request headers too large"))

    def _parse_failed(self, exc: Exception) -> None:
        if isinstance(exc, httptools.HttpParserUpgrade):
            self._no_upgrade()
        elif isinstance(exc, httptools.HttpParserCallbackError):
            refused = exc.__context__
            self._refuse(refused if isinstance(refused, _Refused) else _Refused(400, "bad request"))
        else:
            self._refuse(_Refused(400, f"bad request: {exc}"))

    # -- httptools callbacks ----------------------------------------------
    def on_message_begin(self) -> None:
        self._target = []
        self._target_bytes = 0
        self._headers = []
        self._header_bytes = 0
        self._host = None
        self._continue = None
        self._head_seen = 0

    def on_url(self, url: bytes) -> None:
        self._target.append(url)
        self._target_bytes += len(url)
        if self._target_bytes > MAX_TARGET:
            raise _Refused(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADERS or len(self._headers) > MAX_HEADER_COUNT:
            raise _Refused(431, "request headers too large")
        size = len(name)
        if size == 4 and (name == b"Host" or name.lower() == b"host"):
            if self._host is not None:
                raise _Refused(400, "more than one Host header")
            self._host = value
        elif size == 6 and name.lower() == b"expect":
            self._expectation(value)

    def on_body(self, body: bytes) -> None:
        # Body bytes are not head bytes; chunk framing and trailers are.
        if self._head_seen is not None:
            self._head_seen -= len(body)

    def _expectation(self, value: bytes) -> None:
        """Decided as the header arrives (the head's end is not reported: one
        callback less per request): with nothing ahead of it on the connection,
        a client holding a body back until the 100 must not wait for its timeout."""
        if value.strip().lower() != b"100-continue":
            raise _Refused(417, "only 'Expect: 100-continue' is supported")
        if self._continue is not None or self._parser.get_http_version() != "1.1":
            return  # RFC 9110 10.1.1: ignored in an HTTP/1.0 request
        if self._task is None and self._current is None and not self._queue:
            self._continue = False
            self._write_continue()
        else:
            self._continue = True  # sent when its turn comes

    def on_message_complete(self) -> None:
        self._head_seen = None
        parser = self._parser
        http11 = parser.get_http_version() == "1.1"
        if not http11:
            self._check_http10()
        host = self._host
        if host is None:
            if http11:  # RFC 9112 3.2; HTTP/1.0 had no Host
                raise _Refused(400, "missing Host header")
        elif host != self._valid_host:  # a client sends the same Host every time
            if not _HOST.fullmatch(host):
                raise _Refused(400, "invalid Host header")
            self._valid_host = host
        url = b"".join(self._target)
        if url[0] != 0x2F:  # not "/..."
            url = self._origin_form(url)
        method = parser.get_method()
        exchange = Exchange(
            self,
            _METHODS.get(method) or method.decode("ascii"),
            url.decode("latin-1"),
            self._headers,
            parser.should_keep_alive(),
            http11,
        )
        if self._continue:
            exchange.expects_continue = True
        self._queue.append(exchange)
        if len(self._queue) >= PIPELINE_DEPTH:
            self._pause_reading()

    def _check_http10(self) -> None:
        version = self._parser.get_http_version()
        if version != "1.0":
            raise _Refused(505, f"HTTP/{version} is not supported")
        if any(name.lower() == b"transfer-encoding" for name, _ in self._headers):
            # RFC 9112 6.1: framing an HTTP/1.0 peer cannot mean is faulty framing.
            raise _Refused(400, "Transfer-Encoding in an HTTP/1.0 request")

    def _origin_form(self, url: bytes) -> bytes:
        """An absolute-form target (RFC 9112 3.2.2) for this very host, as origin-form.
        One for another host is refused: the sidecar is not a forward proxy."""
        absolute = _ABSOLUTE.fullmatch(url)
        if absolute is None:  # "*", CONNECT's authority, or junk: the handler refuses it
            return url
        authority, rest = absolute.groups()
        if self._host is None or authority.lower() != self._host.lower():
            raise _Refused(400, "absolute-form target for another host: not a forward proxy")
        return rest if rest[:1] == b"/" else b"/" + rest

    # -- answering, in order ----------------------------------------------
    def _no_upgrade(self) -> None:
        """An Upgrade (or CONNECT) request: answered as a plain request if it is
        one, then the connection closes; what follows it is not HTTP/1.1."""
        last = self._queue[-1] if self._queue else self._current
        if isinstance(last, Exchange) and not last.sent:
            last.keep_alive = False
            self._halt()
        else:
            self._refuse(_Refused(400, "protocol upgrades are not supported"))

    def _refuse(self, refused: _Refused) -> None:
        self._queue.append(refused)
        self._halt()  # nothing after a broken request is trusted

    def _halt(self) -> None:
        self._halted = True
        self._held = b""
        self._pause_reading()

    def _pump(self) -> None:
        """Answer queued requests in order until one needs a task, the client
        stops taking bytes, or the connection ends; parse what was held back
        as the queue empties; read again once everything is answered."""
        answer_now = self._server.answer_now
        queue = self._queue
        while True:
            while (
                self._task is None
                and self._current is None
                and queue
                and not self._paused
                and not self.closed
            ):
                item = queue.popleft()
                if isinstance(item, _Refused):
                    self._write_refusal(item)
                    return
                self._current = item
                self.idle_since = 0.0
                if item.expects_continue:
                    self._write_continue()
                if answer_now is not None and self._answered_now(answer_now, item):
                    if not self._finished(item):
                        return
                    continue
                self._task = self._loop.create_task(self._run(item))
                break
            if not self._held or len(queue) >= PIPELINE_DEPTH or self.closed:
                break
            held, self._held = self._held, b""
            self._parse(held)
        if not (self._reading or queue or self._halted or self._paused or self.closed):
            self._reading = True
            if self._transport is not None:
                self._transport.resume_reading()

    def _answered_now(self, answer_now: AnswerNow, exchange: Exchange) -> bool:
        try:
            return answer_now(exchange)
        except (ConnectionResetError, BrokenPipeError):
            exchange.abort()
            return True
        except Exception:
            log.exception("request handler failed", extra={"path": exchange.target})
            self._fail(exchange)
            return True

    async def _run(self, exchange: Exchange) -> None:
        try:
            await self._server.handler(exchange)
        except asyncio.CancelledError:
            self._task = None
            if not self.closed:
                self.abort()
            raise
        except (ConnectionResetError, BrokenPipeError):
            exchange.abort()  # the client left while its answer was being written
        except Exception:
            log.exception("request handler failed", extra={"path": exchange.target})
            self._fail(exchange)
        else:
            # A client that left before its answer started is not a handler bug.
            if not exchange.sent and not self.gone:
                log.error("request handler returned no answer", extra={"path": exchange.target})
                self._fail(exchange)
        self._task = None
        if self._finished(exchange):
            self._pump()

    def _fail(self, exchange: Exchange) -> None:
        """A handler bug: a 500 if nothing was sent yet, else a cut connection."""
        if exchange.sent or self.gone:
            exchange.abort()
            return
        exchange.keep_alive = False
        exchange.send(500, {"Content-Type": TEXT_PLAIN}, b"internal error\n")

    def _finished(self, exchange: Exchange) -> bool:
        """After a response: True if the connection stays open for the next one."""
        self._current = None
        if self.closed:
            return False
        if not exchange.finished:
            # A handler that started a body and returned without ending it:
            # the client cannot know where the body ends.
            self.abort()
            return False
        if not exchange.keep_alive or self.closing:
            self.close()
            return False
        if not self._queue:
            self.idle_since = self._loop.time()
        return True

    def _write_continue(self) -> None:
        if not self.gone:
            cast(asyncio.Transport, self._transport).write(CONTINUE)

    def _write_refusal(self, refused: _Refused) -> None:
        """The answer to a request that could not be parsed: no method, no target."""
        if self.gone:
            return
        answer = Exchange(self, "", "", [], keep_alive=False, http11=True)
        answer.send(refused.status, {"Content-Type": TEXT_PLAIN}, (refused.message + "\n").encode())
        self._linger_close()

    def _linger_close(self) -> None:
        """Half-close after the refusal, drop what still comes for a moment, then close."""
        self.closing = True
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()  # after the refusal is flushed
        self._linger = self._loop.call_later(LINGER_S, self.abort)
        transport.resume_reading()

    def _drop(self, data: bytes) -> None:
        self._dropped += len(data)
        if self._dropped > LINGER_BYTES:
            self.abort()

    def _pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            if self._transport is not None:
                self._transport.pause_reading()

    # -- the send timeout ---------------------------------------------------
    def _watch_sending(self) -> None:
        if self._send_timer is None and not self.closed:
            self._send_mark = self._taken()
            self._send_progress_at = self._loop.time()
            self._arm_send_check()

    def _arm_send_check(self) -> None:
        # Checked four times per timeout: a client is dropped within 1.25
        # send timeouts of the last byte it took.
        self._send_timer = self._loop.call_later(
            self._server.send_timeout_s / SEND_CHECKS, self._check_sending
        )

    def _unwatch_sending(self) -> None:
        timer, self._send_timer = self._send_timer, None
        if timer is not None:
            timer.cancel()

    def _check_sending(self) -> None:
        self._send_timer = None
        taken, now = self._taken(), self._loop.time()
        if taken > self._send_mark:
            self._send_mark, self._send_progress_at = taken, now  # slow, but taking bytes
        # (uvloop's timers have millisecond steps and may fire a little early)
        if now - self._send_progress_at < self._server.send_timeout_s - 0.002:
            self._arm_send_check()
            return
        current = self._current
        log.info(
            "client dropped: it took no bytes for the send timeout",
            extra={
                "send_timeout_s": self._server.send_timeout_s,
                "path": current.target if current is not None else None,
            },
        )
        # A reset, not a FIN queued behind megabytes the client will never
        # read: the kernel frees the socket's buffers at once (nginx's
        # reset_timedout_connection). connection_lost cancels the handler.
        sock = self._transport.get_extra_info("socket") if self._transport else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        if self._sending_file and self._task is not None:
            # asyncio's sendfile must unwind before its transport closes (3.11
            # fails on the transport's spent "empty" waiter otherwise).
            self._task.cancel()
            self._loop.call_soon(self.abort)
        else:
            self.abort()

    def _taken(self) -> int:
        """Grows while the client takes bytes: what it acknowledged (Linux's
        TCP_INFO; it also covers sendfile, which bypasses the transport) less
        what is still waiting in the transport's buffer."""
        transport = self._transport
        if transport is None:
            return 0
        acked = 0
        sock = transport.get_extra_info("socket")
        if _TCP_INFO is not None and sock is not None:
            try:
                info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 232)
            except OSError:
                info = b""
            acked = int.from_bytes(info[_BYTES_ACKED], sys.byteorder)
        return acked - transport.get_write_buffer_size()

    @property
    def backlog(self) -> tuple[int, int, int]:
        """What this client holds in memory: requests queued, request bytes held
        back unparsed, answer bytes the transport has not handed to the kernel."""
        transport = self._transport
        buffered = transport.get_write_buffer_size() if transport is not None else 0
        return len(self._queue), len(self._held), buffered

    # -- writing ------------------------------------------------------------
    @property
    def date(self) -> DateHeader:
        return self._server.date

    @property
    def gone(self) -> bool:
        """The client hung up (or we cut it): nothing more can be written."""
        return self.closed or self._transport is None or self._transport.is_closing()

    def check_open(self) -> None:
        if self.gone:
            raise ConnectionResetError("the client closed the connection")

    def write(self, data: bytes | memoryview) -> None:
        transport = self._transport  # (gone, spelt out: this is every write)
        if self.closed or transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        transport.write(data)

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionResetError("the client closed the connection")
        if not self._paused:
            return
        waiter = self._drain
        if waiter is None or waiter.done():
            waiter = self._drain = self._loop.create_future()
        await waiter
        if self.closed:
            raise ConnectionResetError("the client closed the connection")

    def _wake_writer(self) -> None:
        waiter, self._drain = self._drain, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def sendfile(self, fobj: Any, offset: int, count: int) -> None:
        transport = self._transport
        if transport is None or self.closed:
            raise ConnectionResetError("the client closed the connection")
        # The copy below is watched through pause_writing; sendfile bypasses the transport.
        self._sending_file = True
        self._watch_sending()
        try:
            sent = await self._loop.sendfile(transport, fobj, offset, count, fallback=False)
        except (NotImplementedError, asyncio.SendfileNotAvailableError):
            pass  # uvloop, or a transport without a socket: copy through Python
        except OSError:
            if self.closed:
                raise ConnectionResetError("the client closed the connection") from None
            raise
        else:
            if sent != count:
                raise OSError(f"file ended {count - sent} bytes early")
            return
        finally:
            self._sending_file = False
            if not self._paused:
                self._unwatch_sending()
        fobj.seek(offset)
        left = count
        while left > 0:
            chunk = await self._loop.run_in_executor(None, fobj.read, min(FILE_CHUNK, left))
            if not chunk:
                raise OSError(f"file ended {left} bytes early")
            left -= len(chunk)
            self.write(chunk)
            await self.drain()

    def close(self) -> None:
        self.closing = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def abort(self) -> None:
        self.closing = True
        if self._transport is not None:
            self._transport.abort()

    def shut_down(self) -> None:
        """Server shutdown: close now if idle, else after the response in progress."""
        self.closing = True
        if self._task is None and self._current is None and not self._queue:
            self.close()

    def kill(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.abort()
