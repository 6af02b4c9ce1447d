"""Relaying one upstream body to the client, teeing it into the cache.

Backpressure comes for free: ``write`` waits while the client's socket is
full, and the upstream is not read meanwhile. A client that hangs up is not
an upstream failure: the upstream connection is dropped and nothing cached.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.client_exceptions import ClientConnectionResetError

from sidecar.cache.base import CacheFill
from sidecar.errors import CacheError, UpstreamError
from sidecar.proxy.headers import response_headers
from sidecar.upstreams import UpstreamResponse

CLIENT_GONE = (ConnectionResetError, ClientConnectionResetError, BrokenPipeError)
# Bodies up to this size (.info, .mod, lists, sumdb answers) are read whole
# before the client sees a byte: a truncated one can still fall through to
# the next upstream, and one write is cheaper than a streamed response.
BUFFER_LIMIT = 256 * 1024


async def read_small(resp: UpstreamResponse) -> bytes | None:
    """The whole body if it is small and announced; None to stream it instead."""
    length = resp.content_length
    if length is None or length > BUFFER_LIMIT:
        return None
    parts = [chunk async for chunk in resp.chunks()]
    resp.release()
    return b"".join(parts)


async def relay(
    request: web.Request, resp: UpstreamResponse, fill: CacheFill | None
) -> tuple[web.StreamResponse, str]:
    """Stream ``resp`` to the client. Returns the response and an outcome label."""
    response = web.StreamResponse(headers=response_headers(resp.headers, resp.upstream.name))
    if resp.content_length is not None:
        response.content_length = resp.content_length
    try:
        await response.prepare(request)
        if request.method == "HEAD":
            resp.release(reuse=False)
            return response, "ok"
        await _pump(response, resp, fill)
        await response.write_eof()
    except CLIENT_GONE:
        _give_up(resp, fill)
        return response, "client_abort"
    except UpstreamError:
        _give_up(resp, fill)
        # Headers are gone already; the only honest signal left is a cut
        # connection, so the client sees a short body, never a complete one.
        if request.transport is not None:
            request.transport.abort()
        raise
    except BaseException:
        _give_up(resp, fill)
        raise
    resp.release()
    return response, "ok"


async def _pump(response: web.StreamResponse, resp: UpstreamResponse, fill: CacheFill | None) -> None:
    async for chunk in resp.chunks():
        if fill is not None:
            fill = await _tee(fill, chunk)
        await response.write(chunk)
    if fill is not None:
        try:
            await fill.commit()
        except CacheError:
            pass  # the store counted and logged it; the client got its bytes


async def store_whole(fill: CacheFill | None, body: bytes) -> None:
    """Cache a body that was read whole; a cache error only loses the entry."""
    if fill is None:
        return
    try:
        await fill.write(body)
        await fill.commit()
    except CacheError:
        fill.abort()


async def _tee(fill: CacheFill, chunk: bytes) -> CacheFill | None:
    try:
        await fill.write(chunk)
    except CacheError:
        fill.abort()
        return None
    return fill


def _give_up(resp: UpstreamResponse, fill: CacheFill | None) -> None:
    if fill is not None:
        fill.abort()
    resp.release(reuse=False)
