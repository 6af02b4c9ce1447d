"""The request pipeline: parse → route by the current plan → stream → record.

Every request is validated before anything else; an invalid one is answered
here and reaches no upstream and no file. Valid ones walk the plan's targets
in order, like the go command walks a comma-separated GOPROXY list: 404/410
and failures fall through, the last answer is returned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from aiohttp import web

from sidecar.breaker.plan import Plan, UpstreamPlan
from sidecar.breaker.state import Action, State
from sidecar.cache.base import CachedEntry, ModuleCache
from sidecar.errors import RequestError, UpstreamError, UpstreamTimeout
from sidecar.goproxy import GoproxyRequest, parse_request_path
from sidecar.proxy.headers import SOURCE_HEADER, STALE_HEADER
from sidecar.proxy.recorder import Recorder
from sidecar.proxy.headers import response_headers
from sidecar.proxy.stream import read_small, relay, store_whole
from sidecar.stats.window import Outcome
from sidecar.upstreams import Upstream, UpstreamResponse

log = logging.getLogger("sidecar.proxy")

METHODS: Final = frozenset({"GET", "HEAD"})
RETRY_AFTER_S: Final = "5"


@dataclass(slots=True)
class Attempts:
    """What happened along one request's route, for the final answer."""

    status: int = 0
    message: str = ""
    not_found_from: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: bool = False


