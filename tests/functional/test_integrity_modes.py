"""Checksum verification's modes and paths (issue 15), with the real Go checksum
database of tests/sumdb/server and loopback upstreams (tests/functional/
test_integrity.py builds both): report mode, a database that cannot vouch
(serve / refuse), modules never looked up (verify.skip, GONOSUMDB, GOPRIVATE,
routing.private), a direct ``verify.url``, and bodies relayed without the
cache (spooled, checked, then sent).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from sidecar.app import SidecarService, build_sidecar
from sidecar.config import (
    CacheConfig,
    RouteRule,
    RoutingConfig,
    VerifyConfig,
    VerifyMode,
    WhenUnavailable,
)
from sidecar.config_loader import load_config
from tests.functional import test_integrity as base
from tests.functional.test_integrity import (
    BIG,
    SMALL,
    Upstream,
    artifact,
    cached_files,
    metric,
    tamper_both,
)
from tests.polling import until
from tests.serving import SidecarTestServer
from tests.sumdb import gosumdb
from tests.sumdb.gosumdb import GoSumdb

# The fixtures of test_integrity.py, used by name: one database per module.
sumdb_server_binary = gosumdb.sumdb_server_binary
database = base.database
serve = base.serve

FAILURES = "goproxy_sidecar_integrity_failures_total"
UNAVAILABLE = "goproxy_sidecar_verify_unavailable_total"


def sumdb_asked(*upstreams: Upstream) -> list[str]:
    return [p for u in upstreams for p in u.asked if p.startswith("sumdb/")]


async def get(client: Any, path: str) -> tuple[int, bytes]:
    resp = await client.get("/" + path)
    return resp.status, await resp.read()


async def test_report_mode_serves_and_caches_a_mismatch_and_counts_it(
    database: tuple[GoSumdb, Path],
    serve: Callable[[Upstream], Any],
    sidecar_client: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The README: report "only tells you": the bytes go where they would go
    without checking (served, cached); a metric and a log line say so."""
    db, proxy = database
    primary = Upstream(proxy, db, tamper=tamper_both(proxy, *BIG))
    backup = Upstream(proxy, db)
    cache_dir = tmp_path / "cache"
    client, _ = await sidecar_client(
        [await serve(primary), await serve(backup)],
        cache=CacheConfig(dir=str(cache_dir)),
        verify=VerifyConfig(mode=VerifyMode.REPORT, key=db.verifier_key),
    )
    zip_path, mod_path = artifact(*BIG, "zip"), artifact(*BIG, "mod")
    with caplog.at_level(logging.ERROR, "sidecar.integrity"):
        assert await get(client, zip_path) == (200, primary.tamper[zip_path])
        assert await get(client, mod_path) == (200, primary.tamper[mod_path])

    metrics = await (await client.get("/metrics")).text()
    assert metric(metrics, FAILURES, upstream="up0", kind="zip") == 1
    assert metric(metrics, FAILURES, upstream="up0", kind="mod") == 1
    mismatches = [r for r in caplog.records if r.getMessage() == "checksum mismatch"]
    assert {r.served for r in mismatches} == {True}
    assert len(mismatches) == 2
    assert not any(p.startswith(artifact(*BIG, "")) for p in backup.asked)
    # Cached as without checking (committed once its fill ends): a hit now.
    await until(
        "the tampered zip committed",
        lambda: primary.tamper[zip_path] in [p.read_bytes() for p in cached_files(cache_dir)],
    )
    asked_before = len(primary.asked)
    assert await get(client, zip_path) == (200, primary.tamper[zip_path])
    assert len(primary.asked) == asked_before


