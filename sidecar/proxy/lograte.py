"""Warnings that must never be silent, nor flood the log.

A condition that hits every request (a checksum database nobody can reach)
would otherwise write one line per request. :class:`LogRate` lets the first
occurrence of each key through at once, then at most one line per interval,
and that line carries how many occurrences went unlogged since the previous
one (their metric counts every one of them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Final

DEFAULT_EVERY_S: Final = 10.0


class LogRate:
    """At most one line per ``every_s`` per key."""

    def __init__(
        self, every_s: float = DEFAULT_EVERY_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._every = every_s
        self._clock = clock
        self._last: dict[Hashable, tuple[float, int]] = {}  # key: (last line, unlogged since)

    def admit(self, key: Hashable) -> int | None:
        """None: leave this occurrence out (it is counted). Otherwise log it, with
        the returned number of occurrences left out since the key's last line."""
        now = self._clock()
        seen = self._last.get(key)
        if seen is not None and now - seen[0] < self._every:
            self._last[key] = (seen[0], seen[1] + 1)
            return None
        self._last[key] = (now, 0)
        return 0 if seen is None else seen[1]
