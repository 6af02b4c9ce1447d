"""The sidecar's HTTP/1.1 server: listening, idle keep-alive timeout, graceful stop.

aiohttp's web server costs ~20 µs per request on this machine kind (a bare
aiohttp app answers ~50 k req/s on one core; a protocol on httptools answers
~3x that), which was most of a small cache hit. This server does only what a
GOPROXY front needs: GET/HEAD with no request body in practice, answers
whole or streamed, sendfile, keep-alive and pipelining.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Protocol

from sidecar.errors import ListenError
from sidecar.server.connection import Connection
from sidecar.server.exchange import DateHeader, Exchange
from sidecar.server.tls import HANDSHAKE_TIMEOUT_S

KEEPALIVE_S: Final = 75.0  # idle keep-alive connections are closed after this (as aiohttp)
SEND_TIMEOUT_S: Final = 60.0  # a client that takes no bytes for this long is dropped (as nginx)
SWEEP_S: Final = 5.0

Handler = Callable[[Exchange], Awaitable[None]]
AnswerNow = Callable[[Exchange], bool]


class _Listening(Protocol):
    """The loop's server, as used here. uvloop's gives its sockets as a list
    where asyncio's gives a tuple (typeshed says tuple, and mypyc checks a
    declared tuple at run time)."""

    @property
    def sockets(self) -> Sequence[socket.socket]: ...

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


class Server:
    """``handler`` answers every request; ``answer_now``, if given, may answer
    one synchronously (True) before a task is made for it. A client that
    takes none of its answer's bytes for ``send_timeout_s`` is dropped, and
    its handler cancelled. With ``tls`` it serves HTTPS only; a handshake
    that takes longer than ``handshake_timeout_s`` is cut."""

    def __init__(
        self,
        handler: Handler,
        answer_now: AnswerNow | None = None,
        keepalive_s: float = KEEPALIVE_S,
        send_timeout_s: float = SEND_TIMEOUT_S,
        tls: ssl.SSLContext | None = None,
        handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
    ) -> None:
        self.handler = handler
        self.answer_now = answer_now
        self.keepalive_s = keepalive_s
        self.send_timeout_s = send_timeout_s
        self.tls = tls
        self.handshake_timeout_s = handshake_timeout_s
        self.connections: set[Connection] = set()
        self.date = DateHeader()
        self.closing = False
        self._listener: _Listening | None = None
        self._sweeper: asyncio.Task[None] | None = None

    def __call__(self) -> Connection:
        return Connection(self)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._listener.sockets) if self._listener is not None else ()

    @property
    def port(self) -> int:
        return int(self.sockets[0].getsockname()[1])

    async def listen(
        self, host: str | None = None, port: int | None = None, sock: socket.socket | None = None
    ) -> None:
        loop = asyncio.get_running_loop()
        tls = self.tls
        handshake = self.handshake_timeout_s if tls is not None else None
        if sock is not None:
            self._listener = await loop.create_server(
                self, sock=sock, backlog=1024, ssl=tls, ssl_handshake_timeout=handshake
            )
        else:
            try:
                self._listener = await loop.create_server(
                    self,
                    host,
                    port or 0,
                    backlog=1024,
                    reuse_address=True,
                    ssl=tls,
                    ssl_handshake_timeout=handshake,
                )
            except OSError as exc:
                raise ListenError(_address(host, port or 0), _reason(exc)) from exc
        self._sweeper = asyncio.create_task(self._sweep(), name="http-idle-sweep")

    async def close(self, grace: float) -> None:
        """Stop accepting; let requests in progress finish within ``grace`` seconds,
        then cut what is left."""
        self.closing = True
        if self._listener is not None:
            self._listener.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await asyncio.sleep(0)  # let connections accepted just now see `closing`
        for conn in list(self.connections):
            conn.shut_down()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.kill()
        await asyncio.sleep(0)  # let cancelled handlers unwind
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._listener.wait_closed(), 1.0)

    async def _sweep(self) -> None:
        """Close keep-alive connections idle for longer than ``keepalive_s``."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(SWEEP_S, self.keepalive_s))
            cutoff = loop.time() - self.keepalive_s
            for conn in list(self.connections):
                if 0.0 < conn.idle_since < cutoff:
                    conn.close()


def _address(host: str | None, port: int) -> str:
    host = host or "*"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reason(exc: OSError) -> str:
    """'address already in use': asyncio wraps the errno in a sentence naming a tuple."""
    if isinstance(exc, socket.gaierror) or not exc.errno:
        return str(exc.strerror or exc).lower()
    return os.strerror(exc.errno).lower()
