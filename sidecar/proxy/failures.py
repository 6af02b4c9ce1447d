"""Failure accounting for one handler: what an upstream's failure or overflow
records (attempt metrics, the breaker's window), what it leaves in the
request's ``Attempts`` for the final answer, and the rate-limited log lines.

Identical failures and overflows are logged once, then summarised with a
count (``sidecar.proxy.lograte``); a timer writes a due summary even when no
further occurrence comes to trigger it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sidecar.breaker.plan import UpstreamPlan
from sidecar.breaker.state import traffic_class
from sidecar.errors import UpstreamBusy, UpstreamError, UpstreamTimeout, UpstreamUnverified
from sidecar.goproxy import GoproxyRequest, Kind
from sidecar.proxy.lograte import LogRate
from sidecar.proxy.recorder import Recorder
from sidecar.stats.window import Outcome
from sidecar.upstreams import UpstreamResponse

if TYPE_CHECKING:
    from sidecar.sumdb.lookup import ModuleHashes

log = logging.getLogger("sidecar.proxy")


class Attempts:
    """What happened along one request's route, for the final answer.

    A plain class, not a dataclass: compiled, a dataclass keeps the
    ``__init__`` the dataclasses module generates, interpreted (5.6 k
    instructions per request against 0.3 k for this one).
    """

    __slots__ = (
        "cut",
        "failed",
        "first_failure",
        "hedged_to",
        "lookup",
        "message",
        "not_found_from",
        "overflowed",
        "skipped",
        "status",
        "targets",
        "unjudged",
        "use_cache",
    )

    def __init__(self, use_cache: bool = True, targets: Sequence[UpstreamPlan] = ()) -> None:
        self.status = 0
        self.message = ""
        self.not_found_from: list[str] = []
        self.skipped: list[str] = []
        self.failed = False
        self.cut: UpstreamError | None = None  # the body failed after headers were sent
        self.overflowed = False  # an upstream had no connection in time (admission)
        self.use_cache = use_cache  # false for modules a routing rule keeps out of the cache
        self.targets = targets  # the walk, in order (hedges pick from it)
        self.hedged_to = ""  # the upstream a hedge already asked: the walk skips it
        # Of the upstream a race began with (its probe's verdict): it failed although
        # its hedge then answered; it gave none (cancelled: its hedge answered first).
        self.first_failure: UpstreamError | None = None
        self.unjudged = False
        # The checksum lookup of a body that is checked, started with the walk so
        # that it runs while the upstreams are asked instead of after the body came.
        self.lookup: asyncio.Future[ModuleHashes] | None = None


def note_failure(exc: UpstreamError, attempts: Attempts) -> None:
    attempts.status = 504 if isinstance(exc, UpstreamTimeout) else 502
    attempts.message = str(exc)
    attempts.failed = True


class Failures:
    """Records upstream failures and overflows; one per handler."""

    def __init__(self, recorder: Recorder, every: float) -> None:
        self.recorder = recorder
        self.every = every  # seconds between summary lines of one key
        self._failure_log = LogRate[tuple[str, str, str]](every)
        self._overflow_log = LogRate[str](every)
        self._summary_timer: asyncio.TimerHandle | None = None

    def failed(
        self, name: str, kind: Kind, exc: UpstreamError, ttfb: float | None, attempts: Attempts
    ) -> None:
        self.record(name, kind, exc, ttfb)
        note_failure(exc, attempts)

    def record(self, name: str, kind: Kind, exc: UpstreamError, ttfb: float | None) -> None:
        if isinstance(exc, UpstreamUnverified):
            # The upstream answered; the checksum database could not vouch (logged there).
            self.recorder.attempt(name, kind, Outcome.OK, ttfb, exc.failure)
            return
        timeout = isinstance(exc, UpstreamTimeout)
        self.recorder.attempt(
            name, kind, Outcome.TIMEOUT if timeout else Outcome.ERROR, ttfb, exc.failure
        )
        klass = traffic_class(kind).value
        unlogged = self._failure_log.admit((name, klass, exc.failure))
        if unlogged is None:
            self._summary_due()
            return
        log.warning(
            "upstream failure",
            extra={
                "upstream": name,
                "class": klass,
                "failure": exc.failure,
                "status": exc.status,
                "error": exc.message,
                "unlogged_before": unlogged,
            },
        )

    async def not_found(
        self, req: GoproxyRequest, resp: UpstreamResponse, attempts: Attempts
    ) -> None:
        """A 404/410: the route's answer so far; the walk goes on."""
        name = resp.upstream.name
        text = await resp.read_text()
        resp.release()
        self.recorder.attempt(name, req.kind, Outcome.NOT_FOUND, resp.ttfb, "not_found")
        attempts.status, attempts.message = resp.status, text or "not found"
        attempts.not_found_from.append(name)

    def overflowed(self, exc: UpstreamBusy, attempts: Attempts) -> None:
        """Admission overflow: counted, logged now and then, never a failure."""
        attempts.overflowed = True
        attempts.skipped.append(str(exc))
        name = exc.upstream
        self.recorder.overflowed(name)
        unlogged = self._overflow_log.admit(name)
        if unlogged is None:
            self._summary_due()
            return
        log.warning(
            "upstream overflow",
            extra={"upstream": name, "error": exc.message, "unlogged_before": unlogged},
        )

    def _summary_due(self) -> None:
        """Occurrences were left out: make sure their summary is written when due,
        even if none follows (an upstream whose breaker opened is asked no more)."""
        if self._summary_timer is None:
            delay = min(
                d
                for d in (self._failure_log.next_due(), self._overflow_log.next_due())
                if d is not None
            )
            loop = asyncio.get_running_loop()
            self._summary_timer = loop.call_later(delay, self._log_summaries)

    def _log_summaries(self) -> None:
        self._summary_timer = None
        every = self.every
        for (name, klass, failure), count in self._failure_log.summaries():
            log.warning(
                "upstream failures",
                extra={
                    "upstream": name,
                    "class": klass,
                    "failure": failure,
                    "count": count,
                    "interval_s": every,
                },
            )
        for name, count in self._overflow_log.summaries():
            log.warning(
                "upstream overflows", extra={"upstream": name, "count": count, "interval_s": every}
            )
        if self._failure_log.next_due() is not None or self._overflow_log.next_due() is not None:
            self._summary_due()
