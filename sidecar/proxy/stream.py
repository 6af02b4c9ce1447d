"""Delivering a body to the client: relayed, read from a fill, or sent from a file.

Backpressure comes for free: ``write`` waits while the client's socket is
full. A client that hangs up is not an upstream failure. Once headers are
sent, the only honest signal of a failed body is a cut connection, so the
client sees a short body, never a complete one.
"""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.client_exceptions import ClientConnectionResetError
from aiohttp.web_fileresponse import _FileResponseResult
from multidict import CIMultiDict

from sidecar.cache.base import FillReader
from sidecar.cache.layout import describe
from sidecar.errors import CacheIntegrityError, UpstreamError
from sidecar.proxy.headers import response_headers
from sidecar.upstreams import UpstreamResponse

if TYPE_CHECKING:
    from aiohttp.web_request import BaseRequest

CLIENT_GONE = (ConnectionResetError, ClientConnectionResetError, BrokenPipeError)
# Bodies up to this size (.info, .mod, lists, sumdb answers) are read whole
# before the client sees a byte: a truncated one can still fall through to
# the next upstream, and one write is cheaper than a streamed response.
BUFFER_LIMIT = 256 * 1024
FILE_CHUNK = 256 * 1024  # read size when sendfile is not available (uvloop)


async def read_small(resp: UpstreamResponse) -> bytes | None:
    """The whole body if it is small and announced; None to stream it instead."""
    length = resp.content_length
    if length is None or length > BUFFER_LIMIT:
        return None
    parts = [chunk async for chunk in resp.chunks()]
    resp.release()
    return b"".join(parts)


def is_small(content_length: int | None) -> bool:
    return content_length is not None and content_length <= BUFFER_LIMIT


async def relay(request: web.Request, resp: UpstreamResponse) -> tuple[web.StreamResponse, str]:
    """Stream ``resp`` to the client. Returns the response and an outcome label."""
    response = web.StreamResponse(headers=response_headers(resp.headers, resp.upstream.name))
    if resp.content_length is not None:
        response.content_length = resp.content_length
    try:
        await response.prepare(request)
        if request.method == "HEAD":
            resp.release(reuse=False)
            return response, "ok"
        async for chunk in resp.chunks():
            await response.write(chunk)
        await response.write_eof()
    except CLIENT_GONE:
        resp.release(reuse=False)
        return response, "client_abort"
    except UpstreamError:
        resp.release(reuse=False)
        _cut(request)
        raise
    except BaseException:
        resp.release(reuse=False)
        raise
    resp.release()
    return response, "ok"


async def deliver(
    request: web.Request,
    reader: FillReader,
    headers: CIMultiDict[str],
    content_length: int | None,
) -> tuple[web.StreamResponse, str, UpstreamError | None]:
    """Stream a fill to one client as its bytes arrive: (response, outcome, failure)."""
    response = web.StreamResponse(headers=headers)
    if content_length is not None:
        response.content_length = content_length
    try:
        await response.prepare(request)
        while (chunk := await reader.next_chunk()) is not None:
            await response.write(chunk)
        await response.write_eof()
    except CLIENT_GONE:
        return response, "client_abort", None
    except UpstreamError as exc:
        _cut(request)
        return response, "failed", exc
    return response, "ok", None


def _cut(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


class EntryResponse(web.FileResponse):
    """A cache hit: the entry's blob with sendfile, and two guards.

    Both guards raise CacheIntegrityError before a byte is sent, so the
    handler can evict the entry and fetch it again instead of answering
    404/403 (what FileResponse does for a missing file) or sending a body of
    the wrong length. They override private FileResponse methods (aiohttp
    3.14); tests/functional/test_cache_integrity.py fails if that breaks.
    The handler prepares the response itself, so ``prepare`` must be
    idempotent when aiohttp calls it again after the handler returns.
    """

    def __init__(self, path: str, size: int, headers: dict[str, str]) -> None:
        super().__init__(path, chunk_size=FILE_CHUNK, headers=headers)
        self._expected_size = size

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return None
        return await super().prepare(request)

    def _make_response(
        self, request: BaseRequest, accept_encoding: str
    ) -> tuple[_FileResponseResult, io.BufferedReader | None, os.stat_result, str | None]:
        try:
            # "": never look for pre-compressed .gz/.br siblings (one stat saved per hit).
            return super()._make_response(request, "")
        except OSError as exc:
            raise CacheIntegrityError(f"cannot open cached file: {describe(exc)}") from exc

    async def _prepare_open_file(
        self,
        request: BaseRequest,
        fobj: io.BufferedReader,
        st: os.stat_result,
        file_encoding: str | None,
    ) -> AbstractStreamWriter | None:
        if st.st_size != self._expected_size:
            raise CacheIntegrityError(
                f"cached file has {st.st_size} bytes, recorded {self._expected_size}"
            )
        return await super()._prepare_open_file(request, fobj, st, file_encoding)
