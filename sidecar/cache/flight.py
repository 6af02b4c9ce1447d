"""Single flight: at most one upstream walk per cache key at a time.

The first request for an uncached key becomes the *leader*: it walks the
plan's targets like any request. Requests for the same key that arrive
meanwhile *join* its flight and wait for the outcome:

- the leader got 200 headers: the flight carries the ``Fill``; every
  waiting joiner gets a reader of it at once, and reads the body as it
  arrives (late joiners too, until it is committed). The fill no longer
  depends on the leader: its client may leave, the body is still fetched;
- the leader read a small body whole (``Whole``, see ``cache.writeback``):
  joiners get the same bytes and headers;
- the leader's walk ended in 404/410: joiners get the same answer (it is
  never cached, only shared with requests that were already waiting);
- anything else (every upstream failed, rejected, the leader's client left
  before an upstream answered): joiners walk the targets themselves,
  without single flight.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from multidict import CIMultiDict

from sidecar.cache.fill import Fill, FillReader


@dataclass(frozen=True, slots=True)
class NotFound:
    status: int
    message: str


@dataclass(frozen=True, slots=True)
class Whole:
    """A small body the leader read whole, with the headers it was answered with."""

    body: bytes
    headers: CIMultiDict[str]
    upstream: str


Outcome = FillReader | NotFound | Whole | None


class Flight:
    __slots__ = ("_ready", "_waiting", "answer", "fill", "key")

    def __init__(self, key: str) -> None:
        self.key = key
        self.fill: Fill | None = None
        self.answer: NotFound | Whole | None = None
        self._ready = False
        self._waiting: list[asyncio.Future[Outcome]] = []

    def publish(self, fill: Fill) -> None:
        """Joiners get a reader at once, before the fill can drop a byte they need."""
        if not self._ready:
            self._ready, self.fill = True, fill
            if self._waiting:
                for fut in self._wake():
                    fut.set_result(fill.join())

    def settle(self, answer: NotFound | Whole | None) -> None:
        """The leader is done without a body for joiners; first outcome wins."""
        if not self._ready:
            self._ready, self.answer = True, answer
            if self._waiting:  # (most flights have no joiner: no lists to build)
                for fut in self._wake():
                    fut.set_result(answer)

    def awaited(self) -> bool:
        """Joiners wait for this flight's outcome now."""
        return bool(self._waiting)

    def _wake(self) -> list[asyncio.Future[Outcome]]:
        waiting, self._waiting = self._waiting, []
        return [fut for fut in waiting if not fut.done()]

    async def outcome(self) -> Outcome:
        """A reader of the leader's fill, its whole body, its shared 404, or None:
        walk by yourself."""
        if self._ready:
            return self.fill.join() if self.fill is not None else self.answer
        fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiting.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                result = fut.result()
                if isinstance(result, FillReader):
                    result.close()  # handed over just as this joiner was cancelled
            raise


class Flights:
    """The table of flights in progress, by cache key."""

    def __init__(self) -> None:
        self._by_key: dict[str, Flight] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def enter(self, key: str) -> tuple[Flight, bool]:
        """The flight for ``key`` and whether the caller leads it."""
        flight = self._by_key.get(key)
        if flight is not None:
            return flight, False
        flight = self._by_key[key] = Flight(key)
        return flight, True

    def attach(self, flight: Flight, fill: Fill) -> None:
        """The leader of ``flight`` started ``fill``: make it joinable."""
        current = self._by_key.get(fill.key)
        if current is flight and flight.fill is None:
            flight.publish(fill)
        elif current is None:
            # The leader's first fill failed (its flight is gone) and a later
            # upstream answered: a new flight for late joiners.
            fresh = self._by_key[fill.key] = Flight(fill.key)
            fresh.publish(fill)
        # else another leader owns the key now: this fill stays private.

    def leave(self, flight: Flight) -> None:
        """The leader stopped walking; a flight without a fill ends here."""
        flight.settle(None)
        if flight.fill is None and self._by_key.get(flight.key) is flight:
            del self._by_key[flight.key]

    def finished(self, fill: Fill) -> None:
        """The fill is committed or failed: new requests use the index or start afresh."""
        flight = self._by_key.get(fill.key)
        if flight is not None and flight.fill is fill:
            del self._by_key[fill.key]