class ProxyHandler:
    def __init__(
        self,
        upstreams: dict[str, Upstream],
        plan: Callable[[], Plan],
        recorder: Recorder,
        cache: ModuleCache | None,
        reject_status: int,
    ) -> None:
        self.upstreams = upstreams
        self.plan = plan
        self.recorder = recorder
        self.cache = cache
        self.reject_status = reject_status

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        raw = request.raw_path
        cut = raw.find("?")
        try:
            req = parse_request_path(raw if cut < 0 else raw[:cut])
        except RequestError as exc:
            self.recorder.counter(self.recorder.metrics.invalid_requests, str(exc.status))()
            return text_response(exc.status, exc.message)
        if request.method not in METHODS:
            return text_response(405, "method not allowed", {"Allow": "GET, HEAD"})
        response, source, outcome = await self._serve(request, req)
        self.recorder.answered(source, req.kind.value, outcome, time.perf_counter() - started)
        return response

    async def _serve(
        self, request: web.Request, req: GoproxyRequest
    ) -> tuple[web.StreamResponse, str, str]:
        cache = self.cache
        if cache is not None and req.immutable:
            entry = cache.lookup(req, allow_stale=False)
            if entry is not None and await cache.verify(entry):
                return self._from_cache(req, entry), "cache", "hit"
        attempts = Attempts()
        for target in self.plan().upstreams:
            answer = await self._try_target(request, req, target, attempts)
            if answer is not None:
                return answer
        return self._exhausted(req, attempts)

    async def _try_target(
        self, request: web.Request, req: GoproxyRequest, target: UpstreamPlan, attempts: Attempts
    ) -> tuple[web.StreamResponse, str, str] | None:
        action = target.action
        if target.state is State.HALF_OPEN and target.breaker.try_acquire_probe():
            return await self._probe(request, req, target, attempts)
        if action is Action.REJECT:
            return self._reject(target), target.name, "rejected"
        if action is Action.REROUTE:
            attempts.skipped.append(f"{target.name}: rerouted ({target.breaker.reason})")
            return None
        if action is Action.CACHE:
            return self._cache_action(req, target, attempts)
        try:
            return await self._fetch(request, req, self.upstreams[target.name], attempts)
        except UpstreamError:
            return None

    async def _probe(
        self, request: web.Request, req: GoproxyRequest, target: UpstreamPlan, attempts: Attempts
    ) -> tuple[web.StreamResponse, str, str] | None:
        """A half-open breaker lets this request through as one of its probes."""
        breaker = target.breaker
        period = breaker.probe_period
        try:
            answer = await self._fetch(request, req, self.upstreams[target.name], attempts)
        except UpstreamError as exc:
            self.recorder.counter(self.recorder.metrics.probes, target.name, "client", "failed")()
            breaker.release_probe(False, exc.message, period=period)
            return None
        except BaseException:
            breaker.cancel_probe(period=period)  # the client left: no verdict
            raise
        self.recorder.counter(self.recorder.metrics.probes, target.name, "client", "ok")()
        breaker.release_probe(True, period=period)
        return answer

    async def _fetch(
        self, request: web.Request, req: GoproxyRequest, upstream: Upstream, attempts: Attempts
    ) -> tuple[web.StreamResponse, str, str] | None:
        """One upstream attempt. None means "go on"; UpstreamError means it failed."""
        try:
            resp = await upstream.open(req.path, request.method)
        except UpstreamError as exc:
            self._failed(upstream.name, exc, None, attempts)
            raise
        if resp.status != 200:
            text = await resp.read_text()
            resp.release()
            self.recorder.attempt(upstream.name, Outcome.NOT_FOUND, resp.ttfb, "not_found")
            attempts.status, attempts.message = resp.status, text or "not found"
            attempts.not_found_from.append(upstream.name)
            return None
        for name in attempts.not_found_from:
            self.recorder.masked(name)
        return await self._stream(request, req, resp, attempts)

    async def _stream(
        self, request: web.Request, req: GoproxyRequest, resp: UpstreamResponse, attempts: Attempts
    ) -> tuple[web.StreamResponse, str, str]:
        name = resp.upstream.name
        fill = None
        if self.cache is not None and request.method == "GET":
            fill = self.cache.begin_fill(
                req, resp.content_length, resp.headers.get("Content-Type", ""))
        try:
            body = await read_small(resp) if request.method == "GET" else None
            if body is not None:
                response: web.StreamResponse = web.Response(
                    body=body, headers=response_headers(resp.headers, name))
                outcome = "ok"
                await store_whole(fill, body)
            else:
                response, outcome = await relay(request, resp, fill)
        except UpstreamError as exc:
            if fill is not None:
                fill.abort()
            resp.release(reuse=False)
            self._failed(name, exc, resp.ttfb, attempts)
            raise
        self.recorder.attempt(name, Outcome.OK, resp.ttfb, "ok")
        return response, name, outcome

    def _failed(
        self, name: str, exc: UpstreamError, ttfb: float | None, attempts: Attempts
    ) -> None:
        timeout = isinstance(exc, UpstreamTimeout)
        self.recorder.attempt(name, Outcome.TIMEOUT if timeout else Outcome.ERROR, ttfb,
                              exc.failure)
        log.warning("upstream failure", extra={"upstream": name, "failure": exc.failure,
                                                "status": exc.status, "error": exc.message})
        attempts.status = 504 if timeout else 502
        attempts.message = str(exc)
        attempts.failed = True

    def _cache_action(
        self, req: GoproxyRequest, target: UpstreamPlan, attempts: Attempts
    ) -> tuple[web.StreamResponse, str, str] | None:
        entry = self.cache.lookup(req, allow_stale=True) if self.cache is not None else None
        if entry is None:
            attempts.skipped.append(f"{target.name}: cache miss ({target.breaker.reason})")
            return None
        return self._from_cache(req, entry), "cache", "stale" if entry.stale else "hit"

    def _from_cache(self, req: GoproxyRequest, entry: CachedEntry) -> web.StreamResponse:
        headers = {"Content-Type": entry.content_type, SOURCE_HEADER: "cache"}
        if entry.stale:
            headers[STALE_HEADER] = "1"
        self.recorder.counter(self.recorder.metrics.cache_hits, req.kind.value)()
        return web.FileResponse(entry.path, headers=headers)

    def _reject(self, target: UpstreamPlan) -> web.StreamResponse:
        self.recorder.counter(self.recorder.metrics.rejected_requests, target.name, "policy")()
        return text_response(
            self.reject_status, f"goproxy-sidecar: {target.name} is shedding load: "
            f"{target.breaker.reason}", {"Retry-After": RETRY_AFTER_S})

    def _exhausted(
        self, req: GoproxyRequest, attempts: Attempts
    ) -> tuple[web.StreamResponse, str, str]:
        if attempts.failed and self.cache is not None:
            entry = self.cache.lookup(req, allow_stale=True)
            if entry is not None:
                self.recorder.counter(self.recorder.metrics.cache_stale_serves, req.kind.value)()
                return self._from_cache(req, entry), "cache", "stale"
        if attempts.status:
            outcome = "not_found" if attempts.status in (404, 410) else "failed"
            return text_response(attempts.status, attempts.message), "sidecar", outcome
        self.recorder.counter(self.recorder.metrics.rejected_requests, "", "no_target")()
        why = "; ".join(attempts.skipped) or "no upstream configured"
        return (text_response(503, f"goproxy-sidecar: no target can serve: {why}",
                              {"Retry-After": RETRY_AFTER_S}), "sidecar", "unavailable")


def text_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """A short plain-text body the go command prints after the status."""
    return web.Response(status=status, text=message.strip() + "\n", content_type="text/plain",
                        charset="utf-8", headers=headers)

