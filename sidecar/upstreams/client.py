"""One upstream GOPROXY server behind its own bounded keep-alive pool.

``Upstream.open`` returns once response headers arrived (that is the TTFB the
breaker sees) and translates every aiohttp/OS failure into the UpstreamError
tree, so the proxy above never sees a library exception.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Final

import aiohttp
from multidict import CIMultiDictProxy

from sidecar.config import UpstreamConfig
from sidecar.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
    UpstreamTruncated,
)
from sidecar.upstreams.auth import OutboundProxy, basic_auth_for, outbound_proxy_for

log = logging.getLogger("sidecar.upstream")

NOT_FOUND_STATUSES: Final = frozenset({404, 410})
AUTH_STATUSES: Final = frozenset({401, 407})
ERROR_BODY_LIMIT: Final = 1024
# Identity keeps Content-Length meaningful for truncation checks and makes
# cached bytes independent of what a client negotiated.
REQUEST_HEADERS: Final = {"Accept-Encoding": "identity", "User-Agent": "goproxy-sidecar"}


class UpstreamResponse:
    """Headers of an answer; the body is read with ``chunks`` then ``release``."""

    __slots__ = ("_released", "_resp", "content_length", "headers", "status", "ttfb", "upstream")

    def __init__(self, upstream: Upstream, resp: aiohttp.ClientResponse, ttfb: float) -> None:
        self.upstream = upstream
        self.status = resp.status
        self.headers: CIMultiDictProxy[str] = resp.headers
        self.content_length = resp.content_length
        self.ttfb = ttfb
        self._resp = resp
        self._released = False

    async def chunks(self) -> AsyncIterator[bytes]:
        """Whatever is buffered, as it arrives; raises on a short or stalled body."""
        received = 0
        name = self.upstream.name
        try:
            async for chunk in self._resp.content.iter_any():
                received += len(chunk)
                yield chunk
        except (aiohttp.ServerTimeoutError, TimeoutError) as exc:
            raise UpstreamTimeout(name, "idle timeout while reading the body") from exc
        except aiohttp.ClientPayloadError as exc:
            raise UpstreamTruncated(name, f"body ended after {received} bytes") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamConnectError(name, f"connection lost: {type(exc).__name__}") from exc
        if self.content_length is not None and received < self.content_length:
            raise UpstreamTruncated(
                name, f"body ended after {received} of {self.content_length} bytes")

    async def read_text(self, limit: int = ERROR_BODY_LIMIT) -> str:
        """A short prefix of the body, for error messages."""
        try:
            data = await self._resp.content.read(limit)
        except (aiohttp.ClientError, OSError, TimeoutError):
            return ""
        return data.decode("utf-8", "replace").strip()

    def release(self, reuse: bool = True) -> None:
        """Give the connection back (or close it when the body was not read)."""
        if self._released:
            return
        self._released = True
        if reuse:
            self._resp.release()
        else:
            self._resp.close()
        self.upstream._done()


class Upstream:
    """A configured upstream: its pool, timeouts, credentials and live load."""

    def __init__(self, cfg: UpstreamConfig, role: str) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.role = role
        self.limit = cfg.pool.max_connections
        self.active = 0
        self.peak = 0
        self._base = cfg.url
        self._proxy: OutboundProxy | None = outbound_proxy_for(cfg.url)
        self._headers = dict(REQUEST_HEADERS)
        authorization = basic_auth_for(cfg)
        if authorization is not None:
            self._headers["Authorization"] = authorization
        self._auth_warned = False
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.limit, keepalive_timeout=self.cfg.timeouts.idle, ttl_dns_cache=60)
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.cfg.timeouts.connect, sock_read=self.cfg.timeouts.idle)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False, trust_env=False,
            skip_auto_headers=("Accept-Encoding", "User-Agent"), raise_for_status=False)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def in_use(self) -> int:
        return min(self.active, self.limit)

    @property
    def waiting(self) -> int:
        return max(0, self.active - self.limit)

    @property
    def saturation(self) -> float:
        return self.active / self.limit

    def take_peak(self) -> int:
        """Peak concurrent requests since the last call (the control loop's tick)."""
        peak, self.peak = self.peak, self.active
        return peak

    def _done(self) -> None:
        self.active -= 1

    async def open(self, path: str, method: str = "GET") -> UpstreamResponse:
        """Send the request; return at response headers or raise UpstreamError.

        200, 404 and 410 come back as responses; every other status is a
        failure, raised after its (short) body was read for the message.
        """
        assert self._session is not None, "Upstream.start() was not awaited"
        self.active += 1
        if self.active > self.peak:
            self.peak = self.active
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.cfg.timeouts.first_byte):
                resp = await self._session.request(
                    method, f"{self._base}/{path}", headers=self._headers,
                    allow_redirects=False,
                    proxy=self._proxy.url if self._proxy else None,
                    proxy_headers=self._proxy.headers if self._proxy else None)
        except asyncio.CancelledError:
            self.active -= 1
            raise
        except Exception as exc:
            self.active -= 1
            raise self._translate(exc, time.perf_counter() - started) from exc
        answer = UpstreamResponse(self, resp, time.perf_counter() - started)
        if answer.status == 200 or answer.status in NOT_FOUND_STATUSES:
            return answer
        await self._raise_status(answer)
        raise AssertionError("unreachable")

    async def _raise_status(self, answer: UpstreamResponse) -> None:
        text = await answer.read_text(200)
        answer.release(reuse=False)
        if answer.status in AUTH_STATUSES:
            self._warn_auth(answer.status)
        raise UpstreamStatusError(
            self.name, f"status {answer.status}" + (f": {text}" if text else ""), answer.status)

    def _warn_auth(self, status: int) -> None:
        if self._auth_warned:
            return
        self._auth_warned = True
        hint = ("check auth.basic env vars or ~/.netrc for this upstream" if status == 401
                else "check the user:password in HTTPS_PROXY/HTTP_PROXY")
        log.warning("upstream refused credentials",
                    extra={"upstream": self.name, "status": status, "hint": hint})

    def _translate(self, exc: Exception, elapsed: float) -> UpstreamError:
        if isinstance(exc, aiohttp.ClientHttpProxyError):
            if exc.status == 407:
                self._warn_auth(407)
            return UpstreamStatusError(self.name, f"outbound proxy answered {exc.status}",
                                       exc.status)
        if isinstance(exc, aiohttp.ServerTimeoutError | TimeoutError):
            what = "connect" if isinstance(exc, aiohttp.ConnectionTimeoutError) else "first byte"
            return UpstreamTimeout(self.name, f"{what} timeout after {elapsed:.2f}s")
        if isinstance(exc, aiohttp.ClientSSLError):
            return UpstreamConnectError(self.name, "TLS error")
        if isinstance(exc, aiohttp.ClientError | OSError):
            return UpstreamConnectError(self.name, _describe(exc))
        return UpstreamConnectError(self.name, type(exc).__name__)


def _describe(exc: BaseException) -> str:
    """A short cause without the URL (which may carry credentials)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or type(exc.os_error).__name__}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server disconnected"
    return type(exc).__name__
