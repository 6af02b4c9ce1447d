"""http1.Connection fed byte by byte: framing, keep-alive, errors, flow control.

No sockets: a fake transport records writes and pause/resume, and the tests
play the server's bytes into ``data_received`` in whatever segments they like.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.errors import (
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamTruncated,
)
from sidecar.upstreams.http1 import (
    BODY,
    DONE,
    FIELD_LIMIT,
    HEAD_LIMIT,
    HEADERS,
    HIGH_WATER,
    LINE_LIMIT,
    Connection,
    StaleConnection,
)
from sidecar.upstreams.route import Origin, Route
from sidecar.upstreams.sender import encode_path, encode_target, header_block


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.paused = False
        self.pauses = 0
        self.closing = False
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True


def connection() -> tuple[Connection, FakeTransport]:
    conn = Connection(None, "up")
    transport = FakeTransport()
    conn.connection_made(transport)
    return conn, transport


def response(body: bytes = b"hello", status: str = "200 OK", extra: str = "") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\n{extra}"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


def chunked(parts: list[bytes]) -> bytes:
    out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    for part in parts:
        out += f"{len(part):x}\r\n".encode() + part + b"\r\n"
    return out + b"0\r\n\r\n"


def body_of(conn: Connection) -> bytes:
    return conn.take()


async def test_content_length_in_one_segment_keeps_the_connection() -> None:
    conn, transport = connection()
    conn.send(b"GET /x HTTP/1.1\r\n\r\n", head=False, deadline=0.0)
    assert transport.written == [b"GET /x HTTP/1.1\r\n\r\n"]
    conn.data_received(response(b"hello"))
    assert conn.state == DONE and conn.status == 200 and conn.length == 5
    assert conn.headers is not None and conn.headers["content-type"] == "text/plain"
    assert not conn.reusable  # body still buffered
    assert body_of(conn) == b"hello"
    assert conn.reusable


async def test_content_length_body_after_the_headers_bypasses_the_parser() -> None:
    conn, _ = connection()
    conn.send(b"GET / HTTP/1.1\r\n\r\n", False, 0.0)
    whole = response(b"a" * 10 + b"b" * 10 + b"c" * 10)
    conn.data_received(whole[:-25])  # headers and 5 body bytes
    assert conn.state == BODY
    conn.data_received(whole[-25:-10])
    conn.data_received(whole[-10:])
    assert conn.state == DONE and conn.received == 30
    assert body_of(conn) == b"a" * 10 + b"b" * 10 + b"c" * 10
    # The next exchange gets a fresh parser (the old one still expects body bytes).
    conn.recycle()
    conn.send(b"GET / HTTP/1.1\r\n\r\n", False, 0.0)
    conn.data_received(response(b"next"))
    assert conn.state == DONE and body_of(conn) == b"next"


async def test_bytes_beyond_content_length_poison_the_connection() -> None:
    conn, _ = connection()
    conn.send(b"GET / HTTP/1.1\r\n\r\n", False, 0.0)
    whole = response(b"12345")
    conn.data_received(whole[:-3])
    conn.data_received(b"345EXTRA")
    assert body_of(conn) == b"12345"
    assert conn.state == DONE and not conn.reusable


@settings(max_examples=60, deadline=None)
@given(
    parts=st.lists(st.binary(min_size=1, max_size=40), max_size=6),
    cuts=st.lists(st.integers(min_value=1, max_value=30), max_size=12),
)
def test_chunked_bodies_survive_any_segmentation(parts: list[bytes], cuts: list[int]) -> None:
    async def scenario() -> None:
        conn, _ = connection()
        conn.send(b"GET / HTTP/1.1\r\n\r\n", False, 0.0)
        raw, got, pos = chunked(parts), b"", 0
        for cut in cuts:
            if pos + cut >= len(raw):
                break  # a transport never delivers an empty segment
            conn.data_received(raw[pos : pos + cut])
            got += conn.take()
            pos += cut
        if pos < len(raw):
            conn.data_received(raw[pos:])
        got += conn.take()
        assert got == b"".join(parts)
        assert conn.state == DONE and conn.reusable and conn.length is None

    asyncio.run(scenario())


async def test_body_without_length_ends_at_a_clean_eof_and_is_not_kept() -> None:
    conn, _ = connection()
    conn.send(b"GET / HTTP/1.1\r\n\r\n", False, 0.0)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nsome")
    conn.data_received(b" bytes")
    assert conn.state == BODY
    assert conn.eof_received() is False  # a FIN: the transport closes itself
    conn.connection_lost(None)
    assert conn.state == DONE and conn.error is None
    assert body_of(conn) == b"some bytes"
    assert not conn.reusable


async def test_body_without_length_cut_by_a_reset_is_truncation() -> None:
    conn, _ = connection()
    conn.send(b"GET / HTTP/1.1\r\n\r\n", False, 0.0)
    conn.data_received(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npart of")
    conn.connection_lost(ConnectionResetError(104, "Connection reset by peer"))
    assert conn.state == BODY
    assert isinstance(conn.error, UpstreamTruncated)
    assert "7 bytes" in conn.error.message and "reset" in conn.error.message


async def test_body_without_length_cut_by_our_own_abort_is_truncation() -> None:
    # Shutdown, an idle timeout: the sidecar ended it, so the body is not whole.
    conn, transport = connection()
    conn.send(b"GET / HTTP/1.1\r\n\r\n", False, 0.0)
    conn.data_received(b"HTTP/1.1 200 OK\r\n\r\npart of")
    conn.abort()
    conn.connection_lost(None)
    assert transport.aborted and isinstance(conn.error, UpstreamTruncated)


async def test_eof_inside_a_content_length_body_is_truncation() -> None:
    conn, _ = connection()
    conn.send(b"GET / HTTP/1.1\r\n\r\n", False, 0.0)
    conn.data_received(response(b"x" * 100)[:-60])
    conn.connection_lost(ConnectionResetError(104, "Connection reset by peer"))
    assert isinstance(conn.error, UpstreamTruncated)
    assert "40 of 100" in conn.error.message


async def test_eof_before_the_last_chunk_is_truncation() -> None:
    conn, _ = connection()
    conn.send(b"GET / HTTP/1.1\r\n\r\n", False, 0.0)
    conn.data_received(chunked([b"abc", b"def"])[:-5])
    conn.connection_lost(None)
    assert isinstance(conn.error, UpstreamTruncated)
    assert "chunk" in conn.error.message


async def test_head_has_no_body_whatever_content_length_says() -> None:
    conn, _ = connection()
    conn.send(b"HEAD / HTTP/1.1\r\n\r\n", head=True, deadline=0.0)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n")
    assert conn.state == DONE and conn.length == 5000 and conn.reusable
    conn.recycle()
    conn.send(b"GET / HTTP/1.1\r\n\r\n", False, 0.0)
    conn.data_received(response(b"after head"))
    assert body_of(conn) == b"after head"


@pytest.mark.parametrize("status", ["204 No Content", "304 Not Modified"])
async def test_no_body_statuses(status: str) -> None:
    conn, _ = connection()
    conn.send(b"GET / HTTP/1.1\r\n\r\n", False, 0.0)
    conn.data_received(f"HTTP/1.1 {status}\r\nETag: x\r\n\r\n".encode())
    assert conn.state == DONE and conn.reusable


async def test_informational_answers_are_skipped() -> None:
    conn, _ = connection()
    conn.send(b"GET / HTTP/1.1\r\n\r\n", False, 0.0)
    conn.data_received(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n")
    assert conn.state == HEADERS
    conn.data_received(response(b"ok"))
    assert conn.status == 200 and conn.headers is not None and "Link" not in conn.headers
    assert body_of(conn) == b"ok"


@pytest.mark.parametrize(
    ("version", "connection_header", "kept"),
    [
        ("1.1", "", True),
        ("1.1", "Connection: close\r\n", False),
        ("1.1", "Connection: Keep-Alive, Close\r\n", False),
        ("1.0", "", False),
        ("1.0", "Connection: keep-alive\r\n", True),
    ],
)
async def test_keep_alive_rules(version: str, connection_header: str, kept: bool) -> None:
    conn, _ = connection()
    conn.send(b"GET / HTTP/1.1\r\n\r\n", False, 0.0)
    conn.data_received(
        f"HTTP/{version} 200 OK\r\n{connection_header}Content-Length: 2\r\n\r\nok".encode()
    )
    assert body_of(conn) == b"ok"
    assert conn.reusable is kept


async def test_a_reused_connection_closed_before_any_byte_is_stale() -> None:
    conn, _ = connection()
    conn.send(b"GET / HTTP/1.1\r\n\r\n", False, 0.0)
    conn.data_received(response(b"1"))
    conn.take()
    conn.recycle()
    conn.send(b"GET / HTTP/1.1\r\n\r\n", False, 0.0)
    conn.connection_lost(None)
    assert isinstance(conn.error, StaleConnection)


async def test_a_fresh_connection_closed_is_a_plain_connect_error() -> None:
    conn, _ = connection()
    conn.send(b"GET / HTTP/1.1\r\n\r\n", False, 0.0)
    conn.connection_lost(ConnectionResetError(104, "Connection reset by peer"))
    assert type(conn.error) is UpstreamConnectError
    assert "reset" in conn.error.message


async def test_a_reused_connection_that_sent_part_of_an_answer_is_not_stale() -> None:
    conn, _ = connection()
    conn.send(b"GET / HTTP/1.1\r\n\r\n", False, 0.0)
    conn.data_received(response(b"1"))
    conn.take()
    conn.recycle()
    conn.send(b"GET / HTTP/1.1\r\n\r\n", False, 0.0)
    conn.data_received(b"HTTP/1.1 200 O")
    conn.connection_lost(None)
    assert type(conn.error) is UpstreamConnectError


async def test_sending_on_a_closed_connection_fails_at_once() -> None:
    conn, transport = connection()
    conn.send(b"GET / HTTP/1.1\r\n\r\n", False, 0.0)
    conn.data_received(response(b"1"))
    conn.take()
    conn.recycle()
    transport.closing = True
    waiter = conn.send(b"GET / HTTP/1.1\r\n\r\n", False, 0.0)
    assert waiter.done() and isinstance(conn.error, StaleConnection)
    with pytest.raises(StaleConnection):
        conn.check()


async def test_garbage_is_an_invalid_response() -> None:
    conn, transport = connection()
    conn.send(b"GET / HTTP/1.1\r\n\r\n", False, 0.0)
    conn.data_received(b"SSH-2.0-OpenSSH_9.2\r\n")
    assert isinstance(conn.error, UpstreamProtocolError)
    assert "invalid HTTP response" in conn.error.message
    assert transport.aborted


async def test_bytes_on_an_idle_connection_close_it() -> None:
    conn, transport = connection()
    conn.data_received(b"HTTP/1.1 200 OK\r\n\r\n")
    assert transport.aborted


async def test_flow_control_pauses_above_the_high_water_mark() -> None:
    conn, transport = connection()
    size = 4 * HIGH_WATER
    conn.send(b"GET / HTTP/1.1\r\n\r\n", False, 0.0)
    conn.data_received(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
    segment = b"z" * (64 * 1024)
    taken = 0
    while conn.received < size:
        if transport.paused:  # a real transport delivers nothing while paused
            taken += len(conn.take())
            assert not transport.paused
            continue
        conn.data_received(segment)
        assert conn.buffered <= HIGH_WATER + len(segment)
    taken += len(conn.take())
    assert taken == size and conn.state == DONE
    assert transport.pauses >= 3
    assert conn.peak_buffered <= HIGH_WATER


async def test_expire_times_out_headers_and_bodies() -> None:
    conn, transport = connection()
    conn.send(b"GET / HTTP/1.1\r\n\r\n", False, 0.0)
    conn.expire()
    assert isinstance(conn.error, UpstreamTimeout) and "first byte" in conn.error.message
    assert transport.aborted
    conn2, _ = connection()
    conn2.send(b"GET / HTTP/1.1\r\n\r\n", False, 0.0)
    conn2.data_received(response(b"x" * 10)[:-5])
    conn2.take()
    waiting = asyncio.ensure_future(conn2.wait_body(30.0))
    await asyncio.sleep(0)
    assert conn2.deadline > 0
    conn2.expire()
    await waiting
    assert isinstance(conn2.error, UpstreamTimeout) and "idle" in conn2.error.message


def test_request_targets_are_escaped_only_when_needed() -> None:
    assert encode_path("github.com/!azure/go-autorest/@v/v1.0.0.zip") == (
        b"github.com/!azure/go-autorest/@v/v1.0.0.zip"
    )
    assert encode_path("sumdb/sum.golang.org/lookup/golang.org/x/text@v0.3.0") == (
        b"sumdb/sum.golang.org/lookup/golang.org/x/text@v0.3.0"
    )
    assert encode_path("a b/ü?#") == b"a%20b/%C3%BC%3F%23"
    assert encode_target("https://s.example/b/k%2Fx?sig=a%3D&e=1") == b"/b/k%2Fx?sig=a%3D&e=1"
    assert encode_target("http://h") == b"/"


def test_header_block_is_constant_and_carries_auth_only_when_given() -> None:
    route = Route(Origin.of("https://proxy.example:8443/base"))
    block = header_block(route, None, keep_alive=True)
    assert block.startswith(b" HTTP/1.1\r\nHost: proxy.example:8443\r\n")
    assert b"Accept-Encoding: identity\r\n" in block and b"Connection: keep-alive" in block
    assert block.endswith(b"\r\n\r\n") and b"Authorization" not in block
    with_auth = header_block(route, "Basic eDp5", keep_alive=False)
    assert b"Authorization: Basic eDp5\r\n" in with_auth and b"Connection: close" in with_auth


def test_origins() -> None:
    assert Origin.of("http://h").port == 80
    assert Origin.of("https://h").port == 443
    assert Origin.of("HTTPS://H:443/x").host_header() == "h"
    assert Origin.of("http://[::1]:3000").host_header() == "[::1]:3000"
    assert Origin.of("http://127.0.0.1:3000").literal and not Origin.of("http://h").literal
    with pytest.raises(ValueError):
        Origin.of("ftp://h")


# ---------------------------------------------------------------- bytes past the end


async def test_a_second_message_in_the_same_read_is_never_parsed() -> None:
    conn, transport = connection()
    conn.send(b"GET / HTTP/1.1\r\n\r\n", False, 0.0)
    evil = b"HTTP/1.1 502 Bad\r\nX-Evil: 1\r\nContent-Length: 4\r\n\r\nevil"
    conn.data_received(response(b"12345") + evil)
    assert conn.state == DONE and conn.error is None
    assert conn.status == 200 and conn.headers is not None and "X-Evil" not in conn.headers
    assert body_of(conn) == b"12345"
    assert transport.aborted and not conn.reusable


# (A bare CRLF after a message is skipped by llhttp: it carries nothing.)
@pytest.mark.parametrize("extra", [b"EVIL", b"HTTP/1.1 200 OK\r\n", b"\r\nHTTP/1.1 200 OK\r\n"])
async def test_bytes_after_a_chunked_body_close_the_connection(extra: bytes) -> None:
    conn, transport = connection()
    conn.send(b"GET / HTTP/1.1\r\n\r\n", False, 0.0)
    conn.data_received(chunked([b"abc", b"def"]) + extra)
    assert conn.error is None and body_of(conn) == b"abcdef"
    assert transport.aborted and not conn.reusable


async def test_bytes_after_a_complete_answer_in_a_later_read_close_the_connection() -> None:
    conn, transport = connection()
    conn.send(b"GET / HTTP/1.1\r\n\r\n", False, 0.0)
    conn.data_received(response(b"12345"))
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil")
    assert body_of(conn) == b"12345" and conn.error is None
    assert transport.aborted and not conn.reusable


# ---------------------------------------------------------------- strict parsing


@pytest.mark.parametrize(
    "field",
    [
        b"X-A: a\x00b",  # NUL
        b"X-A: a\x01b",  # other C0
        b"X-A: a\x1bb",
        b"X-A: a\x7fb",  # DEL
        b"X-A: a\rb",  # bare CR
        b"X-A: a\nX-B: b",  # bare LF
        b"X-A: a\r\n folded",  # obs-fold
        b"X-A: a\r\n\tfolded",
        b"X A: a",  # not a token
    ],
)
async def test_control_characters_and_obs_fold_are_refused(field: bytes) -> None:
    conn, transport = connection()
    conn.send(b"GET / HTTP/1.1\r\n\r\n", False, 0.0)
    conn.data_received(b"HTTP/1.1 200 OK\r\n" + field + b"\r\nContent-Length: 2\r\n\r\nok")
    assert isinstance(conn.error, UpstreamProtocolError)
    assert "invalid HTTP response" in conn.error.message
    assert conn.headers is None and transport.aborted


async def test_tabs_and_non_ascii_in_values_pass() -> None:
    conn, _ = connection()
    conn.send(b"GET / HTTP/1.1\r\n\r\n", False, 0.0)
    conn.data_received(response(b"ok", extra="X-A: a\tb\r\n") + b"")
    assert conn.error is None and conn.headers is not None and conn.headers["X-A"] == "a\tb"
    conn2, _ = connection()
    conn2.send(b"GET / HTTP/1.1\r\n\r\n", False, 0.0)
    conn2.data_received(b"HTTP/1.1 200 OK\r\nX-A: caf\xe9\r\nContent-Length: 0\r\n\r\n")
    assert conn2.error is None and conn2.headers is not None and conn2.headers["X-A"] == "caf\xe9"


# ---------------------------------------------------------------- header limits


def head_of(fields: list[bytes]) -> bytes:
    return b"HTTP/1.1 200 OK\r\n" + b"".join(f + b"\r\n" for f in fields)


async def test_an_unterminated_megabyte_header_is_refused_after_the_head_limit() -> None:
    conn, transport = connection()
    conn.send(b"GET / HTTP/1.1\r\n\r\n", False, 0.0)
    segment = b"a" * (8 * 1024)
    conn.data_received(b"HTTP/1.1 200 OK\r\nX-Big: ")
    fed = 0
    while conn.error is None and fed < 1024 * 1024:
        conn.data_received(segment)
        fed += len(segment)
    assert isinstance(conn.error, UpstreamProtocolError) and transport.aborted
    # Stopped at the line limit, long before the megabyte was read.
    assert "line over" in conn.error.message and fed <= LINE_LIMIT + len(segment)


async def test_a_head_over_the_limit_in_short_lines_is_refused_while_it_arrives() -> None:
    conn, transport = connection()
    conn.send(b"GET / HTTP/1.1\r\n\r\n", False, 0.0)
    fields = [b"X-F%02d: " % i + b"v" * 1000 for i in range(90)]  # ~90 KiB, each line short
    raw = head_of(fields)
    fed = 0
    while conn.error is None and fed < len(raw):
        conn.data_received(raw[fed : fed + 4096])
        fed += 4096
    assert isinstance(conn.error, UpstreamProtocolError) and transport.aborted
    assert "head over" in conn.error.message and fed <= HEAD_LIMIT + 4096


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ([b"X-Long: " + b"v" * LINE_LIMIT], "line over"),
        ([b"X-F%d: v" % i for i in range(FIELD_LIMIT + 1)], "more than"),
        ([b"X-F%02d: " % i + b"v" * 8000 for i in range(9)], "head over"),
    ],
)
async def test_head_limits_hold_in_a_single_read(fields: list[bytes], why: str) -> None:
    conn, transport = connection()
    conn.send(b"GET / HTTP/1.1\r\n\r\n", False, 0.0)
    conn.data_received(head_of([*fields, b"Content-Length: 2"]) + b"\r\nok")
    assert isinstance(conn.error, UpstreamProtocolError) and why in conn.error.message
    assert conn.headers is None and transport.aborted


async def test_a_long_status_line_is_refused() -> None:
    conn, _ = connection()
    conn.send(b"GET / HTTP/1.1\r\n\r\n", False, 0.0)
    reason = b"O" * (LINE_LIMIT + 1)
    conn.data_received(b"HTTP/1.1 200 " + reason[:9000])
    conn.data_received(reason[9000:] + b"\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(conn.error, UpstreamProtocolError) and "line over" in conn.error.message


async def test_a_head_just_within_the_limits_passes() -> None:
    conn, _ = connection()
    conn.send(b"GET / HTTP/1.1\r\n\r\n", False, 0.0)
    fields = [b"X-F%02d: " % i + b"v" * 470 for i in range(FIELD_LIMIT - 2)]
    fields.append(b"X-Long: " + b"v" * (LINE_LIMIT - 20))
    raw = head_of([*fields, b"Content-Length: 2"]) + b"\r\nok"
    assert HEAD_LIMIT - 4096 < len(raw) < HEAD_LIMIT
    for i in range(0, len(raw), 3000):
        conn.data_received(raw[i : i + 3000])
    assert conn.error is None and conn.state == DONE and body_of(conn) == b"ok"
    assert conn.headers is not None and len(conn.headers) == FIELD_LIMIT
