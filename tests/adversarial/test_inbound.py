"""One client must not harm everyone: raw-socket clients against a real sidecar
(loopback upstream, real cache, the sidecar's own HTTP server).

Memory bounds are asserted on the server's own state (the bytes it read from
the client, what it holds for it), never on timing; bench/edges.py prints the
CPU and RSS figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from functools import partial
from pathlib import Path

import pytest

from sidecar.config import (
    CacheConfig,
    PoolConfig,
    RouteRule,
    RoutingConfig,
    UpstreamConfig,
    load_config,
)
from sidecar.errors import ConfigErrors
from sidecar.server.connection import LINGER_BYTES, PIPELINE_DEPTH, Connection
from sidecar.server.listener import Server
from sidecar.server.requests import MAX_HEADER_SECTION, SLICE
from tests.adversarial.rawhttp import (
    INFO,
    INFO_BODY,
    MODULE,
    closed,
    push,
    raw_socket,
    read_head,
    read_response,
    request,
    server_of,
    start_sidecar,
)
from tests.conftest import FAST_TIMEOUTS
from tests.upstream import Reply

ZIP = f"/{MODULE}/@v/v1.0.0.zip"
MiB = 1024 * 1024
READ_CHUNK = 256 * 1024  # the most one read of the event loop takes


@pytest.fixture
def sidecar(fake_upstreams, sidecar_client, tmp_path: Path):
    """``await sidecar(**overrides)``: (fake upstream, client) of a running sidecar."""
    return partial(start_sidecar, fake_upstreams, sidecar_client, tmp_path)


async def the_connection(server: Server) -> Connection:
    """The one client connection the server holds (once it has accepted it, and
    closed any earlier one)."""
    for _ in range(500):
        if len(server.connections) == 1:
            [conn] = server.connections
            return conn
        await asyncio.sleep(0.01)
    raise AssertionError("the server never accepted the connection")


# --- limits enforced while the bytes arrive ---------------------------------


@pytest.mark.parametrize(
    ("prefix", "status"),
    [
        (b"GET /x HTTP/1.1\r\nHost: t\r\nX-Long: ", 431),  # a header value without its CRLF
        (b"GET /x HTTP/1.1\r\nHost: t\r\nX-Long", 431),  # a header name without its colon
        (b"GET /", 414),  # a request target without its end
        (  # a trailer after a chunked body
            b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\nX-Trailer: ",
            431,
        ),
    ],
    ids=["header-value", "header-name", "target", "trailer"],
)
async def test_an_unterminated_line_is_refused_while_it_arrives(sidecar, prefix, status):
    fake, client = await sidecar()
    server = server_of(client)
    sock = await raw_socket(client.server.port)
    sock.send(prefix)
    conn = await the_connection(server)
    flood = asyncio.create_task(push(sock, b"a" * 65536, 128 * MiB))
    reader, writer = await asyncio.open_connection(sock=sock)
    got, headers, _ = await read_response(reader)
    assert (got, headers["connection"]) == (status, "close")
    assert await closed(reader)
    await flood
    writer.close()
    # The server stopped reading soon after the limit: the refusal, then at most
    # what lingering drops, never the 128 MiB the client had to send.
    assert conn.closed
    assert conn.received <= MAX_HEADER_SECTION + LINGER_BYTES + 3 * READ_CHUNK
    assert fake.received == []


async def test_a_large_head_within_the_limits_is_served_where_it_starts_in_a_read(sidecar):
    """Head bytes are counted in slices, from the slice a head begins in: a head
    just under the limits, beginning late in a slice, is still served."""
    _, client = await sidecar()
    fillers = [f"X-Filler-{i:02d}: {'v' * 150}" for i in range(98)]
    big = request(INFO, *fillers)
    assert len(big) > 15_000
    first = request(INFO, "X-Pad: " + "p" * (SLICE - 60))  # the big head begins near a slice's end
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(first + big)
    for _ in range(2):
        status, _, body = await read_response(reader)
        assert (status, body) == (200, INFO_BODY)
    writer.close()


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_body_is_not_counted_as_head(sidecar, chunked):
    """Only the head is limited: a request body far over 16 KiB is read (and
    answered 405: the sidecar takes no bodies), and the connection goes on."""
    _, client = await sidecar()
    body = b"b" * 200_000
    if chunked:
        framing = "Transfer-Encoding: chunked"
        payload = b"".join(
            b"%x\r\n%s\r\n" % (10_000, body[i : i + 10_000]) for i in range(0, 200_000, 10_000)
        )
        payload += b"0\r\n\r\n"
    else:
        framing, payload = f"Content-Length: {len(body)}", body
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(request(INFO, framing, method="POST") + payload + request(INFO))
    status, headers, _ = await read_response(reader)
    assert status == 405 and headers["allow"] == "GET, HEAD"
    assert (await read_response(reader))[::2] == (200, INFO_BODY)
    writer.close()


async def test_too_many_headers_are_refused(sidecar):
    fake, client = await sidecar()
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(request(INFO, *[f"X-{i}: v" for i in range(200)]))
    status, headers, _ = await read_response(reader)
    assert (status, headers["connection"]) == (431, "close")
    assert await closed(reader)
    assert fake.received == []


# --- reading stops while the client does not read ---------------------------


async def test_unread_pipelined_requests_stop_reading_and_are_all_answered_later(sidecar):
    fake, client = await sidecar()
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(request(INFO))
    assert (await read_response(reader))[0] == 200  # now a cache hit
    writer.close()

    one = request(INFO, "X-Pad: " + "p" * 200)  # about as long as its answer
    sock = await raw_socket(client.server.port, rcvbuf=64 * 1024)
    conn_task = asyncio.create_task(the_connection(server_of(client)))
    sent = await push(sock, one * 64, 60 * MiB)
    conn = await conn_task
    queued, held, buffered = conn.backlog
    # The client could not push its 60 MiB: the server stopped reading once its
    # answers stopped leaving, and holds little for it in memory.
    assert sent < 60 * MiB
    assert conn.received < sent
    assert queued <= PIPELINE_DEPTH + SLICE // len(one) + 1
    assert held <= READ_CHUNK
    assert buffered <= 2 * MiB
    assert fake.received.count(INFO.lstrip("/")) == 1
    # Once the client reads, every request it managed to send is answered, in order.
    whole = sent // len(one)
    reader, writer = await asyncio.open_connection(sock=sock)
    status, _, body = await read_response(reader)
    assert (status, body) == (200, INFO_BODY)
    first = await asyncio.wait_for(reader.readuntil(INFO_BODY), 5)  # every answer is as long
    rest = await asyncio.wait_for(reader.readexactly((whole - 2) * len(first)), 60)
    assert rest.count(b"HTTP/1.1 200 OK\r\n") == whole - 2 and rest.endswith(INFO_BODY)
    writer.close()


# --- the send timeout ---------------------------------------------------------


async def test_clients_that_read_nothing_are_dropped_and_free_the_upstream(
    fake_upstreams, sidecar_client, tmp_path: Path, caplog
):
    """A cache: false route relays each body from its own upstream connection.
    Clients that never read hold them until the send timeout drops them; then
    another client is served."""
    caplog.set_level(logging.INFO, "sidecar.server")
    [(fake, url)] = await fake_upstreams(1)
    body = b"z" * (32 * MiB)
    fake.set(ZIP.lstrip("/"), Reply(body=body, headers={"Content-Type": "application/zip"}))
    pool = 4
    upstream = UpstreamConfig(
        "up0", url, timeouts=FAST_TIMEOUTS, pool=PoolConfig(max_connections=pool)
    )
    client, _ = await sidecar_client(
        [url],
        upstreams=(upstream,),
        cache=CacheConfig(dir=str(tmp_path / "cache")),
        routing=RoutingConfig(rules=(RouteRule("example.com/*", cache=False),)),
        send_timeout=1.0,
    )
    server = server_of(client)
    port = client.server.port
    stalled = []
    for _ in range(pool):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request(ZIP))
        stalled.append((reader, writer))
    for _ in range(1000):  # until every one of them has reached the upstream
        if fake.received.count(ZIP.lstrip("/")) >= pool and len(server.connections) == pool:
            break
        await asyncio.sleep(0.01)
    held_up = list(server.connections)
    assert len(held_up) == pool

    status = 0
    for _ in range(5):  # a request that waited past the pool's max_wait is retried
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request(ZIP))
        status, _, got = await asyncio.wait_for(read_response(reader), 30)
        writer.close()
        if status == 200:
            assert got == body
            break
    assert status == 200
    assert all(c.closed for c in held_up)
    assert "client dropped" in caplog.text
    for _, writer in stalled:
        writer.close()


def test_the_send_timeout_is_a_config_key(tmp_path: Path):
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        f'upstreams: [{{name: a, url: "http://127.0.0.1:1"}}]\n'
        f'cache: {{dir: "{tmp_path}"}}\nsend_timeout: 5s\n'
    )
    assert load_config(str(path), env={}).send_timeout == 5.0
    assert load_config(str(path), env={"SIDECAR_SEND_TIMEOUT": "90s"}).send_timeout == 90.0
    with pytest.raises(ConfigErrors, match="send_timeout"):
        load_config(str(path), env={"SIDECAR_SEND_TIMEOUT": "0s"})


# --- Host and Expect ------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (f"GET {INFO} HTTP/1.1\r\n\r\n", "missing Host"),
        (f"GET {INFO} HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", "more than one Host"),
        (f"GET {INFO} HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n", "more than one Host"),
        (f"GET {INFO} HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", "more than one Host"),
        (f"GET {INFO} HTTP/1.1\r\nHost: a/b\r\n\r\n", "invalid Host"),
        (f"GET {INFO} HTTP/1.1\r\nHost: a@b\r\n\r\n", "invalid Host"),
    ],
)
async def test_a_missing_duplicate_or_invalid_host_is_refused(sidecar, raw, why):
    fake, client = await sidecar()
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(raw.encode() + request(INFO))
    status, headers, body = await read_response(reader)
    assert (status, headers["connection"]) == (400, "close") and why.encode() in body
    assert await closed(reader)  # the request after it is never answered
    assert fake.received == []


@pytest.mark.parametrize("host", ["Host: 127.0.0.1:3001", "Host: [::1]:3001", "Host: ", None])
async def test_valid_hosts_and_http10_without_host_are_served(sidecar, host):
    _, client = await sidecar()
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    if host is None:
        writer.write(f"GET {INFO} HTTP/1.0\r\n\r\n".encode())
    else:
        writer.write(f"GET {INFO} HTTP/1.1\r\n{host}\r\n\r\n".encode())
    status, _, body = await read_response(reader)
    assert (status, body) == (200, INFO_BODY)
    writer.close()


async def test_expect_100_continue_gets_a_100_before_the_answer(sidecar):
    _, client = await sidecar()
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(request(INFO, "Expect: 100-continue"))
    assert await read_head(reader) == (100, {})
    status, _, body = await read_response(reader)
    assert (status, body) == (200, INFO_BODY)
    # Pipelined behind another request, its 100 comes when its turn comes.
    writer.write(request(INFO) + request(INFO, "Expect: 100-Continue"))
    assert (await read_response(reader))[0] == 200
    assert await read_head(reader) == (100, {})
    assert (await read_response(reader))[0] == 200
    writer.close()


async def test_expect_is_ignored_for_http10_and_unknown_expectations_get_417(sidecar):
    fake, client = await sidecar()
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(request(INFO, "Expect: 100-continue", "Connection: keep-alive", version="1.0"))
    status, _, body = await read_response(reader)
    assert (status, body) == (200, INFO_BODY)  # no 100 first
    writer.write(request(INFO, "Expect: something-else"))
    status, headers, _ = await read_response(reader)
    assert (status, headers["connection"]) == (417, "close")
    assert await closed(reader)
    assert fake.received == [INFO.lstrip("/")]


async def test_a_client_sending_a_body_after_the_100_is_answered(sidecar):
    """The 100 goes out as soon as the head is in, so a client holding its body
    back until then is not left waiting."""
    _, client = await sidecar()
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(request(INFO, "Expect: 100-continue", "Content-Length: 5", method="POST"))
    assert await read_head(reader) == (100, {})
    writer.write(b"hello")
    status, headers, _ = await read_response(reader)
    assert status == 405 and headers["allow"] == "GET, HEAD"
    writer.close()


async def test_absolute_form_for_the_host_itself_is_served(sidecar):
    fake, client = await sidecar()
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(f"GET http://T{INFO} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    status, _, body = await read_response(reader)
    assert (status, body) == (200, INFO_BODY)
    assert fake.received == [INFO.lstrip("/")]
    with contextlib.suppress(ConnectionError):
        writer.close()
