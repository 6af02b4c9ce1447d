"""Reading requests off one connection: llhttp (via httptools) with the limits
enforced while the bytes arrive, and the RFC 9112 checks llhttp leaves to
its user (Host, the HTTP version, absolute-form, Expect).

A head is measured as it is parsed, not when a field completes: httptools
joins a field's pieces (quadratic in its size) and only reports it whole, so
a line that never ends would otherwise be held, and re-copied, forever.
"""

from __future__ import annotations

import re
from collections import deque
from typing import TYPE_CHECKING, Final, cast

import httptools

from sidecar.server.exchange import Exchange

if TYPE_CHECKING:
    from sidecar.server.connection import Connection

MAX_TARGET: Final = 8190  # bytes of request-target; aiohttp's and nginx's order of size
MAX_HEADERS: Final = 16384  # bytes of all header names and values together
MAX_HEADER_COUNT: Final = 100
# llhttp is fed at most this much at a time, so a head still arriving is
# measured between slices: an unterminated line costs one slice past the limit.
SLICE: Final = 2048
# A message's bytes other than its body, raw, as they arrive (less the
# request-target, limited apart): the fields' own bytes plus ": " and CRLF
# per line, the request line's method and version, chunk framing and
# trailers, and the part of the slice the message began in that came before
# it. A head within the limits above always fits.
MAX_HEADER_SECTION: Final = MAX_HEADERS + 4 * MAX_HEADER_COUNT + 64 + SLICE
# RFC 9112 3.2 / RFC 3986 3.2.2: uri-host [":" port]; empty is allowed.
_HOST: Final = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(?::[0-9]*)?")
_ABSOLUTE: Final = re.compile(rb"[Hh][Tt][Tt][Pp][Ss]?://([^/?#]*)(.*)", re.DOTALL)
_METHODS: Final = {m.encode(): m for m in ("GET", "HEAD")}  # decoded once


