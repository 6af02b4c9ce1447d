"""deploy/grafana/goproxy-sidecar.json against a real Prometheus scraping a
real sidecar (issue 16): every panel's query parses, and returns data.

The world is small and fast: a backup nginx serving the corpus, and a primary
written here (aiohttp on loopback) that misbehaves on purpose, so that the
series each panel draws exist:

- ``.info`` answers 404 while the backup has it: masked failures;
- ``.mod`` answers after HEDGE_SLOW_S: hedged to the backup, hedges won;
- ``example.com/dash-narrow/*`` is routed to "narrow" only, the same server
  behind a pool of one connection and no queue; it answers after
  HEDGE_SLOW_S: overflows, and 503s with reason overflow;
- ``example.com/dash-fail/*`` answers 500: failures, the breaker opens;
- ``sumdb/`` answers 404 (so does nginx): every body is "cannot vouch",
  counted as verify_unavailable (verify.mode report).

Besides: an expired list served from the cache while "narrow"'s breaker
is open (a stale serve), zips fetched twice (misses, hits, cache bytes), a cached blob
rewritten on disk (a cache integrity failure), a denied module and an
invalid path (refusals), and a changed thresholds file (a policy reload).

Two queries may legitimately answer nothing here, and are only checked to
parse: upstream checksum mismatches (they need a checksum database that
vouches for other bytes than an upstream serves) and policy evaluation
failures (they need an evaluation that errors or times out; a broken policy
file is refused at reload and never evaluated).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.e2e.account import SidecarAccount
from tests.e2e.processes import Procs, free_port, wait_until
from tests.e2e.servers import start_nginx, start_prometheus, start_sidecar
from tests.e2e.stack import Thresholds, Tools, write_policies
from tests.tools import require_tool

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "goproxy-sidecar.json"
RULES = REPO / "deploy" / "prometheus" / "alerts.yml"
HEDGE_SLOW_S = 1.0
DATA_DEADLINE_S = 30.0
MUTABLE_TTL_S = 1.0  # lists expire fast: the open breaker serves one stale
ZIPS = (
    "github.com/google/uuid/@v/v1.6.0.zip",
    "github.com/spf13/pflag/@v/v1.0.5.zip",
    "github.com/davecgh/go-spew/@v/v1.1.1.zip",
)
INFOS = tuple(z.removesuffix(".zip") + ".info" for z in ZIPS)
MODS = tuple(z.removesuffix(".zip") + ".mod" for z in ZIPS)
# Grafana's variables, as "All" and a typical rate interval would expand them.
VARIABLES = {"$__rate_interval": "1m", "$instance": ".*", "$upstream": ".*"}
MAY_BE_EMPTY = ("goproxy_sidecar_integrity_failures_total", "goproxy_sidecar_policy_failures_total")


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, expr with the variables expanded) of every target."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = [
        p
        for top in dashboard["panels"]
        for p in ([top] if top["type"] != "row" else top.get("panels", []))
    ]
    out = []
    for panel in panels:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"{panel['title']}: unexpanded variable in {expr}"
            out.append((panel["title"], expr))
    return out


class Primary:
    """A primary that misbehaves by path (see the module docstring)."""

    def __init__(self, tree: Path) -> None:
        self.tree = tree

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path.startswith("/sumdb/") or path.endswith(".info"):
            return web.Response(status=404, text="not found")
        if path.startswith("/example.com/dash-fail/"):
            return web.Response(status=500, text="boom")
        if path.startswith("/example.com/dash-narrow/"):
            await asyncio.sleep(HEDGE_SLOW_S)
            return web.Response(text="v1.0.0\n")
        if path.endswith(".mod"):
            await asyncio.sleep(HEDGE_SLOW_S)
        file = (self.tree / path.lstrip("/")).resolve()
        if not file.is_relative_to(self.tree.resolve()) or not file.is_file():
            return web.Response(status=404, text="not found")
        return web.Response(body=file.read_bytes())


@asynccontextmanager
async def primary_server(tree: Path) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/{tail:.*}", Primary(tree).handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def sidecar_yaml(port: int, primary: str, backup: str, cache: Path, policies: Path) -> str:
    return f"""\
listen: "127.0.0.1:{port}"
upstreams:
  - name: primary
    url: "{primary}"
    timeouts: {{connect: 1s, first_byte: 5s, idle: 5s}}
    hedge: {{delay: 300ms}}
  - name: backup
    url: "{backup}"
    timeouts: {{connect: 1s, first_byte: 5s, idle: 5s}}
  - name: narrow
    url: "{primary}"
    pool: {{max_connections: 1, max_pending: 0}}
    timeouts: {{connect: 1s, first_byte: 5s, idle: 5s}}
cache:
  dir: "{cache}"
  mutable_ttl: {MUTABLE_TTL_S}s
policy:
  engine: embedded
  paths: ["{policies}"]
  interval: 200ms
stats:
  window: 2s
  slice: 500ms
routing:
  rules:
    - {{match: "example.com/dash-deny/*", deny: true}}
    - {{match: "example.com/dash-narrow/*", upstreams: [narrow]}}
