"""Hot reload of the credential files, as the policy files are reloaded.

Every ``reload_interval`` the files are hashed (in a thread). A change is
acted on once the files have stayed the same for one more poll (an editor
or `htpasswd` caught half-way through a write is not a broken file);
``reload_now`` (SIGHUP) skips that. A file that is refused leaves the
credentials in service as they were and logs the reason naming file:line;
the same broken content is not tried again until it changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sidecar.auth.credentials import fingerprint, load_credentials
from sidecar.auth.gate import FrontDoor
from sidecar.config import ClientAuthConfig
from sidecar.errors import AuthFileError
from sidecar.metrics import Metrics

log = logging.getLogger("sidecar.auth")


class CredentialReloader:
    def __init__(self, door: FrontDoor, metrics: Metrics, seen: str) -> None:
        self.door = door
        self._reloads = metrics.client_auth_reloads
        self._seen = seen  # fingerprint of the content in service (or last tried)
        self._pending: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def start(self) -> None:
        self._task = asyncio.create_task(self._poll(), name="client-auth-reloader")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def poll_once(self) -> bool | None:
        """None if nothing changed (or the change is settling), else the reload's result."""
        now = await asyncio.to_thread(fingerprint, self.door.cfg)
        if now == self._seen:
            self._pending = None
            return None
        if now != self._pending:
            self._pending = now
            return None
        return await self._reload(now)

    async def reload_now(self) -> bool:
        return await self._reload(await asyncio.to_thread(fingerprint, self.door.cfg))

    async def _reload(self, seen: str) -> bool:
        async with self._lock:
            self._seen, self._pending = seen, None
            try:
                credentials = await asyncio.to_thread(load_credentials, self.door.cfg)
            except AuthFileError as exc:
                self._reloads.labels("failed").inc()
                log.error(
                    "client credentials reload refused; the previous ones stay",
                    extra={"error": str(exc)},
                )
                return False
            self.door.swap(credentials)
            self._reloads.labels("ok").inc()
            log.info("client credentials reloaded", extra={"identities": credentials.count})
            return True

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.door.cfg.reload_interval)
            try:
                await self.poll_once()
            except Exception:  # never let the poller die: the next poll retries
                log.exception("client credentials poll failed")


def open_door(cfg: ClientAuthConfig, metrics: Metrics) -> tuple[FrontDoor, CredentialReloader]:
    """The front door with its files loaded (blocking; AuthFileError if one is
    refused: a sidecar that cannot authenticate must not start open)."""
    seen = fingerprint(cfg)
    door = FrontDoor(cfg, load_credentials(cfg), metrics)
    return door, CredentialReloader(door, metrics, seen)