async def test_unavailable_serve_serves_unchecked_counts_and_logs(
    database: tuple[GoSumdb, Path],
    serve: Callable[[Upstream], Any],
    sidecar_client: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    db, proxy = database
    only = Upstream(proxy, db, sumdb=False)  # 404 to every sumdb/ path
    client, _ = await sidecar_client(
        [await serve(only)],
        cache=CacheConfig(dir=str(tmp_path / "cache")),
        verify=VerifyConfig(key=db.verifier_key),
    )
    paths = [artifact(*m, ext) for m in (BIG, SMALL) for ext in ("zip", "mod")]
    with caplog.at_level(logging.WARNING, "sidecar.integrity"):
        for path in paths:
            assert await get(client, path) == (200, (proxy / path).read_bytes())
    metrics = await (await client.get("/metrics")).text()
    assert metric(metrics, UNAVAILABLE, kind="zip", action="served") == 2
    assert metric(metrics, UNAVAILABLE, kind="mod", action="served") == 2
    assert metric(metrics, UNAVAILABLE, action="refused") == 0
    assert sumdb_asked(only)  # it did ask, and got 404
    # Never silent, never a flood: the first at once, the rest within the interval
    # (10 s) only counted, and summed up in the next line after it.
    warned = [r for r in caplog.records if "cannot vouch" in r.getMessage()]
    assert len(warned) == 1, [r.__dict__ for r in warned]
    line = warned[0]
    assert (line.action, line.reason, line.unlogged_before) == ("served", "SumdbUnavailable", 0)


async def test_unavailable_refuse_answers_502_and_caches_nothing(
    database: tuple[GoSumdb, Path],
    serve: Callable[[Upstream], Any],
    sidecar_client: Any,
    tmp_path: Path,
) -> None:
    db, proxy = database
    only = Upstream(proxy, db, sumdb=False)
    cache_dir = tmp_path / "cache"
    client, _ = await sidecar_client(
        [await serve(only)],
        cache=CacheConfig(dir=str(cache_dir)),
        verify=VerifyConfig(key=db.verifier_key, unavailable=WhenUnavailable.REFUSE),
    )
    for ext in ("zip", "mod"):
        resp = await client.get("/" + artifact(*BIG, ext))
        text = await resp.text()
        assert resp.status == 502, text
        assert "cannot vouch" in text
    metrics = await (await client.get("/metrics")).text()
    assert metric(metrics, UNAVAILABLE, action="refused") == 2
    assert metric(metrics, UNAVAILABLE, action="served") == 0
    assert metric(metrics, FAILURES) == 0  # no fault of the upstream
    genuine = (proxy / artifact(*BIG, "zip")).read_bytes()
    assert not [p for p in cached_files(cache_dir) if p.read_bytes() == genuine]


async def test_verify_skip_is_never_looked_up(
    database: tuple[GoSumdb, Path],
    serve: Callable[[Upstream], Any],
    sidecar_client: Any,
) -> None:
    db, proxy = database
    primary = Upstream(proxy, db, tamper=tamper_both(proxy, *BIG))
    urls = [await serve(primary)]
    client, _ = await sidecar_client(
        urls,
        verify=VerifyConfig(key=db.verifier_key, skip=("example.com/b*",)),
    )
    assert await get(client, artifact(*BIG, "zip")) == (
        200,
        primary.tamper[artifact(*BIG, "zip")],
    )
    assert sumdb_asked(primary) == []
    metrics = await (await client.get("/metrics")).text()
    assert metric(metrics, FAILURES) == 0
    assert metric(metrics, UNAVAILABLE) == 0


@pytest.fixture
async def loaded_sidecar(
    tmp_path: Path,
) -> AsyncIterator[Callable[[str, dict[str, str]], Any]]:
    """A sidecar from a config file and an environment, as a user runs it."""
    clients: list[TestClient[Any, Any]] = []

    async def start(text: str, env: dict[str, str]) -> TestClient[Any, Any]:
        path = tmp_path / "sidecar.yaml"
        path.write_text(text)
        sidecar = build_sidecar(load_config(str(path), env))
        client: TestClient[Any, Any] = TestClient(SidecarTestServer(SidecarService(sidecar)))
        await client.start_server()
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.close()


async def test_gonosumdb_goprivate_and_routing_private_are_never_looked_up(
    database: tuple[GoSumdb, Path],
    serve: Callable[[Upstream], Any],
    loaded_sidecar: Callable[[str, dict[str, str]], Any],
    tmp_path: Path,
) -> None:
    """Each of the three ways: the module's bodies are served as the upstream has
    them, and not one sumdb/ path reaches an upstream."""
    db, proxy = database
    cases = {
        "GONOSUMDB": ({"GONOSUMDB": "example.com/big"}, ""),
        "GOPRIVATE": ({"GOPRIVATE": "example.com/big"}, ""),
        "routing.private": ({}, 'routing: {private: ["example.com/*"]}\n'),
    }
    for case, (env, extra) in cases.items():
        primary = Upstream(proxy, db, tamper=tamper_both(proxy, *BIG))
        url = await serve(primary)
        client = await loaded_sidecar(
            f'listen: "127.0.0.1:1"\n'  # the test server binds port 0
            f"upstreams: [{{name: up0, url: {url!r}, private_ok: true}}]\n"
            f"cache: {{dir: {str(tmp_path / case)!r}}}\n"
            f"verify: {{key: {db.verifier_key!r}}}\n" + extra,
            env,
        )
        for ext in ("zip", "mod"):
            path = artifact(*BIG, ext)
            assert await get(client, path) == (200, primary.tamper[path]), case
        assert sumdb_asked(primary) == [], case
        # A module not skipped is still checked: the lookup goes out.
        if case != "routing.private":
            assert (await get(client, artifact(*SMALL, "mod")))[0] == 200
            assert sumdb_asked(primary), case


async def test_a_direct_verify_url_checks_without_the_upstreams_sumdb_path(
    database: tuple[GoSumdb, Path],
    serve: Callable[[Upstream], Any],
    sidecar_client: Any,
) -> None:
    db, proxy = database
    primary = Upstream(proxy, db, tamper=tamper_both(proxy, *BIG), sumdb=False)
    backup = Upstream(proxy, db, sumdb=False)
    client, _ = await sidecar_client(
        [await serve(primary), await serve(backup)],
        verify=VerifyConfig(key=db.verifier_key, url=db.url),
    )
    for ext in ("zip", "mod"):
        path = artifact(*BIG, ext)
        assert await get(client, path) == (200, (proxy / path).read_bytes())
    metrics = await (await client.get("/metrics")).text()
    assert metric(metrics, FAILURES, upstream="up0") == 2
    assert metric(metrics, UNAVAILABLE) == 0
    assert sumdb_asked(primary, backup) == []


@pytest.mark.parametrize("how", ["cache off", "cache: false rule"])
async def test_a_relayed_body_is_checked_before_any_byte_is_sent(
    how: str,
    database: tuple[GoSumdb, Path],
    serve: Callable[[Upstream], Any],
    sidecar_client: Any,
    tmp_path: Path,
) -> None:
    """No cache fill to gate: the body is spooled, checked, then sent; the
    tampered one is never served, the backup's genuine one is."""
    db, proxy = database
    primary = Upstream(proxy, db, tamper=tamper_both(proxy, *BIG))
    backup = Upstream(proxy, db)
    cache_dir = tmp_path / "cache"
    overrides: dict[str, Any] = {}
    if how == "cache: false rule":
        overrides = {
            "cache": CacheConfig(dir=str(cache_dir)),
            "routing": RoutingConfig(rules=(RouteRule(match="example.com/big", cache=False),)),
        }
    client, _ = await sidecar_client(
        [await serve(primary), await serve(backup)],
        verify=VerifyConfig(key=db.verifier_key),
        **overrides,
    )
    for ext in ("zip", "mod"):
        path = artifact(*BIG, ext)
        status, body = await get(client, path)
        assert (status, body) == (200, (proxy / path).read_bytes()), how
        assert path in primary.asked and path in backup.asked
    metrics = await (await client.get("/metrics")).text()
    assert metric(metrics, FAILURES, upstream="up0", kind="zip") == 1
    assert metric(metrics, FAILURES, upstream="up0", kind="mod") == 1
    cached = [p.read_bytes() for p in cached_files(cache_dir)] if cache_dir.exists() else []
    assert not any(b in cached for b in primary.tamper.values())


@dataclass
class CountingUpstream(Upstream):
    """Sets ``reached`` once it has been asked for ``want`` bodies of BIG."""

    want: int = 0
    reached: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        answer = await super().handle(request)
        if sum(p.startswith(artifact(*BIG, "")) for p in self.asked) >= self.want:
            self.reached.set()
        return answer


@dataclass
class HeldDatabase:
    """The database in front of its own URL, holding each lookup's answer until
    every client's body has reached the sidecar: all their checks are waiting."""

    db: GoSumdb
    release: asyncio.Event
    lookups: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path.lstrip("/")
        if path.startswith("lookup/"):
            self.lookups.append(path)
            await asyncio.wait_for(self.release.wait(), 60)
            await asyncio.sleep(0.2)  # the last body's check starts meanwhile
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{self.db.url}/{path}") as answer,
        ):
            return web.Response(status=answer.status, body=await answer.read())


async def test_concurrent_checks_of_one_version_share_one_lookup(
    database: tuple[GoSumdb, Path],
    serve: Callable[[Any], Any],
    sidecar_client: Any,
) -> None:
    """Eight clients, no cache (each request fetches and checks its own body):
    one lookup of module@version, every client served the genuine body."""
    db, proxy = database
    clients = 8
    only = CountingUpstream(proxy, db, sumdb=False, want=clients)
    front = HeldDatabase(db, only.reached)
    client, _ = await sidecar_client(
        [await serve(only)], verify=VerifyConfig(key=db.verifier_key, url=await serve(front))
    )
    paths = [artifact(*BIG, "zip" if i % 2 else "mod") for i in range(clients)]
    answers = await asyncio.gather(*(get(client, p) for p in paths))
    assert answers == [(200, (proxy / p).read_bytes()) for p in paths]
    assert front.lookups == [f"lookup/{BIG[0]}@{BIG[1]}"]
    metrics = await (await client.get("/metrics")).text()
    assert metric(metrics, UNAVAILABLE) == 0
