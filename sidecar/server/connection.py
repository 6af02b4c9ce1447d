"""One client connection: keep-alive, pipelining, backpressure, and
cancelling the handler when the client leaves.

Requests on a connection are answered strictly in order, one at a time;
pipelined ones wait in a short queue. A request the server can answer without
waiting (``Server.answer_now``, a small cache hit held in memory) is answered
inside ``data_received``, without a task; anything else is answered by the
connection's one worker task, started at the first such request and kept
while the connection lives: a task per request cost a miss 7 k instructions
(its creation and registration in asyncio's set of tasks, a Python WeakSet),
and the worker waits for the next request on a bare future instead.

What one client can cost is bounded: its requests are measured as they
arrive (``requests``), reading pauses while the queue is full or while the
client is not taking its answers, and a client that takes no bytes for the
send timeout is dropped (``sending``).
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import socket
from collections import deque
from typing import TYPE_CHECKING, Any, Final, cast

import httptools

from sidecar.server.exchange import TEXT_PLAIN, DateHeader, Exchange, SpliceSource
from sidecar.server.requests import SLICE, Refused, RequestReader
from sidecar.server.sending import SendWatch

if TYPE_CHECKING:
    from sidecar.server.listener import AnswerNow, Server

log = logging.getLogger("sidecar.server")

PIPELINE_DEPTH: Final = 16
SENDFILE_MAX: Final = 4 * 1024 * 1024  # per sendfile(2) call
# Bytes one body may move by splice or sendfile before the loop gets a turn.
# A client's ACKs free its send queue from the client's own core while the
# loop keeps splicing, and the upstream's queued bytes arrive as fast as they
# are read: without a bound a relay went on for megabytes per turn. With 100
# 50 MiB relays and the upstream on the sidecar's core, the loop then stalled
# 100-400 ms per iteration and up to 2.3 s, long enough to fail requests to a
# healthy upstream with a connect timeout and to time out the policy's
# evaluation. Same load, 8 s runs alternated (ad hoc, wrk -c100, a 10 ms
# ticker on the loop): stalls over 100 ms per run 16-39 unbounded (the
# longest 1.2-2.3 s), 1-2 at 128 KiB (118-156 ms), 15-38 at 1 MiB
# (183-321 ms). MB/s relayed, unbounded against 128 KiB: upstream on the
# sidecar's core 1,525-1,802 against 1,486-1,703; on wrk's core 1,728-2,792
# against 1,722-1,911; 4 clients 1,237-1,269 against 1,353-1,368.
TURN_BYTES: Final = 128 * 1024
COPY_CHUNK: Final = 256 * 1024  # per read of a file copied over TLS: the buffer one client holds
_CAN_SPLICE: Final = hasattr(os, "splice")  # Linux
_SPLICE_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
# The pipe a splice goes through. Its size is what one splice(2) can move: a
# 50 MiB relay through 1 MiB cost 0.38 s of CPU per GiB, 256 KiB 0.44, the
# default 64 KiB 0.75 (nginx's plain proxy 0.67-0.79, the copy this replaces
# 0.84-0.97; 4 clients, alternated rounds, a throwaway relay), so a pipe that
# cannot be made 256 KiB means a copy instead. Pipe pages are the socket
# buffers' own (nothing is copied), not this process's heap.
PIPE_SIZES: Final = (1024 * 1024, 256 * 1024)
# Unsent bytes the kernel may queue for one client (TCP_NOTSENT_LOWAT) while a
# body of BOUNDED_FROM bytes or more goes by sendfile or splice; past them the
# call waits for the client. Unbounded, such a body filled the socket's send
# buffer (4 MiB here): the client's ACKs then sent the queued bytes from the
# client's core while the sidecar sent more from its own, and loopback (like
# veth between pods) delivers each core's packets through that core's own
# queue, so they arrived reordered and were retransmitted, congestion window
# and all. 50 MiB relays at 4 connections, upstream and wrk on one core, the
# sidecar on the other (bench/run.py's load layout): 18.7-19.2 relays/s
# unbounded (nginx 24-27), 27.4-27.9 at 64 and 128 KiB, 24.1 at 512, 21.0 at
# 1 MiB; spurious retransmissions per 6 s 1,100-1,300 against 50-90. Smaller
# bodies go unbounded: one fits in the send buffer in one call, where the
# bound made it wait for the socket every ~128 KiB (a 1 MiB sendfile hit cost
# 354 µs of CPU bounded against 303 unbounded, bench/tls_cost.py's plain case).
NOTSENT_LOWAT: Final = 128 * 1024
BOUNDED_FROM: Final = 4 * 1024 * 1024  # net.ipv4.tcp_wmem's largest send buffer
_NOTSENT_LOWAT_OPTION: Final = getattr(socket, "TCP_NOTSENT_LOWAT", None)  # Linux, macOS
# After a refusal, what the client still sends is read and dropped for a
# moment: closing with unread input resets the connection, and a client still
# sending could lose the refusal. Bounded in time and bytes.
LINGER_S: Final = 2.0
LINGER_BYTES: Final = 1024 * 1024
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


class Connection(asyncio.Protocol):
    __slots__ = (
        "_current",
        "_drain",
        "_dropped",
        "_halted",
        "_held",
        "_linger",
        "_loop",
        "_next",
        "_paused",
        "_queue",
        "_reader",
        "_reading",
        "_send",
        "_sending_file",
        "_server",
        "_transport",
        "_worker",
        "closed",
        "closing",
        "credential",
        "date",
        "idle_since",
        "peer",
        "received",
    )

    def __init__(self, server: Server) -> None:
        self._server = server
        # The server's ``Date:`` line (``Exchange`` reads it for every answer).
        self.date: DateHeader = server.date
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        # Exchanges waiting their turn; a Refused one is answered, then the connection closes.
        self._queue: deque[Exchange | Refused] = deque()
        self._reader = RequestReader(self, self._queue)
        self._held = b""  # bytes not parsed yet because the queue is full
        # Runs the handler of every request answer_now did not answer, in order;
        # between them it waits on ``_next`` (None while it is answering one).
        self._worker: asyncio.Task[None] | None = None
        self._next: asyncio.Future[Exchange] | None = None
        self._current: Exchange | None = None
        self._paused = False  # the transport's write buffer is over its high-water mark
        self._drain: asyncio.Future[None] | None = None
        self._send: SendWatch | None = None
        self._sending_file = False
        self._reading = True
        self._halted = False  # nothing more is parsed: a broken request or an upgrade came
        self._linger: asyncio.TimerHandle | None = None
        self._dropped = 0  # bytes read and dropped while lingering
        self.received = 0  # bytes read from the client
        self.peer = ""  # the client's IP address, for the front door's throttle
        # The front door's note of the last credential verified on this
        # connection (sidecar.auth.gate): its next requests skip the hashing.
        self.credential: Any = None
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
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple):
            self.peer = str(peername[0])
        self._send = SendWatch(self._transport, self._server.send_timeout_s, self._send_expired)
        self._server.connections.add(self)
        if self._server.closing:
            self.closing = True
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._server.connections.discard(self)
        self._queue.clear()
        self._held = b""
        # The reader and the send watch hold this connection (one a parser with
        # the reader's callbacks, the other one of ours): cycles only the
        # cyclic GC would free.
        self._reader.close()
        if self._send is not None:
            self._send.unwatch()
            self._send = None
        if self._linger is not None:
            self._linger.cancel()
        if self._worker is not None:
            self._worker.cancel()  # the client left: stop its upstream fetch too
        self._wake_writer()

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self._halted:
            self._drop(data)
        elif len(data) > SLICE:
            self._parse(data)
        else:  # _feed, inline: this is every small request
            try:
                self._reader.feed(data)
            except Refused as refused:
                self._refuse(refused)
            except httptools.HttpParserUpgrade:
                self._no_upgrade()
        self._pump()

    def pause_writing(self) -> None:
        # The client is not taking its answers: read no more requests from it
        # until it does, and drop it if it takes nothing for the send timeout.
        self._paused = True
        self._pause_reading()
        if self._send is not None:
            self._send.watch()

    def resume_writing(self) -> None:
        self._paused = False
        if not self._sending_file and self._send is not None:
            self._send.unwatch()
        self._wake_writer()
        self._pump()

    # -- parsing ----------------------------------------------------------
    def _parse(self, data: bytes) -> None:
        """A large read, in slices: the head is measured after each, and what
        comes after a full queue is held back (reading is paused meanwhile)."""
        view = memoryview(data)
        for start in range(0, len(data), SLICE):
            if self._halted:
                return
            if len(self._queue) >= PIPELINE_DEPTH:
                self._held = data[start:]
                self._pause_reading()
                return
            self._feed(view[start : start + SLICE])

    def _feed(self, piece: bytes | memoryview) -> None:
        try:
            self._reader.feed(piece)
        except Refused as refused:
            self._refuse(refused)
        except httptools.HttpParserUpgrade:
            self._no_upgrade()

    def _send_expired(self) -> None:
        current = self._current
        log.info(
            "client dropped: it took no bytes for the send timeout",
            extra={
                "send_timeout_s": self._server.send_timeout_s,
                "path": current.target if current is not None else None,
            },
        )
        if self._send is not None:
            self._send.reset_on_close()
        if self._sending_file and self._worker is not None:
            # asyncio's sendfile must unwind before its transport closes (3.11
            # fails on the transport's spent "empty" waiter otherwise).
            self._worker.cancel()
            self._loop.call_soon(self.abort)
        else:
            self.abort()  # connection_lost cancels the handler, as for a client that left

    # -- answering, in order ----------------------------------------------
    def _no_upgrade(self) -> None:
        """An Upgrade (or CONNECT) request: answered as a plain request if it is
        one, then the connection closes; what follows it is not HTTP/1.1."""
        last = self._queue[-1] if self._queue else self._current
        if isinstance(last, Exchange) and not last.sent:
            last.keep_alive = False
            self._halt()
        else:
            self._refuse(Refused(400, "protocol upgrades are not supported"))

    def _refuse(self, refused: Refused) -> None:
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
            while self._current is None and queue and not self._paused and not self.closed:
                item = queue.popleft()
                if isinstance(item, Refused):
                    self._write_refusal(item)
                    return
                self._current = item
                self.idle_since = 0.0
                if item.expects_continue:
                    self.write_continue()
                if answer_now is not None and self._answered_now(answer_now, item):
                    if not self._finished(item):
                        return
                    continue
                self._hand(item)
                break
            if not self._held or len(queue) >= PIPELINE_DEPTH or self.closed:
                break
            held, self._held = self._held, b""
            self._parse(held)
        if len(queue) >= PIPELINE_DEPTH:
            self._pause_reading()
        elif not (self._reading or queue or self._halted or self._paused or self.closed):
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

    def _hand(self, exchange: Exchange) -> None:
        """``exchange`` to the worker: waking it, or starting it if there is none yet."""
        waiting = self._next
        if waiting is not None:
            self._next = None
            waiting.set_result(exchange)
        else:
            self._worker = self._loop.create_task(self._work(exchange))

    async def _work(self, exchange: Exchange) -> None:
        """Answer requests in order until the connection ends; cancelled only
        when it ends (the client left, or was dropped)."""
        handler = self._server.handler
        try:
            while True:
                try:
                    await handler(exchange)
                except asyncio.CancelledError:
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
                        log.error(
                            "request handler returned no answer", extra={"path": exchange.target}
                        )
                        self._fail(exchange)
                if not self._finished(exchange):
                    return
                waiting = self._next = self._loop.create_future()
                self._pump()  # answers what it can now; hands the next one to ``waiting``
                exchange = await waiting
        finally:
            self._worker = self._next = None

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

    @property
    def idle(self) -> bool:
        """Nothing is being answered or waits to be: an answer written now comes next."""
        return self._current is None and not self._queue

    def write_continue(self) -> None:
        if not self.gone:
            cast(asyncio.Transport, self._transport).write(CONTINUE)

    def _write_refusal(self, refused: Refused) -> None:
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

    @property
    def backlog(self) -> tuple[int, int, int]:
        """What this client holds in memory: requests queued, request bytes held
        back unparsed, answer bytes the transport has not handed to the kernel."""
        transport = self._transport
        buffered = transport.get_write_buffer_size() if transport is not None else 0
        return len(self._queue), len(self._held), buffered

    # -- writing ------------------------------------------------------------
    @property
    def gone(self) -> bool:
        """The client hung up (or we cut it): nothing more can be written."""
        return self.closed or self._transport is None or self._transport.is_closing()

    def check_open(self) -> None:
        transport = self._transport  # (gone, spelt out: every answer checks it)
        if self.closed or transport is None or transport.is_closing():
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
        if self._server.tls is not None:
            await self._copy_file(fobj, offset, count)
            return
        bounded = self._bypass(count)
        try:
            try:
                sent = await self._loop.sendfile(transport, fobj, offset, count, fallback=False)
            except (NotImplementedError, asyncio.SendfileNotAvailableError):
                sent = -1
            if sent < 0:
                # Not awaited in the except clause: compiled, a coroutine that
                # yields there leaves its exception as the one being handled
                # while other requests run, and every exception they raise
                # then chains onto it (1 MiB hits cost 830 µs of CPU, not
                # 153, when the polled sendfile below yielded every 128 KiB).
                sent = await self._sendfile_polled(transport, fobj, offset, count)
        except OSError:
            if self.closed:
                raise ConnectionResetError("the client closed the connection") from None
            raise
        finally:
            self._bypassed(bounded)
        if sent != count:
            raise OSError(f"file ended {count - sent} bytes early")

    @property
    def splices(self) -> bool:
        """Bytes may reach this client through splice(2): plain TCP, no TLS to
        encrypt them."""
        return _CAN_SPLICE and self._server.tls is None and not self.closed

    async def splice(self, source: SpliceSource) -> bool:
        """``source``'s remaining bytes from its socket to this client's through
        a pipe, moved by the kernel (splice(2)): no byte is copied through this
        process and no buffer is held here, whatever the number of clients.
        ``source.sent`` counts what reached the client's socket. False, at once
        and with nothing taken, when the descriptors or a large enough pipe
        for it cannot be had. The client's send
        timeout applies as for sendfile; the source's own wait (``readable``)
        carries its idle timeout."""
        transport = self._transport
        sock = None if transport is None else transport.get_extra_info("socket")
        if transport is None or sock is None or self.closed:
            raise ConnectionResetError("the client closed the connection")
        try:
            out = os.dup(sock.fileno())  # a loop refuses a writer on a transport's own one
        except OSError:
            return False  # out of descriptors: nothing taken, the caller copies
        try:
            pipe_out, pipe_in = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            os.close(out)
            return False
        room = _widen(pipe_in)
        if not room:
            for fd in (pipe_out, pipe_in, out):
                os.close(fd)
            return False
        bounded = self._bypass(source.remaining)
        piped = 0
        turn = 0  # bytes moved since this relay last let the loop run
        try:
            await self._flushed(transport, out)
            while source.remaining or piped:
                got = False
                if source.remaining and piped < room:
                    n = _splice(source.fd, pipe_in, min(source.remaining, room - piped), source)
                    if n > 0:
                        source.took(n)
                        piped += n
                        got = True
                if piped:
                    try:
                        n = os.splice(pipe_out, out, piped, flags=_SPLICE_FLAGS)
                    except BlockingIOError:
                        n = 0
                    except OSError:
                        if self.closed:
                            raise ConnectionResetError("the client closed the connection") from None
                        raise
                    if n:
                        piped -= n
                        source.sent += n
                        turn += n
                        if turn >= TURN_BYTES:
                            turn = 0
                            await asyncio.sleep(0)
                    elif not got:
                        turn = 0
                        await self._writable(out)
                elif not got:
                    turn = 0
                    await source.readable()
        finally:
            os.close(pipe_out)
            os.close(pipe_in)
            os.close(out)
            self._bypassed(bounded)
        return True

    def _bypass(self, count: int) -> bool:
        """sendfile(2) and splice(2) write past the transport: the send timeout
        watches the client's progress through TCP_INFO while they run. True if
        what waits unsent was bounded for these ``count`` bytes (NOTSENT_LOWAT)."""
        self._sending_file = True
        if self._send is not None:
            self._send.watch()
        return count >= BOUNDED_FROM and self._bound_unsent(NOTSENT_LOWAT)

    def _bypassed(self, bounded: bool) -> None:
        self._sending_file = False
        if not self._paused and self._send is not None:
            self._send.unwatch()
        if bounded:
            self._bound_unsent(0)  # 0: the system's default again (unbounded)

    def _bound_unsent(self, limit: int) -> bool:
        transport = self._transport
        # Closing, the descriptor is the loop's to close (uvloop's socket then
        # says -1, and the number may be another connection's by the time a
        # relay notices): never touched.
        if _NOTSENT_LOWAT_OPTION is None or transport is None or transport.is_closing():
            return False
        sock = transport.get_extra_info("socket")
        if sock is None:
            return False
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _NOTSENT_LOWAT_OPTION, limit)
        except (OSError, ValueError):  # a kernel without the option; fd -1
            return False
        return True

    async def _flushed(self, transport: asyncio.Transport, fd: int) -> None:
        """Until the transport has written what it holds (the head, earlier
        bytes): what goes past it on ``fd`` (a duplicate) comes after."""
        while transport.get_write_buffer_size():
            await self._writable(fd)
            await asyncio.sleep(0)  # the transport flushes on the same event

    async def _copy_file(self, fobj: Any, offset: int, count: int) -> None:
        """Over TLS: sendfile(2) would put the file's plaintext on the encrypted
        stream, so it goes through the transport in bounded chunks, each read
        in a worker thread (the transport's flow control, and the send
        timeout with it, apply as to any streamed answer)."""
        fobj.seek(offset)
        done = 0
        while done < count:
            chunk = await self._loop.run_in_executor(None, fobj.read, min(count - done, COPY_CHUNK))
            if not chunk:
                raise OSError(f"file ended {count - done} bytes early")
            self.write(chunk)
            done += len(chunk)
            await self.drain()

    async def _sendfile_polled(
        self, transport: asyncio.Transport, fobj: Any, offset: int, count: int
    ) -> int:
        """sendfile(2) where the loop has none (uvloop): on a duplicate of the
        socket's descriptor, since a loop refuses a writer on a transport's own
        one. Zero-copy, so a hit holds no buffer per client whatever their
        number: 200 concurrent 50 MiB hits peaked at 90 MB (88 idle), against
        227 MB with the 256 KiB copies through worker threads this replaced,
        and cost 5x less CPU (bench/run.py --quick, one session)."""
        sock = transport.get_extra_info("socket")
        in_fd = fobj.fileno()
        dup = os.dup(sock.fileno())
        try:
            await self._flushed(transport, dup)
            done = turn = 0
            while done < count:
                try:
                    n = os.sendfile(dup, in_fd, offset + done, min(count - done, SENDFILE_MAX))
                except BlockingIOError:
                    n = -1  # waited for below, not in the except clause (see sendfile)
                if n < 0:
                    turn = 0
                    await self._writable(dup)
                    continue
                if n == 0:
                    break
                done += n
                turn += n
                if turn >= TURN_BYTES:
                    turn = 0
                    await asyncio.sleep(0)
            return done
        finally:
            os.close(dup)

    async def _writable(self, fd: int) -> None:
        """Until ``fd`` can take bytes; connection_lost wakes (and cancels) it too."""
        waiter = self._drain = self._loop.create_future()
        self._loop.add_writer(fd, self._wake_writer)
        try:
            await waiter
        finally:
            self._loop.remove_writer(fd)
        if self.closed:
            raise ConnectionResetError("the client closed the connection")

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
        if self._current is None and not self._queue:
            self.close()

    def kill(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self.abort()


def _widen(pipe: int) -> int:
    """The pipe's size once set to the first of ``PIPE_SIZES`` the system
    allows; 0 if none. An unprivileged user's pipes are capped in all
    (``fs.pipe-user-pages-soft``, 64 MiB): past it a new pipe has two pages,
    and a splice through it would cost more than the copy."""
    for size in PIPE_SIZES:
        try:
            return int(fcntl.fcntl(pipe, fcntl.F_SETPIPE_SZ, size))
        except OSError:
            continue
    return 0


def _splice(fd: int, pipe: int, count: int, source: SpliceSource) -> int:
    """One splice(2) from ``source``'s socket into the pipe: the bytes moved, 0
    if none are there yet (or the pipe is full); the socket's end or failure
    before its last byte raises the source's error."""
    try:
        n = os.splice(fd, pipe, count, flags=_SPLICE_FLAGS)
    except BlockingIOError:
        return 0
    except OSError as exc:
        source.ended(exc)
    if n == 0:
        source.ended(None)
    return n
