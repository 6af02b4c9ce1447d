"""The sidecar's HTTP/1.1 server (sidecar.server), over real loopback sockets.

Raw sockets rather than an HTTP client: framing, pipelining and what is sent
on the wire are the point here.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import uvloop

from sidecar.server import Exchange, Server
from sidecar.server.connection import NOTSENT_LOWAT
from sidecar.server.exchange import header_block
from tests.adversarial.rawhttp import closed, read_head, read_response
from tests.adversarial.rawhttp import request as get
from tests.polling import until

Handler = Callable[[Exchange], Awaitable[None]]


async def hello(ex: Exchange) -> None:
    ex.send(200, {"Content-Type": "text/plain"}, f"hello {ex.target}".encode())


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Server]]]:
    servers: list[Server] = []

    async def start(handler: Handler = hello, **kwargs: object) -> Server:
        server = Server(handler, **kwargs)  # type: ignore[arg-type]
        await server.listen("127.0.0.1", 0)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close(1.0)


async def connect(server: Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


async def test_keep_alive_serves_several_requests_on_one_connection(serve):
    server = await serve()
    reader, writer = await connect(server)
    for path in ("/a", "/b"):
        writer.write(get(path))
        status, headers, body = await read_response(reader)
        assert (status, body) == (200, f"hello {path}".encode())
        assert "connection" not in headers and "date" in headers
    writer.close()


async def test_http10_without_keep_alive_is_closed_after_the_answer(serve):
    server = await serve()
    reader, writer = await connect(server)
    writer.write(get("/x", version="1.0"))
    status, headers, body = await read_response(reader)
    assert status == 200 and headers["connection"] == "close" and body == b"hello /x"
    assert await closed(reader)


async def test_pipelined_requests_are_answered_in_order(serve):
    async def slow_first(ex: Exchange) -> None:
        if ex.target == "/1":
            await asyncio.sleep(0.2)  # the second one is ready long before
        await hello(ex)

    server = await serve(slow_first)
    reader, writer = await connect(server)
    writer.write(get("/1") + get("/2") + get("/3"))
    bodies = [(await read_response(reader))[2] for _ in range(3)]
    assert bodies == [b"hello /1", b"hello /2", b"hello /3"]


async def test_answer_now_and_tasks_mix_in_order(serve):
    async def later(ex: Exchange) -> None:
        await asyncio.sleep(0.05)
        ex.send(200, {}, b"later " + ex.target.encode())

    def now(ex: Exchange) -> bool:
        if ex.target.startswith("/now"):
            ex.send(200, {}, b"now " + ex.target.encode())
            return True
        return False

    server = await serve(later, answer_now=now)
    reader, writer = await connect(server)
    writer.write(get("/now1") + get("/task") + get("/now2"))
    bodies = [(await read_response(reader))[2] for _ in range(3)]
    assert bodies == [b"now /now1", b"later /task", b"now /now2"]


async def test_a_cancel_one_request_took_back_does_not_reach_the_next(serve):
    # The requests of a connection share its worker task: a cancel a handler
    # caught and answered anyway (as a hedge's win is) leaves the task's count
    # raised, which the next request's asyncio.timeout must not misread as a
    # cancel of its own (it measures from the count at its entry).
    async def handler(ex: Exchange) -> None:
        if ex.target == "/took-back":
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):  # taken back, no uncancel()
                await asyncio.sleep(1)
            ex.send(200, {}, b"answered")
            return
        try:
            async with asyncio.timeout(0.01):
                await asyncio.sleep(5)
        except TimeoutError:
            ex.send(504, {}, b"timed out")

    server = await serve(handler)
    reader, writer = await connect(server)
    writer.write(get("/took-back"))
    assert (await read_response(reader))[::2] == (200, b"answered")
    writer.write(get("/times-out"))
    assert (await read_response(reader))[::2] == (504, b"timed out")
    writer.close()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"this is not http\r\n\r\n", 400),
        (get("/" + "a" * 9000), 414),
        (get("/x", *[f"X-Filler-{i}: {'v' * 200}" for i in range(90)]), 431),
    ],
)
async def test_bad_requests_are_refused_and_never_reach_the_handler(serve, request_bytes, status):
    seen: list[str] = []

    async def handler(ex: Exchange) -> None:
        seen.append(ex.target)
        await hello(ex)

    server = await serve(handler)
    reader, writer = await connect(server)
    writer.write(request_bytes)
    got, headers, _ = await read_response(reader)
    assert got == status and headers["connection"] == "close"
    assert await closed(reader)
    assert seen == []


async def test_an_upgrade_request_is_answered_plainly_then_closed(serve):
    server = await serve()
    reader, writer = await connect(server)
    writer.write(get("/x", "Upgrade: websocket", "Connection: Upgrade") + b"\x81\x05hello")
    status, headers, body = await read_response(reader)
    assert (status, body, headers["connection"]) == (200, b"hello /x", "close")
    assert await closed(reader)


async def test_head_announces_the_length_and_sends_no_body(serve):
    server = await serve()
    reader, writer = await connect(server)
    writer.write(get("/x", method="HEAD") + get("/y"))
    status, headers = await read_head(reader)
    assert status == 200 and headers["content-length"] == str(len(b"hello /x"))
    # the next response starts right after the HEAD's headers: no body was sent
    status, _, body = await read_response(reader)
    assert body == b"hello /y"


async def stream_unknown_length(ex: Exchange) -> None:
    await ex.start(200, {"Content-Type": "application/zip"}, None)
    for part in (b"one ", b"two ", b"three"):
        await ex.write(part)
    await ex.end()


async def test_unknown_length_is_chunked_for_http11(serve):
    server = await serve(stream_unknown_length)
    reader, writer = await connect(server)
    writer.write(get("/z") + get("/z"))
    for _ in range(2):  # and the connection stays usable
        _, headers, body = await read_response(reader)
        assert headers["transfer-encoding"] == "chunked" and body == b"one two three"


async def test_unknown_length_is_close_delimited_for_http10(serve):
    server = await serve(stream_unknown_length)
    reader, writer = await connect(server)
    writer.write(get("/z", "Connection: keep-alive", version="1.0"))
    _, headers, body = await read_response(reader)
    assert "transfer-encoding" not in headers and headers["connection"] == "close"
    assert body == b"one two three"


async def test_a_client_that_leaves_cancels_its_handler(serve):
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def waits(ex: Exchange) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    server = await serve(waits)
    _, writer = await connect(server)
    writer.write(get("/slow"))
    await asyncio.wait_for(started.wait(), 5)
    writer.close()
    await asyncio.wait_for(cancelled.wait(), 5)


async def test_writes_wait_for_a_slow_reader(serve):
    chunk = b"x" * (1024 * 1024)
    written: list[int] = []

    async def big(ex: Exchange) -> None:
        await ex.start(200, {}, 64 * len(chunk))
        for i in range(64):
            await ex.write(chunk)
            written.append(i)
        await ex.end()

    server = await serve(big)
    reader, writer = await connect(server)
    writer.write(get("/big"))
    await asyncio.sleep(0.5)  # not reading: the server must stop producing
    assert len(written) < 32, f"{len(written)} MiB written to a client that reads nothing"
    status, _, body = await read_response(reader)
    assert status == 200 and len(body) == 64 * len(chunk) and len(written) == 64


async def test_a_handler_error_is_a_500_and_a_closed_connection(serve, caplog):
    async def broken(ex: Exchange) -> None:
        raise RuntimeError("bug")

    server = await serve(broken)
    reader, writer = await connect(server)
    writer.write(get("/x"))
    status, headers, _ = await read_response(reader)
    assert status == 500 and headers["connection"] == "close"
    assert await closed(reader)
    assert "request handler failed" in caplog.text


async def test_a_handler_that_answers_nothing_is_a_500(serve, caplog):
    async def silent(ex: Exchange) -> None:
        return None

    server = await serve(silent)
    reader, writer = await connect(server)
    writer.write(get("/x"))
    status, _, _ = await read_response(reader)
    assert status == 500 and "returned no answer" in caplog.text


async def test_a_handler_that_leaves_a_body_unfinished_cuts_the_connection(serve):
    async def unfinished(ex: Exchange) -> None:
        await ex.start(200, {}, 100)
        await ex.write(b"only ten b")

    server = await serve(unfinished)
    reader, writer = await connect(server)
    writer.write(get("/x"))
    with pytest.raises(asyncio.IncompleteReadError):
        await read_response(reader)


async def test_idle_keep_alive_connections_are_closed(serve):
    server = await serve(keepalive_s=0.2)
    reader, writer = await connect(server)
    writer.write(get("/x"))
    await read_response(reader)
    assert await closed(reader)  # within the read's 5 s, after ~0.2-0.4 s
    assert not server.connections


async def test_a_half_sent_request_is_closed_like_an_idle_connection(serve):
    server = await serve(keepalive_s=0.2)
    reader, writer = await connect(server)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: t\r\n")  # and never the end
    assert await closed(reader)
    assert not server.connections


async def test_close_lets_requests_in_progress_finish_and_closes_idle_ones(serve):
    release = asyncio.Event()

    async def held(ex: Exchange) -> None:
        if ex.target == "/held":
            await release.wait()
        await hello(ex)

    server = await serve(held)
    port = server.port
    busy_r, busy_w = await connect(server)
    idle_r, idle_w = await connect(server)
    idle_w.write(get("/quick"))
    await read_response(idle_r)
    busy_w.write(get("/held"))
    await asyncio.sleep(0.05)
    closing = asyncio.create_task(server.close(5.0))
    assert await closed(idle_r)
    release.set()
    status, headers, body = await read_response(busy_r)
    assert status == 200 and body == b"hello /held" and headers["connection"] == "close"
    await asyncio.wait_for(closing, 5)
    with pytest.raises(OSError):  # no longer listening
        await asyncio.open_connection("127.0.0.1", port)


async def test_close_cuts_what_outlives_the_grace(serve):
    async def forever(ex: Exchange) -> None:
        await asyncio.sleep(30)

    server = await serve(forever)
    reader, writer = await connect(server)
    writer.write(get("/x"))
    await asyncio.sleep(0.05)
    await asyncio.wait_for(server.close(0.2), 5)
    assert await asyncio.wait_for(reader.read(), 5) == b""


def test_a_line_break_in_a_header_value_is_refused():
    with pytest.raises(ValueError, match="line break"):
        header_block({"ETag": 'x"\r\nSet-Cookie: a=b'})
    assert header_block({"Content-Length": "5", "ETag": "e"}) == b"ETag: e\r\n"


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_files_are_sent_whole_and_in_parts_on_both_loops(tmp_path: Path, loop_factory):
    """asyncio's loop has sendfile; under uvloop the server calls sendfile(2) itself."""
    data = bytes(range(256)) * 4096 * 3  # 3 MiB: more than one copy chunk
    path = tmp_path / "blob"
    path.write_bytes(data)

    async def scenario() -> None:
        async def files(ex: Exchange) -> None:
            first, last = (0, len(data) - 1) if ex.target == "/whole" else (1000, 2_500_000)
            status = 200 if first == 0 else 206
            with open(path, "rb") as fobj:
                await ex.start(status, {"Content-Type": "x"}, last - first + 1)
                await ex.sendfile(fobj, first, last - first + 1)
                await ex.end()

        server = Server(files)
        await server.listen("127.0.0.1", 0)
        try:
            reader, writer = await connect(server)
            writer.write(get("/whole") + get("/part"))
            status, _, body = await read_response(reader)
            assert status == 200 and body == data
            status, _, body = await read_response(reader)
            assert status == 206 and body == data[1000:2_500_001]
            writer.close()
        finally:
            await server.close(1.0)

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(scenario())


