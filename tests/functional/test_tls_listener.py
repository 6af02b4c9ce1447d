"""HTTPS on the GOPROXY port (``tls``): hits, misses and large files over TLS,
the certificate reloaded for new connections, bad pairs refused at load and
on reload, plain HTTP and silent handshakes cut.

Certificates are self-signed, made here (``self_signed``); clients trust them
as their CA.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
from cryptography import x509

from sidecar.app import SidecarService, build_sidecar
from sidecar.config import CacheConfig, TlsConfig, load_config
from sidecar.errors import ConfigErrors, TlsError
from sidecar.server import Exchange, Server
from sidecar.server.tls import ListenerTls
from tests.adversarial.rawhttp import read_response
from tests.adversarial.rawhttp import request as get
from tests.certs import self_signed
from tests.conftest import make_config
from tests.functional.test_cli import free_port, sidecar_cmd
from tests.polling import until
from tests.upstream import FakeGoproxy

BIG = os.urandom(3 * 1024 * 1024 + 17)  # several copy chunks, not a multiple of one
ZIP = "example.com/big/@v/v1.0.0.zip"
INFO = "example.com/big/@v/v1.0.0.info"


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """The live files the config names; ``make`` other pairs and copy them over."""
    live = tmp_path / "live"
    live.mkdir()
    return self_signed(live, "first")


def make(tmp_path: Path, name: str) -> tuple[Path, Path]:
    folder = tmp_path / name
    folder.mkdir()
    return self_signed(folder, name)


def install(new: tuple[Path, Path], live: tuple[Path, Path]) -> None:
    shutil.copyfile(new[0], live[0])
    shutil.copyfile(new[1], live[1])


def trusting(*certs: Path) -> ssl.SSLContext:
    context = ssl.create_default_context()
    for cert in certs:
        context.load_verify_locations(cafile=str(cert))
    return context


def peer_name(writer: asyncio.StreamWriter) -> str:
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    [attribute] = x509.load_der_x509_certificate(der).subject
    return str(attribute.value)


@pytest.fixture
async def tls_sidecar(
    fake_upstreams: Any, pair: tuple[Path, Path], tmp_path: Path
) -> AsyncIterator[tuple[SidecarService, FakeGoproxy]]:
    [(fake, url)] = await fake_upstreams(1)
    fake.set(INFO, b'{"Version":"v1.0.0"}')
    fake.set(ZIP, BIG)
    config = make_config(
        [url],
        tmp_path,
        cache=CacheConfig(dir=str(tmp_path / "cache")),
        tls=TlsConfig(certificate=str(pair[0]), key=str(pair[1])),
    )
    service = SidecarService(build_sidecar(config))
    service.server.handshake_timeout_s = 1.0  # the silent-client test waits this out
    await service.start("127.0.0.1", 0)
    try:
        yield service, fake
    finally:
        await service.stop(2.0)


async def fetch(port: int, path: str, context: ssl.SSLContext) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"https://127.0.0.1:{port}/{path}", ssl=context) as response,
    ):
        return response.status, await response.read()


async def test_hits_and_misses_are_served_over_https(
    tls_sidecar: tuple[SidecarService, FakeGoproxy], pair: tuple[Path, Path]
) -> None:
    service, fake = tls_sidecar
    context = trusting(pair[0])
    assert await fetch(service.port, INFO, context) == (200, b'{"Version":"v1.0.0"}')
    assert await fetch(service.port, INFO, context) == (200, b'{"Version":"v1.0.0"}')
    assert fake.received.count(INFO) == 1  # the second was a hit


async def test_a_large_zip_hit_arrives_intact_over_tls(
    tls_sidecar: tuple[SidecarService, FakeGoproxy], pair: tuple[Path, Path]
) -> None:
    """A hit is sent with sendfile(2) on plain HTTP: over TLS it must be copied
    through the transport, or the client would read plaintext as records."""
    service, fake = tls_sidecar
    context = trusting(pair[0])
    want = hashlib.sha256(BIG).hexdigest()
    for _ in range(2):  # a miss, then a hit from the cache's file
        status, body = await fetch(service.port, ZIP, context)
        assert status == 200 and len(body) == len(BIG)
        assert hashlib.sha256(body).hexdigest() == want
    assert fake.received.count(ZIP) == 1


async def test_a_relayed_zip_is_copied_not_spliced_over_tls(
    fake_upstreams: Any, pair: tuple[Path, Path], tmp_path: Path
) -> None:
    """Without the cache a large body is relayed, by splice(2) between plain
    sockets: over TLS that would put plaintext on the encrypted stream, so it
    is copied through the transport instead."""
    [(fake, url)] = await fake_upstreams(1)
    fake.set(ZIP, BIG)
    config = make_config([url], tmp_path, tls=TlsConfig(certificate=str(pair[0]), key=str(pair[1])))
    service = SidecarService(build_sidecar(config))
    await service.start("127.0.0.1", 0)
    try:
        status, body = await fetch(service.port, ZIP, trusting(pair[0]))
        assert status == 200 and hashlib.sha256(body).digest() == hashlib.sha256(BIG).digest()
        _, metrics = await fetch(service.port, "metrics", trusting(pair[0]))
        relayed = re.findall(rb'relayed_bytes_total\{mode="(\w+)"\} (\S+)', metrics)
        assert [(mode, float(n)) for mode, n in relayed] == [(b"copy", len(BIG))]
    finally:
        await service.stop(2.0)


async def test_plain_http_and_a_silent_handshake_are_cut(
    tls_sidecar: tuple[SidecarService, FakeGoproxy], pair: tuple[Path, Path]
) -> None:
    service, fake = tls_sidecar
    reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
    writer.write(get(f"/{INFO}"))
    assert not (await read_all(reader)).startswith(b"HTTP")
    writer.close()
    silent_r, silent_w = await asyncio.open_connection("127.0.0.1", service.port)
    # Cut after the handshake timeout (1 s here), not held until the client gives up.
    assert await asyncio.wait_for(silent_r.read(), 30) == b""
    silent_w.close()
    assert fake.received == []
    assert await fetch(service.port, INFO, trusting(pair[0])) == (200, b'{"Version":"v1.0.0"}')


async def read_all(reader: asyncio.StreamReader) -> bytes:
    try:
        return await asyncio.wait_for(reader.read(), 30)
    except ConnectionResetError:
        return b""  # dropped: a reset is as good as a close


async def open_tls(port: int, context: ssl.SSLContext) -> asyncio.StreamWriter:
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    return writer


async def test_a_reloaded_certificate_is_used_by_new_connections(
    tls_sidecar: tuple[SidecarService, FakeGoproxy], pair: tuple[Path, Path], tmp_path: Path
) -> None:
    service, _ = tls_sidecar
    tls = service.tls
    assert tls is not None
    second, third = make(tmp_path, "second"), make(tmp_path, "third")
    context = trusting(pair[0], second[0], third[0])
    before = await open_tls(service.port, context)
    assert peer_name(before) == "first"
    # The client's address under the TLS transport, for the front door's throttle.
    await until("the server's side of the handshake", lambda: bool(service.server.connections))
    assert {conn.peer for conn in service.server.connections} == {"127.0.0.1"}

    install(second, pair)  # found by the poller once the files have settled
    for _ in range(300):  # two polls of 2 s, bounded well past them for a loaded machine
        if tls.reloads:
            break
        await asyncio.sleep(0.1)
    assert tls.reloads == 1
    after = await open_tls(service.port, context)
    assert peer_name(after) == "second"

    # A key that does not match is refused; the pair in service stays.
    shutil.copyfile(third[1], pair[1])
    assert await tls.reload_now() is False
    refused = await open_tls(service.port, context)
    assert peer_name(refused) == "second"

    shutil.copyfile(third[0], pair[0])  # the SIGHUP path: at once
    assert await tls.reload_now() is True
    assert peer_name(await open_tls(service.port, context)) == "third"
    registry = service.sidecar.metrics.registry
    reloads = "goproxy_sidecar_tls_reloads_total"
    assert registry.get_sample_value(reloads, {"result": "ok"}) == 2
    assert registry.get_sample_value(reloads, {"result": "failed"}) == 1
    expiry = x509.load_pem_x509_certificate(third[0].read_bytes()).not_valid_after_utc
    assert (
        registry.get_sample_value("goproxy_sidecar_tls_certificate_expiry_timestamp_seconds")
        == expiry.timestamp()
    )
    for writer in (before, after, refused):
        writer.close()


def write_config(tmp_path: Path, certificate: str, key: str) -> Path:
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        "upstreams: [{name: athens, url: 'http://127.0.0.1:3000'}]\n"
        f"cache: {{dir: {tmp_path / 'cache'}}}\n"
        f"tls: {{certificate: {certificate}, key: {key}}}\n"
    )
    return path


def test_a_bad_pair_is_refused_at_load_naming_the_key(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    other = make(tmp_path, "other")
    with pytest.raises(ConfigErrors) as mismatch:
        load_config(str(write_config(tmp_path, str(pair[0]), str(other[1]))))
    assert str(mismatch.value) == (
        f"tls.key: {other[1]} does not match the certificate in {pair[0]}"
    )
    with pytest.raises(ConfigErrors) as missing:
        load_config(str(write_config(tmp_path, "nowhere.pem", str(pair[1]))))
    assert str(missing.value) == (
        f"tls.certificate: cannot read {tmp_path / 'nowhere.pem'}: no such file or directory"
    )
    with pytest.raises(ConfigErrors) as swapped:
        load_config(str(write_config(tmp_path, str(pair[1]), str(pair[0]))))
    assert str(swapped.value) == f"tls.certificate: no PEM certificate in {pair[1]}"
    # Relative to the config file, like the credential files.
    config = load_config(str(write_config(tmp_path, "live/cert.pem", "live/key.pem")))
    assert config.tls.certificate == str(pair[0]) and config.tls.key == str(pair[1])


def test_check_reports_a_bad_pair_on_one_line(pair: tuple[Path, Path], tmp_path: Path) -> None:
    config = write_config(tmp_path, str(pair[0]), str(make(tmp_path, "other")[1]))
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    [line] = result.stderr.strip().splitlines()
    assert "tls.key:" in line and "does not match the certificate" in line


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_files_are_sent_whole_and_in_parts_over_tls_on_both_loops(
    pair: tuple[Path, Path], tmp_path: Path, loop_factory: Any
) -> None:
    """The copy that replaces sendfile(2) over TLS, on both loops, keep-alive."""
    path = tmp_path / "blob"
    path.write_bytes(BIG)

    async def scenario() -> None:
        async def files(ex: Exchange) -> None:
            first, last = (0, len(BIG) - 1) if ex.target == "/whole" else (1000, 2_500_000)
            with open(path, "rb") as fobj:
                await ex.start(200 if first == 0 else 206, {"Content-Type": "x"}, last - first + 1)
                await ex.sendfile(fobj, first, last - first + 1)
                await ex.end()

        tls = ListenerTls(TlsConfig(certificate=str(pair[0]), key=str(pair[1])))
        server = Server(files, tls=tls.listener)
        await server.listen("127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", server.port, ssl=trusting(pair[0])
            )
            writer.write(get("/whole") + get("/part"))
            status, _, body = await read_response(reader)
            assert status == 200 and body == BIG
            status, _, body = await read_response(reader)
            assert status == 206 and body == BIG[1000:2_500_001]
            writer.close()
        finally:
            await server.close(1.0)

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(scenario())


async def test_a_sidecar_whose_key_is_gone_does_not_start(
    fake_upstreams: Any, pair: tuple[Path, Path], tmp_path: Path
) -> None:
    """A port meant for HTTPS never comes up as plain HTTP."""
    [(_, url)] = await fake_upstreams(1)
    tls = TlsConfig(certificate=str(pair[0]), key=str(pair[1]))
    service = SidecarService(build_sidecar(make_config([url], tmp_path, tls=tls)))
    pair[1].unlink()
    try:
        with pytest.raises(TlsError, match=f"^tls.key: cannot read {pair[1]}: no such file"):
            await service.start("127.0.0.1", 0)
        assert service.server.sockets == ()
    finally:
        await service.stop(0)


def silent_tls_client(port: int, cafile: Path, request: bytes) -> socket.socket:
    """A client that shakes hands, asks, and then reads nothing (blocking socket:
    what it does not read stays in the kernel, as for a stalled client)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock = trusting(cafile).wrap_socket(raw, server_hostname="127.0.0.1")
    sock.sendall(request)
    return sock


