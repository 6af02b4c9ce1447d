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
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Final

from sidecar.auth.gate import FrontDoor
from sidecar.breaker.plan import Plan, UpstreamPlan
from sidecar.breaker.state import Action, State, traffic_class
from sidecar.cache.base import CachedEntry, FillReader, Flight, ModuleCache, NotFound, Whole
from sidecar.errors import (
    RequestError,
    UpstreamBusy,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnverified,
)
from sidecar.goproxy import GoproxyRequest, Kind, parse_request_path
from sidecar.proxy.headers import SOURCE_HEADER, STALE_HEADER, response_headers
from sidecar.proxy.hedge import Hedging, Race
from sidecar.proxy.integrity import IntegrityChecker, spool
from sidecar.proxy.lograte import LogRate
from sidecar.proxy.ranges import UNSATISFIABLE, byte_range, content_range
from sidecar.proxy.recorder import Recorder
from sidecar.proxy.stream import CLIENT_GONE, Reply, deliver, is_small, read_small, relay, send_file
from sidecar.routing import Route, Router
from sidecar.server import Exchange
from sidecar.server.exchange import TEXT_PLAIN
from sidecar.stats.window import Outcome
from sidecar.upstreams import Upstream, UpstreamResponse

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
STALE_WARNING: Final = '110 - "Response is Stale"'

