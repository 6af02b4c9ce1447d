"""Per-upstream sliding time window: a circular array of fixed time slices.

The idea is resilience4j's ``SlidingTimeWindowMetrics``: the window is
``window_s / slice_s`` slices kept in a ring; a record only touches the current
slice, and when the clock crosses a slice edge the slices that fell out of the
window are zeroed lazily. Memory is fixed at construction whatever the request
rate. The window covers the current (partial) slice plus the ``n - 1`` before
it, so the data a snapshot sees spans between ``window_s - slice_s`` and
``window_s`` seconds.

Besides what the upstream does (outcomes, TTFB), a window keeps what the
sidecar's own admission saw of it: how long requests waited for a pooled
connection (``record_queue_wait``) and how many could not get one in time
(``record_overflow``). Queueing is admission, not sickness by itself; the
policy decides what it means together with the upstream's TTFB.

Requests still waiting for headers are slow now, not only when they end: the
window owns the upstream's ``InFlight`` registry (``inflight``), and

- a request that times out enters the TTFB statistics with its whole wait,
  no less than its timeout (a censored sample: its true TTFB is longer);
- a request still waiting when a slice ends counts in that slice with its
  wait so far, and the requests waiting now count in the current slice and
  the window totals of a snapshot, so a slice of a hung upstream is slow
  although nothing in it ended;
- ``consecutive_failures`` counts failures in a row (Envoy's
  ``consecutive_5xx``): a sequence needs no volume;
- ``consecutive_masked`` counts masked failures in a row, the same way: an
  Athens whose own upstream is dead answers every request 404, and waiting
  for a rate over a span lets the slice in which the fault began, mostly
  healthy traffic, hold the rule off for a slice;
- ``last_answers`` are the last ``LAST_ANSWERS`` answers, newest first, 1 for
  a failure (Envoy's ``failure_percentage`` over a count, not a time): an
  upstream failing every other request never makes a run, and a rate over
  a span waits for its slices.

Time comes from an injectable clock (``time.monotonic`` by default) so tests
advance a fake clock instead of sleeping. Not thread-safe: use one window from
one thread (the event loop).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from sidecar.stats.histogram import Histogram
from sidecar.stats.inflight import InFlight, InFlightSnapshot

Clock = Callable[[], float]

QUANTILES = (0.5, 0.9, 0.95, 0.99)  # p95: the hedge delay (sidecar.proxy.hedge)
QUEUE_QUANTILES = (0.5, 0.99)
# A run of failures (or masked failures) this long asks the control loop for a
# verdict before its next tick: one failure alone is no run, and an upstream
# failing now and then must not make the loop tick faster.
RUN_WAKE = 2
# The answers whose failures a window keeps in order (``last_answers``): the
# most the policy can ask about (thresholds.recent_answers).
LAST_ANSWERS = 32
_LAST_MASK = (1 << LAST_ANSWERS) - 1
# A failure wakes the loop when one of the two answers before it failed too: a
# run (RUN_WAKE in a row), or failures dense enough to be half of the answers,
# as an upstream failing every other request. One now and then never does.
_WAKE_BEFORE = 0b110


class Outcome(enum.Enum):
    """How one request to an upstream ended, as far as its health is concerned."""

    OK = "ok"
    NOT_FOUND = "not_found"  # 404/410: a valid "not here", not a failure
    ERROR = "error"  # 5xx, 429, connect/TLS errors, truncated bodies
    TIMEOUT = "timeout"  # connect / first-byte / idle timeout; also an error


# The members as module constants, for the per-request path here and in the
# proxy: an enum member read through its class runs EnumType's __getattr__
# hook on Python 3.11 (~1 k instructions), a module constant is a dict get.
OUTCOME_OK: Final = Outcome.OK
OUTCOME_NOT_FOUND: Final = Outcome.NOT_FOUND
OUTCOME_ERROR: Final = Outcome.ERROR
OUTCOME_TIMEOUT: Final = Outcome.TIMEOUT


class _Slice:
    """Counters of one time slice. Mutable and reused: the ring never reallocates."""

    __slots__ = (
        "errors",
        "hedges",
        "hedges_won",
        "integrity",
        "masked",
        "not_found",
        "overflows",
        "queue",
        "requests",
        "saturation",
        "timeouts",
        "ttfb",
    )

    def __init__(self) -> None:
        self.ttfb = Histogram()
        self.queue = Histogram()
        self.clear()

    def clear(self) -> None:
        self.requests = 0
        self.errors = 0
        self.not_found = 0
        self.timeouts = 0
        self.masked = 0
        self.integrity = 0
        self.hedges = 0
        self.hedges_won = 0
        self.overflows = 0
        self.saturation = 0.0
        self.ttfb.reset()
        self.queue.reset()


@dataclass(frozen=True, slots=True)
class SliceSnapshot:
    """One slice of ``WindowSnapshot.series``. ``age_s`` is 0 for the current slice."""

    age_s: float
    requests: int
    error_rate: float
    p99_ms: float
    saturation: float
    queue_wait_p50_ms: float
    queue_wait_p99_ms: float
    overflows: int
    masked_failures: int = 0
    hedges: int = 0


@dataclass(frozen=True, slots=True)
class WindowSnapshot:
    """What the policy sees of one upstream: totals over the window plus the series.

    ``errors`` counts every failure, timeouts included; ``timeouts`` is the
    subset. ``masked_failures`` are 404s that a later upstream answered with
    200. TTFB quantiles cover every record that carried a TTFB, the wait of
    every request that timed out before its headers, and the waits of the
    requests in flight (see the module docstring); they are 0.0 when there
    is none. ``consecutive_failures``: failures since the last answer that
    was not one (OK or NOT_FOUND). ``consecutive_masked``: masked failures
    since this upstream's last OK answer (see ``UpstreamWindow.record``).
    ``last_answers``: the last answers (at most ``LAST_ANSWERS``), newest
    first, 1 for a failure and 0 for any other answer.
    Queue-wait quantiles cover every wait recorded (0.0 when none);
    ``overflows`` counts requests that got no connection in time. ``series``
    is newest first and only as long as the time elapsed since the window
    (re)started.
    """

    window_s: float
    requests: int
    errors: int
    not_found: int
    timeouts: int
    masked_failures: int
    error_rate: float
    not_found_rate: float
    ttfb_p50_ms: float
    ttfb_p90_ms: float
    ttfb_p99_ms: float
    queue_wait_p50_ms: float
    queue_wait_p99_ms: float
    overflows: int
    consecutive_failures: int
    inflight: InFlightSnapshot
    series: tuple[SliceSnapshot, ...]
    # Bodies that did not match the checksum database (already counted in errors).
    integrity_failures: int = 0
    # Requests hedged away from this upstream (no headers within the hedge
    # delay), and those of them the hedge's answer served (sidecar.proxy.hedge).
    hedges: int = 0
    hedges_won: int = 0
    ttfb_p95_ms: float = 0.0  # the automatic hedge delay; not in the policy input
    consecutive_masked: int = 0
    last_answers: tuple[int, ...] = ()

    def as_policy_input(self, admission: bool) -> dict[str, Any]:
        """This upstream's stats in the policy input shape of the README.

        The caller adds ``role``, ``state``, ``state_age_s`` and ``pool``
        (whose ``overflows`` and ``queue_wait_ms`` come from ``pool_input``).
        ``admission``: the series slices also carry the pool's figures
        (saturation, queue waits, overflows) and the slice's masked failures.
        They are recorded once per upstream, in its module-traffic window; the
        checksum-traffic window leaves them out (the pool's would be zeros, its
        masked failures count as a run, and every key costs the policy engine
        time: it parses the whole input at every tick).
        """
        return {
            "window_s": _seconds(self.window_s),
            "requests": self.requests,
            "errors": self.errors,
            "not_found": self.not_found,
            "timeouts": self.timeouts,
            "error_rate": _ratio(self.error_rate),
            "not_found_rate": _ratio(self.not_found_rate),
            "masked_failures": self.masked_failures,
            "integrity_failures": self.integrity_failures,
            "hedges": self.hedges,
            "hedges_won": self.hedges_won,
            "ttfb_ms": {
                "p50": _ms(self.ttfb_p50_ms),
                "p90": _ms(self.ttfb_p90_ms),
                "p99": _ms(self.ttfb_p99_ms),
            },
            "consecutive_failures": self.consecutive_failures,
            # The same keys in both classes keep one input shape.
            "consecutive_masked": self.consecutive_masked,
            "last_answers": list(self.last_answers),
            "inflight": self.inflight.as_policy_input(),
            "series": [_slice_input(s, admission) for s in self.series],
        }

    def pool_input(self) -> dict[str, Any]:
        """The window's share of the policy input's ``pool`` object."""
        return {
            "overflows": self.overflows,
            "queue_wait_ms": {
                "p50": _ms(self.queue_wait_p50_ms),
                "p99": _ms(self.queue_wait_p99_ms),
            },
        }


def _slice_input(s: SliceSnapshot, admission: bool) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "age_s": _seconds(s.age_s),
        "requests": s.requests,
        "error_rate": _ratio(s.error_rate),
        "p99_ms": _ms(s.p99_ms),
    }
    if admission:
        doc["saturation"] = _ratio(s.saturation)
        doc["queue_wait_ms"] = {"p50": _ms(s.queue_wait_p50_ms), "p99": _ms(s.queue_wait_p99_ms)}
        doc["overflows"] = s.overflows
        doc["masked_failures"] = s.masked_failures  # module kinds only, like the pool's
        doc["hedges"] = s.hedges
    return doc


def _ratio(x: float) -> float:
    return round(x, 4)


def _ms(x: float) -> float:
    return round(x, 2)


def _seconds(x: float) -> float | int:
    """Whole seconds as an int (``120``, not ``120.0``); otherwise milliseconds precision."""
    r = round(x, 3)
    return int(r) if r.is_integer() else r


def _rate(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


class UpstreamWindow:
    """Sliding-window stats of one upstream; see the module docstring."""

    __slots__ = (
        "_clock",
        "_consecutive",
        "_current",
        "_epoch",
        "_inflight",
        "_last",
        "_last_count",
        "_masked_run",
        "_n",
        "_next_edge",
        "_origin",
        "_queue_scratch",
        "_scratch",
        "_slice_s",
        "_slices",
        "_waiting_scratch",
        "_wake",
        "_window_s",
    )

    def __init__(self, window_s: float, slice_s: float, clock: Clock = time.monotonic) -> None:
        self._n = _slice_count(window_s, slice_s)
        self._window_s = float(window_s)
        self._slice_s = float(slice_s)
        self._clock = clock
        self._slices = [_Slice() for _ in range(self._n)]
        self._scratch = Histogram()  # reused by snapshot() to merge the slices
        self._queue_scratch = Histogram()
        self._waiting_scratch = Histogram()  # the current slice plus the requests waiting
        self._inflight = InFlight(clock, self._record_timed_out)
        self._consecutive = 0
        self._masked_run = 0
        self._last = 0  # bit i: the answer i before the newest failed
        self._last_count = 0
        self._wake: Callable[[], None] | None = None
        self._origin = 0.0
        self._epoch = 0
        self._current = self._slices[0]
        self._next_edge = 0.0
        self.reset()

    @property
    def inflight(self) -> InFlight:
        """The requests waiting for headers: ``begin`` / ``end`` around each wait."""
        return self._inflight

    def wake_on_runs(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` whenever a run of failures or of masked failures is
        ``RUN_WAKE`` long or longer, or a failure follows another within two
        answers: the control loop then judges it before its next regular tick
        (sidecar.control)."""
        self._wake = wake

    @property
    def window_s(self) -> float:
        return self._window_s

    @property
    def slice_s(self) -> float:
        return self._slice_s

    @property
    def slice_count(self) -> int:
        return self._n

    def reset(self) -> None:
        """Start an empty window now (called on every breaker transition).

        Requests in flight stay registered (they still wait); their silence,
        the runs of consecutive failures and masked failures and the last
        answers start again, like every figure.
        """
        for s in self._slices:
            s.clear()
        self._consecutive = 0
        self._masked_run = 0
        self._last = 0
        self._last_count = 0
        self._inflight.restart_silence()
        self._origin = self._clock()
        self._epoch = 0
        self._current = self._slices[0]
        self._next_edge = self._origin + self._slice_s

    def record(self, outcome: Outcome, ttfb_s: float | None = None) -> None:
        """Count one request. ``ttfb_s`` is time to response headers, if any.

        Hot path (once per upstream request): one clock read, a few counters.
        A TIMEOUT before headers comes without a TTFB: its wait was recorded
        when it ended (``InFlight`` calls ``_record_timed_out``). One after
        headers (an idle timeout in the body) carries its real TTFB.

        The run of masked failures: an OK ends it, as the proof that this
        upstream still serves. A NOT_FOUND neither ends nor extends it: whether
        the 404 was masked is only known when a later upstream answers
        (``record_masked`` then extends the run), and a 404 that nobody
        served, a module that exists nowhere (``go get nonexistent/module``,
        or the go command's path-prefix lookups), says nothing of this
        upstream either way. Were it to end the run, a dead Athens asked for
        such modules among real ones would never show a run; it cannot
        extend one, so no amount of them trips a healthy Athens. Failures
        leave it too: they have a run of their own.
        """
        now = self._clock()
        if now >= self._next_edge:
            self._advance(now)
        s = self._current
        s.requests += 1
        if self._last_count < LAST_ANSWERS:
            self._last_count += 1
        if outcome is OUTCOME_OK:
            self._consecutive = 0
            self._masked_run = 0
            self._last = (self._last << 1) & _LAST_MASK
        elif outcome is OUTCOME_NOT_FOUND:
            s.not_found += 1
            self._consecutive = 0
            self._last = (self._last << 1) & _LAST_MASK
        else:
            s.errors += 1
            self._consecutive += 1
            last = self._last = ((self._last << 1) | 1) & _LAST_MASK
            if outcome is OUTCOME_TIMEOUT:
                s.timeouts += 1
            if last & _WAKE_BEFORE and self._wake is not None:
                self._wake()
        if ttfb_s is not None:
            s.ttfb.record(ttfb_s)

    def _record_timed_out(self, wait_s: float) -> None:
        """The wait of a request that timed out before its headers: a TTFB
        sample no less than its timeout (the request itself is counted by
        ``record(TIMEOUT)``)."""
        now = self._clock()
        if now >= self._next_edge:
            self._advance(now)
        self._current.ttfb.record(wait_s)

    def record_masked(self) -> None:
        """Count a 404 of this upstream that a later upstream answered with 200.

        The 404 itself was already recorded as NOT_FOUND; this only adds to
        ``masked_failures`` and to the run of them (``consecutive_masked``),
        and does not change ``requests``.
        """
        now = self._clock()
        if now >= self._next_edge:
            self._advance(now)
        self._current.masked += 1
        self._masked_run += 1
        if self._masked_run >= RUN_WAKE and self._wake is not None:
            self._wake()

    def record_integrity(self) -> None:
        """Count a body of this upstream that did not match the checksum database.

        The failed attempt itself was already recorded as ERROR; this only adds
        to ``integrity_failures``.
        """
        now = self._clock()
        if now >= self._next_edge:
            self._advance(now)
        self._current.integrity += 1

    def record_hedge(self, won: bool, overtaken: bool = False) -> None:
        """One request to this upstream was hedged: it had no headers within the
        hedge delay, and the same request went to the next upstream. ``won``: the
        hedge's answer was served (this upstream's attempt was cancelled, or it
        failed or answered 404 meanwhile); ``overtaken``: it was served while
        this upstream's attempt still waited (the in-flight silence counts it).

        Neither a request, an error nor a TTFB sample: what this upstream did is
        recorded when it answers, and a cancelled wait ends in the in-flight
        registry as abandoned.
        """
        now = self._clock()
        if now >= self._next_edge:
            self._advance(now)
        s = self._current
        s.hedges += 1
        if won:
            s.hedges_won += 1
        if overtaken:
            self._inflight.overtake()

    def record_queue_wait(self, seconds: float) -> None:
        """How long one request waited for a pooled connection (0 if it did not).

        Every admitted request records its wait, so the quantiles describe
        all requests, not only the unlucky ones.
        """
        now = self._clock()
        if now >= self._next_edge:
            self._advance(now)
        self._current.queue.record(seconds)

    def record_overflow(self) -> None:
        """One request could not get a connection in time (admission overflow)."""
        now = self._clock()
        if now >= self._next_edge:
            self._advance(now)
        self._current.overflows += 1

    def sample_saturation(self, value: float) -> None:
        """Pool saturation sampled by the control loop; a slice keeps its maximum."""
        now = self._clock()
        if now >= self._next_edge:
            self._advance(now)
        s = self._current
        if value > s.saturation:
            s.saturation = value

    def snapshot(self) -> WindowSnapshot:
        """Totals over the window and the per-slice series, newest first.

        The requests waiting now count in the current slice's ``p99_ms`` and
        in the window's TTFB quantiles with their wait so far.
        """
        now = self._clock()
        if now >= self._next_edge:
            self._advance(now)
        waiting = [now - start for start in self._inflight.starts()]
        live = min(self._epoch + 1, self._n)
        newest_first = [self._slices[(self._epoch - age) % self._n] for age in range(live)]
        requests = errors = not_found = timeouts = masked = overflows = integrity = 0
        hedges = hedges_won = 0
        merged = self._scratch
        merged.reset()
        queued = self._queue_scratch
        queued.reset()
        series = []
        for age, s in enumerate(newest_first):
            requests += s.requests
            errors += s.errors
            not_found += s.not_found
            timeouts += s.timeouts
            masked += s.masked
            integrity += s.integrity
            hedges += s.hedges
            hedges_won += s.hedges_won
            overflows += s.overflows
            s.ttfb.merge_into(merged)
            s.queue.merge_into(queued)
            q50, q99 = s.queue.quantiles(QUEUE_QUANTILES)
            series.append(
                SliceSnapshot(
                    age_s=age * self._slice_s,
                    requests=s.requests,
                    error_rate=_rate(s.errors, s.requests),
                    p99_ms=self._p99_with(s.ttfb, waiting) if age == 0 else s.ttfb.quantile(0.99),
                    saturation=s.saturation,
                    queue_wait_p50_ms=q50,
                    queue_wait_p99_ms=q99,
                    overflows=s.overflows,
                    masked_failures=s.masked,
                    hedges=s.hedges,
                )
            )
        for wait in waiting:
            merged.record(wait)
        p50, p90, p95, p99 = merged.quantiles(QUANTILES)
        q50, q99 = queued.quantiles(QUEUE_QUANTILES)
        return WindowSnapshot(
            window_s=self._window_s,
            requests=requests,
            errors=errors,
            not_found=not_found,
            timeouts=timeouts,
            masked_failures=masked,
            error_rate=_rate(errors, requests),
            not_found_rate=_rate(not_found, requests),
            ttfb_p50_ms=p50,
            ttfb_p90_ms=p90,
            ttfb_p99_ms=p99,
            queue_wait_p50_ms=q50,
            queue_wait_p99_ms=q99,
            overflows=overflows,
            consecutive_failures=self._consecutive,
            inflight=self._inflight.snapshot(),
            series=tuple(series),
            integrity_failures=integrity,
            hedges=hedges,
            hedges_won=hedges_won,
            ttfb_p95_ms=p95,
            consecutive_masked=self._masked_run,
            last_answers=tuple((self._last >> i) & 1 for i in range(self._last_count)),
        )

    def _p99_with(self, ttfb: Histogram, waiting: list[float]) -> float:
        """P99 of ``ttfb`` counting the ``waiting`` requests' waits so far."""
        if not waiting:
            return ttfb.quantile(0.99)
        both = self._waiting_scratch
        both.reset()
        ttfb.merge_into(both)
        for wait in waiting:
            both.record(wait)
        return both.quantile(0.99)

    def _advance(self, now: float) -> None:
        """Move to the slice that holds ``now``, zeroing every slice skipped or reused.

        Each slice that ended (and is still in the window) gets the waits of
        the requests in flight at its end: a slice of a hung upstream is slow
        although no request ended in it.
        """
        # The slice whose edges (origin + k * slice_s, as _next_edge is computed)
        # hold now: the division alone can round to the slice before, leaving
        # _next_edge == now, and the next call would move on a slice with no
        # time passed. The caller saw now >= _next_edge: at least one edge.
        origin, width = self._origin, self._slice_s
        epoch = int((now - origin) // width)
        if origin + (epoch + 1) * width <= now:
            epoch += 1
        elif origin + epoch * width > now:
            epoch -= 1
        epoch = max(self._epoch + 1, epoch)
        oldest_kept = epoch - self._n + 1
        for e in range(max(self._epoch + 1, oldest_kept), epoch + 1):
            self._slices[e % self._n].clear()
        starts = self._inflight.starts()
        if starts:
            for e in range(max(self._epoch, oldest_kept), epoch):
                end = self._origin + (e + 1) * self._slice_s
                ttfb = self._slices[e % self._n].ttfb
                for start in starts:
                    if start < end:
                        ttfb.record(end - start)
        self._epoch = epoch
        self._current = self._slices[epoch % self._n]
        self._next_edge = self._origin + (epoch + 1) * self._slice_s


def _slice_count(window_s: float, slice_s: float) -> int:
    if not slice_s > 0:
        raise ValueError(f"stats slice must be positive, got {slice_s!r}")
    if not window_s >= slice_s:
        raise ValueError(f"stats window ({window_s!r}) must be at least one slice ({slice_s!r})")
    n = round(window_s / slice_s)
    if abs(n * slice_s - window_s) > 1e-6 * window_s:
        raise ValueError(
            f"stats window ({window_s!r}) must be a multiple of the slice ({slice_s!r})"
        )
    return n
