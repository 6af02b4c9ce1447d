"""Loopback GOPROXY upstreams that behave like Athens, and misbehave on cue.

One server per process, so the harness measures nothing of it:

    python3 -m bench.faults --port P --control-port C [--athens] [--root DIR]
        [--sumdb URL] [--mode MODE]

What it serves: ``.info``, ``.mod``, ``@v/list`` and ``@latest`` of any
module under ``tree.UNIQUE_PREFIX`` (made up on the fly, so every load
request can ask for a new path), any file under ``--root`` (the e2e
corpus' GOPROXY tree, for the real go command's builds), and ``sumdb/``
paths passed on to the checksum database at ``--sumdb`` (bench/checksums.py:
a real one, signed, that holds the made-up modules), as Athens passes them
on to sum.golang.org. Anything else is 404. Every answer takes
``SERVICE_S`` (a sumdb answer: after the database's), like a warm Athens.
``--athens``: ``HEAD`` on anything is 405, as Athens answers (FIELD-NOTES).

The mode is switched at run time on the control port (``GET /mode/<name>``);
``GET /stats`` there returns the counters as JSON. Leaving ``hung`` answers
the requests it held, as a SIGCONT'ed Athens would. ``MODES`` says what
each mode does.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import signal
import socket
import struct
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aiohttp
import httptools

from bench.procs import Proc, Procs, free_port, wait_http
from bench.tree import UNIQUE_PREFIX, VERSION, info_body, mod_body

REPO = Path(__file__).resolve().parent.parent

SERVICE_S = 0.003  # a warm Athens answering from its storage
SLOW_TTFB_S = 1.5
FLAP_PERIOD_S = 10.0
OVERLOAD_CAPACITY = 8  # requests served at once; the rest queue inside the server
OVERLOAD_SERVICE_S = 0.05  # capacity 160 req/s: far below what the load asks
SUMDB_TIMEOUT_S = 10.0

MODES = {
    "healthy": f"answers everything after {SERVICE_S * 1000:g} ms",
    "sumdb502": "every sumdb/ path 502 (Athens proxying an unreachable checksum database); "
    "modules served",
    "hung": "accepts connections and reads requests, never answers (SIGSTOP'ed Athens)",
    "slow": f"answers after {SLOW_TTFB_S:g} s (time to first byte)",
    "error50": "500 on every second request",
    "error100": "500 on every request",
    "reset": "resets the connection (RST) on every request",
    "masking": "404 for everything, with Athens' bodies (its own upstream is dead)",
    "flapping": f"down for {FLAP_PERIOD_S:g} s (listener closed, connections reset), "
    f"then up for {FLAP_PERIOD_S:g} s, and so on",
    "overloaded": f"serves {OVERLOAD_CAPACITY} requests at once, "
    f"{OVERLOAD_SERVICE_S * 1000:g} ms each; the others queue inside the server",
}

REASONS = {
    200: "OK",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    502: "Bad Gateway",
}
JSON_TYPE = "application/json"
TEXT_TYPE = "text/plain; charset=utf-8"
Answer = tuple[int, bytes, str]  # status, body, content type
Handler = Callable[["HttpConn", str, str, bool], None]


class HttpConn(asyncio.Protocol):
    """One HTTP/1.1 connection; requests are handed to ``handler`` one at a time."""

    def __init__(self, handler: Handler, conns: set[HttpConn]) -> None:
        self.handler = handler
        self.conns = conns
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.waiting: collections.deque[tuple[str, str, bool]] = collections.deque()
        self.busy = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.conns.discard(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.close()

    def on_message_begin(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        path = httptools.parse_url(self.url).path.decode("latin-1")
        method = self.parser.get_method().decode()
        self.waiting.append((method, path, self.parser.should_keep_alive()))
        self._next()

    def _next(self) -> None:
        if self.busy or self.closed or not self.waiting:
            return
        self.busy = True
        self.handler(self, *self.waiting.popleft())

    def answer(self, answer: Answer, head: bool, keep: bool) -> None:
        if self.closed or self.transport is None:
            return
        status, body, ctype = answer
        lines = [
            f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}",
            f"Content-Type: {ctype}",
            f"Content-Length: {len(body)}",
        ]
        if not keep:
            lines.append("Connection: close")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode()
        self.transport.write(data if head else data + body)
        if not keep:
            self.close()
            return
        self.busy = False
        self._next()

    def reset(self) -> None:
        """Close with RST (SO_LINGER 0): the peer sees 'connection reset by peer'."""
        if self.transport is None or self.closed:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()
        self.closed = True

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.closed = True


class Content:
    """What a healthy upstream answers for a path (GET)."""

    def __init__(self, root: Path | None, sumdb: str | None = None) -> None:
        self.root = root
        self.sumdb = sumdb  # the checksum database's base URL
        self._files: dict[str, bytes | None] = {}
        self._session: aiohttp.ClientSession | None = None

    def answer(self, path: str) -> Answer:
        """Anything but a ``sumdb/`` path (``forward``)."""
        if path.startswith(UNIQUE_PREFIX):
            made_up = self._made_up(path)
            if made_up is not None:
                return made_up
        body = self._file(path)
        if body is None:
            return 404, b"not found\n", TEXT_TYPE
        return 200, body, _content_type(path)

    @staticmethod
    def _made_up(path: str) -> Answer | None:
        module, _, tail = path[1:].partition("/@")
        if tail == "v/list":
            return 200, f"{VERSION}\n".encode(), TEXT_TYPE
        if tail in ("latest", f"v/{VERSION}.info"):
            return 200, info_body(), JSON_TYPE
        if tail == f"v/{VERSION}.mod":
            return 200, mod_body(module), TEXT_TYPE
        return None

    async def forward(self, path: str) -> Answer:
        """A ``sumdb/`` path, as the database answers it (502 when it does not)."""
        if self.sumdb is None:
            return 404, b"not found\n", TEXT_TYPE
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=SUMDB_TIMEOUT_S)
            self._session = aiohttp.ClientSession(timeout=timeout)
        try:
            async with self._session.get(self.sumdb + path) as resp:
                body = await resp.read()
                ctype = resp.headers.get("Content-Type", TEXT_TYPE)
                return resp.status, body, ctype
        except (aiohttp.ClientError, TimeoutError):
            return 502, b"", TEXT_TYPE

    def _file(self, path: str) -> bytes | None:
        if self.root is None or ".." in path:
            return None
        if path not in self._files:
            target = self.root / path.lstrip("/")
            # Small files (the corpus is ~16 MB); read once, on first use.
            self._files[path] = target.read_bytes() if target.is_file() else None
        return self._files[path]


def _content_type(path: str) -> str:
    if path.endswith(".info"):
        return JSON_TYPE
    if path.endswith(".zip"):
        return "application/zip"
    return TEXT_TYPE


def masked(path: str) -> Answer:
    """Athens with a dead upstream (FIELD-NOTES): 404 to everything, these bodies."""
    if path.endswith("/@v/list"):
        module = path[1:].removesuffix("/@v/list")
        err = (
            f'not found: module {module}: Get "https://proxy.golang.org/{module}/@v/list": '
            "dial tcp 127.0.0.1:9: connect: connection refused\n"
        )
        return 404, err.encode(), TEXT_TYPE
    return 404, b"", JSON_TYPE if path.endswith(".info") else TEXT_TYPE


class Upstream:
    """The GOPROXY listener and its current mode."""

    def __init__(self, port: int, athens: bool, content: Content, mode: str) -> None:
        self.port = port
        self.athens = athens
        self.content = content
        self.loop = asyncio.get_running_loop()
        self.mode = "healthy"
        self.conns: set[HttpConn] = set()
        self.listener: asyncio.Server | None = None
        self.held: list[tuple[HttpConn, str, str, bool]] = []
        self.queue: collections.deque[Callable[[], None]] = collections.deque()
        self.serving = 0  # overloaded: requests in service now
        self.active = 0
        self.down = False
        self.flap: asyncio.TimerHandle | None = None
        self.counts: collections.Counter[str] = collections.Counter()
        self.start_mode = mode

    async def start(self) -> None:
        await self._listen()
        await self.set_mode(self.start_mode)

    async def _listen(self) -> None:
        self.listener = await self.loop.create_server(
            lambda: HttpConn(self.handle, self.conns), "127.0.0.1", self.port, backlog=4096
        )

    async def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        if self.flap is not None:
            self.flap.cancel()
            self.flap = None
        self.mode = mode
        self.counts[f"mode_{mode}"] += 1
        if self.down:
            await self._go_up()
        if mode == "flapping":
            await self._go_down()
            self.flap = self.loop.call_later(FLAP_PERIOD_S, self._flip)
        held, self.held = self.held, []
        for req in held:
            self.handle(*req)

    async def _go_down(self) -> None:
        self.down = True
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        for conn in list(self.conns):
            conn.reset()

    async def _go_up(self) -> None:
        self.down = False
        await self._listen()

    def _flip(self) -> None:
        async def flip() -> None:
            await (self._go_up() if self.down else self._go_down())
            self.flap = self.loop.call_later(FLAP_PERIOD_S, self._flip)

        self.loop.create_task(flip())

    def handle(self, conn: HttpConn, method: str, path: str, keep: bool) -> None:
        self.counts["requests"] += 1
        self.counts[f"method_{method}"] += 1
        if self.mode == "hung":
            self.counts["held"] += 1
            self.held.append((conn, method, path, keep))
            return
        if self.mode == "reset" or self.down:
            self.counts["reset"] += 1
            conn.reset()
            return
        answer = self._answer(method, path)
        if answer is None:
            forwarding = self.loop.create_task(self.content.forward(path))
            forwarding.add_done_callback(lambda t: self._respond(conn, method, keep, t.result()))
            return
        self._respond(conn, method, keep, answer)

    def _respond(self, conn: HttpConn, method: str, keep: bool, answer: Answer) -> None:
        self.active += 1
        self.counts["max_active"] = max(self.counts["max_active"], self.active)

        def send() -> None:
            self.active -= 1
            self.counts[f"status_{answer[0]}"] += 1
            conn.answer(answer, method == "HEAD", keep)

        if self.mode == "overloaded":
            self._admit(send)
        else:
            delay = SLOW_TTFB_S if self.mode == "slow" else SERVICE_S
            self.loop.call_later(delay, send)

    def _answer(self, method: str, path: str) -> Answer | None:
        """What the mode answers; None: the checksum database's answer (``forward``)."""
        if method not in ("GET", "HEAD") or (method == "HEAD" and self.athens):
            return 405, b'{"message":"Method Not Allowed"}\n', JSON_TYPE
        mode = self.mode
        if mode == "masking":
            return masked(path)
        if mode == "error100" or (mode == "error50" and self.counts["requests"] % 2 == 0):
            return 500, b"Internal Server Error\n", TEXT_TYPE
        if mode == "sumdb502" and path.startswith("/sumdb/"):
            # Athens' reverse proxy to sum.golang.org: 502 and no body.
            return 502, b"", TEXT_TYPE
        if path.startswith("/sumdb/"):
            return None
        return self.content.answer(path)

    def _admit(self, send: Callable[[], None]) -> None:
        if self.serving >= OVERLOAD_CAPACITY:
            self.queue.append(send)
            self.counts["max_queued"] = max(self.counts["max_queued"], len(self.queue))
            return
        self.serving += 1

        def done() -> None:
            send()
            self.serving -= 1
            if self.queue:
                self._admit(self.queue.popleft())

        self.loop.call_later(OVERLOAD_SERVICE_S, done)


