"""Hot reload of the policy files: poll, compile aside, swap only what works.

Polling, settling and ``reload_now()`` (SIGHUP) are ``sidecar.filewatch``'s.
A reload builds a NEW engine from the factory, loads it and evaluates a
sample input; only then does it replace the current engine, and the old one
is closed. Anything that fails
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
import logging
from collections.abc import Callable, Sequence
from typing import Any

from sidecar.errors import PolicyError
from sidecar.filewatch import FileWatch
from sidecar.metrics import Metrics
from sidecar.policy import files
from sidecar.policy.base import PolicyEngine, call_back, smoke_test

log = logging.getLogger(__name__)

OnReload = Callable[[bool, str | None], Any]  # may return an awaitable


class PolicyReloader(FileWatch):
    def __init__(
        self,
        engine_factory: Callable[[], PolicyEngine],
        paths: Sequence[str],
        poll_interval: float,
        on_reload: OnReload | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__("policy-reloader", poll_interval)
        self._factory = engine_factory
        self._paths = tuple(paths)
        self._on_reload = on_reload
        self._metrics = metrics
        self._engine: PolicyEngine | None = None
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
        self._seen = await asyncio.to_thread(self.fingerprint)
        if engine is None:
            engine = self._factory()
            try:
                self._set_warning(await _vetted_load(engine))
            except BaseException:
                await engine.close()
                raise
        self._engine = engine
        self._seen = engine.version or self._seen  # what the engine actually read
        self.start_polling()

    async def close(self) -> None:
        """Stop polling and close the engine in service."""
        await self.stop_polling()
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.close()

    def fingerprint(self) -> str:
        return files.fingerprint(self._paths)

    async def load(self) -> bool:
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
        self._seen = engine.version or self._seen  # what was actually read
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
