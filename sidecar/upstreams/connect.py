"""Opening one connection: resolve, race the addresses, tunnel, TLS.

- Names are resolved through a ``Resolver`` (the system's ``getaddrinfo``
  unless one is given) and cached for ``DNS_TTL_S``.
- Addresses are tried Happy Eyeballs style (RFC 8305): families
  interleaved, the next attempt started ``HAPPY_EYEBALLS_DELAY_S`` after the
  previous one unless that failed first, the first to connect wins. One
  silent address (a dead node still in DNS, an IPv6 route that drops SYNs)
  then costs a quarter of a second, not the whole connect timeout.
- Through an outbound proxy the socket goes to the proxy; an https origin
  gets a ``CONNECT`` tunnel first (see ``route``).
- TLS uses ``ssl.create_default_context()`` with SNI and verification for
  the origin's name; the system trust store applies (``SSL_CERT_FILE`` /
  ``SSL_CERT_DIR`` work).
- A ``RedirectGuard`` (redirects to other origins) drops addresses of a
  refused class before connecting and checks the connected peer again.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

from sidecar.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
)
from sidecar.upstreams.addresses import RedirectGuard
from sidecar.upstreams.http1 import Connection
from sidecar.upstreams.route import Origin, Route

Address = tuple[int, tuple[str, int]]  # (family, (host, port)) as sock_connect takes it
Resolver = Callable[[str, int], Awaitable[list[Address]]]

DNS_TTL_S: Final = 60.0
HAPPY_EYEBALLS_DELAY_S: Final = 0.25  # RFC 8305's recommended connection attempt delay
TUNNEL_HEAD_LIMIT: Final = 16 * 1024
USER_AGENT: Final = "goproxy-sidecar"


class AddressRefused(UpstreamError):
    """A redirect target resolves only to (or connected to) a refused address
    class. Never escapes ``Upstream``: it becomes a refused redirect there."""

    def __init__(self, upstream: str, kind: str) -> None:
        super().__init__(upstream, f"redirect to a {kind} address refused")
        self.kind = kind


async def system_resolver(host: str, port: int) -> list[Address]:
    """``getaddrinfo`` for TCP, in its order, without duplicates."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out: list[Address] = []
    for family, _type, _proto, _name, sockaddr in infos:
        entry = (int(family), (str(sockaddr[0]), int(sockaddr[1])))
        if entry not in out:
            out.append(entry)
    return out


def interleave(addresses: Sequence[Address]) -> list[Address]:
    """Alternate address families, starting with the first one's (RFC 8305 §4)."""
    if not addresses:
        return []
    first = addresses[0][0]
    same = [a for a in addresses if a[0] == first]
    other = [a for a in addresses if a[0] != first]
    out: list[Address] = []
    for i in range(max(len(same), len(other))):
        out.extend(group[i] for group in (same, other) if i < len(group))
    return out


