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
- Connecting (DNS, Happy Eyeballs, proxy tunnels, TLS) is the
  ``connect.Connector``'s; the pool bounds it by the connect timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import Final

from sidecar.errors import UpstreamConnectError, UpstreamTimeout
from sidecar.upstreams.addresses import RedirectGuard
from sidecar.upstreams.connect import Connector
from sidecar.upstreams.http1 import Connection
from sidecar.upstreams.route import Route

MAX_TICK_S: Final = 0.1
MIN_TICK_S: Final = 0.01
READ_MAX: Final = 256 * 1024  # one socket read with few busy connections (large-zip speed)
READ_MIN: Final = 16 * 1024
READ_BUDGET: Final = 16 * 1024 * 1024  # what one round of reads of all busy connections may bring

Waiter = tuple["asyncio.Future[Connection | None]", float]


class Pool:
    """Connections along ``route`` for one upstream named ``name``."""

    def __init__(
        self,
        name: str,
        route: Route,
        connector: Connector,
        limit: int,
        connect_timeout: float,
        idle_timeout: float,
        tick: float,
    ) -> None:
        self.name = name
        self.route = route
        self.connector = connector
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
            if self._waiters and self._hand_over(conn):
                return  # still busy, now for the oldest waiter
            self._busy.discard(conn)
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
            if self._timer is None:  # (every release: no call when it runs already)
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

    async def open(
        self, deadline: float, route: Route | None = None, guard: RedirectGuard | None = None
    ) -> Connection:
        """A new connection. Along the pool's route the caller holds a slot,
        freed here on failure; another route (a redirect elsewhere) gets a
        one-shot connection, checked by ``guard``."""
        own = route is None
        started = time.monotonic()
        budget = deadline - started
        try:
            async with asyncio.timeout(min(self.connect_timeout, budget)):
                conn = await self.connector.connect(
                    self.route if route is None else route,
                    lambda: Connection(self, self.name),
                    guard,
                )
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
