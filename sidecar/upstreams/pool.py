"""A bounded pool of keep-alive connections to one origin, and its deadline sweeper.

- At most ``limit`` connections exist (open, opening or idle). A request that
  finds none idle and no free slot waits in a FIFO queue: a connection given
  back goes straight to the oldest waiter, and a closed one hands its slot to
  the oldest waiter, so no request can be overtaken forever.
- Idle connections are reused LIFO (the most recently used is the most likely
  to still be open and warm) and closed after ``idle_timeout`` unused.
- Deadlines (connect aside) are enforced by one sweeper timer per pool that
  runs every ``tick`` while anything is in flight or idle, instead of one
  timer per request: a uvloop timer costs a libuv handle per request, the
  sweeper one scan of at most ``limit`` connections per tick. Timeouts
  therefore fire up to ``tick`` (≤ 0.1 s) late.
- Connecting resolves the host once a minute (cached), tries each address in
  turn, and wraps TLS with ``ssl.create_default_context()`` and SNI; the
  system trust store applies (``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` work).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
import time
from collections import deque
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from sidecar.errors import UpstreamConnectError, UpstreamTimeout
from sidecar.upstreams.http1 import Connection

DNS_TTL_S: Final = 60.0
MAX_TICK_S: Final = 0.1
MIN_TICK_S: Final = 0.01
DEFAULT_PORTS: Final = {"http": 80, "https": 443}
READ_MAX: Final = 256 * 1024  # one socket read with few busy connections (large-zip speed)
READ_MIN: Final = 16 * 1024
READ_BUDGET: Final = 16 * 1024 * 1024  # what one round of reads of all busy connections may bring

Waiter = tuple["asyncio.Future[Connection | None]", float]


@dataclass(frozen=True, slots=True)
class Origin:
    """scheme://host:port of an upstream (credentials never kept here)."""

    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: str) -> Origin:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {scheme}://{parts.hostname or ''}")
        return cls(scheme, parts.hostname, parts.port or DEFAULT_PORTS[scheme])

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def literal(self) -> int:
        """The address family if ``host`` is an IP literal, else 0."""
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            return 0
        return socket.AF_INET6 if ip.version == 6 else socket.AF_INET

    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


