"""Delivering a body to the client: relayed, read from a fill, or sent from a file.

Backpressure comes for free: ``write`` waits while the client's socket is
full. A client that hangs up is not an upstream failure. Once headers are
sent, the only honest signal of a failed body is a cut connection, so the
client sees a short body, never a complete one.

Each function notes in a ``Reply`` how much of the body it handed to the
connection, before awaiting the drain: the server cancels a handler whose
client left at whatever await it is in, often the drain after the last
byte (the go command closes surplus keep-alive connections as soon as it
has a body). The handler's accounting then reads the ``Reply``: a client
that was handed every byte is a success, not ``client_abort``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import BinaryIO

from sidecar.cache.base import FillReader
from sidecar.cache.fill import BodyFile
from sidecar.errors import UpstreamError
from sidecar.proxy.headers import response_headers
from sidecar.proxy.ranges import content_range
from sidecar.server import Exchange
from sidecar.upstreams import UpstreamResponse
from sidecar.upstreams.http1 import RawBody

CLIENT_GONE = (ConnectionResetError, BrokenPipeError)
# Bodies up to this size (.info, .mod, lists, sumdb answers) are read whole
# before the client sees a byte: a truncated one can still fall through to
# the next upstream, and one write is cheaper than a streamed response.
BUFFER_LIMIT = 256 * 1024


class Reply:
    """Who answers one request, the outcome if its body goes out whole, and how
    much of that body was handed to the connection so far."""

    __slots__ = ("length", "outcome", "sent", "source", "spliced", "whole")

    def __init__(self) -> None:
        self.source = "sidecar"  # nobody answered yet
        self.outcome = "ok"
        self.length: int | None = None  # body bytes announced; None: unknown (chunked)
        self.sent = 0
        self.whole = False  # the response is over (HEAD, chunked: its last chunk handed over)
        self.spliced = False  # relayed by splice(2), not copied through

    def answering(self, source: str, outcome: str = "ok") -> None:
        self.source, self.outcome = source, outcome

    @property
    def complete(self) -> bool:
        return self.whole or (self.length is not None and self.sent >= self.length)

    def left(self) -> tuple[str, str]:
        """The answer of a request whose handler was cancelled now."""
        return self.source, self.outcome if self.complete else "client_abort"


async def read_small(resp: UpstreamResponse) -> bytes | None:
    """The whole body if it is small and announced; None to stream it instead."""
    length = resp.content_length
    if length is None or length > BUFFER_LIMIT:
        return None
    body = resp.arrived()  # no async generator for a body that is all here
    if body is None:
        body = b"".join([chunk async for chunk in resp.chunks()])
    resp.release()
    return body


def is_small(content_length: int | None) -> bool:
    return content_length is not None and content_length <= BUFFER_LIMIT


async def relay(
    ex: Exchange, resp: UpstreamResponse, reply: Reply
) -> tuple[str, UpstreamError | None]:
    """Stream ``resp`` to the client: (outcome, failure). A body that fails
    after the headers went out cuts the connection and is returned, not
    raised: the request is answered (badly), no other upstream can take it.

    Between two plain TCP sockets a Content-Length body is spliced: what has
    arrived is written, the rest goes from the upstream's socket to the
    client's through a pipe, moved by the kernel (half the CPU of nginx's
    plain proxy per byte, sidecar.server.connection.PIPE_SIZES). Otherwise
    (TLS on either side, a chunked or unframed body) it is copied through."""
    reply.answering(resp.upstream.name)
    reply.length = resp.content_length
    raw: RawBody | None = None
    try:
        await ex.start(200, response_headers(resp.headers, resp.upstream.name), resp.content_length)
        if ex.splices:
            first = resp.take()
            raw = resp.raw_body()  # at once: nothing may be read in between
            if first:
                reply.sent += len(first)
                await ex.write(first)
        if raw is not None:
            reply.spliced = True
            try:
                spliced = await ex.splice(raw)
            finally:
                reply.sent += raw.sent
            if spliced:
                raw.close()
            else:  # no descriptors for it: copied after all
                reply.spliced = False
                raw.resume()
                raw = None
        if not reply.spliced:
            async for chunk in resp.chunks():
                reply.sent += len(chunk)
                await ex.write(chunk)
        reply.whole = True
        await ex.end()
    except CLIENT_GONE:
        _abandon(resp, raw)
        return "client_abort", None
    except UpstreamError as exc:
        _abandon(resp, raw)
        ex.abort()
        return "failed", exc
    except BaseException:
        _abandon(resp, raw)
        raise
    resp.release()
    return "ok", None


def _abandon(resp: UpstreamResponse, raw: RawBody | None) -> None:
    if raw is not None:
        raw.close()  # a body not taken whole: the connection goes
    resp.release(reuse=False)


async def deliver(
    ex: Exchange,
    reader: FillReader,
    headers: Mapping[str, str],
    content_length: int | None,
    reply: Reply,
) -> tuple[str, UpstreamError | None]:
    """Send a fill to one client: (outcome, failure). A body already whole on
    disk when this client may start (a gated fill released, a complete fill
    joined) goes out as a hit does, from its file; else it is streamed as its
    bytes arrive.

    Raises UpstreamError when the fill fails before its first byte (a body its
    gate refused, sidecar.cache.fill): no header is sent, the caller may go on."""
    reply.answering(reader.fill.upstream)
    body = await reader.whole_file()
    if body is not None:
        reply.length = body.size
        return await send_file(ex, body, body.size, dict(headers), reply), None
    chunk = await reader.next_chunk()
    reply.length = content_length  # from the headers on: an empty body is whole once they are
    try:
        await ex.start(200, headers, content_length)
        while chunk is not None:
            reply.sent += len(chunk)
            await ex.write(chunk)
            chunk = await reader.next_chunk()
        reply.whole = True
        await ex.end()
    except CLIENT_GONE:
        return "client_abort", None
    except UpstreamError as exc:
        ex.abort()
        return "failed", exc
    return "ok", None


async def send_file(
    ex: Exchange,
    fobj: BinaryIO | BodyFile,
    size: int,
    headers: dict[str, str],
    reply: Reply,
    part: tuple[int, int] | None = None,
) -> str:
    """A body from a complete file (sendfile where the loop has it), whole or
    ``part`` (first, last byte): an outcome label. ``fobj`` is a hit's blob as
    ``ModuleCache.open_blob`` opened and checked it, a spooled body, or a
    fill's stored body; it is closed here. A file that shrinks while it is
    sent cuts the connection.
    """
    try:
        first, last = (0, size - 1) if part is None else part
        if part is not None:
            headers["Content-Range"] = content_range(part, size)
        await ex.start(200 if part is None else 206, headers, last - first + 1)
        await ex.sendfile(fobj, first, last - first + 1)
        reply.sent += last - first + 1
        reply.whole = True
        await ex.end()
    except CLIENT_GONE:
        return "client_abort"
    except OSError:
        ex.abort()
        return "failed"
    finally:
        fobj.close()
    return "ok"
