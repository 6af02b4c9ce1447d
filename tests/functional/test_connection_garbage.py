"""Connections that end leave nothing that only the cyclic GC can free.

A connection's parser holds the connection's callbacks, the client side's
reader holds its connection, and a lost upstream connection holds its error,
whose traceback holds frames: when each of those ended as a reference cycle,
every failed attempt and every closed client connection became ~50 objects
that only the cyclic GC frees, and only when it passes over the oldest
generation the connection had reached. Real parts: a raw upstream that
resets every connection, an aiohttp upstream that closes after each answer,
the sidecar's own server and upstream client on loopback.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import AsyncIterator
from typing import Any

import httptools
import pytest
from aiohttp import web

from sidecar.server.connection import Connection as ClientConnection
from sidecar.server.requests import RequestReader
from sidecar.upstreams.http1 import Connection as UpstreamConnection
from tests.adversarial.rawhttp import reset
from tests.garbage import cyclic_garbage

REQUESTS = 40
INFO = b'{"Version":"v1.0.0","Time":"2024-01-01T00:00:00Z"}'
LEFTOVERS = (
    ClientConnection,
    UpstreamConnection,
    RequestReader,
    httptools.HttpRequestParser,
    httptools.HttpResponseParser,
    BaseException,
    types.FrameType,
    types.TracebackType,
)


class Resetting:
    """Reads a request, then closes with SO_LINGER 0: the kernel sends a reset."""

    def __init__(self) -> None:
        self.url = ""
        self.requests = 0


@pytest.fixture
async def resetting() -> AsyncIterator[Resetting]:
    upstream = Resetting()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            upstream.requests += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        reset(writer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    upstream.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield upstream
    finally:
        server.close()


@pytest.fixture
async def closing(aiohttp_server: Any) -> str:
    """Answers every .info, then closes the connection (``Connection: close``)."""

    async def info(request: web.Request) -> web.Response:
        resp = web.Response(body=INFO, content_type="application/json")
        resp.force_close()
        return resp

    app = web.Application()
    app.router.add_get("/{tail:.*}", info)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


async def test_ended_connections_leave_no_cyclic_garbage(
    resetting: Resetting, closing: str, sidecar_client: Any
) -> None:
    # No control loop: the primary's breaker never opens, so every request
    # fails there first (a reset), then is answered by the backup, which
    # closes its connection; the client closes its own after each answer.
    client, _ = await sidecar_client([resetting.url, closing], run_control=False)
    headers = {"Connection": "close"}
    warm = await client.get("/example.com/warm/@v/v1.0.0.info", headers=headers)
    assert warm.status == 200  # imports, pools, first-use caches
    await warm.read()
    with cyclic_garbage(LEFTOVERS) as left:
        for i in range(REQUESTS):
            resp = await client.get(f"/example.com/m{i}/@v/v1.0.0.info", headers=headers)
            assert resp.status == 200 and await resp.read() == INFO
        await asyncio.sleep(0.1)  # the last connections' connection_lost callbacks
    assert resetting.requests >= REQUESTS  # every request's first attempt did fail
    # Before: per request a lost upstream connection with its parser, error,
    # tracebacks and frames, and a client connection with its reader and parser.
    assert len(left) < REQUESTS // 4, sorted({type(o).__name__ for o in left})
