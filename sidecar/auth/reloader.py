"""Hot reload of the credential files (``sidecar.filewatch``: settled changes,
SIGHUP at once). A file that is refused leaves the credentials in service as
they were and logs the reason naming file:line.
"""

from __future__ import annotations

import asyncio
import logging

from sidecar.auth.credentials import fingerprint, load_credentials
from sidecar.auth.gate import FrontDoor
from sidecar.config import ClientAuthConfig
from sidecar.errors import AuthFileError
from sidecar.filewatch import FileWatch
from sidecar.metrics import Metrics

log = logging.getLogger("sidecar.auth")


class CredentialReloader(FileWatch):
    def __init__(self, door: FrontDoor, metrics: Metrics, seen: str) -> None:
        super().__init__("client-auth-reloader", door.cfg.reload_interval, seen)
        self.door = door
        self._reloads = metrics.client_auth_reloads

    def fingerprint(self) -> str:
        return fingerprint(self.door.cfg)

    async def load(self) -> bool:
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


def open_door(cfg: ClientAuthConfig, metrics: Metrics) -> tuple[FrontDoor, CredentialReloader]:
    """The front door with its files loaded (blocking; AuthFileError if one is
    refused: a sidecar that cannot authenticate must not start open)."""
    seen = fingerprint(cfg)
    door = FrontDoor(cfg, load_credentials(cfg), metrics)
    return door, CredentialReloader(door, metrics, seen)
