"""Requests of one upstream still waiting for their response headers.

A request is judged only when it ends, and a hung upstream ends nothing: its
requests wait out ``timeouts.first_byte`` (15 s by default) one after the
other. So each statistics window also keeps the start time of every request
in flight, from the moment it got a connection slot (admission) to its
response headers, its failure or its caller giving up, and reports:

- the **ages** of the requests waiting now (the window counts them as slow
  now: see ``UpstreamWindow``), and
- the **silence**: how long the upstream has been asked without answering
  anything, and how many requests it was asked meanwhile. A hung upstream
  answers nothing, whatever the number of requests; a slow one still answers
  some. Requests given up on (a client that left, a hedge that lost its
  race) end their wait without an answer, so the silence goes on even when
  no single request waits long, and
- the requests of the silence that the next upstream answered instead
  (``overtaken``: their hedge won): evidence that the silence is this
  upstream's, not a lull in what the clients ask.

Cost per request: ``begin`` is one clock read and one dict insertion,
``end`` one dict pop (plus a clock read unless it was answered with nothing
else waiting). The dict keeps insertion order, and starts only grow, so the
oldest request is its first value: the control loop reads it in O(1) and
scans the rest (at most the pool's connections) once per tick.

Single-threaded: use one registry from the event loop.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

Clock = Callable[[], float]


class Ending(enum.Enum):
    """How a wait ended, as far as the silence and the latency are concerned."""

    ANSWERED = "answered"  # headers of any status, or a failure that is not a timeout
    TIMED_OUT = "timed_out"  # connect / first-byte timeout: the wait is a lower bound of TTFB
    ABANDONED = "abandoned"  # the caller gave up (client left, a hedge won): no verdict


# A pause between two requests shorter than this never starts the silence
# afresh, however short the silence before it. A go command's module requests
# are interleaved with its checksum lookups (another class, another registry),
# so a class of a hung upstream whose requests are hedged away after 200 ms is
# left alone for a few hundred ms between two of them: measured in
# `bench/resilience.py --scenarios build-hung`, where without this floor the
# silence restarted at every request and the breaker tripped only once the
# hedge budget ran out and a request waited out its 15 s first-byte timeout.
RESUME_GAP_S = 1.0

# Module constants: identity checks against these are cheaper than Ending.X lookups.
_ANSWERED = Ending.ANSWERED
_TIMED_OUT = Ending.TIMED_OUT


def _nothing(_seconds: float) -> None:
    pass


@dataclass(frozen=True, slots=True)
class InFlightSnapshot:
    """What the policy sees of the requests waiting now and of the silence.

    ``count`` and ``oldest_s``: the requests waiting now (0 when none).
    ``silent_s``: how long the upstream has been asked without answering
    anything (while nobody waits, the silence stands still: being left
    alone is not being silent; unless a hedge answered one of its requests,
    then it goes on until this upstream answers); ``unanswered``: how many requests it was
    asked in that time, those waiting now included; ``overtaken``: how many
    of them a hedge to the next upstream answered. All 0 after an answer.
    """

    count: int
    oldest_s: float
    silent_s: float
    unanswered: int
    overtaken: int = 0

    def as_policy_input(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "oldest_ms": round(self.oldest_s * 1000.0, 2),
            "silent_ms": round(self.silent_s * 1000.0, 2),
            "unanswered": self.unanswered,
            "overtaken": self.overtaken,
        }


IDLE = InFlightSnapshot(0, 0.0, 0.0, 0)


class InFlight:
    """The registry of one upstream and traffic class; see the module docstring.

    ``on_timeout`` receives the wait of every request that timed out (its
    window records it as a TTFB sample: a timeout is latency).
    """

    __slots__ = (
        "_clock",
        "_empty_since",
        "_next",
        "_on_timeout",
        "_overtaken",
        "_silent_since",
        "_started",
        "_unanswered",
    )

    def __init__(
        self, clock: Clock = time.monotonic, on_timeout: Callable[[float], None] = _nothing
    ) -> None:
        self._clock = clock
        self._on_timeout = on_timeout
        self._started: dict[int, float] = {}
        self._next = 0
        self._silent_since: float | None = None
        self._empty_since = 0.0
        self._unanswered = 0
        self._overtaken = 0

    @property
    def count(self) -> int:
        return len(self._started)

    @property
    def overtaken(self) -> int:
        """Requests of the current silence that a hedge answered (0 when none)."""
        return self._overtaken

    def starts(self) -> Collection[float]:
        """Start times of the requests waiting now, oldest first (a live view)."""
        return self._started.values()

    def begin(self) -> int:
        """A request starts waiting; returns the token to pass to ``end``."""
        now = self._clock()
        started = self._started
        if not started:
            self._resume(now)
        self._next = token = self._next + 1
        started[token] = now
        self._unanswered += 1
        return token

    def end(self, token: int, how: Ending) -> None:
        """The wait of ``token`` is over (exactly once per ``begin``)."""
        started = self._started
        if how is _TIMED_OUT and token in started:
            # Before it leaves: a window crossing a slice edge now still sees
            # it waiting at that edge.
            self._on_timeout(self._clock() - started[token])
        start = started.pop(token, None)
        if start is None:
            return
        if how is _ANSWERED:
            # The requests still waiting now wait on an upstream that just spoke.
            self._overtaken = 0
            if started:
                self._silent_since = self._clock()
                self._unanswered = len(started)
            else:
                self._silent_since = None
                self._unanswered = 0
            return
        if not started:
            self._empty_since = self._clock()

    def overtake(self) -> None:
        """A request of this upstream, given up on, was answered by its hedge
        (called after its ``end``). Counts only within a silence: after an
        answer of this upstream it is no evidence of one."""
        if self._silent_since is not None:
            self._overtaken += 1

    def restart_silence(self) -> None:
        """Forget the silence so far (a breaker transition: fresh evidence),
        keeping the requests that still wait."""
        self._overtaken = 0
        if self._started:
            self._silent_since = self._clock()
            self._unanswered = len(self._started)
        else:
            self._silent_since = None
            self._unanswered = 0

    def snapshot(self) -> InFlightSnapshot:
        since = self._silent_since
        if since is None:
            return IDLE
        started = self._started
        if not started and not self._overtaken:
            # Every request was given up on by its client: the silence stands
            # still until the next one (being left alone is not being silent).
            return InFlightSnapshot(0, 0.0, self._empty_since - since, self._unanswered, 0)
        now = self._clock()
        if not started:
            # The next upstream answered for it, and it has said nothing since:
            # its requests were only cut short because something else answered
            # first. The silence goes on, or a hung upstream whose last requests
            # were all hedged away would never be judged once its clients stop.
            return InFlightSnapshot(0, 0.0, now - since, self._unanswered, self._overtaken)
        return InFlightSnapshot(
            count=len(started),
            oldest_s=now - next(iter(started.values())),
            silent_s=now - since,
            unanswered=self._unanswered,
            overtaken=self._overtaken,
        )

    def _resume(self, now: float) -> None:
        """The first request after none waited. Requests a moment apart (a
        client's next request after its last was given up on) keep the
        silence going; an upstream left alone for longer than it had been
        silent (and than ``RESUME_GAP_S``) starts afresh, so one abandoned
        request long ago does not make the next one look like part of an
        outage."""
        since = self._silent_since
        if since is None or now - self._empty_since > max(self._empty_since - since, RESUME_GAP_S):
            self._silent_since = now
            self._unanswered = 0
            self._overtaken = 0
