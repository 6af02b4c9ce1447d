"""The aiohttp backend: outbound HTTP(S)_PROXY upstreams, and the escape hatch.

This is the sidecar's original client, kept for two jobs: upstreams reached
through a corporate proxy (CONNECT tunnels and Proxy-Authorization are
aiohttp's), and every upstream when the operator sets
``GOPROXY_SIDECAR_UPSTREAM_CLIENT=aiohttp`` (see ``client.py``). With it
the sidecar spends about twice the CPU per small request (bench/proxy_micro.py:
~110 against ~55 µs), but it has had more exposure to odd servers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

import aiohttp

from sidecar.config import TimeoutsConfig
from sidecar.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
    UpstreamTruncated,
)
from sidecar.upstreams.auth import OutboundProxy
from sidecar.upstreams.base import ERROR_BODY_LIMIT, USER_AGENT, Backend, UpstreamResponse

if TYPE_CHECKING:
    from sidecar.upstreams.client import Upstream

# Identity keeps Content-Length meaningful for truncation checks and makes
# cached bytes independent of what a client negotiated.
REQUEST_HEADERS: Final = {"Accept-Encoding": "identity", "User-Agent": USER_AGENT}


class AiohttpResponse(UpstreamResponse):
    __slots__ = ("_resp",)

    def __init__(self, upstream: Upstream, resp: aiohttp.ClientResponse) -> None:
        super().__init__(upstream, resp.status, resp.headers, resp.content_length)
        self._resp = resp

    async def chunks(self) -> AsyncIterator[bytes]:
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
        except asyncio.CancelledError:
            self.release(reuse=False)
            raise
        if self.content_length is not None and received < self.content_length:
            raise UpstreamTruncated(
                name, f"body ended after {received} of {self.content_length} bytes"
            )

    async def read_text(self, limit: int = ERROR_BODY_LIMIT) -> str:
        try:
            data = await self._resp.content.read(limit)
        except (aiohttp.ClientError, OSError, TimeoutError):
            return ""
        return data.decode("utf-8", "replace").strip()

    def _finish(self, reuse: bool) -> None:
        if reuse:
            self._resp.release()
        else:
            self._resp.close()


class AiohttpBackend(Backend):
    def __init__(
        self,
        name: str,
        url: str,
        limit: int,
        timeouts: TimeoutsConfig,
        authorization: str | None,
        proxy: OutboundProxy | None,
    ) -> None:
        self.name = name
        self._base = url
        self._limit = limit
        self._timeouts = timeouts
        self._proxy = proxy
        self._origin = _origin(url)
        self._headers = dict(REQUEST_HEADERS)
        if authorization is not None:
            self._headers["Authorization"] = authorization
        self._session: aiohttp.ClientSession | None = None

    def describe(self) -> str:
        return "aiohttp via outbound proxy" if self._proxy else "aiohttp"

    async def start(self) -> None:
        t = self._timeouts
        connector = aiohttp.TCPConnector(
            limit=self._limit, keepalive_timeout=t.idle, ttl_dns_cache=60
        )
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=t.connect, sock_read=t.idle)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            auto_decompress=False,
            trust_env=False,
            skip_auto_headers=("Accept-Encoding", "User-Agent"),
            raise_for_status=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(
        self, upstream: Upstream, method: str, path: str, deadline: float
    ) -> UpstreamResponse:
        return await self._request(
            upstream, method, f"{self._base}/{path}", self._headers, deadline
        )

    async def send_url(
        self, upstream: Upstream, method: str, url: str, deadline: float
    ) -> UpstreamResponse:
        headers = self._headers if _origin(url) == self._origin else dict(REQUEST_HEADERS)
        return await self._request(upstream, method, url, headers, deadline)

    async def _request(
        self, upstream: Upstream, method: str, url: str, headers: dict[str, str], deadline: float
    ) -> UpstreamResponse:
        assert self._session is not None, "Upstream.start() was not awaited"
        started = time.monotonic()
        try:
            async with asyncio.timeout(deadline - started):
                resp = await self._session.request(
                    method,
                    url,
                    headers=headers,
                    allow_redirects=False,
                    proxy=self._proxy.url if self._proxy else None,
                    proxy_headers=self._proxy.headers if self._proxy else None,
                )
        except Exception as exc:
            raise self._translate(exc, time.monotonic() - started) from exc
        return AiohttpResponse(upstream, resp)

    def _translate(self, exc: Exception, elapsed: float) -> UpstreamError:
        if isinstance(exc, aiohttp.ClientHttpProxyError):
            return UpstreamStatusError(
                self.name, f"outbound proxy answered {exc.status}", exc.status
            )
        if isinstance(exc, aiohttp.ServerTimeoutError | TimeoutError):
            what = "connect" if isinstance(exc, aiohttp.ConnectionTimeoutError) else "first byte"
            return UpstreamTimeout(self.name, f"{what} timeout after {elapsed:.2f}s")
        if isinstance(exc, aiohttp.ClientSSLError):
            return UpstreamConnectError(self.name, "TLS error")
        if isinstance(exc, aiohttp.ClientError | OSError):
            return UpstreamConnectError(self.name, _describe(exc))
        return UpstreamConnectError(self.name, type(exc).__name__)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return (parts.scheme, parts.hostname or "", parts.port)


def _describe(exc: BaseException) -> str:
    """A short cause without the URL (which may carry credentials)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or type(exc.os_error).__name__}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server disconnected"
    return type(exc).__name__
