"""https upstreams: verification against the system trust store, SNI, keep-alive
over TLS, flow control through the TLS transport, https->http redirects refused,
CONNECT tunnels through an outbound proxy.

The certificate is self-signed and generated here (``cryptography``, a
runtime dependency); the client trusts it the way an operator would, through
``SSL_CERT_FILE``.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest

from sidecar.errors import UpstreamConnectError, UpstreamStatusError
from tests.certs import HOST, self_signed
from tests.functional.test_upstream_client import (
    LOOPS,
    PROXY_AUTH,
    Runner,
    answer,
    fetch,
    keep_alive_server,
    loop_runner,
    opened,
    outbound_proxy,
    raw_server,
    read_request,
    upstream,
)


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Runner:
    return loop_runner(request.param)


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"))


def server_context(cert: tuple[Path, Path], names: list[str | None]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*cert)

    def sni(_sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        names.append(name)

    ctx.sni_callback = sni  # type: ignore[assignment]
    return ctx


def by_name(url: str) -> str:
    return url.replace("127.0.0.1", HOST)


def test_https_upstream_verified_with_sni_and_kept_alive(run, cert, monkeypatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(cert[0]))
    names: list[str | None] = []
    body = b"q" * (3 * 1024 * 1024 + 5)  # several flow-control rounds through TLS

    def respond(request: bytes) -> bytes:
        return answer(body if b".zip" in request else b"{}")

    async def scenario() -> None:
        ctx = server_context(cert, names)
        async with (
            raw_server(keep_alive_server(respond), ssl=ctx) as url,
            upstream(by_name(url)) as up,
        ):
            assert await fetch(up, "m/@v/v1.0.0.info") == (200, b"{}")
            assert await fetch(up, "m/@v/v1.0.0.zip") == (200, body)
            assert await fetch(up, "m/@v/v1.0.0.info") == (200, b"{}")
            assert opened(up) == 1  # one handshake for all three
        assert names == [HOST]

    run(scenario())


def test_an_untrusted_certificate_is_a_tls_connect_error(run, cert, monkeypatch) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    names: list[str | None] = []

    async def scenario() -> None:
        ctx = server_context(cert, names)
        async with (
            raw_server(keep_alive_server(lambda _: answer(b"{}")), ssl=ctx) as url,
            upstream(by_name(url)) as up,
        ):
            with pytest.raises(UpstreamConnectError) as err:
                await up.open("m/@v/list")
            assert "TLS error" in err.value.message
            assert "CERTIFICATE_VERIFY_FAILED" in err.value.message
            assert up.active == 0

    run(scenario())


def test_a_redirect_from_https_to_http_is_refused(run, cert, monkeypatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(cert[0]))
    names: list[str | None] = []
    plain_hits: list[bytes] = []

    async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        plain_hits.append(await read_request(reader))

    async def scenario() -> None:
        async with raw_server(plain) as plain_url:
            redirect = answer(b"", "302 Found", f"Location: {plain_url}/m.zip\r\n")
            ctx = server_context(cert, names)
            async with (
                raw_server(keep_alive_server(lambda _: redirect), ssl=ctx) as url,
                upstream(by_name(url)) as up,
            ):
                with pytest.raises(UpstreamStatusError) as err:
                    await up.open("m/@v/v1.0.0.zip")
                assert err.value.status == 302 and "non-https" in err.value.message
                assert up.active == 0
        assert plain_hits == []

    run(scenario())


def test_close_delimited_body_over_tls_ends_at_close_notify(run, cert, monkeypatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(cert[0]))
    body = b"t" * 100_000

    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body)
        writer.close()  # close_notify, then FIN
        await writer.wait_closed()

    async def scenario() -> None:
        ctx = server_context(cert, [])
        async with raw_server(until_close, ssl=ctx) as url, upstream(by_name(url)) as up:
            assert await fetch(up) == (200, body)

    run(scenario())


def test_an_https_upstream_is_tunnelled_through_https_proxy(run, cert, monkeypatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(cert[0]))
    names: list[str | None] = []
    seen: list[bytes] = []

    def respond(request: bytes) -> bytes:
        seen.append(request)
        return answer(b"tunnelled")

    async def scenario() -> None:
        ctx = server_context(cert, names)
        async with (
            raw_server(keep_alive_server(respond), ssl=ctx) as url,
            outbound_proxy(PROXY_AUTH) as (proxy_url, proxy),
        ):
            host = proxy_url.removeprefix("http://")
            monkeypatch.setenv("HTTPS_PROXY", f"bob:pr0xy-secret@{host}")  # scheme optional
            async with upstream(by_name(url) + "/base") as up:
                for _ in range(3):
                    assert await fetch(up, "m/@v/v1.0.0.zip") == (200, b"tunnelled")
                assert "tunnel" in repr(up) and "pr0xy-secret" not in repr(up)
                assert opened(up) == 1 and proxy.connections == 1  # one tunnel, kept alive
        port = url.rsplit(":", 1)[1]
        # The proxy saw one CONNECT with its credentials, nothing of the requests.
        assert len(proxy.seen) == 1
        assert proxy.seen[0].startswith(f"CONNECT {HOST}:{port} HTTP/1.1\r\n".encode())
        assert f"Proxy-Authorization: {PROXY_AUTH}\r\n".encode() in proxy.seen[0]
        assert names == [HOST]  # SNI for the upstream, verified for its name
        assert len(seen) == 3 and seen[0].startswith(b"GET /base/m/@v/v1.0.0.zip HTTP/1.1\r\n")
        assert b"Proxy-Authorization" not in seen[0]

    run(scenario())


def test_a_tunnel_is_verified_and_a_refusing_proxy_is_a_status_failure(
    run, cert, monkeypatch
) -> None:
    async def scenario() -> None:
        ctx = server_context(cert, [])
        async with (
            raw_server(keep_alive_server(lambda _: answer(b"{}")), ssl=ctx) as url,
            outbound_proxy(PROXY_AUTH) as (proxy_url, _proxy),
        ):
            monkeypatch.setenv("HTTPS_PROXY", proxy_url)  # no credentials: 407
            async with upstream(by_name(url)) as up:
                with pytest.raises(UpstreamStatusError) as err:
                    await up.open("m/@v/list")
                assert (
                    err.value.status == 407 and "outbound proxy answered 407" in err.value.message
                )
            host = proxy_url.removeprefix("http://")
            monkeypatch.setenv("HTTPS_PROXY", f"http://bob:pr0xy-secret@{host}")
            monkeypatch.delenv("SSL_CERT_FILE", raising=False)  # the upstream is not trusted now
            async with upstream(by_name(url)) as up:
                with pytest.raises(UpstreamConnectError) as err2:
                    await up.open("m/@v/list")
                assert "CERTIFICATE_VERIFY_FAILED" in err2.value.message
                assert up.active == 0

    run(scenario())