verify: {{mode: report, key: sum.golang.org}}
shutdown_grace: 1s
"""


async def get(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url) as r:
        await r.read()
        return r.status


async def drive(sidecar: SidecarAccount, cache: Path, policies: Path) -> dict[str, list[int]]:
    """The traffic; returns the statuses by phase, for the failure message."""
    base = sidecar.url
    seen: dict[str, list[int]] = {}
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        # One connection, no queue: two of three overflow, with nowhere else to go.
        seen["overflow"] = list(
            await asyncio.gather(
                *(get(s, f"{base}/example.com/dash-narrow/m{i}/@v/list") for i in range(3))
            )
        )
        listed_at = asyncio.get_running_loop().time()
        seen["miss"] = [await get(s, f"{base}/{p}") for p in ZIPS]
        seen["hit"] = [await get(s, f"{base}/{p}") for p in ZIPS]
        seen["masked"] = [await get(s, f"{base}/{p}") for p in INFOS]
        seen["hedged"] = [await get(s, f"{base}/{p}") for p in MODS]
        # Same size, new bytes and mtime: the next hit hashes it again and evicts it.
        for blob in (cache / "v1" / "blobs").rglob("*"):
            if blob.is_file():
                data = blob.read_bytes()
                blob.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])
        seen["corrupt"] = [await get(s, f"{base}/{p}") for p in ZIPS]
        seen["refused"] = [
            await get(s, f"{base}/example.com/dash-deny/x/@v/list"),
            await get(s, f"{base}/not-a-module-path"),
        ]
        thresholds = policies / "thresholds.yaml"
        thresholds.write_text(thresholds.read_text() + "# changed: a reload\n")
        seen["fail"] = [
            await get(s, f"{base}/example.com/dash-fail/m{i}/@v/list") for i in range(8)
        ]
        # An open breaker says "cache": the expired list (mutable_ttl 1s) is served stale.
        await sidecar.wait_breaker("narrow", DATA_DEADLINE_S, state="open")
        # The phases above may take less than mutable_ttl (hedges fire at once
        # during a silence): let the list expire, or it is served as a fresh hit.
        await asyncio.sleep(
            max(0.0, listed_at + MUTABLE_TTL_S + 0.2 - asyncio.get_running_loop().time())
        )
        served = seen["overflow"].index(200) if 200 in seen["overflow"] else 0
        seen["stale"] = [await get(s, f"{base}/example.com/dash-narrow/m{served}/@v/list")]
    return seen


async def query(session: aiohttp.ClientSession, prometheus: str, expr: str) -> dict[str, Any]:
    async with session.get(f"{prometheus}/api/v1/query", params={"query": expr}) as r:
        body: dict[str, Any] = await r.json()
        return body


async def scraped(prometheus: str) -> bool:
    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        body = await query(session, prometheus, 'up{job="goproxy-sidecar"} == 1')
    return bool(body["data"]["result"])


async def test_every_dashboard_query_parses_and_returns_data(
    tmp_path: Path, corpus: Path, tools: Tools, procs: Procs
) -> None:
    prometheus_bin = require_tool("prometheus")
    queries = panel_queries()
    assert len(queries) >= 30, "fewer targets than the dashboard's rows need?"
    tree = corpus / "modcache" / "cache" / "download"
    policies = write_policies(tmp_path / "policies", Thresholds(ttfb_p99_ms=60_000))
    cache = tmp_path / "cache"
    backup = await start_nginx(procs, tools.nginx, "nginx-backup", tree)
    async with primary_server(tree) as primary:
        port = free_port()
        config = tmp_path / "sidecar.yaml"
        config.write_text(sidecar_yaml(port, primary, backup.url, cache, policies))
        sidecar = SidecarAccount(
            f"http://127.0.0.1:{port}", await start_sidecar(procs, config, port)
        )
        prom = await start_prometheus(procs, prometheus_bin, f"127.0.0.1:{port}", RULES)
        # Prometheus applies new targets a few seconds after start: traffic before
        # its first scrape would leave short states (an open breaker) unseen.
        await wait_until("Prometheus' first scrape", lambda: scraped(prom), DATA_DEADLINE_S, 0.5)
        seen = await drive(sidecar, cache, policies)

        assert seen["overflow"].count(503) >= 1 and 200 in seen["overflow"], seen
        assert seen["miss"] == seen["hit"] == seen["corrupt"] == [200] * len(ZIPS), seen
        assert seen["masked"] == seen["hedged"] == [200] * len(ZIPS), seen
        assert seen["refused"][0] == 403 and 400 <= seen["refused"][1] < 500, seen
        # Once a breaker opens mid-phase the answer may change; some went through.
        assert 502 in seen["fail"] and seen["stale"] == [200], seen

        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for title, expr in queries:
                body = await query(session, prom, expr)
                assert body["status"] == "success", f"{title}: {expr}: {body}"
            pending = [(t, e) for t, e in queries if not any(m in e for m in MAY_BE_EMPTY)]
            assert len(pending) < len(queries)

            async def all_answer() -> bool:
                still = []
                for title, expr in pending:
                    body = await query(session, prom, expr)
                    if not body["data"]["result"]:
                        still.append((title, expr))
                pending[:] = still
                return not still

            try:
                await wait_until(
                    "every panel query to return data",
                    all_answer,
                    DATA_DEADLINE_S,
                    1.0,
                    sidecar.proc,
                )
            except AssertionError as exc:
                empty = "\n".join(f"  {t}: {e}" for t, e in pending)
                raise AssertionError(f"{exc}\nno data yet:\n{empty}\ntraffic: {seen}") from None
            # The breakers of the failing upstreams opened (the sidecar said so
            # above): the timeline's query shows it, as 2, once Prometheus scraped it.
            timeline = next(e for _, e in queries if 'state="open"' in e)
            opened = f"max_over_time(({timeline})[1m:1s]) == 2"

            async def shows_open() -> list[dict[str, Any]] | None:
                result: list[dict[str, Any]] = (await query(session, prom, opened))["data"][
                    "result"
                ]
                return result or None

            shown = await wait_until("the timeline to show open", shows_open, DATA_DEADLINE_S, 1.0)
            assert {r["metric"]["upstream"] for r in shown} >= {"narrow"}, shown
