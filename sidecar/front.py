"""What every request meets first: the front door (``client_auth``), then the
sidecar's own endpoints, then the proxy handler.

Compiled with the rest of the request path (sidecar/compiled.py): an
interpreted frame here sat between the compiled server and the compiled
handler on every request, and every resumption of a miss passed through it.
"""

from __future__ import annotations

from sidecar.auth.gate import INTERNAL, FrontDoor
from sidecar.config import AUTHENTICATED, EndpointAccess
from sidecar.endpoints import Endpoint
from sidecar.proxy.handler import METHODS, ProxyHandler, send_text
from sidecar.server import Exchange


class Front:
    def __init__(self, proxy: ProxyHandler, endpoints: dict[str, Endpoint]) -> None:
        self.proxy = proxy
        self.endpoints = endpoints
        # Set when client_auth opens (SidecarService.start): it reads files.
        self.door: FrontDoor | None = None
        self.needs: dict[str, EndpointAccess] = {}  # endpoint path -> its rule

    async def handle(self, ex: Exchange) -> None:
        path = ex.path
        door = self.door
        if (
            door is not None
            and ex.identity is None
            and not await door.admit(ex, self.needs.get(path, AUTHENTICATED))
        ):
            return
        # A request answer_now has seen (scratch set) is no endpoint.
        if ex.scratch is not None or not self._endpoint(ex, path):
            await self.proxy.handle(ex)

    def answer_now(self, ex: Exchange) -> bool:
        path = ex.path
        door = self.door
        if door is not None and ex.identity is None:
            # Before anything is looked up: no endpoint or cache hit goes round it.
            # Its endpoint's rule, else a client identity (inlined: a call
            # frame is a tenth of what the door costs a hit).
            admitted = door.now(ex, self.needs.get(path, AUTHENTICATED))
            if admitted is not True:
                return admitted is False  # None: handle() verifies it off the loop
        return self._endpoint(ex, path) or self.proxy.answer_now(ex)

    async def internal(self, ex: Exchange) -> None:
        """The sidecar asking itself (checksum-database lookups): no client."""
        ex.identity = INTERNAL
        await self.proxy.handle(ex)

    def _endpoint(self, ex: Exchange, path: str) -> bool:
        """Answer ``ex`` if it asks for one of the sidecar's own endpoints."""
        endpoint = self.endpoints.get(path)
        if endpoint is None:
            return False
        if ex.method not in METHODS:
            send_text(ex, 405, "method not allowed", {"Allow": "GET, HEAD"})
            return True
        status, content_type, body = endpoint()
        ex.send(status, {"Content-Type": content_type}, body)
        return True
