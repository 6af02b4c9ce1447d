"""One upstream GOPROXY server behind its own bounded keep-alive pool.

``Upstream.open`` returns once response headers arrived (that is the TTFB the
breaker sees) and raises only the UpstreamError tree, so the proxy above
never sees a library exception. The HTTP is ``sender.Sender``'s, an
HTTP/1.1 keep-alive client on asyncio transports, straight or through an
outbound HTTP(S)_PROXY (``route``).

What an upstream answers is trusted only when it is framed exactly
(``http1``), and only as identity: the request asks for
``Accept-Encoding: identity``, and a 200 with any other Content-Encoding is
refused (UpstreamProtocolError). Passing it on would need its header kept
and every byte-level rule (Content-Length, ranges, the checksum database's
hash of a zip, the cache's SHA-256) to be about encoded bytes; relabelling
it would serve and cache compressed bytes as the artifact.

Redirects. The go command follows redirects from a GOPROXY (up to 10,
never from https to http), and real servers send them: Athens' download
mode ``redirect`` answers 301 to another proxy, Artifactory-style stores
answer 302 to signed storage URLs. So GET/HEAD follow up to
``MAX_REDIRECTS`` hops, on the pool for the upstream's own origin, on a
one-shot connection elsewhere; credentials go only to the upstream's own
origin, a hop from https to http is refused, and another origin may be
reached only at a public address or one of the upstream's own address
classes (``addresses.RedirectGuard``). The whole chain shares one
first-byte deadline and its TTFB. What the chain ends with is the
upstream's answer, cached by the same rules as if it had sent it itself:
a refused hop is the upstream's failure, and nothing from it is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from time import monotonic
from typing import Final
from urllib.parse import urljoin, urlsplit

from sidecar.config import UpstreamConfig
from sidecar.errors import (
    ConfigError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from sidecar.stats.inflight import Ending, InFlight
from sidecar.upstreams.admission import Admission
from sidecar.upstreams.auth import basic_auth_for, route_for
from sidecar.upstreams.connect import AddressRefused, Connector, Resolver
from sidecar.upstreams.response import ERROR_BODY_LIMIT, UpstreamResponse, encoded
from sidecar.upstreams.sender import Sender

log = logging.getLogger("sidecar.upstream")

NOT_FOUND_STATUSES: Final = frozenset({404, 410})
AUTH_STATUSES: Final = frozenset({401, 407})
REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS: Final = 3
# Read once: an enum member read through its class runs EnumType's
# __getattr__ hook on Python 3.11 (~1 k instructions), on every answer.
_ANSWERED: Final = Ending.ANSWERED


class Upstream:
    """A configured upstream: its pool, timeouts, credentials and live load.

    ``active`` counts requests from ``open`` until their response is released
    (or ``open`` failed): those holding a connection and those queued for one.
    ``admission`` is the only gate on connections (the sender's own pool
    never makes a request wait): see ``sidecar.upstreams.admission``.
    ``inflight`` / ``sumdb_inflight`` register every request from admission
    to its headers, by traffic class (the app hands in its windows' own).
    """

    def __init__(self, cfg: UpstreamConfig, role: str, resolver: Resolver | None = None) -> None:
        """``resolver`` replaces the system's getaddrinfo (tests, static hosts)."""
        self.cfg = cfg
        self.name = cfg.name
        self.role = role
        pool = cfg.pool
        self.limit = pool.max_connections
        self.admission = Admission(cfg.name, pool.max_connections, pool.max_pending, pool.max_wait)
        self.active = 0
        self.peak = 0
        self.sender = Sender(
            cfg.name,
            cfg.url,
            pool.max_connections,
            cfg.timeouts,
            basic_auth_for(cfg),
            Connector(cfg.name, resolver),
        )
        self._first_byte = cfg.timeouts.first_byte
        self._auth_warned = False
        self.inflight = InFlight()
        self.sumdb_inflight = InFlight()

    def __repr__(self) -> str:
        return f"Upstream({self.name!r}, {self.role}, client={self.sender.describe()})"

    async def start(self) -> None:
        self.sender.start()
        log.info("upstream client", extra={"upstream": self.name, "client": self.sender.describe()})

    async def close(self) -> None:
        await self.sender.close()

    @property
    def in_use(self) -> int:
        return self.admission.in_use

    @property
    def waiting(self) -> int:
        return self.admission.waiting

    @property
    def saturation(self) -> float:
        return self.active / self.limit

    def take_peak(self) -> int:
        """Peak concurrent requests since the last call (the control loop's tick)."""
        peak, self.peak = self.peak, self.active
        return peak

    def _done(self) -> None:
        self.active -= 1
        self.admission.release()

    async def open(
        self, path: str, method: str = "GET", admitted: Callable[[], object] | None = None
    ) -> UpstreamResponse:
        """Send the request; return at response headers or raise UpstreamError.

        200, 404 and 410 come back as responses; every other status is a
        failure, raised after its (short) body was read for the message.
        UpstreamBusy: no connection within ``pool.max_wait`` (or the pending
        queue was full); nothing was sent.

        TTFB runs from the moment the request is written on a connection
        (``UpstreamResponse.written``) to its response headers: neither the
        sidecar's own queue nor connecting reads as a slow upstream (a slow
        connect is bounded by ``timeouts.connect``). A redirect chain's TTFB
        starts at its first request. The first-byte deadline starts at
        admission; so does ``admitted``, called then (a hedge's delay).
        """
        active = self.active = self.active + 1
        if active > self.peak:
            self.peak = active
        admission = self.admission
        if not admission.try_acquire():
            try:
                await admission.acquire()
            except BaseException:
                self.active -= 1
                raise
        if admitted is not None:
            admitted()
        started = monotonic()
        deadline = started + self._first_byte
        waits = self.sumdb_inflight if path.startswith("sumdb/") else self.inflight
        token = waits.begin()
        try:
            answer = await self.sender.send(self, method, path, deadline)
            written = answer.written
            if answer.status in REDIRECT_STATUSES:
                answer = await self._follow(answer, method, path, deadline)
        except BaseException as exc:
            waits.end(token, _ending(exc))
            self.active -= 1
            admission.release()
            if isinstance(exc, UpstreamStatusError) and exc.status in AUTH_STATUSES:
                self._warn_auth(exc.status)
            raise
        answer.ttfb = monotonic() - written
        waits.end(token, _ANSWERED)
        answer._counted = True
        status = answer.status
        if status == 200:
            if encoded(answer.headers) is not None:
                self._refuse_encoding(answer)
            return answer
        if status in NOT_FOUND_STATUSES:
            return answer
        await self._raise_status(answer)
        raise AssertionError("unreachable")

    def _refuse_encoding(self, answer: UpstreamResponse) -> None:
        """A 200 in an encoding the sidecar did not ask for (see the module docstring)."""
        answer.release(reuse=False)
        raise UpstreamProtocolError(
            self.name, f"Content-Encoding {encoded(answer.headers)!r} refused (asked for identity)"
        )

    async def _follow(
        self, answer: UpstreamResponse, method: str, path: str, deadline: float
    ) -> UpstreamResponse:
        """Follow redirects; the final answer (any status) is returned."""
        url = f"{self.cfg.url}/{path}"
        for _ in range(MAX_REDIRECTS):
            location = answer.headers.get("Location")
            if not location:
                return answer  # a 3xx without a target: a failure status
            target = urljoin(url, location)
            await answer.read_text(ERROR_BODY_LIMIT)  # small HTML; lets the connection be reused
            answer.release(reuse=True)
            status = answer.status
            scheme = urlsplit(target).scheme.lower()
            if scheme not in ("http", "https") or (url.startswith("https:") and scheme != "https"):
                raise self._refused(status, "redirect to a non-https URL refused")
            try:
                route = route_for(target)
            except (ValueError, ConfigError) as exc:
                raise self._refused(status, f"redirect to an unusable URL refused: {exc}") from None
            try:
                answer = await self.sender.send_url(self, method, target, route, deadline)
            except AddressRefused as exc:
                raise self._refused(status, exc.message) from None
            if answer.status not in REDIRECT_STATUSES:
                return answer
            url = target
        answer.release(reuse=False)
        raise self._refused(answer.status, f"more than {MAX_REDIRECTS} redirects")

    def _refused(self, status: int, why: str) -> UpstreamStatusError:
        return UpstreamStatusError(self.name, f"status {status}: {why}", status)

    async def _raise_status(self, answer: UpstreamResponse) -> None:
        text = await answer.read_text(200)
        answer.release(reuse=True)  # pooled again only if the body was read to its end
        if answer.status in AUTH_STATUSES:
            self._warn_auth(answer.status)
        raise UpstreamStatusError(
            self.name, f"status {answer.status}" + (f": {text}" if text else ""), answer.status
        )

    def _warn_auth(self, status: int) -> None:
        if self._auth_warned:
            return
        self._auth_warned = True
        hint = (
            "check auth.basic env vars or ~/.netrc for this upstream"
            if status == 401
            else "check the user:password in HTTPS_PROXY/HTTP_PROXY"
        )
        log.warning(
            "upstream refused credentials",
            extra={"upstream": self.name, "status": status, "hint": hint},
        )


def _ending(exc: BaseException) -> Ending:
    """How a failed wait ended: a refusal or a reset is an answer (the upstream
    is not silent), a timeout is not, and a caller that left gives no verdict."""
    if isinstance(exc, UpstreamTimeout):
        return Ending.TIMED_OUT
    return Ending.ANSWERED if isinstance(exc, UpstreamError) else Ending.ABANDONED
