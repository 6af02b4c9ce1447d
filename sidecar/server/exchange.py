"""One request and its response on a connection: what a handler reads and writes.

A handler either answers whole with ``send`` (headers and body in one write,
what every small GOPROXY answer is) or streams: ``start``, ``write`` as the
bytes arrive, ``end``. ``write`` waits while the client's socket buffer is
full, so a slow client slows its upstream read instead of growing memory.
A client that hung up makes ``write`` raise ``ConnectionResetError``.
A body whose bytes wait in another socket (an upstream's) can instead be
handed to ``splice``, which has the kernel move them (see ``splices``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from email.utils import formatdate
from typing import Any, Final, NoReturn, Protocol

TEXT_PLAIN: Final = "text/plain; charset=utf-8"
# Response headers the server owns: framing and connection management.
_OWN: Final = frozenset({"content-length", "transfer-encoding", "connection", "date"})
REASONS: Final = {
    200: "OK",
    206: "Partial Content",
    304: "Not Modified",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    410: "Gone",
    413: "Content Too Large",
    414: "URI Too Long",
    416: "Range Not Satisfiable",
    417: "Expectation Failed",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


class _StatusLines(dict[int, bytes]):
    """Status lines by code: every answer's head is looked up here without a
    call, and a code without a reason (never kept: the map stays this size)
    is made when asked."""

    def __missing__(self, status: int) -> bytes:
        return f"HTTP/1.1 {status} Unknown\r\n".encode("ascii")


_STATUS_LINES: Final = _StatusLines(
    (status, f"HTTP/1.1 {status} {reason}\r\n".encode("ascii"))
    for status, reason in REASONS.items()
)


class DateHeader:
    """``Date: ...\\r\\n``, formatted once per second rather than per response."""

    __slots__ = ("_line", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._line = b""

    def line(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._line = f"Date: {formatdate(now, usegmt=True)}\r\n".encode("ascii")
        return self._line


def header_line(name: str, value: str) -> str:
    """``name: value`` and its CRLF; refuses a line break in the value, which
    would let an upstream header smuggle a second response."""
    if "\n" in value or "\r" in value:
        raise ValueError(f"header {name!r} has a line break in its value")
    return f"{name}: {value}\r\n"


def header_block(headers: Mapping[str, str]) -> bytes:
    """Serialised ``header_line``s, less the headers the server owns."""
    return "".join(
        [header_line(name, value) for name, value in headers.items() if name.lower() not in _OWN]
    ).encode("latin-1")


class SpliceSource(Protocol):
    """Bytes waiting in a socket (``fd``) for ``Exchange.splice``: an upstream's
    body (sidecar.upstreams.http1.RawBody)."""

    fd: int
    sent: int  # bytes handed on to the client's socket so far

    @property
    def remaining(self) -> int: ...

    def took(self, n: int) -> None: ...

    async def readable(self) -> None: ...

    def ended(self, exc: OSError | None) -> NoReturn: ...


class Client(Protocol):
    """Where an exchange's answer goes: the client's Connection, or the Capture
    that keeps an answer the sidecar asked itself for (the checksum
    verifier's fetches through the proxy path). mypyc checks a declared class
    at run time, so the stand-in must be typed as what it is."""

    closing: bool
    date: DateHeader
    peer: str
    credential: Any  # the front door's note of the last credential verified

    def write(self, data: bytes | memoryview) -> None: ...

    async def drain(self) -> None: ...

    def check_open(self) -> None: ...

    def abort(self) -> None: ...

    async def sendfile(self, fobj: Any, offset: int, count: int) -> None: ...

    @property
    def splices(self) -> bool: ...

    async def splice(self, source: SpliceSource) -> bool: ...


class Exchange:
    """A parsed request (``method``, ``target``, its ``path``, ``headers``) and its response."""

    __slots__ = (
        "_chunked",
        "authorization",
        "connection",
        "expects_continue",
        "finished",
        "headers",
        "http11",
        "identity",
        "keep_alive",
        "method",
        "path",
        "scratch",
        "sent",
        "status",
        "target",
    )

    def __init__(
        self,
        conn: Client,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
        http11: bool,
    ) -> None:
        self.connection = conn  # a plain slot: the front door reads it on every request
        self.method = method
        self.target = target  # the raw request-target, query included
        cut = target.find("?")
        # Without the query: what the endpoints, the door and the proxy look up.
        self.path = target if cut < 0 else target[:cut]
        self.headers = headers  # raw, as received; see header()
        self.keep_alive = keep_alive
        self.http11 = http11
        self.status = 0
        self.sent = False  # headers written: from here only a cut connection can signal failure
        self.finished = False
        self._chunked = False
        # Expect: 100-continue arrived while earlier requests were being
        # answered: the 100 goes out when this one's turn comes.
        self.expects_continue = False
        # The handler's own note on this request: what ``answer_now`` worked
        # out (the parsed path) is not worked out again by the handler.
        self.scratch: Any = None
        # Who sent it, once the front door (sidecar.auth.gate) has decided.
        self.identity: Any = None
        # The Authorization value, picked out while parsing (the front door
        # would otherwise walk every header of every request to find it).
        self.authorization: bytes | None = None

    @property
    def peer(self) -> str:
        """The client's IP address ('' if the connection is no IP socket)."""
        return self.connection.peer

    def header(self, name: str) -> str | None:
        """The first request header called ``name`` (case-insensitive)."""
        wanted = name.lower().encode("latin-1")
        size = len(wanted)
        for key, value in self.headers:
            # Lengths first: most requests have none of the headers asked for.
            if len(key) == size and key.lower() == wanted:
                return value.decode("latin-1")
        return None

    def send(self, status: int, headers: Mapping[str, str] | bytes, body: bytes) -> None:
        """The whole response in one write (no body for HEAD, its length still announced).
        ``headers`` as bytes: lines already serialised and checked (``header_block``)."""
        self._begin(status)
        block = headers if isinstance(headers, bytes) else header_block(headers)
        head = self._head(status, block, len(body))
        self.connection.write(head if self.method == "HEAD" else head + body)
        self.finished = True

    async def start(self, status: int, headers: Mapping[str, str], length: int | None) -> None:
        """Send the headers of a streamed body of ``length`` bytes (None: unknown,
        sent chunked, or delimited by closing the connection for HTTP/1.0)."""
        self._begin(status)
        if length is None and self.method != "HEAD":
            if self.http11:
                self._chunked = True
            else:
                self.keep_alive = False
        self.connection.write(self._head(status, header_block(headers), length))
        await self.connection.drain()

    async def write(self, data: bytes | memoryview) -> None:
        if self.method == "HEAD" or not data:
            return
        conn = self.connection
        if self._chunked:  # one write: each transport.write may be a send(2)
            conn.write(b"".join((b"%x\r\n" % len(data), data, b"\r\n")))
        else:
            conn.write(data)
        await conn.drain()

    async def end(self) -> None:
        if self._chunked and self.method != "HEAD":
            self.connection.write(b"0\r\n\r\n")
        self.finished = True
        await self.connection.drain()

    async def sendfile(self, fobj: object, offset: int, count: int) -> None:
        """``count`` bytes of an open binary file from ``offset``, after ``start``."""
        if self.method != "HEAD" and count:
            await self.connection.sendfile(fobj, offset, count)

    @property
    def splices(self) -> bool:
        """After ``start``, the body may go out through ``splice``: a GET's
        Content-Length body to a client over plain TCP."""
        return self.method != "HEAD" and not self._chunked and self.connection.splices

    async def splice(self, source: SpliceSource) -> bool:
        """After ``start`` (where ``splices``): ``source``'s remaining bytes moved to
        the client by the kernel (``source.sent`` counts them as they go); False
        if that could not start (nothing taken: copy them instead)."""
        return await self.connection.splice(source)

    def abort(self) -> None:
        """Cut the connection: the client sees a short body, never a complete one."""
        self.keep_alive = False
        self.connection.abort()

    def _begin(self, status: int) -> None:
        if self.sent:
            raise RuntimeError("response headers already sent")
        self.connection.check_open()
        self.status = status
        self.sent = True
        if self.connection.closing:
            self.keep_alive = False

    def _head(self, status: int, block: bytes, length: int | None) -> bytes:
        parts = [_STATUS_LINES[status], self.connection.date.line(), block]
        if length is not None:
            parts.append(b"Content-Length: %d\r\n" % length)
        elif self._chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        if not self.keep_alive:
            parts.append(b"Connection: close\r\n")
        elif not self.http11:
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)