class Pool:
    """Connections to ``origin`` for one upstream named ``name``."""

    def __init__(
        self,
        name: str,
        origin: Origin,
        limit: int,
        connect_timeout: float,
        idle_timeout: float,
        tick: float,
    ) -> None:
        self.name = name
        self.origin = origin
        self.limit = limit
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.tick = min(MAX_TICK_S, max(MIN_TICK_S, tick))
        self.opened = 0  # connections ever opened (tests and logs)
        self._count = 0  # connections holding a slot: open, opening or idle
        self._idle: list[Connection] = []
        self._busy: set[Connection] = set()
        self._waiters: deque[Waiter] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._dns: dict[tuple[str, int], tuple[float, list[tuple[int, tuple[str, int]]]]] = {}
        self._ssl: ssl.SSLContext | None = None
        self._closed = False
        # Every connection of this pool reads into this buffer and copies out
        # what arrived (buffer_updated runs right after each read), so read
        # memory does not grow with the number of connections.
        self._read_buffer = memoryview(bytearray(READ_MAX))

    # -- what the outside sees ---------------------------------------------------

    @property
    def size(self) -> int:
        return self._count

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def read_view(self) -> memoryview:
        """Where the next socket read of one of these connections lands. Reads
        shrink as more connections are busy: 200 concurrent 50 MiB relays each
        reading 256 KiB at a time held about half a megabyte per stream."""
        size = READ_BUDGET // max(1, len(self._busy))
        return self._read_buffer[: min(READ_MAX, max(READ_MIN, size))]

    def start(self) -> None:
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiters:
            fut, _ = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(UpstreamConnectError(self.name, "upstream client closed"))
        for conn in [*self._idle, *self._busy]:
            conn.abort()
        self._idle.clear()

    # -- acquire / release -------------------------------------------------------

    def acquire_nowait(self) -> Connection | None:
        """The most recently used idle connection that is still open, or None."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.usable:
                self._busy.add(conn)
                return conn
            self._discard(conn)
        return None

    async def acquire(self, deadline: float) -> Connection:
        """An idle connection, a new one, or the next one freed (FIFO)."""
        conn = self.acquire_nowait()
        if conn is not None:
            return conn
        if self._closed:
            raise UpstreamConnectError(self.name, "upstream client closed")
        if self._count < self.limit and not self._waiters:
            self._count += 1
            return await self.open(deadline)
        fut: asyncio.Future[Connection | None] = asyncio.get_running_loop().create_future()
        entry = (fut, deadline)
        self._waiters.append(entry)
        self._ensure_sweeper()
        try:
            handed = await fut
        except asyncio.CancelledError:
            self._abandon(entry)
            raise
        if handed is None:  # a slot was freed for us (and counted)
            return await self.open(deadline)
        return handed

    def _abandon(self, entry: Waiter) -> None:
        """A waiter was cancelled: give back whatever it was handed meanwhile."""
        fut = entry[0]
        if not fut.done() or fut.cancelled():
            with contextlib.suppress(ValueError):  # already taken off by the sweeper
                self._waiters.remove(entry)
            return
        if fut.exception() is not None:
            return
        handed = fut.result()
        if handed is None:
            self._free_slot()
        else:
            self.release(handed, reuse=True)

    def release(self, conn: Connection, reuse: bool) -> None:
        """Back to the pool if its answer was read to the end, else closed."""
        if reuse and conn.slot and conn.reusable and not self._closed:
            conn.recycle()
            if self._hand_over(conn):
                return  # still busy, now for the oldest waiter
            self._busy.discard(conn)
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
            self._ensure_sweeper()
            return
        self._busy.discard(conn)
        conn.abort()
        self._discard(conn)

    async def replace(self, conn: Connection, deadline: float) -> Connection:
        """A fresh connection in the slot of ``conn`` (a stale keep-alive)."""
        self._busy.discard(conn)
        conn.abort()
        own = conn.slot
        conn.slot = False
        if not own:  # a one-shot connection: its origin is not ours
            raise UpstreamConnectError(self.name, "server closed the connection")
        return await self.open(deadline)

    def lost(self, conn: Connection) -> None:
        """The transport closed (protocol callback). A busy connection keeps
        its slot until its holder releases it."""
        if conn in self._busy:
            return
        with contextlib.suppress(ValueError):  # not idle: closed while being opened
            self._idle.remove(conn)
        self._discard(conn)

    def _hand_over(self, conn: Connection) -> bool:
        waiters = self._waiters
        while waiters:
            fut, _ = waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return True
        return False

    def _discard(self, conn: Connection) -> None:
        """``conn`` is gone: free its slot (once)."""
        if conn.slot:
            conn.slot = False
            self._free_slot()

    def _free_slot(self) -> None:
        self._count -= 1
        waiters = self._waiters
        while waiters:
            fut, _ = waiters.popleft()
            if not fut.done():
                self._count += 1
                fut.set_result(None)
                return

    # -- connecting ----------------------------------------------------------------

    async def open(self, deadline: float, origin: Origin | None = None) -> Connection:
        """A new connection. For the pool's origin the caller holds a slot,
        freed here on failure; another origin gets a one-shot connection."""
        own = origin is None
        target = self.origin if origin is None else origin
        started = time.monotonic()
        budget = deadline - started
        try:
            async with asyncio.timeout(min(self.connect_timeout, budget)):
                conn = await self._connect(target, own)
        except TimeoutError as exc:
            if own:
                self._free_slot()
            what = "connect" if self.connect_timeout <= budget else "first byte"
            raise UpstreamTimeout(
                self.name, f"{what} timeout after {time.monotonic() - started:.2f}s"
            ) from exc
        except BaseException:
            if own:
                self._free_slot()
            raise
        conn.slot = own
        self.opened += 1
        self._busy.add(conn)
        self._ensure_sweeper()
        return conn

    async def _connect(self, origin: Origin, own: bool) -> Connection:
        loop = asyncio.get_running_loop()
        last: OSError | None = None
        for family, address in await self._resolve(origin):
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                await loop.sock_connect(sock, address)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                ctx = self._tls_context() if origin.tls else None
                _, conn = await loop.create_connection(
                    lambda: Connection(self, self.name),
                    sock=sock,
                    ssl=ctx,
                    server_hostname=origin.host if ctx is not None else None,
                )
            except ssl.SSLError as exc:
                sock.close()
                reason = getattr(exc, "reason", None) or type(exc).__name__
                raise UpstreamConnectError(self.name, f"TLS error: {reason}") from exc
            except OSError as exc:
                sock.close()
                last = exc
                continue
            except BaseException:
                sock.close()
                raise
            return conn
        why = (last.strerror or type(last).__name__) if last is not None else "no address"
        raise UpstreamConnectError(self.name, f"cannot connect: {why}") from last

    async def _resolve(self, origin: Origin) -> list[tuple[int, tuple[str, int]]]:
        family = origin.literal
        if family:
            return [(family, (origin.host, origin.port))]
        key = (origin.host, origin.port)
        now = time.monotonic()
        cached = self._dns.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(origin.host, origin.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise UpstreamConnectError(
                self.name, f"cannot resolve host: {exc.strerror or type(exc).__name__}"
            ) from exc
        addresses: list[tuple[int, tuple[str, int]]] = []
        for fam, _type, _proto, _name, sockaddr in infos:
            entry = (int(fam), (str(sockaddr[0]), int(sockaddr[1])))
            if entry not in addresses:
                addresses.append(entry)
        self._dns[key] = (now + DNS_TTL_S, addresses)
        return addresses

    def _tls_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            ctx = ssl.create_default_context()
            ctx.set_alpn_protocols(["http/1.1"])
            self._ssl = ctx
        return self._ssl

    # -- the sweeper ---------------------------------------------------------------

    def _ensure_sweeper(self) -> None:
        if self._timer is None and not self._closed:
            self._timer = asyncio.get_running_loop().call_later(self.tick, self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        now = time.monotonic()
        # Waiters first: a slot freed by an expiring connection below must not
        # go to a waiter whose own deadline has passed.
        waiters = self._waiters
        while waiters and (waiters[0][0].done() or waiters[0][1] <= now):
            fut, _ = waiters.popleft()
            if not fut.done():
                fut.set_exception(
                    UpstreamTimeout(
                        self.name, "first byte timeout while waiting for a pool connection"
                    )
                )
        expired = [c for c in self._busy if c.deadline and c.deadline <= now]
        for conn in expired:
            conn.expire()
        idle, stale_before = self._idle, now - self.idle_timeout
        while idle and idle[0].idle_since <= stale_before:
            conn = idle.pop(0)
            conn.close()
            self._discard(conn)
        if self._busy or self._waiters or self._idle:
            self._ensure_sweeper()