class Control:
    """The control port: ``/mode/<name>``, ``/stats``, ``/health``."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.conns: set[HttpConn] = set()

    def handle(self, conn: HttpConn, method: str, path: str, keep: bool) -> None:
        up = self.upstream
        if path.startswith("/mode/"):
            name = path.removeprefix("/mode/")
            if name not in MODES:
                conn.answer((404, f"unknown mode {name}\n".encode(), TEXT_TYPE), False, keep)
                return

            async def switch() -> None:
                await up.set_mode(name)
                conn.answer((200, f"{name}\n".encode(), TEXT_TYPE), False, keep)

            up.loop.create_task(switch())
            return
        if path == "/stats":
            doc = {"mode": up.mode, "down": up.down, "in_flight": up.active, **up.counts}
            conn.answer((200, json.dumps(doc).encode(), JSON_TYPE), False, keep)
            return
        conn.answer((200, b"ok\n", TEXT_TYPE), method == "HEAD", keep)


async def serve(args: argparse.Namespace) -> None:
    root = Path(args.root) if args.root else None
    upstream = Upstream(args.port, args.athens, Content(root, args.sumdb or None), args.mode)
    await upstream.start()
    control = Control(upstream)
    await upstream.loop.create_server(
        lambda: HttpConn(control.handle, control.conns), "127.0.0.1", args.control_port
    )
    await asyncio.Event().wait()  # until the harness ends the process group


# ---------------------------------------------------------------- the harness' side


@dataclass
class FaultUpstream:
    """The harness' handle on one fault upstream process."""

    name: str
    url: str
    control: str
    proc: Proc
    frozen: bool = False

    def set_mode(self, mode: str) -> None:
        with urllib.request.urlopen(f"{self.control}/mode/{mode}", timeout=10) as resp:
            resp.read()

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.control}/stats", timeout=10) as resp:
            doc: dict[str, Any] = json.loads(resp.read())
            return doc

    def freeze(self) -> None:
        """SIGSTOP: the kernel still accepts connections, nothing answers."""
        os.killpg(self.proc.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGCONT)
            self.frozen = False


