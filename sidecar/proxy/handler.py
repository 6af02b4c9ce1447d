"""The request pipeline: parse → cache → route by the current plan → deliver → record.

Every request is validated before anything else; an invalid one is answered
here and reaches no upstream and no file. Valid ones are looked up in the
cache; a miss walks the plan's targets in order, like the go command walks a
comma-separated GOPROXY list: 404/410 and failures fall through, the last
answer is returned.

With a cache, a GET miss goes through single flight (``sidecar.cache.flight``):
the walk ("find an upstream that answers 200 headers") is done by one leader
per key, and the body is fetched once by a fill that every waiting client
reads ("deliver the body"). Without a cache the body is relayed as before.

Every request that gets this far is recorded exactly once (duration
histogram, outcome counter, debug line), in ``handle``, whether the handler
returns or is cancelled: the server cancels a handler whose client left, at
whatever await it is in, and the go command leaves as soon as it has the
last byte. A ``Reply`` tells the two apart: a client handed every byte is
a success, one that left before the last byte is ``client_abort``.

The parts it holds, one job each: ``hits`` (answers from the cache),
``delivery`` (an upstream's 200 to the client), ``racing`` (a step raced
against its hedge), ``failures`` (what a failure records and logs).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Final

from sidecar.auth.gate import FrontDoor
from sidecar.breaker.plan import Plan, UpstreamPlan
from sidecar.breaker.state import Action, State
from sidecar.cache.base import Flight, ModuleCache, NotFound, Whole
from sidecar.errors import RequestError, UpstreamBusy, UpstreamError
from sidecar.goproxy import KIND_LABEL, GoproxyRequest, Kind, parse_request_path
from sidecar.proxy.delivery import Delivery
from sidecar.proxy.failures import Attempts, Failures
from sidecar.proxy.headers import response_headers
from sidecar.proxy.hedge import Hedging
from sidecar.proxy.hits import Answer, Hits, wanted_range
from sidecar.proxy.integrity import IntegrityChecker
from sidecar.proxy.racing import Racing
from sidecar.proxy.recorder import Recorder
from sidecar.proxy.stream import Reply, is_small
from sidecar.routing import Route, Router
from sidecar.server import Exchange
from sidecar.server.exchange import TEXT_PLAIN
from sidecar.upstreams import Upstream

log = logging.getLogger("sidecar.proxy")

METHODS: Final = frozenset({"GET", "HEAD"})
# Parsed request paths kept per handler: validating and case-decoding a path
# costs 5-7 µs, about a quarter of a small cache hit's own work, and a build
# asks the same paths again and again. Failures are not kept (they raise).
PARSE_MEMO: Final = 8192
RETRY_AFTER_S: Final = "5"
# An overflow is a queue that was full a moment ago: worth retrying at once.
OVERFLOW_RETRY_AFTER_S: Final = "1"
# Identical failures (upstream, class, failure kind) and overflows (upstream):
# the first logged at once, then one summary line per this many seconds with
# the count. An upstream nobody runs fails every request it is asked, and 31
# lines for one `go mod download` told nothing the first did not; the metrics
# count every one.
FAILURE_LOG_EVERY_S: Final = 10.0
# An enum member read through its class costs ~1 k instructions on Python 3.11
# (EnumType's __getattr__ hook runs on every class attribute read); every walk
# reads these.
_ALLOW: Final = Action.ALLOW
_HALF_OPEN: Final = State.HALF_OPEN


class ProxyHandler:
    def __init__(
        self,
        upstreams: dict[str, Upstream],
        plan: Callable[[], Plan],
        recorder: Recorder,
        cache: ModuleCache | None,
        reject_status: int,
        router: Router,
        checker: IntegrityChecker | None = None,
        hedging: Hedging | None = None,
    ) -> None:
        self.upstreams = upstreams
        self.plan = plan
        self.recorder = recorder
        self.cache = cache
        self.reject_status = reject_status
        self.router = router
        self.hedging = hedging  # None: no request is ever hedged
        # Client authentication (set by the app when client_auth is on): who may
        # fetch which module, asked before the cache so a hit is no way around it.
        self.door: FrontDoor | None = None
        self._parse = functools.lru_cache(maxsize=PARSE_MEMO)(parse_request_path)
        failures = Failures(recorder, FAILURE_LOG_EVERY_S)
        self._failed = failures.failed
        self._overflowed = failures.overflowed
        self._not_found = failures.not_found
        self._race = Racing(recorder, failures).race
        self._delivery = delivery = Delivery(cache, recorder, failures, checker)
        self._checker_for = delivery.checker_for
        self._head = delivery.head
        self._stream = delivery.stream
        self._body_end = delivery.body_end
        self._deliver = delivery.send_fill
        hits = Hits(cache)
        # Bound once: answer_now serves most of a warm build through _send_hit.
        self._send_hit = hits.send_hit
        self._from_cache = hits.from_cache
        self._cache_action = hits.cache_action
        # Decided once: the level is set before the server starts (--log-level).
        self._debug = log.isEnabledFor(logging.DEBUG)

    @property
    def checker(self) -> IntegrityChecker | None:
        """Checks .mod/.zip bodies against the checksum database; set once by the
        app (it fetches the database's answers through this handler)."""
        return self._delivery.checker

    @checker.setter
    def checker(self, checker: IntegrityChecker | None) -> None:
        self._delivery.checker = checker

    async def handle(self, ex: Exchange) -> None:
        started = time.perf_counter()
        checked: tuple[GoproxyRequest, Route] | None = ex.scratch or self._check(ex)
        if checked is None:
            return
        req, route = checked
        reply = Reply()
        try:
            source, outcome = await self._serve(ex, req, route, reply)
        except asyncio.CancelledError:
            # Recorded here, not skipped: the client left, maybe after every byte.
            self._answered(ex, req, *reply.left(), time.perf_counter() - started)
            raise
        self._answered(ex, req, source, outcome, time.perf_counter() - started)

    def answer_now(self, ex: Exchange) -> bool:
        """Answer without waiting if nothing needs I/O: a refused request, or a
        verified small entry held in memory (most of a warm build's requests).
        False: ``handle`` must answer it."""
        started = time.perf_counter()
        checked = ex.scratch = self._check(ex)
        if checked is None:
            return True
        req, route = checked
        cache = self.cache
        if cache is None or not route.cache:
            return False
        entry = cache.lookup(req, allow_stale=False)
        if entry is None or not entry.verified or entry.body is None:
            return False
        part = wanted_range(ex, entry)
        source, outcome = self._send_hit(ex, entry, entry.body, False, part)
        self._answered(ex, req, source, outcome, time.perf_counter() - started)
        return True

    def _answered(
        self, ex: Exchange, req: GoproxyRequest, source: str, outcome: str, seconds: float
    ) -> None:
        self.recorder.answered(source, KIND_LABEL[req.kind], outcome, seconds)
        if self._debug:
            log.debug(
                "request",
                extra={
                    "method": ex.method,
                    "path": req.path,
                    "status": ex.status,
                    "source": source,
                    "outcome": outcome,
                    "ms": round(seconds * 1000, 3),
                },
            )

    def _check(self, ex: Exchange) -> tuple[GoproxyRequest, Route] | None:
        """The parsed request and its route; None if it was refused (and answered)."""
        try:
            req = self._parse(ex.path)
        except RequestError as exc:
            self.recorder.counter(self.recorder.metrics.invalid_requests, str(exc.status))()
            send_text(ex, exc.status, exc.message)
            return None
        if ex.method not in METHODS:
            send_text(ex, 405, "method not allowed", {"Allow": "GET, HEAD"})
            return None
        route = self.router.route(req.module)
        if self._refused(ex, req, route):
            return None
        door = self.door
        if (
            door is not None
            and (route.guarded or ex.identity is None)
            and door.module_refused(ex, req.module, route.private)
        ):
            return None
        return req, route

    def _refused(self, ex: Exchange, req: GoproxyRequest, route: Route) -> bool:
        """Routing refusals, answered before any cache or upstream is asked."""
        if route.deny:
            reason, status = "deny", 403
            text = f"goproxy-sidecar: {req.module} is refused by routing rule {route.rule!r}"
        elif route.private and req.kind is Kind.SUMDB_LOOKUP:
            reason, status = "private_sumdb", 403
            text = (
                f"goproxy-sidecar: {req.module} is private: checksum lookups for it "
                "are not forwarded (set GONOSUMDB or GOPRIVATE for it)"
            )
        else:
            return False
        self.recorder.counter(self.recorder.metrics.route_refusals, reason)()
        send_text(ex, status, text)
        return True

    async def _serve(self, ex: Exchange, req: GoproxyRequest, route: Route, reply: Reply) -> Answer:
        cache = self.cache
        if cache is None or not route.cache:
            return await self._walk(ex, req, None, route, reply)
        entry = cache.lookup(req, allow_stale=False)
        if entry is not None:
            answer = await self._from_cache(ex, entry, False, reply)
            if answer is not None:
                return answer
        self.recorder.missed(req.kind)
        if ex.method != "GET":
            return await self._walk(ex, req, None, route, reply)
        flight, leader = cache.flight(req)
        if not leader:
            answer = await self._join(ex, req, flight, reply)
            return answer if answer is not None else await self._walk(ex, req, None, route, reply)
        try:
            return await self._walk(ex, req, flight, route, reply)
        finally:
            cache.land(flight)

    async def _walk(
        self, ex: Exchange, req: GoproxyRequest, flight: Flight | None, route: Route, reply: Reply
    ) -> Answer:
        targets = self._targets(route, req.kind)
        attempts = Attempts(use_cache=route.cache, targets=targets)
        checker = self._checker_for(req) if ex.method == "GET" else None
        if checker is not None:
            # A .mod miss waited for its upstream, then for the lookup: twice the
            # time of an .info, and most of the slowest 1 % of requests (issue 14).
            attempts.lookup = checker.start_lookup(req)
        for target in targets:
            if target.name == attempts.hedged_to:
                continue  # asked already, as an earlier target's hedge
            try:
                if target.action is _ALLOW and target.state is not _HALF_OPEN:
                    # The common case without _try_target's coroutine frame.
                    answer = await self._fetch(ex, req, target, attempts, flight, reply)
                else:
                    answer = await self._try_target(ex, req, target, attempts, flight, reply)
            except (UpstreamError, UpstreamBusy):
                answer = None  # on to the next target
            if answer is not None:
                return answer
        if not route.targets:
            # 404, not 5xx: the go command then falls through to its next
            # GOPROXY entry (usually `direct` for private modules), never to us.
            self.recorder.counter(self.recorder.metrics.route_refusals, "private_no_target")()
            attempts.failed = True  # a cached copy may still serve: it never leaves the host
            attempts.status = 404
            attempts.message = (
                f"goproxy-sidecar: {req.module} is private and no upstream "
                "with private_ok can serve it"
            )
        answer = await self._exhausted(ex, req, attempts, reply)
        if flight is not None and answer[1] == "not_found":
            flight.settle(NotFound(attempts.status, attempts.message))
        return answer

    def _targets(self, route: Route, kind: Kind) -> tuple[UpstreamPlan, ...] | list[UpstreamPlan]:
        """The plan's targets this route allows, in preference order, as the
        breakers of ``kind``'s traffic class (module or checksum) see them."""
        upstreams = self.plan().targets(kind)
        if route is self.router.default:
            return upstreams
        return [t for t in upstreams if t.name in route.targets]

    async def _try_target(
        self,
        ex: Exchange,
        req: GoproxyRequest,
        target: UpstreamPlan,
        attempts: Attempts,
        flight: Flight | None,
        reply: Reply,
    ) -> Answer | None:
        action = target.action
        if target.state is State.HALF_OPEN and target.breaker.try_acquire_probe():
            return await self._probe(ex, req, target, attempts, flight, reply)
        if action is Action.REJECT:
            self._reject(ex, target)
            return target.name, "rejected"
        if action is Action.REROUTE:
            attempts.skipped.append(f"{target.name}: rerouted ({target.breaker.reason})")
            return None
        if action is Action.CACHE:
            return await self._cache_action(ex, req, target, attempts, reply)
        return await self._fetch(ex, req, target, attempts, flight, reply)  # the walk catches

    async def _probe(
        self,
        ex: Exchange,
        req: GoproxyRequest,
        target: UpstreamPlan,
        attempts: Attempts,
        flight: Flight | None,
        reply: Reply,
    ) -> Answer | None:
        """A half-open breaker lets this request through as one of its probes."""
        breaker = target.breaker
        period = breaker.probe_period
        attempts.first_failure, attempts.unjudged = None, False
        try:
            answer = await self._fetch(ex, req, target, attempts, flight, reply)
        except UpstreamError as exc:
            self.recorder.counter(self.recorder.metrics.probes, target.name, "client", "failed")()
            breaker.release_probe(False, exc.message, period=period)
            return None
        except UpstreamBusy:
            breaker.cancel_probe(period=period)  # never reached the upstream: no verdict
            return None
        except BaseException:
            if reply.complete:  # the client left after the last byte: answered in full
                self.recorder.counter(self.recorder.metrics.probes, target.name, "client", "ok")()
                breaker.release_probe(True, period=period)
            else:
                breaker.cancel_probe(period=period)  # the client left: no verdict
            raise
        failure = attempts.first_failure or attempts.cut
        if attempts.first_failure is None and attempts.unjudged:
            breaker.cancel_probe(period=period)  # its hedge answered first: no verdict
            return answer
        if failure is not None:
            self.recorder.counter(self.recorder.metrics.probes, target.name, "client", "failed")()
            breaker.release_probe(False, failure.message, period=period)
            return answer
        self.recorder.counter(self.recorder.metrics.probes, target.name, "client", "ok")()
        breaker.release_probe(True, period=period)
        return answer

    async def _fetch(
        self,
        ex: Exchange,
        req: GoproxyRequest,
        target: UpstreamPlan,
        attempts: Attempts,
        flight: Flight | None,
        reply: Reply,
    ) -> Answer | None:
        """One upstream attempt, maybe hedged. None means "go on"; UpstreamError
        means it failed, UpstreamBusy that it had no connection in time (not a
        failure)."""
        upstream = self.upstreams[target.name]
        reply.answering(upstream.name)  # a client leaving now left while it was asked
        hedging = self.hedging
        race = None
        if hedging is not None and not attempts.hedged_to:
            race = hedging.race(target, req.path, attempts.targets)
        if race is None:
            try:
                # Always GET: the GOPROXY protocol defines no other method and Athens
                # answers HEAD with 405. A HEAD is answered from the GET's headers.
                resp = await upstream.open(req.path)
            except UpstreamBusy as exc:
                self._overflowed(exc, attempts)
                raise
            except UpstreamError as exc:
                self._failed(upstream.name, req.kind, exc, None, attempts)
                raise
            if resp.status != 200:
                await self._not_found(req, resp, attempts)
                return None
        else:
            raced = await self._race(req, upstream, race, attempts)
            if raced is None:
                return None
            resp = raced
            upstream = resp.upstream  # the hedge's, when its answer won
        for name in attempts.not_found_from:
            self.recorder.masked(name, req.kind)
        if ex.method == "HEAD":
            return await self._head(ex, req, resp, attempts.use_cache, reply)
        cache = self.cache
        if flight is not None and cache is not None:
            if is_small(resp.content_length) and cache.takes_small(resp.content_length):
                return await self._stream(ex, req, resp, attempts, reply, (cache, flight))
            checker = self._checker_for(req)
            reader = await cache.start_fill(
                req,
                resp,
                response_headers(resp.headers, upstream.name),
                flight,
                partial(self._body_end, upstream.name, req.kind, resp.ttfb),
                checker.gate(req, upstream.name, attempts.lookup) if checker is not None else None,
            )
            if reader is not None:
                return await self._deliver(ex, reader, attempts, reply)
        return await self._stream(ex, req, resp, attempts, reply)

    async def _join(
        self, ex: Exchange, req: GoproxyRequest, flight: Flight, reply: Reply
    ) -> Answer | None:
        """Wait for the leader of this key. None: walk the targets yourself."""
        outcome = await flight.outcome()
        if isinstance(outcome, NotFound):
            send_text(ex, outcome.status, outcome.message)
            return "sidecar", "not_found"
        if isinstance(outcome, Whole):
            ex.send(200, outcome.headers, outcome.body)
            return outcome.upstream, "ok"
        if outcome is None:  # no body to share; a fill that ended meanwhile may be committed
            entry = self.cache.lookup(req, allow_stale=False) if self.cache else None
            return await self._from_cache(ex, entry, False, reply) if entry else None
        try:
            return await self._deliver(ex, outcome, None, reply)
        except UpstreamError:
            return None  # failed before headers: this client moves on by itself

    def _reject(self, ex: Exchange, target: UpstreamPlan) -> None:
        self.recorder.counter(self.recorder.metrics.rejected_requests, target.name, "policy")()
        send_text(
            ex,
            self.reject_status,
            f"goproxy-sidecar: {target.name} is shedding load: {target.breaker.reason}",
            {"Retry-After": RETRY_AFTER_S},
        )

    async def _exhausted(
        self, ex: Exchange, req: GoproxyRequest, attempts: Attempts, reply: Reply
    ) -> Answer:
        busy = attempts.overflowed
        if (attempts.failed or busy) and attempts.use_cache and self.cache is not None:
            entry = self.cache.lookup(req, allow_stale=True)
            if entry is not None:
                answer = await self._from_cache(ex, entry, self.cache.is_stale(entry), reply)
                if answer is not None:
                    return answer
        if busy:
            # Not the policy's reject_status: an upstream that may hold the answer
            # was only busy, so "not found" would be a lie and a retry may succeed.
            self.recorder.counter(self.recorder.metrics.rejected_requests, "", "overflow")()
            why = "; ".join(attempts.skipped + ([attempts.message] if attempts.status else []))
            send_text(
                ex,
                503,
                f"goproxy-sidecar: no upstream could take the request now: {why}",
                {"Retry-After": OVERFLOW_RETRY_AFTER_S},
            )
            return "sidecar", "overflow"
        if attempts.status:
            outcome = "not_found" if attempts.status in (404, 410) else "failed"
            send_text(ex, attempts.status, attempts.message)
            return "sidecar", outcome
        self.recorder.counter(self.recorder.metrics.rejected_requests, "", "no_target")()
        why = "; ".join(attempts.skipped) or "no upstream configured"
        send_text(
            ex, 503, f"goproxy-sidecar: no target can serve: {why}", {"Retry-After": RETRY_AFTER_S}
        )
        return "sidecar", "unavailable"


def send_text(
    ex: Exchange, status: int, message: str, headers: dict[str, str] | None = None
) -> None:
    """A short plain-text body the go command prints after the status."""
    out = {"Content-Type": TEXT_PLAIN}
    if headers:
        out.update(headers)
    ex.send(status, out, (message.strip() + "\n").encode())