async def test_a_client_that_takes_no_bytes_is_dropped_and_its_handler_cancelled(serve, caplog):
    cancelled = asyncio.Event()
    chunk = b"x" * (1024 * 1024)

    async def endless(ex: Exchange) -> None:
        await ex.start(200, {}, None)
        try:
            for _ in range(1024):  # far more than the socket buffers hold
                await ex.write(chunk)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    caplog.set_level("INFO", "sidecar.server")
    server = await serve(endless, send_timeout_s=0.3)
    _, writer = await connect(server)
    writer.write(get("/big"))
    await asyncio.wait_for(cancelled.wait(), 10)
    assert not server.connections and "client dropped" in caplog.text
    # Reset, not closed behind the megabytes it will never read: the client's
    # socket is closed at once (Linux tcpi_state 7, TCP_CLOSE).
    sock = writer.get_extra_info("socket")
    for _ in range(500):
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
        if state != 1:  # ESTABLISHED
            break
        await asyncio.sleep(0.01)
    assert state == 7
    writer.close()


async def test_a_slow_client_that_keeps_reading_is_not_dropped(serve):
    size = 4 * 1024 * 1024

    async def big(ex: Exchange) -> None:
        await ex.start(200, {}, size)
        for _ in range(size // 65536):
            await ex.write(b"y" * 65536)
        await ex.end()

    server = await serve(big, send_timeout_s=1.0)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # a small window
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=64 * 1024)
    writer.write(get("/slow"))
    status, _ = await read_head(reader)
    got = 0
    reads = 0
    while got < size and reads < 1000:  # 64 KiB every 50 ms: short pauses, a long answer
        piece = await asyncio.wait_for(reader.read(65536), 5)
        if not piece:
            break
        got += len(piece)
        reads += 1
        await asyncio.sleep(0.05)
    assert status == 200 and got == size
    assert reads * 0.05 > 1.0  # the whole answer took longer than the send timeout
    writer.close()


