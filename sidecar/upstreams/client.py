"""One upstream GOPROXY server behind its own bounded keep-alive pool.

``Upstream.open`` returns once response headers arrived (that is the TTFB the
breaker sees) and raises only the UpstreamError tree, so the proxy above
never sees a library exception. Which client does the HTTP is a backend
(``base.Backend``):

- direct http/https upstreams use ``direct.DirectBackend``, a lean HTTP/1.1
  keep-alive client on asyncio transports (about 40 % of a bare aiohttp
  proxy's CPU per small request was aiohttp's client path);
- an upstream reached through an outbound HTTP(S)_PROXY uses
  ``fallback.AiohttpBackend`` (aiohttp);
- ``GOPROXY_SIDECAR_UPSTREAM_CLIENT=aiohttp`` in the environment puts every
  upstream on aiohttp: the operator's escape hatch if the direct client
  misbehaves with some server (``http1``, the default, is the other value).
  The name is not ``SIDECAR_...``: that prefix is reserved for configuration
  overrides, and the config loader refuses unknown ``SIDECAR_*`` variables.

Redirects. The go command follows redirects from a GOPROXY (up to 10,
never from https to http), and real servers send them: Athens' download
mode ``redirect`` answers 301 to another proxy, Artifactory-style stores
answer 302 to signed storage URLs. So GET/HEAD follow up to
``MAX_REDIRECTS`` hops, on the pool for the upstream's own origin, on a
one-shot connection elsewhere; credentials go only to the upstream's own
origin, and a hop from https to http is refused. The whole chain shares one
first-byte deadline and its TTFB.
"""

from __future__ import annotations

import logging
import os
from time import monotonic
from typing import Final
from urllib.parse import urljoin, urlsplit

from sidecar.config import UpstreamConfig
from sidecar.errors import ConfigError, UpstreamStatusError
from sidecar.upstreams.admission import Admission
from sidecar.upstreams.auth import basic_auth_for, outbound_proxy_for
from sidecar.upstreams.base import ERROR_BODY_LIMIT, Backend, UpstreamResponse
from sidecar.upstreams.direct import DirectBackend
from sidecar.upstreams.fallback import AiohttpBackend

log = logging.getLogger("sidecar.upstream")

CLIENT_ENV: Final = "GOPROXY_SIDECAR_UPSTREAM_CLIENT"
CLIENTS: Final = ("http1", "aiohttp")
NOT_FOUND_STATUSES: Final = frozenset({404, 410})
AUTH_STATUSES: Final = frozenset({401, 407})
REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS: Final = 3


def client_choice(env: dict[str, str] | os._Environ[str] | None = None) -> str:
    """``http1`` or ``aiohttp`` from CLIENT_ENV; ConfigError names the variable."""
    value = (os.environ if env is None else env).get(CLIENT_ENV, "").strip().lower() or "http1"
    if value not in CLIENTS:
        raise ConfigError(CLIENT_ENV, f"expected one of {', '.join(CLIENTS)}, got {value!r}")
    return value


def make_backend(cfg: UpstreamConfig, choice: str | None = None) -> Backend:
    authorization = basic_auth_for(cfg)
    proxy = outbound_proxy_for(cfg.url)
    limit = cfg.pool.max_connections
    if proxy is not None or (choice or client_choice()) == "aiohttp":
        return AiohttpBackend(cfg.name, cfg.url, limit, cfg.timeouts, authorization, proxy)
    return DirectBackend(cfg.name, cfg.url, limit, cfg.timeouts, authorization)


class Upstream:
    """A configured upstream: its pool, timeouts, credentials and live load.

    ``active`` counts requests from ``open`` until their response is released
    (or ``open`` failed): those holding a connection and those queued for one.
    ``admission`` is the only gate on connections (the backend's own pool
    never makes a request wait): see ``sidecar.upstreams.admission``.
    """

    def __init__(self, cfg: UpstreamConfig, role: str, backend: Backend | None = None) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.role = role
        pool = cfg.pool
        self.limit = pool.max_connections
        self.admission = Admission(cfg.name, pool.max_connections, pool.max_pending, pool.max_wait)
        self.active = 0
        self.peak = 0
        self.backend = backend if backend is not None else make_backend(cfg)
        self._first_byte = cfg.timeouts.first_byte
        self._auth_warned = False

    def __repr__(self) -> str:
        return f"Upstream({self.name!r}, {self.role}, client={self.backend.describe()})"

    async def start(self) -> None:
        await self.backend.start()
        log.info(
            "upstream client", extra={"upstream": self.name, "client": self.backend.describe()}
        )

    async def close(self) -> None:
        await self.backend.close()

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

    async def open(self, path: str, method: str = "GET") -> UpstreamResponse:
        """Send the request; return at response headers or raise UpstreamError.

        200, 404 and 410 come back as responses; every other status is a
        failure, raised after its (short) body was read for the message.
        UpstreamBusy: no connection within ``pool.max_wait`` (or the pending
        queue was full); nothing was sent.

        TTFB starts once admitted, so the sidecar's own queue never reads as a
        slow upstream. (It includes connecting when no idle connection is
        kept: that is the upstream's accept latency. Starting it at "request
        written" instead needs aiohttp tracing, measured at about 30 µs of
        CPU per request.)
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
        started = monotonic()
        deadline = started + self._first_byte
        try:
            answer = await self.backend.send(self, method, path, deadline)
            if answer.status in REDIRECT_STATUSES:
                answer = await self._follow(answer, method, path, deadline)
        except BaseException as exc:
            self.active -= 1
            admission.release()
            if isinstance(exc, UpstreamStatusError) and exc.status in AUTH_STATUSES:
                self._warn_auth(exc.status)
            raise
        answer.ttfb = monotonic() - started
        answer._counted = True
        status = answer.status
        if status == 200 or status in NOT_FOUND_STATUSES:
            return answer
        await self._raise_status(answer)
        raise AssertionError("unreachable")

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
            scheme = urlsplit(target).scheme.lower()
            if scheme not in ("http", "https") or (url.startswith("https:") and scheme != "https"):
                raise UpstreamStatusError(
                    self.name,
                    f"status {answer.status}: redirect to a non-https URL refused",
                    answer.status,
                )
            answer = await self.backend.send_url(self, method, target, deadline)
            if answer.status not in REDIRECT_STATUSES:
                return answer
            url = target
        answer.release(reuse=False)
        raise UpstreamStatusError(
            self.name, f"status {answer.status}: more than {MAX_REDIRECTS} redirects", answer.status
        )

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
