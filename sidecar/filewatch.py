"""Hot reload of files the sidecar reads at start: policy files, client
credentials, the TLS certificate and key.

Every ``interval`` the files are hashed (in a thread). A change is acted on
once the files have stayed the same for one more poll, so an editor (or
``htpasswd``, or the kubelet swapping a Secret) caught half-way through a
write is not reported as a broken file. ``reload_now`` (SIGHUP) skips that.
What a reload does is the subclass's ``load``: it keeps what is in service
when the new content is refused, and the same refused content is not tried
again until it changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger(__name__)


class FileWatch:
    """Polls ``fingerprint()`` and calls ``load()`` for a settled change."""

    def __init__(self, name: str, interval: float, seen: str | None = None) -> None:
        self._name = name
        self._interval = interval
        self._seen = seen  # fingerprint of the content in service (or last tried)
        self._pending: str | None = None  # a change waiting to settle
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def fingerprint(self) -> str:
        """The files' content hash; runs in a thread."""
        raise NotImplementedError

    async def load(self) -> bool:
        """Put the files' content in service; False (logged) if refused. Runs
        under the lock, after the fingerprint was taken as seen."""
        raise NotImplementedError

    def start_polling(self) -> None:
        self._task = asyncio.create_task(self._poll(), name=self._name)

    async def stop_polling(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def poll_once(self) -> bool | None:
        """One poll: None if nothing to do (or the change is settling), else
        the result of the reload it made."""
        now = await asyncio.to_thread(self.fingerprint)
        if now == self._seen:
            self._pending = None
            return None
        if now != self._pending:  # changed since the last poll: let it settle
            self._pending = now
            return None
        return await self._reload(now)

    async def reload_now(self) -> bool:
        """Reload whatever the files hold now; True if it is in service."""
        return await self._reload(await asyncio.to_thread(self.fingerprint))

    async def _reload(self, seen: str) -> bool:
        async with self._lock:
            self._seen, self._pending = seen, None
            return await self.load()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.poll_once()
            except Exception:  # never let the poller die: the next poll retries
                log.exception("%s: poll failed", self._name)