@pytest.mark.parametrize("body", ["streamed", "file"])
@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_a_tls_client_that_takes_no_bytes_is_dropped_on_both_loops(
    pair: tuple[Path, Path], tmp_path: Path, loop_factory: Any, body: str
) -> None:
    """The send timeout over TLS: the transport's flow control, and TCP_INFO read
    from the TCP socket under the TLS transport."""
    path = tmp_path / "blob"
    path.write_bytes(BIG * 8)  # 24 MiB: far more than the socket buffers hold

    async def scenario() -> None:
        cancelled = asyncio.Event()

        async def endless(ex: Exchange) -> None:
            try:
                if body == "file":
                    with open(path, "rb") as fobj:
                        await ex.start(200, {}, len(BIG) * 8)
                        await ex.sendfile(fobj, 0, len(BIG) * 8)
                else:
                    await ex.start(200, {}, None)
                    for _ in range(64):
                        await ex.write(BIG)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        tls = ListenerTls(TlsConfig(certificate=str(pair[0]), key=str(pair[1])))
        server = Server(endless, send_timeout_s=0.5, tls=tls.listener)
        await server.listen("127.0.0.1", 0)
        try:
            sock = await asyncio.to_thread(silent_tls_client, server.port, pair[0], get("/big"))
            await asyncio.wait_for(cancelled.wait(), 30)
            assert not server.connections
            sock.close()
        finally:
            await server.close(1.0)

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(scenario())


