"""A running sidecar on loopback for aiohttp's TestClient."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import BaseTestServer
from aiohttp.web_runner import BaseRunner
from yarl import URL

from sidecar.app import SidecarService

SHUTDOWN_GRACE_S = 2.0


class SidecarTestServer(BaseTestServer):
    """Starts a SidecarService on 127.0.0.1 and an ephemeral port."""

    def __init__(self, service: SidecarService, **kwargs: Any) -> None:
        super().__init__(host="127.0.0.1", **kwargs)
        self.service = service

    async def start_server(self, loop: Any = None, **kwargs: Any) -> None:
        if self._root is not None:
            return
        await self.service.start("127.0.0.1", 0)
        self.port = self.service.port
        self.scheme = "http" if self.service.tls is None else "https"
        self._root = URL(f"{self.scheme}://127.0.0.1:{self.port}")

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        raise NotImplementedError("the sidecar has its own server")

    @property
    def started(self) -> bool:
        return self._root is not None

    async def close(self) -> None:
        if self._root is not None and not self._closed:
            await self.service.stop(SHUTDOWN_GRACE_S)
            self._root = None
            self._closed = True