class Refused(Exception):
    """A request that cannot be parsed or is over a limit: answered, then closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# A parser holds its owner's callbacks (bound methods) and the reader holds its
# connection, which holds the reader: cycles that only the cyclic GC could free
# once the client is gone, ~50 objects a connection. ``close`` breaks them.
_SPENT: Final = httptools.HttpRequestParser(object())  # an owner without callbacks


class RequestReader:
    """Parses what a client sends into ``Exchange``s appended to ``queue``.

    ``feed`` raises ``Refused`` for a request to refuse (those before it are
    queued) and ``httptools.HttpParserUpgrade`` for a protocol switch."""

    __slots__ = (
        "_authorization",
        "_conn",
        "_connection",
        "_continue",
        "_head_seen",
        "_header_bytes",
        "_headers",
        "_host",
        "_parser",
        "_queue",
        "_refusal",
        "_target",
        "_target_bytes",
        "_valid_host",
    )

    def __init__(self, conn: Connection, queue: deque[Exchange | Refused]) -> None:
        self._conn: Connection | None = conn  # None once closed
        self._queue = queue
        self._parser = httptools.HttpRequestParser(self)
        # The message being parsed.
        self._target: list[bytes] = []
        self._target_bytes = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._host: bytes | None = None
        self._authorization: bytes | None = None
        self._connection = False  # a Connection header came
        self._valid_host = b""  # the last Host value that passed the check
        # What a callback refused: httptools raises its own error in its place
        # (the refusal only as that error's __context__, which compiled code
        # does not keep), so feed raises this one. The connection closes after.
        self._refusal: Refused | None = None
        # Expect: 100-continue: None (not asked), False (sent), True (owed).
        self._continue: bool | None = None
        # Bytes of the message that are not body bytes (over by at most one
        # slice); None between messages.
        self._head_seen: int | None = None

    def close(self) -> None:
        """The connection is gone: let go of it and of the parser (see _SPENT)."""
        self._conn = None
        self._parser = _SPENT

    def feed(self, data: bytes | memoryview) -> None:
        """At most SLICE bytes (more only when the head is measured elsewhere)."""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            raise self._refusal or Refused(400, "bad request") from None
        except httptools.HttpParserError as exc:
            raise Refused(400, f"bad request: {exc}") from None
        if self._head_seen is not None:
            seen = self._head_seen = self._head_seen + len(data)
            if seen - self._target_bytes > MAX_HEADER_SECTION:
                raise Refused(431, "request headers too large")

    # -- httptools callbacks ----------------------------------------------
    def on_message_begin(self) -> None:
        self._target = []
        self._target_bytes = 0
        self._headers = []
        self._header_bytes = 0
        self._host = None
        self._authorization = None
        self._connection = False
        self._head_seen = 0

    def on_url(self, url: bytes) -> None:
        self._target.append(url)
        self._target_bytes += len(url)
        if self._target_bytes > MAX_TARGET:
            raise self._refuse(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name)
        total = self._header_bytes = self._header_bytes + size + len(value)
        if total > MAX_HEADERS:
            raise self._refuse(431, "request headers too large")
        if size == 13 and (name == b"Authorization" or name.lower() == b"authorization"):
            # A second one is refused: a proxy in front may have checked the
            # other (Authorization holds one credential: RFC 9110 11.6.2).
            if self._authorization is not None:
                raise self._refuse(400, "more than one Authorization header")
            # Kept out of ``headers``: nothing after the front door sees a
            # client's credential, so nothing can log or forward it.
            self._authorization = value
            return
        headers = self._headers
        if len(headers) >= MAX_HEADER_COUNT:
            raise self._refuse(431, "request headers too large")
        headers.append((name, value))
        if size == 4 and (name == b"Host" or name.lower() == b"host"):
            if self._host is not None:
                raise self._refuse(400, "more than one Host header")
            self._host = value
        elif size == 6 and name.lower() == b"expect":
            self._expectation(value)
        elif size == 10 and name.lower() == b"connection":
            self._connection = True

    def on_body(self, body: bytes) -> None:
        # Body bytes are not head bytes; chunk framing and trailers are.
        if self._head_seen is not None:
            self._head_seen -= len(body)

    def on_message_complete(self) -> None:
        self._head_seen = None
        parser = self._parser
        keep_alive = parser.should_keep_alive()
        # llhttp takes HTTP/0.9, 1.0, 1.1 and 2.0 only, and keeps a message
        # alive without a Connection header only in 1.1: the version string (a
        # str.format in httptools, ~1.5 k instructions) is read only otherwise.
        http11 = (keep_alive and not self._connection) or parser.get_http_version() == "1.1"
        if not http11:
            self._check_http10()
        host = self._host
        if host is None:
            if http11:  # RFC 9112 3.2; HTTP/1.0 had no Host
                raise self._refuse(400, "missing Host header")
        elif host != self._valid_host:  # a client sends the same Host every time
            if not _HOST.fullmatch(host):
                raise self._refuse(400, "invalid Host header")
            self._valid_host = host
        url = b"".join(self._target)
        if url[0] != 0x2F:  # not "/..."
            url = self._origin_form(url)
        method = parser.get_method()
        conn = self._conn
        assert conn is not None  # fed only while the connection is open
        exchange = Exchange(
            conn,
            _METHODS.get(method) or method.decode("ascii"),
            url.decode("latin-1"),
            self._headers,
            keep_alive,
            http11,
        )
        exchange.authorization = self._authorization
        if self._continue is not None:  # (reset here: rare, unlike a new message)
            exchange.expects_continue = self._continue
            self._continue = None
        self._queue.append(exchange)

    def _refuse(self, status: int, message: str) -> Refused:
        refused = self._refusal = Refused(status, message)
        return refused

    # -- checks llhttp leaves to its user -----------------------------------
    def _expectation(self, value: bytes) -> None:
        """Decided as the header arrives (the head's end is not reported: one
        callback less per request): with nothing ahead of it on the connection,
        a client holding a body back until the 100 must not wait for its timeout."""
        if value.strip().lower() != b"100-continue":
            raise self._refuse(417, "only 'Expect: 100-continue' is supported")
        if self._continue is not None or self._parser.get_http_version() != "1.1":
            return  # RFC 9110 10.1.1: ignored in an HTTP/1.0 request
        conn = self._conn
        assert conn is not None  # fed only while the connection is open
        if conn.idle:
            self._continue = False
            conn.write_continue()
        else:
            self._continue = True  # sent when its turn comes

    def _check_http10(self) -> None:
        version = self._parser.get_http_version()
        if version != "1.0":
            raise self._refuse(505, f"HTTP/{version} is not supported")
        if any(name.lower() == b"transfer-encoding" for name, _ in self._headers):
            # RFC 9112 6.1: framing an HTTP/1.0 peer cannot mean is faulty framing.
            raise self._refuse(400, "Transfer-Encoding in an HTTP/1.0 request")

    def _origin_form(self, url: bytes) -> bytes:
        """An absolute-form target (RFC 9112 3.2.2) for this very host, as origin-form.
        One for another host is refused: the sidecar is not a forward proxy."""
        absolute = _ABSOLUTE.fullmatch(url)
        if absolute is None:  # "*", CONNECT's authority, or junk: the handler refuses it
            return url
        authority, rest = cast(tuple[bytes, bytes], absolute.groups())
        if self._host is None or authority.lower() != self._host.lower():
            raise self._refuse(400, "absolute-form target for another host: not a forward proxy")
        return rest if rest[:1] == b"/" else b"/" + rest