class Connector:
    """Opens connections for one upstream (named ``name`` in every error)."""

    def __init__(
        self,
        name: str,
        resolver: Resolver | None = None,
        delay: float = HAPPY_EYEBALLS_DELAY_S,
    ) -> None:
        self.name = name
        self.delay = delay
        self._resolver = resolver or system_resolver
        self._dns: dict[tuple[str, int], tuple[float, list[Address]]] = {}
        self._ssl: ssl.SSLContext | None = None

    async def connect(
        self,
        route: Route,
        factory: Callable[[], Connection],
        guard: RedirectGuard | None = None,
    ) -> Connection:
        """A connected (tunnelled, TLS-wrapped) connection to ``route.origin``."""
        if guard is not None and route.proxy is not None:
            # The proxy resolves names: only a literal (or localhost) is seen here.
            kind = guard.refused_host(route.origin.host)
            if kind is not None:
                raise AddressRefused(self.name, kind)
        addresses = await self.resolve(route.hop)
        if guard is not None and route.proxy is None:
            addresses = self._allowed(addresses, guard)
        sock = await self._race(addresses)
        try:
            if guard is not None and route.proxy is None:
                kind = guard.refused(sock.getpeername()[0])
                if kind is not None:
                    raise AddressRefused(self.name, kind)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if route.tunnel:
                await self._tunnel(sock, route)
            return await self._wrap(sock, route.origin, factory)
        except BaseException:
            sock.close()
            raise

    async def resolve(self, origin: Origin) -> list[Address]:
        family = origin.literal
        if family:
            return [(family, (origin.host, origin.port))]
        key = (origin.host, origin.port)
        now = time.monotonic()
        cached = self._dns.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            addresses = await self._resolver(origin.host, origin.port)
        except socket.gaierror as exc:
            raise UpstreamConnectError(
                self.name, f"cannot resolve host: {exc.strerror or type(exc).__name__}"
            ) from exc
        if not addresses:
            raise UpstreamConnectError(self.name, "cannot resolve host: no address")
        self._dns[key] = (now + DNS_TTL_S, addresses)
        return addresses

    def _allowed(self, addresses: list[Address], guard: RedirectGuard) -> list[Address]:
        kinds = [guard.refused(address[1][0]) for address in addresses]
        allowed = [a for a, kind in zip(addresses, kinds, strict=True) if kind is None]
        if not allowed:
            raise AddressRefused(self.name, next(k for k in kinds if k is not None))
        return allowed

    # -- TCP -----------------------------------------------------------------------

    async def _race(self, addresses: list[Address]) -> socket.socket:
        """The first address to accept a connection (Happy Eyeballs)."""
        if len(addresses) == 1:
            try:
                return await _connect_one(addresses[0])
            except OSError as exc:
                raise self._cannot_connect(exc) from exc
        loop = asyncio.get_running_loop()
        waiting = interleave(addresses)
        waiting.reverse()  # pop() takes the next one
        pending: set[asyncio.Task[socket.socket]] = set()
        last: OSError | None = None
        winner: socket.socket | None = None
        failure: BaseException | None = None
        try:
            while (waiting or pending) and winner is None:
                if waiting:
                    pending.add(loop.create_task(_connect_one(waiting.pop())))
                done, pending = await asyncio.wait(
                    pending,
                    timeout=self.delay if waiting else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for task in done:
                    error = task.exception()
                    if error is None:
                        if winner is None:
                            winner = task.result()
                        else:
                            task.result().close()
                    elif isinstance(error, OSError):
                        last = error
                    else:
                        raise error
        except BaseException as exc:
            failure = exc
        # Not a finally: compiled, the exception a finally re-raises after an
        # await is read from the thread's state, which other tasks change
        # meanwhile (see DiskCache._run_fill). Kept, and raised by name.
        for task in pending:
            task.cancel()
        if pending:
            for result in await asyncio.gather(*pending, return_exceptions=True):
                if isinstance(result, socket.socket):
                    result.close()
        if failure is not None:
            raise failure
        if winner is not None:
            return winner
        raise self._cannot_connect(last)

    def _cannot_connect(self, exc: OSError | None) -> UpstreamConnectError:
        why = (exc.strerror or type(exc).__name__) if exc is not None else "no address"
        return UpstreamConnectError(self.name, f"cannot connect: {why}")

    # -- proxy tunnel and TLS ----------------------------------------------------------

    async def _tunnel(self, sock: socket.socket, route: Route) -> None:
        """``CONNECT`` through the proxy; returns once the tunnel is open."""
        loop = asyncio.get_running_loop()
        authority = route.origin.authority()
        lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}", f"User-Agent: {USER_AGENT}"]
        if route.proxy_authorization is not None:
            lines.append(f"Proxy-Authorization: {route.proxy_authorization}")
        await loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        head = b""
        while (end := head.find(b"\r\n\r\n")) < 0:
            if len(head) > TUNNEL_HEAD_LIMIT:
                raise UpstreamProtocolError(self.name, "outbound proxy answer head too large")
            data = await loop.sock_recv(sock, TUNNEL_HEAD_LIMIT)
            if not data:
                raise UpstreamConnectError(self.name, "outbound proxy closed the connection")
            head += data
        status = _status_of(head[: head.find(b"\r\n")])
        if status is None:
            raise UpstreamProtocolError(self.name, "outbound proxy sent an invalid answer")
        if not 200 <= status < 300:
            raise UpstreamStatusError(self.name, f"outbound proxy answered {status}", status)
        if end + 4 != len(head):
            # The origin speaks only after our TLS hello: these bytes are no one's.
            raise UpstreamProtocolError(self.name, "outbound proxy sent bytes after its answer")

    async def _wrap(
        self, sock: socket.socket, origin: Origin, factory: Callable[[], Connection]
    ) -> Connection:
        loop = asyncio.get_running_loop()
        ctx = self._tls_context() if origin.tls else None
        try:
            _, conn = await loop.create_connection(
                factory,
                sock=sock,
                ssl=ctx,
                server_hostname=origin.host if ctx is not None else None,
            )
        except ssl.SSLError as exc:
            reason = getattr(exc, "reason", None) or type(exc).__name__
            raise UpstreamConnectError(self.name, f"TLS error: {reason}") from exc
        except OSError as exc:
            raise UpstreamConnectError(
                self.name, f"cannot connect: {exc.strerror or type(exc).__name__}"
            ) from exc
        return conn

    def _tls_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            ctx = ssl.create_default_context()
            ctx.set_alpn_protocols(["http/1.1"])
            self._ssl = ctx
        return self._ssl


async def _connect_one(address: Address) -> socket.socket:
    family, sockaddr = address
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


def _status_of(line: bytes) -> int | None:
    """The status code of an ``HTTP/1.x NNN reason`` line, None if it is not one."""
    parts = line.split(b" ", 2)
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0"):
        return None
    code = parts[1]
    return int(code) if len(code) == 3 and code.isdigit() else None
