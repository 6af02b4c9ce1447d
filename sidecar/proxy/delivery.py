"""An upstream's 200 delivered to the client: a small body read whole (and,
for a flight, kept and handed to its joiners), a large one relayed, checked
first when the checksum database must vouch for it, or read from a cache
fill; a HEAD answered from the GET's headers.
"""

from __future__ import annotations

import asyncio

from sidecar.cache.base import FillReader, Flight, ModuleCache, Whole
from sidecar.errors import UpstreamError
from sidecar.goproxy import GoproxyRequest, Kind
from sidecar.proxy.failures import Attempts, Failures, note_failure
from sidecar.proxy.headers import response_block, response_headers
from sidecar.proxy.hits import Answer
from sidecar.proxy.integrity import CHECKED_KINDS, IntegrityChecker, spool
from sidecar.proxy.recorder import Recorder
from sidecar.proxy.stream import (
    BUFFER_LIMIT,
    CLIENT_GONE,
    Reply,
    deliver,
    is_small,
    read_small,
    relay,
    send_file,
)
from sidecar.server import Exchange
from sidecar.stats.window import OUTCOME_OK
from sidecar.upstreams import UpstreamResponse


class Delivery:
    """Delivers a handler's upstream answers."""

    def __init__(
        self,
        cache: ModuleCache | None,
        recorder: Recorder,
        failures: Failures,
        checker: IntegrityChecker | None,
    ) -> None:
        self.cache = cache
        self.recorder = recorder
        self.failures = failures
        # Checks .mod/.zip bodies against the checksum database; set once by the
        # app (it fetches the database's answers through the handler).
        self.checker = checker

    async def stream(
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
        checker = self.checker_for(req)
        try:
            length = resp.content_length
            # A small body mostly came with its head: taken here, without
            # read_small's coroutine (~1 k instructions a miss).
            body = resp.arrived() if length is not None and length <= BUFFER_LIMIT else None
            if body is not None:
                resp.release()
            else:
                body = await read_small(resp)
            if body is not None:
                if checker is not None:
                    # before the cache or a client has it
                    await checker.check(req, name, body, lookup=attempts.lookup)
                if keep is not None:
                    cache, flight = keep
                    cache.keep_small(req, body, resp.headers.get("Content-Type", ""), name)
                    if flight.awaited():
                        # Nobody else can join before the handler lands the
                        # flight (no await from here on); later requests are hits.
                        flight.settle(Whole(body, response_headers(resp.headers, name), name))
                ex.send(200, response_block(resp.headers, name), body)
                outcome = "ok"
            elif checker is not None:
                outcome = await self._relay_checked(ex, req, resp, checker, reply, attempts)
            else:
                try:
                    outcome, cut = await relay(ex, resp, reply)
                finally:
                    self.recorder.relayed(reply.spliced, reply.sent)
                if cut is not None:  # after the headers: answered, cut, no other upstream
                    self.failures.record(name, req.kind, cut, resp.ttfb)
                    attempts.cut = cut
                    return name, outcome
        except UpstreamError as exc:
            resp.release(reuse=False)
            self.failures.failed(name, req.kind, exc, resp.ttfb, attempts)
            raise
        except asyncio.CancelledError:
            resp.release(reuse=False)
            # The upstream answered; its client leaving is no failure of its own.
            self.recorder.attempt(name, req.kind, OUTCOME_OK, resp.ttfb, "ok")
            raise
        self.recorder.attempt(name, req.kind, OUTCOME_OK, resp.ttfb, "ok")
        return name, outcome

    async def _relay_checked(
        self,
        ex: Exchange,
        req: GoproxyRequest,
        resp: UpstreamResponse,
        checker: IntegrityChecker,
        reply: Reply,
        attempts: Attempts,
    ) -> str:
        """A body relayed without the cache, checked first: spooled to a temp
        file, checked, then sent from it."""
        name = resp.upstream.name
        body, size = await spool(resp)
        try:
            await checker.check(req, name, body, lookup=attempts.lookup)
        except BaseException:
            body.close()
            raise
        reply.answering(name)
        reply.length = size
        return await send_file(ex, body, size, dict(response_headers(resp.headers, name)), reply)

    def checker_for(self, req: GoproxyRequest) -> IntegrityChecker | None:
        """The checker if ``req``'s body must be checked before it is served."""
        checker = self.checker
        # Most misses (.info, lists, checksum lookups) are no kind that is ever
        # checked: answered without wants(), whose mode test reads an enum member
        # (~1 k instructions on Python 3.11), twice a miss.
        if checker is None or req.kind not in CHECKED_KINDS:
            return None
        return checker if checker.wants(req) else None

    async def head(
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
            checker = self.checker_for(req)
            gate = checker.gate(req, name) if checker is not None else None
            await cache.prefetch(req, resp, gate)  # the fill owns resp from here
        else:
            resp.release(reuse=False)
        self.recorder.attempt(name, req.kind, OUTCOME_OK, resp.ttfb, "ok")
        reply.answering(name)
        reply.whole = True  # the headers are the whole answer: once written, it is served
        try:
            await ex.start(200, response_headers(resp.headers, name), resp.content_length)
            await ex.end()
        except CLIENT_GONE:
            return name, "client_abort"
        return name, "ok"

    def body_end(self, name: str, kind: Kind, ttfb: float, exc: UpstreamError | None) -> None:
        """The fill of one body ended: recorded once, however many clients read it."""
        if exc is None:
            self.recorder.attempt(name, kind, OUTCOME_OK, ttfb, "ok")
        else:
            self.failures.record(name, kind, exc, ttfb)

    async def send_fill(
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
                        note_failure(exc, attempts)
                    raise
                ex.send(200, fill.headers, body)
                return fill.upstream, "ok"
            try:
                outcome, failure = await deliver(
                    ex, reader, fill.headers, fill.content_length, reply
                )
            except UpstreamError as exc:  # before any header: the caller may go on
                if attempts is not None:
                    note_failure(exc, attempts)
                raise
            if failure is not None and attempts is not None:
                attempts.cut = failure
            return fill.upstream, outcome
        finally:
            reader.close()
