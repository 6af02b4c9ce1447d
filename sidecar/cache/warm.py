"""Prefetch every module version of a go.sum into the cache (``goproxy-sidecar warm``).

Each go.sum line names one module version: ``<module> <version>/go.mod h1:…``
needs the ``.mod``; ``<module> <version> h1:…`` needs the ``.zip``, plus the
``.info`` and ``.mod`` the go command asks for alongside. Artifacts already in
the cache are skipped. Each one walks the configured upstreams in order, like
a comma-separated GOPROXY: 404/410 and failures fall through to the next.
What the routing rules keep out of the cache (``deny``, ``cache: false``, a
private module no upstream may serve) is skipped, not failed: the running
sidecar would not cache it either.
A ``.zip`` or ``.mod`` is checked against its go.sum ``h1:`` line before it is
kept (the fill's gate): one that does not match is not cached, and the next
upstream is tried, as the sidecar does with the checksum database.
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
    UpstreamIntegrityError,
    UpstreamUnverified,
    ZipHashError,
)
from sidecar.goproxy import GoproxyRequest, escape_path, escape_version, parse_request_path
from sidecar.metrics import Metrics
from sidecar.routing import Route, Router
from sidecar.sumdb.dirhash import hash_gomod, hash_zip
from sidecar.upstreams import Upstream

DEFAULT_JOBS: Final = 8


@dataclass(frozen=True, slots=True)
class Artifact:
    module: str
    version: str
    ext: str
    req: GoproxyRequest
    h1: str | None = None  # what go.sum says the body hashes to (zip and mod)

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
    seen: dict[str, int] = {}  # cache key: index in plan.artifacts
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3 or not fields[2].startswith("h1:"):
            plan.problems.append(f"line {number}: not a go.sum line: {line.strip()[:120]}")
            continue
        module, version, h1 = fields
        gomod_line = version.endswith("/go.mod")
        exts = ("mod",) if gomod_line else ("zip", "info", "mod")
        version = version.removesuffix("/go.mod")
        for ext in exts:
            # The zip line's hash is the zip's; the /go.mod line's the .mod's.
            line_h1 = h1 if (ext == "mod") == gomod_line and ext != "info" else None
            try:
                artifact = _artifact(module, version, ext, line_h1)
            except RequestError as exc:
                plan.problems.append(f"line {number}: {module} {version}: {exc.message}")
                break
            key = artifact.req.cache_key
            if key not in seen:
                seen[key] = len(plan.artifacts)
                plan.artifacts.append(artifact)
            elif line_h1 is not None and plan.artifacts[seen[key]].h1 is None:
                plan.artifacts[seen[key]] = artifact  # the .mod of a zip line, now with its hash
    return plan


def _artifact(module: str, version: str, ext: str, h1: str | None = None) -> Artifact:
    path = f"/{escape_path(module)}/@v/{quote(escape_version(version), safe='')}.{ext}"
    return Artifact(module, version, ext, parse_request_path(path), h1)


class GoSumGate:
    """A fill's gate (``sidecar.cache.fill.Gate``): the body must hash to go.sum's line."""

    def __init__(self, artifact: Artifact, upstream: str) -> None:
        self._artifact, self._upstream = artifact, upstream

    def sink(self) -> None:
        """None: the stored body is hashed once complete (warm has no client waiting)."""
        return None

    async def check(self, path: str) -> None:
        a = self._artifact
        assert a.h1 is not None
        got = await asyncio.to_thread(_h1_of, path, a.ext)
        if got != a.h1:
            subject = f"{a.module}@{a.version}"
            raise UpstreamIntegrityError(self._upstream, subject, a.ext, a.h1, got, "go.sum")

    def unchecked(self, reason: str) -> None:
        raise UpstreamUnverified(self._upstream, f"cannot be checked against go.sum: {reason}")


def _h1_of(path: str, ext: str) -> str:
    """Worker thread: the h1: of a stored body, or a marker that never equals one."""
    try:
        if ext == "zip":
            return hash_zip(path)
        with open(path, "rb") as f:
            return hash_gomod(f.read())
    except (ZipHashError, OSError) as exc:
        return f"unreadable ({exc})"


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
        gate = GoSumGate(artifact, upstream.name) if artifact.h1 is not None else None
        fill = await cache.prefetch(artifact.req, resp, gate)
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
