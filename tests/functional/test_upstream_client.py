"""Upstream against real loopback servers: framing, failures, keep-alive, redirects.

Every scenario is a self-contained coroutine (it starts its own servers) run
by the ``run`` fixture on both event loops the sidecar may meet: asyncio (the
tests' default) and uvloop (what ``goproxy-sidecar run`` uses); their
transports differ in exactly the places a client gets wrong (writes to a
closing transport, EOF, pause/resume).

The helpers here are imported by the other ``test_upstream_client_*`` files.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import pytest
import uvloop
from aiohttp import web
from aiohttp.test_utils import TestServer

from sidecar.config import AuthConfig, BasicAuth, PoolConfig, TimeoutsConfig, UpstreamConfig
from sidecar.errors import (
    ConfigError,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeout,
    UpstreamTruncated,
)
from sidecar.upstreams import Upstream
from sidecar.upstreams.connect import Resolver

SCENARIO_TIMEOUT_S = 30.0
LOOPS: dict[str, Callable[[Coroutine[Any, Any, Any]], Any]] = {
    "asyncio": asyncio.run,
    "uvloop": uvloop.run,
}
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


Runner = Callable[[Coroutine[Any, Any, Any]], Any]


def loop_runner(loop: str) -> Runner:
    """Run a scenario to completion on a fresh ``loop`` event loop, time-boxed."""
    runner = LOOPS[loop]

    def run_scenario(coro: Coroutine[Any, Any, Any]) -> Any:
        async def guarded() -> Any:
            return await asyncio.wait_for(coro, SCENARIO_TIMEOUT_S)

        return runner(guarded())

    return run_scenario


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Runner:
    return loop_runner(request.param)


# ---------------------------------------------------------------- helpers


@contextlib.asynccontextmanager
async def raw_server(handler: Handler, ssl: Any = None) -> AsyncIterator[str]:
    """A bare asyncio server on loopback running ``handler`` per connection."""
    tasks: set[asyncio.Task[Any]] = set()

    async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            pass  # stopped at teardown: end quietly (asyncio logs a cancelled handler)
        finally:
            writer.transport.abort()
            tasks.discard(task)

    server = await asyncio.start_server(wrapped, "127.0.0.1", 0, ssl=ssl)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"{'https' if ssl else 'http'}://127.0.0.1:{port}"
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def answer(body: bytes, status: str = "200 OK", headers: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\n{headers}Content-Length: {len(body)}\r\n\r\n".encode() + body


def keep_alive_server(respond: Callable[[bytes], bytes | None]) -> Handler:
    """Answer every request on a connection with ``respond(request)``; None closes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request = await read_request(reader)
            reply = respond(request)
            if reply is None:
                return
            writer.write(reply)
            await writer.drain()

    return handler


