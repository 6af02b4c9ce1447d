"""Admission control for one upstream: a connection limit and a bounded FIFO queue.

Envoy's circuit breakers split the same two numbers (``max_connections``,
``max_pending_requests``) from its outlier detection, and so does the
sidecar: a full pool is the sidecar's own load, not a verdict on the
upstream. ``Admission`` lets at most ``limit`` requests hold a connection;
up to ``max_pending`` more wait, first come first served, each for at most
``max_wait`` seconds. A request that finds the queue full, or waits out its
time, gets ``UpstreamBusy`` and overflows elsewhere (``sidecar.proxy``);
it is never an upstream failure.

A released slot is handed straight to the oldest live waiter, so a newcomer
cannot overtake the queue and ``in_use`` never dips between holders.
Cancellation-safe: a waiter cancelled after a slot was handed to it passes
the slot on; one cancelled or expired before holds nothing and frees nothing.
Single-threaded: use one gate from the event loop.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from time import monotonic

from sidecar.errors import UpstreamBusy

# Expired and cancelled waiters stay in the deque until a release skips them;
# past this many times ``max_pending`` entries, the deque is swept instead, so
# stuck holders and a stream of expiring waiters cannot grow it without bound.
_SWEEP_FACTOR = 2


def _nothing(_seconds: float) -> None:
    pass


class Admission:
    """The gate; see the module docstring. ``on_wait`` receives every admitted
    request's queue wait in seconds (0.0 when it did not queue) and every
    expired waiter's ``max_wait``."""

    __slots__ = (
        "_queue",
        "_waiting",
        "in_use",
        "limit",
        "max_pending",
        "max_wait",
        "name",
        "on_wait",
    )

    def __init__(self, name: str, limit: int, max_pending: int, max_wait: float) -> None:
        self.name = name
        self.limit = limit
        self.max_pending = max_pending
        self.max_wait = max_wait
        self.in_use = 0
        self.on_wait: Callable[[float], None] = _nothing
        self._waiting = 0
        self._queue: deque[asyncio.Future[bool]] = deque()

    @property
    def waiting(self) -> int:
        """Requests queued for a slot now (expired and cancelled ones excluded)."""
        return self._waiting

    def try_acquire(self) -> bool:
        """Take a free slot if nobody is queued: the common case, without a coroutine."""
        if self.in_use < self.limit and not self._waiting:
            self.in_use += 1
            self.on_wait(0.0)
            return True
        return False

    async def acquire(self) -> None:
        """Take a slot (FIFO); UpstreamBusy when the queue is full or ``max_wait`` ran out.

        Every successful ``acquire`` (or true ``try_acquire``) must be paired
        with exactly one ``release``.
        """
        if self.try_acquire():
            return
        if self._waiting >= self.max_pending:
            raise UpstreamBusy(
                self.name,
                f"busy: {self.in_use} in use, {self._waiting} waiting "
                f"(pool.max_pending {self.max_pending})",
                0.0,
            )
        await self._wait()

    async def _wait(self) -> None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._queue.append(waiter)
        self._waiting += 1
        if len(self._queue) > _SWEEP_FACTOR * max(self.max_pending, 1):
            self._queue = deque(w for w in self._queue if not w.done())
        started = monotonic()
        timer = loop.call_at(loop.time() + self.max_wait, self._expire, waiter)
        try:
            granted = await waiter
        except BaseException:  # cancelled: the caller left
            timer.cancel()
            if waiter.cancelled():
                self._waiting -= 1
            elif waiter.result():
                self.release()  # handed a slot just before the cancel arrived
            raise
        timer.cancel()
        waited = monotonic() - started
        self.on_wait(waited)
        if not granted:
            raise UpstreamBusy(
                self.name,
                f"busy: no connection within pool.max_wait ({self.max_wait:g}s), "
                f"{self.in_use} in use, {self._waiting} waiting",
                waited,
            )

    def release(self) -> None:
        """Free a slot: to the oldest live waiter if any, else back to the pool."""
        queue = self._queue
        while queue:
            waiter = queue.popleft()
            if not waiter.done():
                self._waiting -= 1
                waiter.set_result(True)  # the slot changes hands; in_use stays
                return
        self.in_use -= 1

    def _expire(self, waiter: asyncio.Future[bool]) -> None:
        if not waiter.done():
            self._waiting -= 1
            waiter.set_result(False)
