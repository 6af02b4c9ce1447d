"""Hot reload of the policy files: poll, compile aside, swap only what works.

Every ``poll_interval`` the reloader hashes the policy files (in a thread). A
change is acted on once the files have stayed the same for one more poll, so
an editor caught half-way through a save is not reported as a broken policy.
``reload_now()`` (SIGHUP) skips both checks. A reload builds a NEW engine
from the factory, loads it and evaluates a sample input; only then does it
replace the current engine, and the old one is closed. Anything that fails
leaves the last good engine in place and reports
``on_reload(False, "policies/sidecar/breaker.rego:12: ...")``; the same broken
content is not tried again until it changes.

The caller reads ``reloader.engine`` at each evaluation, so a swap takes
effect at the next control-loop tick.

With the OPA-server engine the policy is not in local files: the reloader
only (re)connects on ``reload_now()``, never evaluates a sample (an OPA that
is down or answers garbage must not stop the sidecar), and keeps the warning
``load()`` returned in ``warning``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

from sidecar.errors import PolicyError
from sidecar.metrics import Metrics
from sidecar.policy import files
from sidecar.policy.base import PolicyEngine, call_back, smoke_test

log = logging.getLogger(__name__)

OnReload = Callable[[bool, str | None], Any]  # may return an awaitable


class PolicyReloader:
    def __init__(
        self,
        engine_factory: Callable[[], PolicyEngine],
        paths: Sequence[str],
        poll_interval: float,
        on_reload: OnReload | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._factory = engine_factory
        self._paths = tuple(paths)
        self._poll_interval = poll_interval
        self._on_reload = on_reload
        self._metrics = metrics
        self._engine: PolicyEngine | None = None
        self._seen: str | None = None  # fingerprint of the last content tried
        self._pending: str | None = None  # a change waiting to settle
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.warning: str | None = None  # from the last load() of the engine in service

    @property
    def loaded(self) -> bool:
        """True once an engine is in service."""
        return self._engine is not None

    @property
    def engine(self) -> PolicyEngine:
        """The engine in service: the last one that loaded and evaluated."""
        if self._engine is None:
            raise RuntimeError("PolicyReloader.start() was not called")
        return self._engine

    async def start(self, engine: PolicyEngine | None = None) -> None:
        """Adopt an engine already loaded, or load a first one (``PolicyLoadError``
        if that fails: there is no good policy to keep), then start polling."""
        self._seen = await asyncio.to_thread(files.fingerprint, self._paths)
        if engine is None:
            engine = self._factory()
            try:
                self._set_warning(await _vetted_load(engine))
            except BaseException:
                await engine.close()
                raise
        self._engine = engine
        self._seen = engine.version or self._seen  # what the engine actually read
        self._task = asyncio.create_task(self._poll(), name="policy-reloader")

    async def close(self) -> None:
        """Stop polling and close the engine in service."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.close()

    async def reload_now(self) -> bool:
        """Reload whatever the files hold now; True if the new policy is in service."""
        fingerprint = await asyncio.to_thread(files.fingerprint, self._paths)
        return await self._reload(fingerprint)

    async def poll_once(self) -> bool | None:
        """One poll: None if nothing to do, else the result of the reload it made."""
        fingerprint = await asyncio.to_thread(files.fingerprint, self._paths)
        if fingerprint == self._seen:
            self._pending = None
            return None
        if fingerprint != self._pending:  # changed since the last poll: let it settle
            self._pending = fingerprint
            return None
        return await self._reload(fingerprint)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval)
            try:
                await self.poll_once()
            except Exception:  # never let the poller die: the next poll retries
                log.exception("policy reload poll failed")

    async def _reload(self, fingerprint: str) -> bool:
        async with self._lock:
            self._seen, self._pending = fingerprint, None
            engine = self._factory()
            try:
                warning = await _vetted_load(engine)
            except Exception as exc:  # refused: the engine in service stays
                await engine.close()
                why = str(exc) if isinstance(exc, PolicyError) else f"{type(exc).__name__}: {exc}"
                await self._report(False, why)
                return False
            except BaseException:
                await engine.close()
                raise
            old, self._engine = self._engine, engine
            self._set_warning(warning)
            self._seen = engine.version or fingerprint  # what was actually read
            if old is not None:
                await old.close()
            await self._report(True, None)
            return True

    def _set_warning(self, warning: str | None) -> None:
        self.warning = warning
        if warning is not None:
            log.warning("policy warning: %s", warning)

    async def _report(self, ok: bool, error: str | None) -> None:
        if self._metrics is not None:
            self._metrics.policy_reloads.labels("ok" if ok else "failed").inc()
        if self._on_reload is not None:
            try:
                await call_back(self._on_reload, ok, error)
            except Exception:
                log.exception("policy on_reload callback failed")


async def _vetted_load(engine: PolicyEngine) -> str | None:
    """Load, and for a file-based engine also evaluate ``SMOKE_INPUT``."""
    warning = await engine.load()
    if engine.from_files:
        await smoke_test(engine)
    return warning