Answer = tuple[str, str]  # who answered, outcome; the response is sent by then


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
        # Checks .mod/.zip bodies against the checksum database; set once by the
        # app (it fetches the database's answers through this handler).
        self.checker = checker
        self.hedging = hedging  # None: no request is ever hedged
        # Client authentication (set by the app when client_auth is on): who may
        # fetch which module, asked before the cache so a hit is no way around it.
        self.door: FrontDoor | None = None
        self._parse = functools.lru_cache(maxsize=PARSE_MEMO)(parse_request_path)
        self._failure_log = LogRate[tuple[str, str, str]](FAILURE_LOG_EVERY_S)
        self._overflow_log = LogRate[str](FAILURE_LOG_EVERY_S)
        self._summary_timer: asyncio.TimerHandle | None = None
        # Decided once: the level is set before the server starts (--log-level).
        self._debug = log.isEnabledFor(logging.DEBUG)

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
        part = wanted_range(ex, entry.size)
        source, outcome = self._send_hit(ex, entry, entry.body, False, part)
        self._answered(ex, req, source, outcome, time.perf_counter() - started)
        return True

    def _answered(
        self, ex: Exchange, req: GoproxyRequest, source: str, outcome: str, seconds: float
    ) -> None:
        self.recorder.answered(source, req.kind.value, outcome, seconds)
        if outcome == "hit" or outcome == "stale":
            metrics = self.recorder.metrics
            metric = metrics.cache_hits if outcome == "hit" else metrics.cache_stale_serves
            self.recorder.counter(metric, req.kind.value)()
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
        raw = ex.target
        cut = raw.find("?")
        try:
            req = self._parse(raw if cut < 0 else raw[:cut])
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
        if door is not None and door.module_refused(ex, req.module, route.private):
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
        self.recorder.counter(self.recorder.metrics.cache_misses, req.kind.value)()
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
        for target in targets:
            if target.name == attempts.hedged_to:
                continue  # asked already, as an earlier target's hedge
            answer = await self._try_target(ex, req, target, attempts, flight, reply)
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
        try:
            return await self._fetch(ex, req, target, attempts, flight, reply)
        except (UpstreamError, UpstreamBusy):
            return None

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
                checker.gate(req, upstream.name) if checker is not None else None,
            )
            if reader is not None:
                return await self._deliver(ex, reader, attempts, reply)
        return await self._stream(ex, req, resp, attempts, reply)

    async def _not_found(
        self, req: GoproxyRequest, resp: UpstreamResponse, attempts: Attempts
    ) -> None:
        """A 404/410: the route's answer so far; the walk goes on."""
        name = resp.upstream.name
        text = await resp.read_text()
        resp.release()
        self.recorder.attempt(name, req.kind, Outcome.NOT_FOUND, resp.ttfb, "not_found")
        attempts.status, attempts.message = resp.status, text or "not found"
        attempts.not_found_from.append(name)

    async def _race(
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
                self._overflowed(exc, attempts)
                raise
            except UpstreamError as exc:
                self._failed(upstream.name, req.kind, exc, None, attempts)
                if race.hedge is None:
                    raise
                attempts.first_failure = exc
            else:
                if resp.status == 200:
                    return resp
                await self._not_found(req, resp, attempts)
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
            self._overflowed(exc, attempts)
            return None
        except UpstreamError as exc:
            self._failed(race.hedge_name, req.kind, exc, None, attempts)
            return None
        if resp.status != 200:
            await self._not_found(req, resp, attempts)
            return None
        return resp

    def _settle_unused(
        self, req: GoproxyRequest, outcome: UpstreamResponse | BaseException
    ) -> None:
        """A hedge that ended with nobody to use its answer: recorded like any attempt."""
        if isinstance(outcome, UpstreamBusy):
            self.recorder.overflowed(outcome.upstream)
        elif isinstance(outcome, UpstreamError):
            self._record_failure(outcome.upstream, req.kind, outcome, None)
        elif isinstance(outcome, UpstreamResponse):
            outcome.release(reuse=False)
            ok = outcome.status == 200
            result = Outcome.OK if ok else Outcome.NOT_FOUND
            name = outcome.upstream.name
            self.recorder.attempt(name, req.kind, result, outcome.ttfb, result.value)
        else:
            log.error("hedge attempt failed", exc_info=outcome)

    async def _stream(
        self,
        ex: Exchange,
        req: GoproxyRequest,
        resp: UpstreamResponse,
        attempts: Attempts,
        reply: Reply,
        keep: tuple[ModuleCache, Flight] | None = None,
    ) -> Answer:
        """Relay a body without a fill; ``keep``: a small body, read whole, is also
        cached and handed to the flight's joiners."""
        name = resp.upstream.name
        checker = self._checker_for(req)
        try:
            body = await read_small(resp)
            if body is not None:
                if checker is not None:
                    await checker.check(req, name, body)  # before the cache or a client has it
                headers = response_headers(resp.headers, name)
                if keep is not None:
                    cache, flight = keep
                    cache.keep_small(req, body, resp.headers.get("Content-Type", ""), name)
                    flight.settle(Whole(body, headers, name))
                ex.send(200, headers, body)
                outcome = "ok"
            elif checker is not None:
                outcome = await self._relay_checked(ex, req, resp, checker, reply)
            else:
                outcome = await relay(ex, resp, reply)
        except UpstreamError as exc:
            resp.release(reuse=False)
            self._failed(name, req.kind, exc, resp.ttfb, attempts)
            raise
        except asyncio.CancelledError:
            resp.release(reuse=False)
            # The upstream answered; its client leaving is no failure of its own.
            self.recorder.attempt(name, req.kind, Outcome.OK, resp.ttfb, "ok")
            raise
        self.recorder.attempt(name, req.kind, Outcome.OK, resp.ttfb, "ok")
        return name, outcome

    async def _relay_checked(
        self,
        ex: Exchange,
        req: GoproxyRequest,
        resp: UpstreamResponse,
        checker: IntegrityChecker,
        reply: Reply,
    ) -> str:
        """A body relayed without the cache, checked first: spooled to a temp
        file, checked, then sent from it."""
        name = resp.upstream.name
        body, size = await spool(resp)
        try:
            await checker.check(req, name, body)
        except BaseException:
            body.close()
            raise
        reply.answering(name)
        reply.length = size
        return await send_file(ex, body, size, dict(response_headers(resp.headers, name)), reply)

    def _checker_for(self, req: GoproxyRequest) -> IntegrityChecker | None:
        """The checker if ``req``'s body must be checked before it is served."""
        checker = self.checker
        return checker if checker is not None and checker.wants(req) else None

    async def _head(
        self,
        ex: Exchange,
        req: GoproxyRequest,
        resp: UpstreamResponse,
        use_cache: bool,
        reply: Reply,
    ) -> Answer:
        """A HEAD answered from the upstream's GET: the same headers a GET gets,
        at once. An artifact's body goes on into the cache, read by nobody (the
        GET that usually follows is a hit); any other body is dropped."""
        name = resp.upstream.name
        cache = self.cache if use_cache else None
        if cache is not None and req.immutable:
            checker = self._checker_for(req)
            gate = checker.gate(req, name) if checker is not None else None
            await cache.prefetch(req, resp, gate)  # the fill owns resp from here
        else:
            resp.release(reuse=False)
        self.recorder.attempt(name, req.kind, Outcome.OK, resp.ttfb, "ok")
        reply.answering(name)
        reply.whole = True  # the headers are the whole answer: once written, it is served
        try:
            await ex.start(200, response_headers(resp.headers, name), resp.content_length)
            await ex.end()
        except CLIENT_GONE:
            return name, "client_abort"
        return name, "ok"

    def _body_end(self, name: str, kind: Kind, ttfb: float, exc: UpstreamError | None) -> None:
        """The fill of one body ended: recorded once, however many clients read it."""
        if exc is None:
            self.recorder.attempt(name, kind, Outcome.OK, ttfb, "ok")
        else:
            self._record_failure(name, kind, exc, ttfb)

    async def _deliver(
        self, ex: Exchange, reader: FillReader, attempts: Attempts | None, reply: Reply
    ) -> Answer:
        """Send a fill's body to this client. UpstreamError: it failed before any
        header was sent (the caller may try elsewhere); after, the connection is cut."""
        fill = reader.fill
        try:
            if is_small(fill.content_length):
                try:
                    body = await reader.read_all()
                except UpstreamError as exc:
                    if attempts is not None:
                        self._note_failure(exc, attempts)
                    raise
                ex.send(200, fill.headers, body)
                return fill.upstream, "ok"
            try:
                outcome, failure = await deliver(
                    ex, reader, fill.headers, fill.content_length, reply
                )
            except UpstreamError as exc:  # before any header: the caller may go on
                if attempts is not None:
                    self._note_failure(exc, attempts)
                raise
            if failure is not None and attempts is not None:
                attempts.cut = failure
            return fill.upstream, outcome
        finally:
            reader.close()

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

    def _failed(
        self, name: str, kind: Kind, exc: UpstreamError, ttfb: float | None, attempts: Attempts
    ) -> None:
        self._record_failure(name, kind, exc, ttfb)
        self._note_failure(exc, attempts)

    def _record_failure(
        self, name: str, kind: Kind, exc: UpstreamError, ttfb: float | None
    ) -> None:
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

    @staticmethod
    def _note_failure(exc: UpstreamError, attempts: Attempts) -> None:
        attempts.status = 504 if isinstance(exc, UpstreamTimeout) else 502
        attempts.message = str(exc)
        attempts.failed = True

    def _overflowed(self, exc: UpstreamBusy, attempts: Attempts) -> None:
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
        every = FAILURE_LOG_EVERY_S
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

    async def _cache_action(
        self,
        ex: Exchange,
        req: GoproxyRequest,
        target: UpstreamPlan,
        attempts: Attempts,
        reply: Reply,
    ) -> Answer | None:
        cache = self.cache if attempts.use_cache else None
        entry = cache.lookup(req, allow_stale=True) if cache is not None else None
        if entry is not None and cache is not None:
            answer = await self._from_cache(ex, entry, cache.is_stale(entry), reply)
            if answer is not None:
                return answer
        attempts.skipped.append(f"{target.name}: cache miss ({target.breaker.reason})")
        return None

    async def _from_cache(
        self, ex: Exchange, entry: CachedEntry, stale: bool, reply: Reply
    ) -> Answer | None:
        """Serve an entry from memory or its file; None if it turned out broken
        (evicted meanwhile): the caller fetches it again."""
        cache = self.cache
        assert cache is not None
        if not entry.verified and not await cache.verify(entry):
            return None
        part = wanted_range(ex, entry.size)
        body = await cache.small_body(entry)
        if body is not None or part == UNSATISFIABLE:  # a 416 needs no bytes
            return self._send_hit(ex, entry, body or b"", stale, part)
        if not cache.acquire(entry):
            return None
        served = "stale" if stale else "hit"
        reply.answering("cache", served)
        try:
            blob = await cache.open_blob(entry)  # checked against what was hashed
            if blob is None:
                return None
            headers = self._hit_headers(entry, stale)
            outcome = await send_file(ex, blob, entry.size, headers, reply, part)
        finally:
            cache.release(entry)
        return "cache", served if outcome == "ok" else outcome

    def _send_hit(
        self,
        ex: Exchange,
        entry: CachedEntry,
        body: bytes,
        stale: bool,
        part: tuple[int, int] | None,
    ) -> Answer:
        """A hit from bytes in memory, whole or ``part`` of it (wanted_range)."""
        headers = self._hit_headers(entry, stale)
        if part is None:
            ex.send(200, headers, body)
        else:
            headers["Content-Range"] = content_range(part, entry.size)
            if part == UNSATISFIABLE:
                ex.send(416, headers, b"")
                return "cache", "unsatisfiable"
            ex.send(206, headers, body[part[0] : part[1] + 1])
        return "cache", "stale" if stale else "hit"

    def _hit_headers(self, entry: CachedEntry, stale: bool) -> dict[str, str]:
        assert self.cache is not None
        headers = {
            "Content-Type": entry.content_type,
            SOURCE_HEADER: "cache",
            "Age": str(self.cache.age(entry)),
        }
        if stale:
            headers[STALE_HEADER] = "1"
            headers["Warning"] = STALE_WARNING
        return headers

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


def wanted_range(ex: Exchange, size: int) -> tuple[int, int] | None:
    """The single byte range a GET asks for, if any (see sidecar.proxy.ranges)."""
    if ex.method != "GET":
        return None
    header = ex.header("range")
    return None if header is None else byte_range(header, size, ex.header("if-range"))


def send_text(
    ex: Exchange, status: int, message: str, headers: dict[str, str] | None = None
) -> None:
    """A short plain-text body the go command prints after the status."""
    out = {"Content-Type": TEXT_PLAIN}
    if headers:
        out.update(headers)
    ex.send(status, out, (message.strip() + "\n").encode())
