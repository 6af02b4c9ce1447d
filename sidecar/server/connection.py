"""One client connection: HTTP/1.1 parsing (llhttp via httptools), keep-alive,
pipelining, backpressure, and cancelling the handler when the client leaves.

Requests on a connection are answered strictly in order, one at a time;
pipelined ones wait in a short queue (reading pauses when it is full). A
request the server can answer without waiting (``Server.answer_now``, a small
cache hit held in memory) is answered inside ``data_received``, without a
task; anything else runs as one task per request.
"""

from __future__ import annotations

import asyncio
import logging
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
PIPELINE_DEPTH: Final = 16
FILE_CHUNK: Final = 256 * 1024  # read size when the loop has no sendfile (uvloop)


class _Refused(Exception):
    """A request that cannot be parsed or is over a limit: answered, then closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Connection(asyncio.Protocol):
    __slots__ = (
        "_current",
        "_drain",
        "_halted",
        "_header_bytes",
        "_headers",
        "_loop",
        "_parser",
        "_paused",
        "_queue",
        "_reading",
        "_server",
        "_target",
        "_task",
        "_transport",
        "closed",
        "closing",
        "idle_since",
    )

    def __init__(self, server: Server) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._target: list[bytes] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        # Exchanges waiting their turn; a _Refused one is answered, then the connection closes.
        self._queue: deque[Exchange | _Refused] = deque()
        self._task: asyncio.Task[None] | None = None
        self._current: Exchange | None = None
        self._paused = False  # the transport's write buffer is over its high-water mark
        self._drain: asyncio.Future[None] | None = None
        self._reading = True
        self._halted = False  # nothing more is read: a broken request or an upgrade came
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
        if self._task is not None:
            self._task.cancel()  # the client left: stop its upstream fetch too
        self._wake_writer()

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            refused = exc.__context__
            self._refuse(refused if isinstance(refused, _Refused) else _Refused(400, "bad request"))
        except httptools.HttpParserUpgrade:
            self._no_upgrade()
        except httptools.HttpParserError as exc:
            self._refuse(_Refused(400, f"bad request: {exc}"))
        self._pump()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_writer()

    # -- httptools callbacks ----------------------------------------------
    def on_message_begin(self) -> None:
        self._target = []
        self._headers = []
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._target.append(url)
        self._header_bytes += len(url)
        if self._header_bytes > MAX_TARGET:
            raise _Refused(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADERS or len(self._headers) > MAX_HEADER_COUNT:
            raise _Refused(431, "request headers too large")

    def on_message_complete(self) -> None:
        parser = self._parser
        target = b"".join(self._target).decode("latin-1")
        exchange = Exchange(
            self,
            parser.get_method().decode("ascii"),
            target,
            self._headers,
            parser.should_keep_alive(),
            parser.get_http_version() == "1.1",
        )
        self._queue.append(exchange)
        if len(self._queue) >= PIPELINE_DEPTH and self._reading and self._transport is not None:
            self._reading = False
            self._transport.pause_reading()

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
        if self._transport is not None and self._reading:
            self._reading = False
            self._transport.pause_reading()

    def _pump(self) -> None:
        """Answer queued requests until one needs a task or the connection ends."""
        answer_now = self._server.answer_now
        while self._task is None and self._queue and not self.closed:
            item = self._queue.popleft()
            if isinstance(item, _Refused):
                self._write_refusal(item)
                return
            self._current = item
            self.idle_since = 0.0
            if answer_now is not None and self._answered_now(answer_now, item):
                if not self._finished(item):
                    return
                continue
            self._task = self._loop.create_task(self._run(item))
            return
        if not (self._queue or self._reading or self._halted or self.closed) and self._transport:
            self._reading = True
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

    def _write_refusal(self, refused: _Refused) -> None:
        """The answer to a request that could not be parsed: no method, no target."""
        if self.gone:
            return
        answer = Exchange(self, "", "", [], keep_alive=False, http11=True)
        answer.send(refused.status, {"Content-Type": TEXT_PLAIN}, (refused.message + "\n").encode())
        self.close()

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
