"""A large body relayed straight from an upstream (no cache, nothing checked
before serving) goes from socket to socket by splice(2): the bytes arrive
exact, the upstream connection is reused only when the body came whole and
alone, and every failure the copying relay handles is handled the same way:
an upstream that cuts or stalls mid-body, a client that leaves or stops
reading. Real loopback sockets on both sides (an aiohttp upstream, raw ones
where the framing is the point)."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import resource
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.config import TimeoutsConfig, UpstreamConfig
from sidecar.server.connection import PIPE_SIZES, TURN_BYTES
from tests.adversarial.rawhttp import raw_socket, read_head, reset
from tests.adversarial.rawhttp import request as get
from tests.certs import HOST, self_signed
from tests.functional.test_upstream_client import (
    answer,
    keep_alive_server,
    raw_server,
    read_request,
)
from tests.polling import until
from tests.upstream import Reply

MIB = 1024 * 1024
ZIP = "example.com/big/@v/v1.0.0.zip"
# Not a multiple of a pipe, a page or a read.
BODY = os.urandom(8 * MIB + 12_345)


async def relayed(client: Any) -> dict[str, float]:
    """goproxy_sidecar_relayed_bytes_total by mode."""
    text = await (await client.get("/metrics")).text()
    found = re.findall(r'^goproxy_sidecar_relayed_bytes_total\{mode="(\w+)"\} (\S+)$', text, re.M)
    return {mode: float(value) for mode, value in found}


def pool_of(sidecar: Any, name: str = "up0") -> Any:
    return sidecar.upstreams[name].sender.pool


async def test_a_large_body_is_spliced_exact_and_the_connection_reused(
    fake_upstreams: Any, sidecar_client: Any
) -> None:
    [(fake, url)] = await fake_upstreams(1)
    fake.set(ZIP, BODY)
    client, sidecar = await sidecar_client([url])
    for _ in range(2):
        resp = await client.get("/" + ZIP)
        assert resp.status == 200
        assert int(resp.headers["Content-Length"]) == len(BODY)
        assert await resp.read() == BODY
    assert await relayed(client) == {"splice": 2 * len(BODY)}
    assert pool_of(sidecar).opened == 1  # whole, nothing after it: kept alive
    assert sidecar.windows["up0"].snapshot().errors == 0


async def test_bytes_after_the_body_are_never_read_as_the_next_answer(
    sidecar_client: Any,
) -> None:
    """The splice takes exactly the announced length: what follows stays in
    the socket, and the connection is closed instead of carrying the next
    request, whose answer would otherwise be those bytes."""
    forged = answer(b"forged", headers="Content-Type: application/zip\r\n")
    body = BODY[: 2 * MIB]
    genuine = answer(b"genuine")
    served = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        while True:
            head = await read_request(reader)
            served += 1
            if b".zip" in head:
                writer.write(answer(body) + forged)
            else:
                writer.write(genuine)
            await writer.drain()

    async with raw_server(handler) as url:
        client, sidecar = await sidecar_client([url])
        resp = await client.get("/" + ZIP)
        assert resp.status == 200 and await resp.read() == body
        resp = await client.get("/example.com/big/@v/v1.0.1.info")
        assert resp.status == 200 and await resp.read() == b"genuine"
        assert pool_of(sidecar).opened == 2
        assert (await relayed(client))["splice"] == len(body)


async def test_an_upstream_that_stalls_mid_body_is_timed_out(sidecar_client: Any) -> None:
    """The splice waits for the upstream's socket under the idle timeout, as
    the copying relay waits for its next bytes: the client is cut (a short
    body, never a complete one) and the upstream charged with a timeout."""
    stall = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {4 * MIB}\r\n\r\n".encode())
        writer.write(BODY[:MIB])
        await writer.drain()
        await stall.wait()  # never set: the rest never comes

    timeouts = TimeoutsConfig(connect=1.0, first_byte=1.0, idle=0.5)
    async with raw_server(handler) as url:
        cfg = UpstreamConfig(name="up0", url=url, timeouts=timeouts)
        client, sidecar = await sidecar_client([url], upstreams=(cfg,))
        started = time.monotonic()
        resp = await client.get("/" + ZIP)
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
        assert time.monotonic() - started < 5.0
        await until("a timeout charged", lambda: sidecar.windows["up0"].snapshot().timeouts == 1)
        assert (await relayed(client))["splice"] == MIB
        assert pool_of(sidecar).size == 0  # that connection is gone


async def test_an_upstream_that_resets_mid_body_cuts_the_client(sidecar_client: Any) -> None:
    cut = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {4 * MIB}\r\n\r\n".encode())
        writer.write(BODY[: 3 * MIB])
        await writer.drain()
        await cut.wait()
        reset(writer)

    async with raw_server(handler) as url:
        client, sidecar = await sidecar_client([url])
        resp = await client.get("/" + ZIP)
        assert resp.status == 200
        await resp.content.readexactly(MIB)  # the relay is under way: splicing
        cut.set()
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
        await until("a failure charged", lambda: sidecar.windows["up0"].snapshot().errors == 1)
        assert 0 < (await relayed(client))["splice"] <= 3 * MIB


async def test_a_client_that_stops_reading_is_dropped_and_frees_the_upstream(
    fake_upstreams: Any, sidecar_client: Any
) -> None:
    """More than every socket buffer and the pipe can hold: the splice waits
    on the client, whose send timeout drops it; the upstream connection goes
    with it and the upstream is not blamed."""
    [(fake, url)] = await fake_upstreams(1)
    huge = BODY * 8  # 64 MiB
    fake.set(ZIP, huge)
    client, sidecar = await sidecar_client([url], send_timeout=0.5)
    sock = await raw_socket(client.port, rcvbuf=64 * 1024)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, get("/" + ZIP))
    first = await asyncio.wait_for(loop.sock_recv(sock, 4096), 5.0)  # then reads nothing
    assert first.startswith(b"HTTP/1.1 200")
    await until("the upstream request dropped", lambda: fake.cancelled == 1)
    assert fake.completed == 0
    await until("the upstream connection closed", lambda: pool_of(sidecar).size == 0)
    assert sidecar.windows["up0"].snapshot().errors == 0
    assert 0 < (await relayed(client))["splice"] < len(huge)
    sock.close()


async def test_a_client_that_leaves_while_the_upstream_is_slow(
    fake_upstreams: Any, sidecar_client: Any
) -> None:
    """Waiting on the upstream's socket, the splice is cancelled with the
    handler when the client goes: the slow upstream's request is dropped."""
    [(fake, url)] = await fake_upstreams(1)
    fake.set(ZIP, Reply(body=BODY, chunk_delay=0.05))
    client, sidecar = await sidecar_client([url])
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(get("/" + ZIP))
    status, _ = await read_head(reader)
    assert status == 200
    await reader.readexactly(256 * 1024)
    writer.transport.abort()
    await until("the upstream request dropped", lambda: fake.cancelled == 1)
    assert fake.completed == 0
    await until("the upstream connection closed", lambda: pool_of(sidecar).size == 0)
    assert sidecar.windows["up0"].snapshot().errors == 0


