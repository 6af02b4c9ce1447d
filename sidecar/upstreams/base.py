"""What every upstream client (backend) provides, and the response the proxy reads.

Two backends implement ``Backend``:

- ``direct.DirectBackend``: a lean HTTP/1.1 keep-alive client on asyncio
  transports (``http1.Connection`` + ``pool.Pool``), for plain http and https
  upstreams. The default.
- ``fallback.AiohttpBackend``: aiohttp's ClientSession, for upstreams reached
  through an outbound HTTP(S)_PROXY, and for everything when the operator
  sets the escape hatch (``sidecar.upstreams.client.CLIENT_ENV``).

Both hand back an ``UpstreamResponse`` at response headers and raise only the
UpstreamError tree; ``client.Upstream`` adds the accounting, the status
classification and redirects on top, the same for both.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Final

from multidict import CIMultiDictProxy

if TYPE_CHECKING:
    from sidecar.upstreams.client import Upstream

ERROR_BODY_LIMIT: Final = 1024
USER_AGENT: Final = "goproxy-sidecar"


class UpstreamResponse(abc.ABC):
    """Headers of an answer; the body is read with ``chunks`` then ``release``.

    ``release`` must be called exactly once per response (more calls are
    no-ops): it frees the pool slot and the request's ``Upstream.active``.
    ``headers`` is a case-insensitive mapping (``CIMultiDictProxy``).
    """

    __slots__ = ("_counted", "_released", "content_length", "headers", "status", "ttfb", "upstream")

    def __init__(
        self,
        upstream: Upstream,
        status: int,
        headers: CIMultiDictProxy[str],
        content_length: int | None,
    ) -> None:
        self.upstream = upstream
        self.status = status
        self.headers = headers
        self.content_length = content_length
        self.ttfb = 0.0
        self._released = False
        # Set by Upstream.open when it hands the answer out (it is then part of
        # ``Upstream.active``); a followed redirect's answer never is.
        self._counted = False

    @abc.abstractmethod
    def chunks(self) -> AsyncIterator[bytes]:
        """Whatever is buffered, as it arrives; raises on a short or stalled body.

        UpstreamTruncated: the body ended before its Content-Length (or last
        chunk); UpstreamTimeout: nothing arrived for ``timeouts.idle``.
        """

    @abc.abstractmethod
    async def read_text(self, limit: int = ERROR_BODY_LIMIT) -> str:
        """A short prefix of the body, for error messages ("" if it cannot be read)."""

    @abc.abstractmethod
    def _finish(self, reuse: bool) -> None:
        """Give the connection back (reuse) or close it; no accounting."""

    def release(self, reuse: bool = True) -> None:
        """Give the connection back, or close it when ``reuse`` is False or the
        body was not read to its end. Idempotent."""
        if self._released:
            return
        self._released = True
        self._finish(reuse)
        if self._counted:
            self.upstream._done()

    def __del__(self) -> None:
        # A caller that lost a response without releasing it would leak a pool
        # slot and inflate ``active`` (which feeds the saturation breaker).
        if not self._released:
            with contextlib.suppress(Exception):  # interpreter shutdown, closed loop
                self.release(reuse=False)


class Backend(abc.ABC):
    """Sends one request to one upstream and returns at response headers."""

    name: str

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    def send(
        self, upstream: Upstream, method: str, path: str, deadline: float
    ) -> Awaitable[UpstreamResponse]:
        """``method`` the upstream's ``<base path>/<path>``; ``deadline``
        (time.monotonic) bounds pool wait, connect and headers. (May be a
        plain function returning the awaitable: a coroutine frame less.)"""

    @abc.abstractmethod
    async def send_url(
        self, upstream: Upstream, method: str, url: str, deadline: float
    ) -> UpstreamResponse:
        """``method`` an absolute URL (a redirect target). Credentials go only
        to the upstream's own origin."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Which client this is, for logs (never a credential)."""
