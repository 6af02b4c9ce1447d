"""Warnings that must never be silent, nor flood the log.

A condition that hits every request (a checksum database nobody can reach,
an upstream nothing listens at) would otherwise write one line per request.
:class:`LogRate` lets the first occurrence of each key through at once, then
at most one line per interval, and that line carries how many occurrences
went unlogged since the previous one (their metric counts every one of them).

A burst that stops would leave its count untold until the key occurs again,
perhaps never: a caller that wants one summary line per interval instead
calls :meth:`LogRate.summaries` when :meth:`LogRate.next_due` says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Final, Generic, TypeVar

DEFAULT_EVERY_S: Final = 10.0
K = TypeVar("K", bound=Hashable)


class LogRate(Generic[K]):
    """At most one line per ``every_s`` per key."""

    def __init__(
        self, every_s: float = DEFAULT_EVERY_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.every_s = every_s
        self._clock = clock
        self._last: dict[K, tuple[float, int]] = {}  # key: (last line, unlogged since)

    def admit(self, key: K) -> int | None:
        """None: leave this occurrence out (it is counted). Otherwise log it, with
        the returned number of occurrences left out since the key's last line."""
        now = self._clock()
        seen = self._last.get(key)
        if seen is not None and now - seen[0] < self.every_s:
            self._last[key] = (seen[0], seen[1] + 1)
            return None
        self._last[key] = (now, 0)
        return 0 if seen is None else seen[1]

    def summaries(self) -> list[tuple[K, int]]:
        """``(key, occurrences left out)`` for every key whose interval is over
        with some left out: log one line each; their next interval starts now.
        A key quiet for a whole interval is forgotten (its next occurrence is
        logged at once), so the table holds only what happened lately."""
        now = self._clock()
        due: list[tuple[K, int]] = []
        for key, (last, unlogged) in list(self._last.items()):
            if now - last < self.every_s:
                continue
            if unlogged:
                due.append((key, unlogged))
                self._last[key] = (now, 0)
            else:
                del self._last[key]
        return due

    def next_due(self) -> float | None:
        """Seconds until the next summary is due; None if nothing is left out."""
        now = self._clock()
        waits = [last + self.every_s - now for last, unlogged in self._last.values() if unlogged]
        return max(0.0, min(waits)) if waits else None