async def test_out_of_descriptors_the_body_is_copied_instead(sidecar_client: Any) -> None:
    """A splice needs three more descriptors than a copy. A process at its
    limit copies the body instead, whole, rather than failing the request:
    here the limit leaves room for the upstream socket's duplicate and no
    more, once both connections are up and the upstream is about to answer."""
    asked, go = asyncio.Event(), asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        asked.set()
        await go.wait()
        writer.write(answer(BODY))
        await writer.drain()
        await read_request(reader)  # keep the connection

    async with raw_server(handler) as url:
        client, sidecar = await sidecar_client([url])
        fetch = asyncio.create_task(client.get("/" + ZIP))
        await asyncio.wait_for(asked.wait(), 5.0)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        holes: list[int] = []
        try:
            top = max(int(fd) for fd in os.listdir("/proc/self/fd"))
            for _ in range(top):  # fill every free number below the highest open one
                fd = os.open(os.devnull, os.O_RDONLY)
                if fd > top:
                    os.close(fd)
                    break
                holes.append(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (top + 2, hard))  # one number left
            go.set()
            resp = await fetch
            assert resp.status == 200 and await resp.read() == BODY
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            for fd in holes:
                os.close(fd)
        assert await relayed(client) == {"copy": len(BODY)}
        assert sidecar.windows["up0"].snapshot().errors == 0


async def test_a_body_from_an_https_upstream_is_copied(
    sidecar_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upstream's socket carries TLS records: splicing them would hand the
    client ciphertext, so the plaintext is copied through."""
    cert, key = self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    body = BODY[: 3 * MIB + 5]
    async with raw_server(keep_alive_server(lambda _: answer(body)), ssl=server) as url:
        client, _ = await sidecar_client([url.replace("127.0.0.1", HOST)])
        resp = await client.get("/" + ZIP)
        assert resp.status == 200 and await resp.read() == body
        assert await relayed(client) == {"copy": len(body)}


def _serve_once(listener: socket.socket, body: bytes) -> None:
    """A thread's upstream: one request, answered with ``body`` as fast as the
    kernel takes it (no event loop behind it to wait for)."""
    conn, _ = listener.accept()
    with conn:
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(4096)
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/zip\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        conn.recv(1)  # until the sidecar closes or reuses it


def _download(port: int, path: str, got: list[int]) -> None:
    """A thread's client reading as fast as it can; ``got[0]``: body bytes."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"GET /{path} HTTP/1.1\r\nHost: sidecar\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        got[0] = len(rest)
        buf = bytearray(1024 * 1024)
        while got[0] < length:
            n = sock.recv_into(buf)
            if not n:
                break
            got[0] += n


async def test_a_relay_lets_the_loop_run_between_turns(sidecar_client: Any) -> None:
    """With peers that never make it wait (an upstream whose bytes are all
    queued, a client that reads at once), a relay still hands the loop back
    every TURN_BYTES: between two turns of the loop it takes at most that
    much more than one pipe's worth in and one out. Unbounded, one relay held
    the loop for megabytes, and 100 of them for seconds (connect timeouts to a
    healthy upstream)."""
    body = os.urandom(48 * MIB)
    listener = socket.create_server(("127.0.0.1", 0))
    upstream = threading.Thread(target=_serve_once, args=(listener, body), daemon=True)
    upstream.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    client, sidecar = await sidecar_client([url], run_control=False)
    pool = pool_of(sidecar)
    loop = asyncio.get_running_loop()
    samples: list[int] = []
    done = asyncio.Event()

    def tick() -> None:  # once per iteration of the loop
        samples.append(sum(conn.received for conn in list(pool._busy)))
        if not done.is_set():
            loop.call_soon(tick)

    got = [0]
    loop.call_soon(tick)
    try:
        await asyncio.to_thread(_download, client.server.port, ZIP, got)
    finally:
        done.set()
        listener.close()
    assert got[0] == len(body)
    steps = [b - a for a, b in itertools.pairwise(samples) if b > a]
    assert sum(steps) >= len(body) // 2  # the ticker saw the relay happen
    assert max(steps) <= TURN_BYTES + 2 * max(PIPE_SIZES), max(steps)
