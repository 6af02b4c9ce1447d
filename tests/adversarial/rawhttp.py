"""Raw HTTP/1.1 over loopback sockets for the server tests (what goes on the
wire is the point, so no HTTP client library stands in between), and a real
sidecar to aim it at."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import struct
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from sidecar.config import CacheConfig
from sidecar.server import Server
from tests.upstream import FakeGoproxy, Reply

READ_S = 5.0
MODULE = "example.com/m"
INFO = f"/{MODULE}/@v/v1.0.0.info"
INFO_BODY = json.dumps({"Version": "v1.0.0", "Time": "2024-01-01T00:00:00Z"}).encode()


def request(path: str, *extra: str, method: str = "GET", version: str = "1.1") -> bytes:
    """A request head with ``Host`` and the ``extra`` header lines."""
    lines = [f"{method} {path} HTTP/{version}", "Host: t", *extra, "", ""]
    return "\r\n".join(lines).encode()


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """One response head: status and headers (lower-case names)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_S)
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response: status, headers, body (by length, by chunks, or to the close)."""
    status, headers = await read_head(reader)
    if "content-length" in headers:
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), READ_S)
    elif headers.get("transfer-encoding") == "chunked":
        parts = []
        while True:
            size = int((await asyncio.wait_for(reader.readline(), READ_S)).strip(), 16)
            if size == 0:
                await reader.readline()
                break
            parts.append(await asyncio.wait_for(reader.readexactly(size), READ_S))
            await reader.readline()
        body = b"".join(parts)
    else:
        body = await asyncio.wait_for(reader.read(), READ_S)
    return status, headers, body


async def closed(reader: asyncio.StreamReader) -> bool:
    """True when the server closes: nothing more arrives, then end of stream."""
    try:
        return await asyncio.wait_for(reader.read(), READ_S) == b""
    except ConnectionResetError:
        return True


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0: the kernel sends a TCP reset."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def raw_socket(port: int, rcvbuf: int = 0) -> socket.socket:
    """A non-blocking client socket connected to ``port`` on loopback."""
    sock = socket.socket()
    if rcvbuf:  # before connecting: it sets the window the client offers
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def push(
    sock: socket.socket, data: bytes, limit: int, stall_s: float = 1.0, deadline: float = math.inf
) -> int:
    """Send ``data`` over and over, up to ``limit`` bytes, until the peer takes
    nothing for ``stall_s``, the connection fails, or the event loop's clock
    reaches ``deadline``: the bytes sent."""
    loop = asyncio.get_running_loop()
    sent = 0
    view = memoryview(data)
    offset = 0
    idle_since = loop.time()
    while sent < limit and loop.time() - idle_since < stall_s and loop.time() < deadline:
        try:
            n = sock.send(view[offset:])
        except BlockingIOError:
            await asyncio.sleep(0.005)
            continue
        except OSError:
            break
        sent += n
        offset = (offset + n) % len(data)
        idle_since = loop.time()
        await asyncio.sleep(0)  # let the reader run
    return sent


def server_of(client: TestClient[Any, Any]) -> Server:
    """The sidecar's own HTTP server behind a ``sidecar_client``."""
    server: Server = client.server.service.server  # type: ignore[attr-defined]
    return server


async def start_sidecar(
    fake_upstreams: Any, sidecar_client: Any, tmp_path: Path, **overrides: Any
) -> tuple[FakeGoproxy, TestClient[Any, Any]]:
    """A sidecar (cache on unless ``overrides`` say otherwise) in front of one
    fake upstream that has ``INFO``; from the conftest fixtures of the same names."""
    [(fake, url)] = await fake_upstreams(1)
    fake.set(INFO.lstrip("/"), Reply(body=INFO_BODY, headers={"Content-Type": "text/json"}))
    overrides.setdefault("cache", CacheConfig(dir=str(tmp_path / "cache")))
    client, _ = await sidecar_client([url], **overrides)
    return fake, client