class OutboundProxy:
    """A corporate HTTP proxy on loopback: absolute-form requests are forwarded
    (``Proxy-Authorization`` checked and dropped), ``CONNECT`` opens a byte
    tunnel. Every head it receives from the sidecar is kept in ``seen``."""

    def __init__(self, credentials: str | None = None) -> None:
        self.credentials = credentials  # the expected Proxy-Authorization value
        self.seen: list[bytes] = []
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        origin: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                head = await read_request(reader)
                self.seen.append(head)
                method, target, _ = head.split(b"\r\n", 1)[0].split(b" ")
                wanted = f"Proxy-Authorization: {self.credentials}\r\n".encode()
                if self.credentials is not None and wanted not in head:
                    writer.write(answer(b"", "407 Proxy Authentication Required"))
                    await writer.drain()
                    continue
                if method == b"CONNECT":
                    host, port = target.decode().rsplit(":", 1)
                    up_reader, up_writer = await asyncio.open_connection(host, int(port))
                    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    await _pipe_both(reader, writer, up_reader, up_writer)
                    return
                origin = origin or await asyncio.open_connection(
                    *target.decode().split("/")[2].rsplit(":", 1)
                )
                await self._forward(head, target, origin, writer)
        finally:
            if origin is not None:
                origin[1].transport.abort()

    async def _forward(
        self,
        head: bytes,
        target: bytes,
        origin: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        writer: asyncio.StreamWriter,
    ) -> None:
        method, rest = head.split(b" ", 1)
        path = b"/" + target.split(b"/", 3)[3]
        lines = [
            line for line in rest.split(b"\r\n")[1:] if not line.startswith(b"Proxy-Authorization")
        ]
        up_reader, up_writer = origin
        up_writer.write(method + b" " + path + b" HTTP/1.1\r\n" + b"\r\n".join(lines))
        reply = await read_request(up_reader)
        length = int(reply.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        writer.write(reply + await up_reader.readexactly(length))
        await writer.drain()


async def _pipe_both(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
) -> None:
    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
        dst.close()

    try:
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
    finally:
        up_writer.transport.abort()


@contextlib.asynccontextmanager
async def outbound_proxy(
    credentials: str | None = None,
) -> AsyncIterator[tuple[str, OutboundProxy]]:
    proxy = OutboundProxy(credentials)
    async with raw_server(proxy.handle) as url:
        yield url, proxy


@contextlib.asynccontextmanager
async def aiohttp_server(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def upstream(
    url: str,
    limit: int = 8,
    connect: float = 1.0,
    first_byte: float = 1.0,
    idle: float = 1.0,
    auth: AuthConfig | None = None,
    max_wait: float = 2.0,
    resolver: Resolver | None = None,
) -> AsyncIterator[Upstream]:
    cfg = UpstreamConfig(
        name="up",
        url=url,
        pool=PoolConfig(limit, max_wait=max_wait),
        timeouts=TimeoutsConfig(connect, first_byte, idle),
        auth=auth or AuthConfig(),
    )
    up = Upstream(cfg, "primary", resolver=resolver)
    await up.start()
    try:
        yield up
    finally:
        await up.close()


async def fetch(up: Upstream, path: str = "m/@v/list", method: str = "GET") -> tuple[int, bytes]:
    resp = await up.open(path, method)
    try:
        body = b"".join([chunk async for chunk in resp.chunks()])
    except BaseException:
        resp.release(reuse=False)
        raise
    resp.release()
    return resp.status, body


def opened(up: Upstream) -> int:
    return up.sender.pool.opened


def pool_size(up: Upstream) -> int:
    return up.sender.pool.size


# ---------------------------------------------------------------- through the sidecar


async def test_the_sidecar_serves_through_its_client(fake_upstreams, sidecar_client) -> None:
    [(fake, url)] = await fake_upstreams(1)
    fake.set("example.com/m/@v/v1.0.0.info", b'{"Version":"v1.0.0"}')
    client, sidecar = await sidecar_client([url])
    assert sidecar.upstreams["up0"].sender.describe() == "http1"
    for _ in range(3):
        resp = await client.get("/example.com/m/@v/v1.0.0.info")
        assert resp.status == 200 and await resp.read() == b'{"Version":"v1.0.0"}'
    assert (await client.get("/example.com/m/@v/v9.9.9.info")).status == 404
    assert sidecar.upstreams["up0"].active == 0


# ---------------------------------------------------------------- passthrough


def test_bodies_pass_byte_exact_and_connections_are_reused(run) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path.endswith(".zip"):
            return web.Response(body=payload, content_type="application/zip")
        if request.path.endswith(".info"):
            return web.json_response({"Version": "v1.0.0"})
        return web.Response(status=404, text="not found: " + request.path)

    async def scenario() -> None:
        async with aiohttp_server(handler) as url, upstream(url) as up:
            for _ in range(3):
                assert await fetch(up, "m/@v/v1.0.0.zip") == (200, payload)
                status, body = await fetch(up, "m/@v/v1.0.0.info")
                assert status == 200 and body == b'{"Version": "v1.0.0"}'
            resp = await up.open("m/@v/list")
            assert resp.status == 404 and resp.ttfb > 0
            assert "not found" in await resp.read_text()
            resp.release()
            assert up.active == 0 and up.peak == 1
            assert opened(up) == 1

    run(scenario())


def test_request_line_and_headers(run) -> None:
    seen: list[bytes] = []

    def respond(request: bytes) -> bytes:
        seen.append(request)
        return answer(b"{}")

    async def scenario() -> None:
        auth = AuthConfig(basic=BasicAuth("U", "P", username="ci-bot", password="s3cret-pw"))
        async with (
            raw_server(keep_alive_server(respond)) as url,
            upstream(url + "/base/path", auth=auth) as up,
        ):
            await fetch(up, "github.com/!azure/go-autorest/@v/v1.0.0.info")
            await fetch(up, "m/@v/v1.0.0.info", "HEAD")
            for secret in ("s3cret-pw", "Y2ktYm90OnMzY3JldC1wdw"):  # plain and base64
                assert secret not in repr(up) + repr(up.sender.route) + repr(up.sender.pool.route)
        port = url.rsplit(":", 1)[1]
        first, head = seen[0].decode(), seen[1].decode()
        assert first.startswith(
            "GET /base/path/github.com/!azure/go-autorest/@v/v1.0.0.info HTTP/1.1\r\n"
        )
        for line in (
            f"Host: 127.0.0.1:{port}",
            "User-Agent: goproxy-sidecar",
            "Accept-Encoding: identity",
            "Connection: keep-alive",
            "Authorization: Basic Y2ktYm90OnMzY3JldC1wdw==",
        ):
            assert line + "\r\n" in first
        assert head.startswith("HEAD /base/path/m/@v/v1.0.0.info HTTP/1.1\r\n")

    run(scenario())


def test_chunked_and_close_delimited_bodies(run) -> None:
    body = b"x" * 70000 + b"y" * 3

    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for i in range(0, len(body), 9000):
                part = body[i : i + 9000]
                writer.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                await writer.drain()
            writer.write(b"0\r\n\r\n")

    async def until_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body)
        await writer.drain()

    async def scenario() -> None:
        async with raw_server(chunked) as url, upstream(url) as up:
            for _ in range(2):
                resp = await up.open("m/@v/list")
                assert resp.content_length is None
                assert b"".join([c async for c in resp.chunks()]) == body
                resp.release()
            assert opened(up) == 1
        async with raw_server(until_eof) as url, upstream(url) as up:
            assert await fetch(up) == (200, body)
            assert await fetch(up) == (200, body)  # a new connection each time
            assert opened(up) == 2

    run(scenario())


def test_head_has_no_body_and_keeps_the_connection(run) -> None:
    def respond(request: bytes) -> bytes:
        if request.startswith(b"HEAD"):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n"
        return answer(b"after")

    async def scenario() -> None:
        async with raw_server(keep_alive_server(respond)) as url, upstream(url) as up:
            resp = await up.open("m/@v/v1.0.0.zip", "HEAD")
            assert resp.content_length == 5000
            assert [c async for c in resp.chunks()] == []
            resp.release()
            assert await fetch(up) == (200, b"after")
            assert opened(up) == 1

    run(scenario())


# ---------------------------------------------------------------- failures


def test_status_failures_carry_the_body_text(run) -> None:
    def respond(request: bytes) -> bytes:
        return answer(b"maintenance window", "503 Service Unavailable")

    async def scenario() -> None:
        async with raw_server(keep_alive_server(respond)) as url, upstream(url) as up:
            for _ in range(2):
                with pytest.raises(UpstreamStatusError) as err:
                    await up.open("m/@v/list")
                assert err.value.status == 503 and "maintenance window" in err.value.message
            assert up.active == 0
            assert opened(up) == 1  # the body was read: the connection stays

    run(scenario())


def test_short_bodies_are_truncation(run) -> None:
    async def short_length(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"z" * 70000)
        await writer.drain()

    async def short_chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n")
        await writer.drain()

    async def scenario() -> None:
        for handler in (short_length, short_chunked):
            async with raw_server(handler) as url, upstream(url) as up:
                resp = await up.open("m/@v/v1.0.0.zip")
                received = 0
                with pytest.raises(UpstreamTruncated):
                    async for chunk in resp.chunks():
                        received += len(chunk)
                resp.release(reuse=False)
                assert received in (70000, 5)
                assert up.active == 0

    run(scenario())


def test_slow_headers_and_slow_bodies_time_out(run) -> None:
    async def slow_headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    async def stalled_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
        await writer.drain()
        await asyncio.sleep(5)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        async with raw_server(slow_headers) as url, upstream(url, first_byte=0.3) as up:
            started = loop.time()
            with pytest.raises(UpstreamTimeout) as err:
                await up.open("m/@v/list")
            assert 0.25 < loop.time() - started < 4  # its timeout, not the server's 5 s
            assert "first byte" in err.value.message and up.active == 0
        async with raw_server(stalled_body) as url, upstream(url, idle=0.3) as up:
            resp = await up.open("m/@v/list")
            started = loop.time()
            with pytest.raises(UpstreamTimeout) as err:
                async for _ in resp.chunks():
                    pass
            assert 0.25 < loop.time() - started < 4
            assert "idle" in err.value.message
            resp.release(reuse=False)
            assert up.active == 0

    run(scenario())


def test_reset_and_refused_are_connect_errors(run) -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.transport.abort()

    async def scenario() -> None:
        async with raw_server(reset) as url, upstream(url) as up:
            with pytest.raises(UpstreamConnectError):
                await up.open("m/@v/list")
            assert up.active == 0
        async with raw_server(reset) as url:
            pass  # closed: its port now refuses
        async with upstream(url) as up:
            with pytest.raises(UpstreamConnectError) as err:
                await up.open("m/@v/list")
            assert "connect" in err.value.message.lower()
            assert up.active == 0

    run(scenario())


def test_a_connect_that_hangs_times_out(run) -> None:
    # A listener whose accept queue is full drops new SYNs: connect() hangs.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = [socket.socket() for _ in range(3)]
    for filler in fillers:
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))

    async def scenario() -> None:
        url = f"http://127.0.0.1:{port}"
        async with upstream(url, connect=0.3, first_byte=5.0) as up:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(UpstreamTimeout) as err:
                await up.open("m/@v/list")
            assert loop.time() - started < 4  # the connect timeout, not first_byte's 5 s
            assert "connect" in err.value.message and up.active == 0
            assert opened(up) == 0 and pool_size(up) == 0

    try:
        run(scenario())
    finally:
        for sock in [listener, *fillers]:
            sock.close()


