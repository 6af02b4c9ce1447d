"""How a checked fill's body reaches its clients (issue 15): every reader of a
gated fill waits until the whole zip is stored and vouched for, then is
handed the stored file and sent it as a hit is (sendfile), not read chunk by
chunk. A client leaving in mid-body is counted as such and does not stop the
entry's commit. A real Go checksum database, loopback upstreams, the real
server.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar.cache.fill import Fill
from sidecar.config import CacheConfig, VerifyConfig
from sidecar.goproxy import parse_request_path
from tests.functional.test_integrity import artifact, metric, write_module
from tests.functional.test_integrity import serve as serve
from tests.sumdb.gosumdb import GoSumdb, start_sumdb
from tests.sumdb.gosumdb import sumdb_server_binary as sumdb_server_binary

# Larger than what the loopback socket buffers hold (a few MiB), so that a
# client that stops reading leaves the server in mid-body.
LARGE = ("example.com/large", "v1.0.0")
WAIT_S = 60.0
STEP_S = 0.01
READERS = 6


@pytest.fixture(scope="module")
def database(
    sumdb_server_binary: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[GoSumdb, Path]]:
    root = tmp_path_factory.mktemp("delivery")
    rng = random.Random(151)
    files = {
        "go.mod": b"module example.com/large\n\ngo 1.21\n",
        "large.go": b"package large\n",
        **{f"testdata/{i}.bin": rng.randbytes(1 << 20) for i in range(12)},  # incompressible
    }
    listing = root / "modules.txt"
    listing.write_text(write_module(root, *LARGE, files))
    with start_sumdb(sumdb_server_binary, listing, filler=40, proxy_dir=root / "proxy") as db:
        yield db, root / "proxy"


class HeldUpstream:
    """A GOPROXY folder and the database's /sumdb/<name>/ path; the zip's second
    half is sent only once ``release`` is set (its first half at once)."""

    def __init__(self, proxy: Path, db: GoSumdb) -> None:
        self.proxy, self.db = proxy, db
        self.holding = asyncio.Event()
        self.release = asyncio.Event()
        self.zip_asked = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path.lstrip("/")
        prefix = f"sumdb/{self.db.name}/"
        if path.startswith(prefix):
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{self.db.url}/{path[len(prefix) :]}") as answer,
            ):
                return web.Response(status=answer.status, body=await answer.read())
        file = self.proxy / path
        if not file.is_file():
            return web.Response(status=404, text="not found")
        body = file.read_bytes()
        if not path.endswith(".zip"):
            return web.Response(body=body)
        self.zip_asked += 1
        resp = web.StreamResponse()
        resp.content_length = len(body)
        await resp.prepare(request)
        half = len(body) // 2
        await resp.write(body[:half])
        self.holding.set()
        await asyncio.wait_for(self.release.wait(), WAIT_S)
        await resp.write(body[half:])
        await resp.write_eof()
        return resp


async def until(check: Any, what: str) -> None:
    """Wait (bounded) until ``check()`` is true."""
    for _ in range(int(WAIT_S / STEP_S)):
        if check():
            return
        await asyncio.sleep(STEP_S)
    raise AssertionError(f"timed out waiting for {what}")


def running_fill(sidecar: Any, path: str) -> Fill | None:
    flight = sidecar.cache.flights._by_key.get(parse_request_path(f"/{path}").cache_key)
    return flight.fill if flight is not None else None


async def start(
    database: tuple[GoSumdb, Path], serve: Any, sidecar_client: Any, tmp_path: Path
) -> tuple[Any, Any, HeldUpstream, str, bytes]:
    db, proxy = database
    upstream = HeldUpstream(proxy, db)
    client, sidecar = await sidecar_client(
        [await serve(upstream)],
        cache=CacheConfig(dir=str(tmp_path / "cache")),
        verify=VerifyConfig(key=db.verifier_key),
    )
    path = artifact(*LARGE, "zip")
    return client, sidecar, upstream, path, (proxy / path).read_bytes()


async def test_every_reader_of_a_checked_fill_is_sent_the_stored_file(
    database: tuple[GoSumdb, Path], serve: Any, sidecar_client: Any, tmp_path: Path
) -> None:
    client, sidecar, upstream, path, genuine = await start(
        database, serve, sidecar_client, tmp_path
    )
    gets = [asyncio.ensure_future(client.get(f"/{path}")) for _ in range(READERS)]
    await until(upstream.holding.is_set, "the upstream to send half the zip")
    fill = running_fill(sidecar, path)
    assert fill is not None
    await until(lambda: fill.readers == READERS, "every client to join the fill")
    upstream.release.set()
    bodies = []
    for resp in await asyncio.gather(*gets):
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len(genuine))
        bodies.append(await resp.read())
    assert all(body == genuine for body in bodies)
    assert fill.file_reads == READERS  # each was handed the whole stored file
    assert upstream.zip_asked == 1
    metrics = await (await client.get("/metrics")).text()
    requests = "goproxy_sidecar_requests_total"
    assert metric(metrics, requests, upstream="up0", kind="zip", outcome="ok") == READERS


async def test_a_client_leaving_in_mid_body_is_counted_and_the_entry_committed(
    database: tuple[GoSumdb, Path], serve: Any, sidecar_client: Any, tmp_path: Path
) -> None:
    client, sidecar, upstream, path, genuine = await start(
        database, serve, sidecar_client, tmp_path
    )
    upstream.release.set()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    sock.settimeout(WAIT_S)
    await asyncio.to_thread(sock.connect, (client.host, client.port))
    request = f"GET /{path} HTTP/1.1\r\nHost: sidecar\r\n\r\n".encode()
    await asyncio.to_thread(sock.sendall, request)
    got = b""
    while b"\r\n\r\n" not in got:  # the head comes only once the zip is stored and checked
        piece = await asyncio.to_thread(sock.recv, 65536)
        assert piece, got
        got += piece
    fill = running_fill(sidecar, path)
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert f"content-length: {len(genuine)}".encode() in head.lower()
    assert len(body) < len(genuine)
    sock.close()  # bytes unread: a reset, in mid-body

    requests = "goproxy_sidecar_requests_total"

    async def counted() -> float:
        return metric(await (await client.get("/metrics")).text(), requests, kind="zip")

    for _ in range(int(WAIT_S / STEP_S)):
        if await counted() >= 1:
            break
        await asyncio.sleep(STEP_S)
    metrics = await (await client.get("/metrics")).text()
    assert metric(metrics, requests, upstream="up0", kind="zip", outcome="client_abort") == 1
    assert metric(metrics, requests, kind="zip") == 1
    if fill is not None:  # still in its flight when the head came: it was handed the file
        assert fill.file_reads == 1

    # The commit went on without its client: the next request is a hit of the genuine zip.
    await until(lambda: running_fill(sidecar, path) is None, "the fill to end")
    resp = await client.get(f"/{path}")
    assert resp.status == 200
    assert await resp.read() == genuine
    metrics = await (await client.get("/metrics")).text()
    assert metric(metrics, requests, upstream="cache", kind="zip", outcome="hit") == 1
    assert upstream.zip_asked == 1