def test_check_names_the_certificate_and_its_expiry(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    config = write_config(tmp_path, "live/cert.pem", "live/key.pem")
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    [line] = [x for x in result.stdout.splitlines() if x.startswith("tls ")]
    assert line.startswith(f"tls ok: {pair[0]} (CN=first, valid until ")
    assert line.endswith(f" UTC), key {pair[1]}, min TLSv1.2")


async def test_run_serves_https_and_reloads_on_sighup(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    """The real `run` (uvloop when installed): HTTPS on its port, SIGHUP wired."""
    port = free_port()
    config = write_config(tmp_path, "live/cert.pem", "live/key.pem")
    config.write_text(config.read_text() + f'listen: "127.0.0.1:{port}"\n')
    second = make(tmp_path, "second")
    context = trusting(pair[0], second[0])
    proc = await asyncio.create_subprocess_exec(
        *sidecar_cmd("run", "--config", str(config)), stderr=asyncio.subprocess.PIPE
    )
    try:
        first = await open_when_up(port, context)
        assert peer_name(first) == "first"
        assert await fetch(port, "healthz", context) == (200, b"ok\n")
        install(second, pair)
        proc.send_signal(signal.SIGHUP)
        for _ in range(300):
            again = await open_tls(port, context)
            name = peer_name(again)
            again.close()
            if name == "second":
                break
            await asyncio.sleep(0.1)
        assert name == "second"
        first.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert "SIGHUP: reloading the TLS certificate" in err.decode()
    assert proc.returncode == 0


async def open_when_up(port: int, context: ssl.SSLContext) -> asyncio.StreamWriter:
    for _ in range(300):  # bounded: start-up on a loaded machine
        try:
            return await open_tls(port, context)
        except OSError:
            await asyncio.sleep(0.1)
    raise AssertionError(f"nothing answers TLS on {port}")
