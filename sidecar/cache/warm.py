"""Prefetch every module version of a go.sum into the cache (``goproxy-sidecar warm``).

Each go.sum line names one module version: ``<module> <version>/go.mod h1:…``
needs the ``.mod``; ``<module> <version> h1:…`` needs the ``.zip``, plus the
``.info`` and ``.mod`` the go command asks for alongside. Artifacts already in
the cache are skipped. Each one walks the configured upstreams in order, like
a comma-separated GOPROXY: 404/410 and failures fall through to the next.
What the routing rules keep out of the cache (``deny``, ``cache: false``, a
private module no upstream may serve) is skipped, not failed: the running
sidecar would not cache it either.
No sidecar needs to run: this uses the same store, in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Final
from urllib.parse import quote

from sidecar.cache.layout import Layout, mark_changed, prepare
from sidecar.cache.store import DiskCache
from sidecar.config import Config
from sidecar.errors import (
    CacheError,
    CacheWriteError,
    ConfigError,
    RequestError,
    UpstreamBusy,
    UpstreamError,
)
from sidecar.goproxy import GoproxyRequest, escape_path, escape_version, parse_request_path
from sidecar.metrics import Metrics
from sidecar.routing import Route, Router
from sidecar.upstreams import Upstream

DEFAULT_JOBS: Final = 8


@dataclass(frozen=True, slots=True)
class Artifact:
    module: str
    version: str
    ext: str
    req: GoproxyRequest

    @property
    def name(self) -> str:
        return f"{self.module}@{self.version}.{self.ext}"


@dataclass(slots=True)
class Result:
    artifact: Artifact
    status: str  # fetched | cached | skipped | failed
    size: int = 0
    upstream: str = ""
    reason: str = ""  # why it failed, or which routing rule keeps it out of the cache


@dataclass(slots=True)
class Plan:
    artifacts: list[Artifact] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # go.sum lines that name nothing valid


def parse_go_sum(text: str) -> Plan:
    """The artifacts a go.sum asks for, in file order, without duplicates."""
    plan = Plan()
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3 or not fields[2].startswith("h1:"):
            plan.problems.append(f"line {number}: not a go.sum line: {line.strip()[:120]}")
            continue
        module, version = fields[0], fields[1]
        exts = ("mod",) if version.endswith("/go.mod") else ("zip", "info", "mod")
        version = version.removesuffix("/go.mod")
        for ext in exts:
            try:
                artifact = _artifact(module, version, ext)
            except RequestError as exc:
                plan.problems.append(f"line {number}: {module} {version}: {exc.message}")
                break
            if artifact.req.cache_key not in seen:
                seen.add(artifact.req.cache_key)
                plan.artifacts.append(artifact)
    return plan


def _artifact(module: str, version: str, ext: str) -> Artifact:
    path = f"/{escape_path(module)}/@v/{quote(escape_version(version), safe='')}.{ext}"
    return Artifact(module, version, ext, parse_request_path(path))


async def warm(
    config: Config,
    artifacts: Iterable[Artifact],
    jobs: int = DEFAULT_JOBS,
    on_result: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Fetch what is missing, ``jobs`` at a time; one Result per artifact, in order.

    Raises ConfigError when the cache is disabled and CacheWriteError when its
    directory cannot be used, before any upstream is asked.
    """
    _check_cache(config)
    # No scrub: a warm run is short, and a running sidecar scrubs the same directory.
    cache = DiskCache(replace(config.cache, scrub_rate=0), Metrics())
    upstreams = [
        Upstream(cfg, "primary" if i == 0 else "backup") for i, cfg in enumerate(config.upstreams)
    ]
    await cache.start()
    await cache.wait_loaded()
    for upstream in upstreams:
        await upstream.start()
    limit = asyncio.Semaphore(max(1, jobs))
    router = Router(config)

    async def one(artifact: Artifact) -> Result:
        # The same routing as live requests: a private module is only ever
        # fetched from private_ok upstreams, a denied or no-cache one not at all.
        route = router.route(artifact.req.module)
        if skipped := _kept_out(route):
            result = Result(artifact, "skipped", reason=skipped)
        else:
            async with limit:
                allowed = [u for u in upstreams if u.name in route.targets]
                result = await _fetch(cache, allowed, artifact)
        if on_result is not None:
            on_result(result)
        return result

    results: list[Result] = []
    try:
        results = list(await asyncio.gather(*(one(a) for a in artifacts)))
        return results
    finally:
        await cache.stop()
        if any(r.status == "fetched" for r in results):
            mark_changed(cache.layout)  # a running sidecar picks the new entries up
        for upstream in upstreams:
            await upstream.close()


def _check_cache(config: Config) -> None:
    if not config.cache.enabled:
        raise ConfigError("cache.enabled", "warm needs the cache, and it is off")
    try:
        prepare(Layout.at(config.cache.dir))
    except (OSError, CacheError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise CacheWriteError(f"cache directory {config.cache.dir}: {reason}") from exc


def _kept_out(route: Route) -> str:
    """Why the routing rules keep a module out of the cache ('' when they do not)."""
    if route.deny:
        return f"denied by routing rule {route.rule!r}"
    if not route.cache:
        return f"not cached by routing rule {route.rule!r}"
    if not route.targets:
        return "private module, and no upstream it may go to has private_ok"
    return ""


async def _fetch(cache: DiskCache, upstreams: list[Upstream], artifact: Artifact) -> Result:
    if cache.lookup(artifact.req, allow_stale=False) is not None:
        return Result(artifact, "cached")
    errors = []
    for upstream in upstreams:
        try:
            resp = await upstream.open(artifact.req.path)
        except (UpstreamError, UpstreamBusy) as exc:
            errors.append(f"{upstream.name}: {exc.message}")
            continue
        if resp.status != 200:
            text = await resp.read_text(200)
            resp.release()
            errors.append(f"{upstream.name}: {resp.status} {text}".strip())
            continue
        fill = await cache.prefetch(artifact.req, resp)
        if fill.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await fill.task
        if fill.committed:
            return Result(artifact, "fetched", fill.received, upstream.name)
        if fill.error is not None:
            errors.append(f"{upstream.name}: {fill.error.message}")
            continue
        return Result(
            artifact,
            "failed",
            upstream=upstream.name,
            reason="not cached (write error or larger than cache.max_bytes)",
        )
    return Result(artifact, "failed", reason="; ".join(errors))