def test_an_invalid_answer_is_a_connect_error(run) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    async def scenario() -> None:
        async with raw_server(garbage) as url, upstream(url) as up:
            with pytest.raises(UpstreamProtocolError) as err:
                await up.open("m/@v/list")
            assert "invalid HTTP response" in err.value.message

    run(scenario())


# ---------------------------------------------------------------- redirects


def test_redirects_are_followed_and_credentials_stay_home(run) -> None:
    seen: list[bytes] = []

    def elsewhere(request: bytes) -> bytes:
        seen.append(request)
        return answer(b"zip bytes from storage")

    async def scenario() -> None:
        async with raw_server(keep_alive_server(elsewhere)) as storage:

            def home(request: bytes) -> bytes:
                seen.append(request)
                if b" /goproxy/m/@v/v1.0.0.zip " in request:
                    return answer(b"moved", "302 Found", "Location: /goproxy/m/@v/real.zip\r\n")
                if b" /goproxy/m/@v/real.zip " in request:
                    return answer(
                        b"", "307 Temporary Redirect", f"Location: {storage}/b/k%2F1?sig=a%3D\r\n"
                    )
                return answer(b"", "301 Moved Permanently", "Location: /goproxy/loop\r\n")

            auth = AuthConfig(basic=BasicAuth("U", "P", username="u", password="pw"))
            async with (
                raw_server(keep_alive_server(home)) as url,
                upstream(url + "/goproxy", auth=auth) as up,
            ):
                assert await fetch(up, "m/@v/v1.0.0.zip") == (200, b"zip bytes from storage")
                with pytest.raises(UpstreamStatusError) as err:
                    await up.open("other")
                assert "redirects" in err.value.message and err.value.status == 301
                assert up.active == 0
        assert seen[0].startswith(b"GET /goproxy/m/@v/v1.0.0.zip ")
        assert seen[1].startswith(b"GET /goproxy/m/@v/real.zip ") and b"Authorization" in seen[1]
        assert seen[2].startswith(b"GET /b/k%2F1?sig=a%3D HTTP/1.1\r\n")
        assert b"Authorization" not in seen[2]

    run(scenario())


