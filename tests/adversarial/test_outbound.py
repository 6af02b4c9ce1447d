"""Outbound: an upstream's answer is trusted only when it is framed exactly.

Every hostile upstream here is a raw socket server writing exact bytes; the
sidecar in front of it is the real one (tests/conftest.py, cache on). Each
case asserts that no wrong byte reaches a client and that nothing is cached:
a second request for the same path goes to the upstream again (a cached
entry would be served without it), and no entry is on disk.

Two cases run on ``Upstream`` directly, with the resolver hook
(``Upstream(..., resolver=...)``, a real alternative to getaddrinfo, like a
hosts file): this machine has no DNS name with two loopback addresses, and
the sidecar's own servers bind 127.0.0.1 only, so names that resolve to a
silent address or to a private one are made with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.errors import UpstreamStatusError
from sidecar.upstreams.connect import Address
from tests.adversarial.rawhttp import reset
from tests.functional import test_cache_support
from tests.functional.test_cache_support import (
    all_blobs,
    keys_on_disk,
    settled,
    temp_files,
    wait_for,
)
from tests.functional.test_upstream_client import (
    answer,
    fetch,
    keep_alive_server,
    raw_server,
    read_request,
    upstream,
)

cached_sidecar = test_cache_support.cached_sidecar  # the fixture

INFO = "example.com/m/@v/v1.0.0.info"
INFO_B = "example.com/m/@v/v1.1.0.info"
ZIP = "example.com/m/@v/v1.0.0.zip"
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def path_of(request: bytes) -> str:
    return request.split(b" ", 2)[1].decode().lstrip("/")


class Hostile:
    """A raw upstream: ``script(path, writer)`` writes whatever bytes it likes.
    Counts requests per path and connections."""

    def __init__(self, script: Callable[[str, asyncio.StreamWriter], Awaitable[bool]]) -> None:
        self.script = script
        self.requests: list[str] = []
        self.connections = 0
        self.closed_by_sidecar = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                path = path_of(await read_request(reader))
                self.requests.append(path)
                if not await self.script(path, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_sidecar.set()
            raise

    def hits(self, path: str) -> int:
        return self.requests.count(path)


@contextlib.asynccontextmanager
async def hostile(
    script: Callable[[str, asyncio.StreamWriter], Awaitable[bool]],
) -> AsyncIterator[tuple[str, Hostile]]:
    server = Hostile(script)
    async with raw_server(server.handle) as url:
        yield url, server


async def get(client: Any, path: str) -> tuple[int, bytes, str]:
    """(status, body, X-Sidecar-Upstream); a cut body reads as status -1."""
    resp = await client.get("/" + path)
    try:
        body = await resp.read()
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
        return -1, b"", resp.headers.get("X-Sidecar-Upstream", "")
    return resp.status, body, resp.headers.get("X-Sidecar-Upstream", "")


async def assert_nothing_cached(client: Any, sc: Any, server: Hostile, path: str) -> None:
    """A second request reaches the upstream again, and no entry or temp file is left."""
    before = server.hits(path)
    status, _, _ = await get(client, path)
    assert status != 200 and server.hits(path) == before + 1
    await asyncio.wait_for(sc.cache.written(), 5)
    assert sc.cache.summary()["entries"] == 0 and keys_on_disk(sc.cache.config.dir) == []
    # A failed fill's temp file is removed behind the answer.
    await wait_for(lambda: temp_files(sc.cache.config.dir) == [], what="temp files removed")


# ---------------------------------------------------------------- cut bodies


async def test_a_body_without_length_cut_by_a_reset_is_not_served_whole_or_cached(
    cached_sidecar,
) -> None:
    part = b"PK\x03\x04" + b"z" * 300_000  # the start of a zip, above the small-body size

    async def script(path: str, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: application/zip\r\n")
        writer.write(b"\r\n" + part)
        await writer.drain()
        await asyncio.sleep(0.2)
        reset(writer)
        return False

    async with hostile(script) as (url, server):
        client, sc = await cached_sidecar([url])
        resp = await client.get("/" + ZIP)
        received = b""
        if resp.status == 200:  # headers went out before the cut: the body must stay cut
            with pytest.raises(aiohttp.ClientPayloadError):
                async for chunk in resp.content.iter_any():
                    received += chunk
            assert part.startswith(received) and len(received) <= len(part)
        else:
            assert resp.status == 502 and "cut" in await resp.text()
        await assert_nothing_cached(client, sc, server, ZIP)


async def test_a_body_without_length_ended_by_a_clean_close_is_whole_and_cached(
    cached_sidecar,
) -> None:
    body = b"PK\x03\x04" + b"y" * 300_000

    async def script(path: str, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()
        writer.close()  # FIN
        return False

    async with hostile(script) as (url, server):
        client, sc = await cached_sidecar([url])
        assert await get(client, ZIP) == (200, body, "up0")
        await settled(sc, 1)
        assert keys_on_disk(sc.cache.config.dir) != []
        assert (await get(client, ZIP))[:2] == (200, body)
        assert server.hits(ZIP) == 1  # the second one was a hit


# ---------------------------------------------------------------- bytes past the end

EVIL = b"HTTP/1.1 200 OK\r\nX-Evil: 1\r\nContent-Length: 12\r\n\r\nEVIL-PAYLOAD"


@pytest.mark.parametrize("later", [False, True], ids=["same-read", "later-read"])
async def test_bytes_past_a_content_length_body_are_never_served_or_cached(
    cached_sidecar, later: bool
) -> None:
    bodies = {INFO: b'{"Version":"v1.0.0"}', INFO_B: b'{"Version":"v1.1.0"}'}
    sent_evil = asyncio.Event()

    async def script(path: str, writer: asyncio.StreamWriter) -> bool:
        if path != INFO:
            writer.write(answer(bodies[path]))
            return True
        if later:
            writer.write(answer(bodies[INFO]))
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.write(EVIL)
        else:
            writer.write(answer(bodies[INFO]) + EVIL)  # one write: one read, most likely
        await writer.drain()
        sent_evil.set()
        return True

    async with hostile(script) as (url, server):
        client, sc = await cached_sidecar([url])
        resp = await client.get("/" + INFO)
        assert resp.status == 200 and await resp.read() == bodies[INFO]
        assert "X-Evil" not in resp.headers
        await asyncio.wait_for(sent_evil.wait(), 5)
        await asyncio.sleep(0.3)  # let the sidecar read them (and close that connection)
        assert await get(client, INFO_B) == (200, bodies[INFO_B], "up0")
        # The connection that carried the extra bytes was closed, never reused.
        assert server.connections == 2
        await settled(sc, 2)
        # The first answer was framed exactly: it stands, and is what was kept.
        assert (await get(client, INFO))[:2] == (200, bodies[INFO])
        assert server.hits(INFO) == 1
        for blob in all_blobs(sc.cache.config.dir):
            assert b"EVIL" not in next(Path(sc.cache.config.dir).rglob(blob)).read_bytes()


# ---------------------------------------------------------------- header limits and values


def heads() -> dict[str, bytes]:
    return {
        "64KiB-of-short-lines": b"".join(b"X-F%03d: %s\r\n" % (i, b"v" * 900) for i in range(80)),
        "one-20KiB-line": b"X-Long: " + b"v" * 20 * 1024 + b"\r\n",
        "101-fields": b"".join(b"X-F%03d: v\r\n" % i for i in range(101)),
        "nul": b"X-A: a\x00b\r\n",
        "c0": b"X-A: a\x07b\r\n",
        "del": b"X-A: a\x7fb\r\n",
        "bare-cr": b"X-A: a\rb\r\n",
        "bare-lf": b"X-A: a\nX-B: b\r\n",
        "obs-fold": b"X-A: a\r\n folded\r\n",
        "content-encoding-gzip": b"Content-Encoding: gzip\r\n",
        "content-encoding-br": b"Content-Encoding: br\r\n",
    }


@pytest.mark.parametrize("case", sorted(heads()))
async def test_untrusted_heads_are_refused_and_the_connection_closed(
    cached_sidecar, case: str
) -> None:
    body = b'{"Version":"v1.0.0"}'
    if case.startswith("content-encoding"):
        body = gzip.compress(body)

    async def script(path: str, writer: asyncio.StreamWriter) -> bool:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + heads()[case]
        writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        return True  # keep reading: the sidecar must be the one to close

    async with hostile(script) as (url, server):
        client, sc = await cached_sidecar([url])
        resp = await client.get("/" + INFO)
        text = await resp.read()
        assert resp.status == 502 and body not in text
        assert b"refused" in text or b"invalid HTTP response" in text
        await asyncio.wait_for(server.closed_by_sidecar.wait(), 5)
        await assert_nothing_cached(client, sc, server, INFO)


async def test_an_unterminated_megabyte_header_is_cut_short(cached_sidecar) -> None:
    written = 0

    async def script(path: str, writer: asyncio.StreamWriter) -> bool:
        nonlocal written
        writer.write(b"HTTP/1.1 200 OK\r\nX-Big: ")
        while written < 1024 * 1024:  # a megabyte, no CRLF ever
            writer.write(b"a" * 16384)
            written += 16384
            await writer.drain()
        return True  # and wait for the next request, which never comes

    async with hostile(script) as (url, server):
        client, sc = await cached_sidecar([url])
        resp = await client.get("/" + INFO)
        assert resp.status == 502 and b"over" in await resp.read()
        await asyncio.wait_for(server.closed_by_sidecar.wait(), 5)
        await assert_nothing_cached(client, sc, server, INFO)


async def test_an_identity_content_encoding_is_fine(cached_sidecar) -> None:
    body = b'{"Version":"v1.0.0"}'

    async def script(path: str, writer: asyncio.StreamWriter) -> bool:
        writer.write(answer(body, headers="Content-Encoding: identity\r\n"))
        return True

    async with hostile(script) as (url, server):
        client, sc = await cached_sidecar([url])
        assert (await get(client, INFO))[:2] == (200, body)
        await settled(sc, 1)
        assert (await get(client, INFO))[:2] == (200, body) and server.hits(INFO) == 1


# ---------------------------------------------------------------- redirects


@pytest.mark.parametrize(
    "target",
    [
        "http://169.254.169.254/latest/meta-data/",  # the cloud metadata service
        "http://10.0.0.1/storage/m.info",
        "http://[fe80::1]/m.info",
        "http://[::ffff:169.254.169.254]/m.info",
        "http://0.0.0.0/m.info",
        "http://100.64.0.1/m.info",
    ],
)
async def test_redirects_from_a_loopback_upstream_to_internal_addresses_are_refused(
    cached_sidecar, target: str
) -> None:
    """The upstream is on loopback, so loopback targets are allowed (next test);
    every other internal class is refused before any connection is made."""

    async def script(path: str, writer: asyncio.StreamWriter) -> bool:
        writer.write(answer(b"", "302 Found", f"Location: {target}\r\n"))
        return True

    async with hostile(script) as (url, server):
        client, sc = await cached_sidecar([url])
        resp = await client.get("/" + INFO)
        assert resp.status == 502 and b"address refused" in await resp.read()
        await assert_nothing_cached(client, sc, server, INFO)


async def test_a_redirect_to_another_loopback_port_is_followed_and_cached(cached_sidecar) -> None:
    body = b'{"Version":"v1.0.0"}'
    storage_hits: list[bytes] = []

    def storage(request: bytes) -> bytes:
        storage_hits.append(request)
        return answer(body)

    async with raw_server(keep_alive_server(storage)) as storage_url:

        async def script(path: str, writer: asyncio.StreamWriter) -> bool:
            writer.write(answer(b"", "302 Found", f"Location: {storage_url}/s/{path}\r\n"))
            return True

        async with hostile(script) as (url, server):
            client, sc = await cached_sidecar([url])
            assert await get(client, INFO) == (200, body, "up0")
            await settled(sc, 1)
            assert (await get(client, INFO))[:2] == (200, body)
            assert server.hits(INFO) == 1 and len(storage_hits) == 1


def hosts(
    table: dict[str, list[tuple[str, int]]],
) -> Callable[[str, int], Awaitable[list[Address]]]:
    """A resolver like a hosts file (the name's own port is replaced when one is given)."""

    async def resolve(host: str, port: int) -> list[Address]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        out: list[Address] = []
        for address, fixed in table[host]:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            out.append((family, (address, fixed or port)))
        return out

    return resolve


async def test_redirect_targets_are_judged_by_their_resolved_addresses() -> None:
    """A name is no way around the rule: ``private.test`` resolves to 10.x and is
    refused like the literal; ``mixed.test`` has a private and a loopback
    address, and only the loopback one is tried. The upstream itself is a
    name (``up.test``) that resolves to loopback: that is its class."""
    body = b"from storage"
    async with raw_server(keep_alive_server(lambda _: answer(body))) as storage_url:
        port = int(storage_url.rsplit(":", 1)[1])

        def home(request: bytes) -> bytes:
            name = path_of(request).split("/")[0]
            return answer(b"", "302 Found", f"Location: http://{name}:{port}/x\r\n")

        async with raw_server(keep_alive_server(home)) as url:
            up_port = int(url.rsplit(":", 1)[1])
            resolver = hosts(
                {
                    "up.test": [("127.0.0.1", up_port)],
                    "private.test": [("10.1.2.3", 0)],
                    "meta.test": [("169.254.169.254", 0)],
                    "mixed.test": [("10.1.2.3", 0), ("127.0.0.1", 0)],
                }
            )
            async with upstream(f"http://up.test:{up_port}", resolver=resolver) as up:
                for name, kind in (("private.test", "private"), ("meta.test", "link-local")):
                    with pytest.raises(UpstreamStatusError) as err:
                        await up.open(f"{name}/m/@v/v1.0.0.info")
                    assert err.value.status == 302
                    assert f"redirect to a {kind} address refused" in err.value.message
                assert await fetch(up, "mixed.test/m/@v/v1.0.0.info") == (200, body)
                assert up.active == 0


# ---------------------------------------------------------------- happy eyeballs


def test_a_silent_first_address_does_not_fail_the_connect() -> None:
    """``both.test`` resolves to a blackhole (a listener whose accept queue is
    full: the kernel drops the SYN, connect hangs) and then to a live server.
    Trying the addresses one at a time would spend the whole connect timeout
    on the first; Happy Eyeballs starts the second after 0.25 s."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    silent = listener.getsockname()[1]
    fillers = [socket.socket() for _ in range(3)]
    for filler in fillers:
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", silent))

    async def scenario() -> None:
        async with raw_server(keep_alive_server(lambda _: answer(b"live"))) as url:
            live = int(url.rsplit(":", 1)[1])
            resolver = hosts({"both.test": [("127.0.0.1", silent), ("127.0.0.1", live)]})
            async with upstream(
                "http://both.test", connect=3.0, first_byte=10.0, resolver=resolver
            ) as up:
                assert await fetch(up) == (200, b"live")
                assert await fetch(up) == (200, b"live")  # kept alive: no second race
                assert up.sender.pool.opened == 1

    try:
        asyncio.run(asyncio.wait_for(scenario(), 30))
    finally:
        for sock in [listener, *fillers]:
            sock.close()