def launch(
    procs: Procs,
    name: str,
    athens: bool,
    root: Path | None,
    mode: str,
    core: int | None,
    sumdb: str | None = None,
) -> FaultUpstream:
    """Start one fault upstream in its own process (pinned to ``core``); ``sumdb``:
    the checksum database's URL its ``sumdb/`` paths go to."""
    port, control_port = free_port(), free_port()
    argv = [sys.executable, "-m", "bench.faults", "--port", str(port)]
    argv += ["--control-port", str(control_port), "--mode", mode]
    argv += ["--athens"] if athens else []
    argv += ["--root", str(root)] if root else []
    argv += ["--sumdb", sumdb] if sumdb else []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = procs.start(name, argv, core, env=env, cwd=str(REPO))
    control = f"http://127.0.0.1:{control_port}"
    wait_http(proc, f"{control}/health")
    return FaultUpstream(name, f"http://127.0.0.1:{port}", control, proc)


def main() -> int:
    p = argparse.ArgumentParser(prog="bench.faults", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--control-port", type=int, required=True)
    p.add_argument("--athens", action="store_true", help="HEAD -> 405, like Athens")
    p.add_argument("--root", default="", help="a GOPROXY tree to serve files from")
    p.add_argument("--sumdb", default="", help="the checksum database sumdb/ paths go to")
    p.add_argument("--mode", default="healthy", choices=sorted(MODES))
    args = p.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args))
    else:
        uvloop.run(serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