# ---------------------------------------------------------------- outbound proxy


PROXY_AUTH = "Basic Ym9iOnByMHh5LXNlY3JldA=="  # bob:pr0xy-secret


def test_an_http_upstream_is_forwarded_through_http_proxy(run, monkeypatch) -> None:
    seen: list[bytes] = []

    def respond(request: bytes) -> bytes:
        seen.append(request)
        return answer(b"via proxy")

    async def scenario() -> None:
        auth = AuthConfig(basic=BasicAuth("U", "P", username="u", password="upstream-pw"))
        async with (
            raw_server(keep_alive_server(respond)) as url,
            outbound_proxy(PROXY_AUTH) as (proxy_url, proxy),
        ):
            host = proxy_url.removeprefix("http://")
            monkeypatch.setenv("HTTP_PROXY", f"http://bob:pr0xy-secret@{host}")
            async with upstream(url + "/base", auth=auth) as up:
                for _ in range(3):
                    assert await fetch(up, "m/@v/v1.0.0.info") == (200, b"via proxy")
                assert "via outbound proxy" in repr(up) and "forward" in repr(up)
                assert "pr0xy-secret" not in repr(up) + repr(up.sender.route)
                assert opened(up) == 1 and proxy.connections == 1  # pooled like a direct one
        assert len(proxy.seen) == 3
        assert proxy.seen[0].startswith(f"GET {url}/base/m/@v/v1.0.0.info HTTP/1.1\r\n".encode())
        assert f"Proxy-Authorization: {PROXY_AUTH}\r\n".encode() in proxy.seen[0]
        assert seen[0].startswith(b"GET /base/m/@v/v1.0.0.info HTTP/1.1\r\n")
        assert b"Authorization: Basic dTp1cHN0cmVhbS1wdw==" in seen[0]  # the upstream's own
        assert b"Proxy-Authorization" not in seen[0]

    run(scenario())


def test_no_proxy_and_a_refusing_proxy(run, monkeypatch) -> None:
    async def scenario() -> None:
        async with (
            raw_server(keep_alive_server(lambda _: answer(b"direct"))) as url,
            outbound_proxy(PROXY_AUTH) as (proxy_url, proxy),
        ):
            monkeypatch.setenv("HTTP_PROXY", proxy_url)  # no credentials: 407
            async with upstream(url) as up:
                with pytest.raises(UpstreamStatusError) as err:
                    await up.open("m/@v/list")
                assert err.value.status == 407 and up.active == 0
            monkeypatch.setenv("NO_PROXY", "example.org,127.0.0.1")
            async with upstream(url) as up:
                assert await fetch(up) == (200, b"direct")
                assert repr(up).endswith("client=http1)")
        assert len(proxy.seen) == 1  # only the refused one

    run(scenario())


def test_only_http_proxies_are_supported(monkeypatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "https://bob:pr0xy-secret@corp-proxy:3128")
    with pytest.raises(ConfigError) as err:
        Upstream(UpstreamConfig(name="up", url="https://proxy.golang.org"), "primary")
    assert err.value.key == "HTTPS_PROXY" and "pr0xy-secret" not in str(err.value)
