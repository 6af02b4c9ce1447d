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
from dataclasses import dataclass, field
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


@dataclass(slots=True)
class Attempts:
    """What happened along one request's route, for the final answer."""

    status: int = 0
    message: str = ""
    not_found_from: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: bool = False
    cut: UpstreamError | None = None  # the body failed after headers were sent
    overflowed: bool = False  # an upstream had no connection in time (admission)
    use_cache: bool = True  # false for modules a routing rule keeps out of the cache
    targets: Sequence[UpstreamPlan] = ()  # the walk, in order (hedges pick from it)
    hedged_to: str = ""  # the upstream a hedge already asked: the walk skips it
    # Of the upstream a race began with (its probe's verdict): it failed although
    # its hedge then answered; it gave none (cancelled: its hedge answered first).
    first_failure: UpstreamError | None = None
    unjudged: bool = False
    # The checksum lookup of a body that is checked, started with the walk so
    # that it runs while the upstreams are asked instead of after the body came.
    lookup: asyncio.Future[ModuleHashes] | None = None


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
