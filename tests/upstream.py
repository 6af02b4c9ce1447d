"""A scriptable GOPROXY upstream for tests: a real aiohttp server on loopback.

Each path maps to a Reply; every request received is recorded so a test can
assert what reached the upstream (and, above all, what did not).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # before headers (TTFB)
    truncate_at: int | None = None  # send this many bytes of a longer Content-Length, then cut
    reset: bool = False  # drop the connection without an answer
    chunk_delay: float = 0.0  # between 64 KiB chunks of the body


class FakeGoproxy:
    def __init__(self) -> None:
        self.routes: dict[str, Reply] = {}
        self.default = Reply(status=404, body=b"not found")
        self.received: list[str] = []
        self.headers_seen: list[dict[str, str]] = []
        self.cancelled = 0
        self.completed = 0

    def set(self, path: str, reply: Reply | bytes) -> None:
        self.routes[path] = reply if isinstance(reply, Reply) else Reply(body=reply)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.raw_path.lstrip("/")
        self.received.append(path)
        self.headers_seen.append(dict(request.headers))
        reply = self.routes.get(path, self.default)
        try:
            return await self._answer(request, reply)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def _answer(self, request: web.Request, reply: Reply) -> web.StreamResponse:
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.reset:
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError
        resp = web.StreamResponse(status=reply.status, headers=reply.headers)
        resp.content_length = len(reply.body)
        await resp.prepare(request)
        body = reply.body if reply.truncate_at is None else reply.body[: reply.truncate_at]
        if request.method != "HEAD":
            await _send(resp, body, reply.chunk_delay)
        if reply.truncate_at is not None:
            assert request.transport is not None
            request.transport.abort()
            return resp
        await resp.write_eof()
        self.completed += 1
        return resp


async def _send(resp: web.StreamResponse, body: bytes, chunk_delay: float) -> None:
    step = 64 * 1024
    for i in range(0, len(body), step):
        await resp.write(body[i : i + step])
        if chunk_delay:
            await asyncio.sleep(chunk_delay)


ServerFactory = Callable[..., Awaitable[object]]


def make_app(fake: FakeGoproxy) -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    return app


async def wait_healthy(port: int, timeout: float) -> bool:
    """Poll a sidecar's /healthz on loopback until it answers 200 or time runs out."""
    import time

    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(f"http://127.0.0.1:{port}/healthz") as r:
                    if r.status == 200:
                        return True
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)
    return False
