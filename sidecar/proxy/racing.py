"""One step of the walk raced against its hedge (``sidecar.proxy.hedge``
decides whether and when a hedge is sent): the first 200 is used, the other
attempt is settled and recorded like any attempt.
"""

from __future__ import annotations

import asyncio
import logging

from sidecar.errors import UpstreamBusy, UpstreamError
from sidecar.goproxy import GoproxyRequest
from sidecar.proxy.failures import Attempts, Failures
from sidecar.proxy.hedge import Race
from sidecar.proxy.recorder import Recorder
from sidecar.stats.window import Outcome
from sidecar.upstreams import Upstream, UpstreamResponse

log = logging.getLogger("sidecar.proxy")


class Racing:
    """Runs a handler's races; the attempts are recorded through ``failures``."""

    def __init__(self, recorder: Recorder, failures: Failures) -> None:
        self.recorder = recorder
        self.failures = failures

    async def race(
        self, req: GoproxyRequest, upstream: Upstream, race: Race, attempts: Attempts
    ) -> UpstreamResponse | None:
        """``upstream``'s 200, or its hedge's (``sidecar.proxy.hedge``). None: no
        200 from either, the walk goes on; UpstreamError/UpstreamBusy: the first
        upstream failed before any hedge was sent."""
        served: UpstreamResponse | None = None
        try:
            try:
                try:
                    resp = await upstream.open(req.path, admitted=race.arm)
                finally:
                    race.stop()  # at once: from here on a hedge's 200 cancels nothing
            except asyncio.CancelledError:
                if not race.took_over():
                    raise  # the client left
                attempts.unjudged = True
                attempts.hedged_to = race.hedge_name
                served = race.winner()
                return served
            except UpstreamBusy as exc:  # at admission, so before any hedge
                self.failures.overflowed(exc, attempts)
                raise
            except UpstreamError as exc:
                self.failures.failed(upstream.name, req.kind, exc, None, attempts)
                if race.hedge is None:
                    raise
                attempts.first_failure = exc
            else:
                if resp.status == 200:
                    return resp
                await self.failures.not_found(req, resp, attempts)
                if race.hedge is None:
                    return None
            served = await self._hedge_answer(req, race, attempts)
            return served
        finally:
            unused = race.close(served is not None)
            if unused is not None:
                self._settle_unused(req, unused)

    async def _hedge_answer(
        self, req: GoproxyRequest, race: Race, attempts: Attempts
    ) -> UpstreamResponse | None:
        """The first upstream of a race has no 200: its hedge answers as the next
        upstream of the list would."""
        attempts.hedged_to = race.hedge_name
        try:
            resp = await race.outcome()
        except UpstreamBusy as exc:
            self.failures.overflowed(exc, attempts)
            return None
        except UpstreamError as exc:
            self.failures.failed(race.hedge_name, req.kind, exc, None, attempts)
            return None
        if resp.status != 200:
            await self.failures.not_found(req, resp, attempts)
            return None
        return resp

    def _settle_unused(
        self, req: GoproxyRequest, outcome: UpstreamResponse | BaseException
    ) -> None:
        """A hedge that ended with nobody to use its answer: recorded like any attempt."""
        if isinstance(outcome, UpstreamBusy):
            self.recorder.overflowed(outcome.upstream)
        elif isinstance(outcome, UpstreamError):
            self.failures.record(outcome.upstream, req.kind, outcome, None)
        elif isinstance(outcome, UpstreamResponse):
            outcome.release(reuse=False)
            ok = outcome.status == 200
            result = Outcome.OK if ok else Outcome.NOT_FOUND
            name = outcome.upstream.name
            self.recorder.attempt(name, req.kind, result, outcome.ttfb, result.value)
        else:
            log.error("hedge attempt failed", exc_info=outcome)