async def sendfile_to_a_client_that_reads_nothing(tmp_path: Path) -> None:
    """The file path is watched too: sendfile bypasses the transport's buffer."""
    path = tmp_path / "huge"
    with open(path, "wb") as f:
        f.truncate(256 * 1024 * 1024)  # sparse: no disk used
    cancelled = asyncio.Event()

    async def files(ex: Exchange) -> None:
        with open(path, "rb") as fobj:
            await ex.start(200, {}, 256 * 1024 * 1024)
            try:
                await ex.sendfile(fobj, 0, 256 * 1024 * 1024)
            except asyncio.CancelledError:
                cancelled.set()
                raise

    server = Server(files, send_timeout_s=0.3)
    await server.listen("127.0.0.1", 0)
    try:
        _, writer = await connect(server)
        writer.write(get("/huge"))
        await asyncio.wait_for(cancelled.wait(), 10)
        writer.close()
    finally:
        await server.close(1.0)


def unsent(sock: socket.socket) -> int:
    """tcpi_notsent_bytes of Linux's struct tcp_info: written, not yet sent."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    return int.from_bytes(info[144:148], sys.byteorder)


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_a_file_is_sent_without_buffering_it_on_both_loops(tmp_path: Path, loop_factory):
    """Memory per client is bounded whatever the file: the bytes go from the
    file to the socket (sendfile), never through the transport's buffer (the
    former copy under uvloop held a 256 KiB read plus a full buffer per client),
    and, the file being large, the kernel holds little of it unsent while it
    goes (TCP_NOTSENT_LOWAT): unbounded, megabytes waited there, and on loopback
    they went out of order."""
    size = 32 * 1024 * 1024
    path = tmp_path / "big"
    with open(path, "wb") as f:
        f.truncate(size)

    async def scenario() -> None:
        buffered: list[int] = []
        queued: list[int] = []
        done = asyncio.Event()

        async def files(ex: Exchange) -> None:
            with open(path, "rb") as fobj:
                await ex.start(200, {}, size)
                await ex.sendfile(fobj, 0, size)
                await ex.end()
            done.set()

        server = Server(files)
        await server.listen("127.0.0.1", 0)
        try:
            reader, writer = await connect(server)
            writer.write(get("/big"))
            await read_head(reader)
            [conn] = server.connections
            sock = conn._transport.get_extra_info("socket")
            limits = set()
            got = 0
            while got < size:  # a slow reader: the socket is full most of the time
                piece = await asyncio.wait_for(reader.read(1024 * 1024), 10)
                assert piece
                got += len(piece)
                buffered.append(conn._transport.get_write_buffer_size())
                queued.append(unsent(sock))
                limits.add(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT))
                await asyncio.sleep(0.002)
            await asyncio.wait_for(done.wait(), 10)
            assert got == size and len(buffered) >= 16
            assert max(buffered) == 0, max(buffered)
            assert NOTSENT_LOWAT in limits
            # One write may pass the mark by what it was putting in (a 64 KiB
            # segment at most on loopback).
            assert max(queued) <= NOTSENT_LOWAT + 64 * 1024, max(queued)
            # Bounded for this body only: the next answer on the connection is not.
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == 0
            writer.close()
        finally:
            await server.close(1.0)

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(scenario())


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_a_file_sent_to_a_client_that_reads_nothing_is_dropped(tmp_path: Path, loop_factory):
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(sendfile_to_a_client_that_reads_nothing(tmp_path))


async def test_head_bytes_are_limited_as_they_arrive_in_small_pieces(serve):
    """A header line dribbled a hundred bytes at a time is cut at the same size."""
    server = await serve()
    reader, writer = await connect(server)
    writer.write(b"GET /x HTTP/1.1\r\nHost: t\r\nX-Long: ")

    async def dribble() -> None:
        for _ in range(300):  # 30 KB at most, well past the limit
            writer.write(b"a" * 100)
            await writer.drain()
            await asyncio.sleep(0)

    dribbling = asyncio.create_task(dribble())
    status, headers = await read_head(reader)
    assert status == 431 and headers["connection"] == "close"
    dribbling.cancel()
    writer.close()


async def test_expect_100_continue_in_a_pipeline_comes_at_its_turn(serve):
    async def later(ex: Exchange) -> None:
        await asyncio.sleep(0.05)
        await hello(ex)

    server = await serve(later)
    reader, writer = await connect(server)
    writer.write(get("/1") + get("/2", "Expect: 100-continue"))
    assert (await read_response(reader))[2] == b"hello /1"
    assert await read_head(reader) == (100, {})
    assert (await read_response(reader))[2] == b"hello /2"
    writer.close()


async def test_an_absolute_form_target_for_this_host_reaches_the_handler_in_origin_form(serve):
    server = await serve()
    reader, writer = await connect(server)
    writer.write(b"GET HTTP://T:80/a/b?c HTTP/1.1\r\nHost: t:80\r\n\r\n")
    assert (await read_response(reader))[2] == b"hello /a/b?c"
    writer.write(b"GET http://t:80?q HTTP/1.1\r\nHost: t:80\r\n\r\n")
    assert (await read_response(reader))[2] == b"hello /?q"
    writer.close()


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_unbounding_after_the_client_left_touches_no_socket(loop_factory):
    """A large body's send ends after its client left (a relay waiting on its
    upstream notices only at its next write): the bound on unsent bytes is then
    not lifted on a socket that is gone. uvloop's already says descriptor -1,
    and the number may belong to another connection by then."""

    async def scenario() -> None:
        server = Server(hello)
        await server.listen("127.0.0.1", 0)
        try:
            _, writer = await connect(server)
            await until("the connection", lambda: len(server.connections) == 1)
            [conn] = server.connections
            assert conn._bound_unsent(NOTSENT_LOWAT) is True  # as a large body starts
            writer.transport.abort()
            await until("its end", lambda: not server.connections)
            await asyncio.sleep(0.01)  # past the loop's own closing of the socket
            assert conn._bound_unsent(0) is False
        finally:
            await server.close(1.0)

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(scenario())
