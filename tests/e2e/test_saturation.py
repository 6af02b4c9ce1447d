"""Scenario 5: a truly overloaded upstream. The primary serves at most CAPACITY
requests at a time, SERVICE_S each, and queues the rest, like an Athens
that cannot keep up; a crowd of clients asks for far more than that.

The sidecar's pool (POOL connections) fills, its pending queue holds the
rest for up to ``pool.max_wait``, then requests overflow: to the backup, and
as a 503 with ``Retry-After: 1`` when the backup has nothing better (busy is
not sick: no failure is recorded). Once the queueing is sustained while the
primary's own answers are slow, the default policy (test spans) rejects with
an alert: fast 503s with Retry-After, the go command sees the load shedding,
and the real Prometheus fires GoproxySidecarLoadShedding from
deploy/prometheus/alerts.yml."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web

from tests.e2e.processes import free_port, wait_until
from tests.e2e.stack import PRIMARY, Stack, Thresholds

pytestmark = pytest.mark.e2e

ALERT = "GoproxySidecarLoadShedding"
CAPACITY = 2  # requests the primary serves at once: 40 requests/s at SERVICE_S
SERVICE_S = 0.05
POOL = 16  # the sidecar's connections to it: 14 of them queue inside the primary
CLIENTS = 320  # 304 queued in the sidecar: about 7.6 s each, past pool.max_wait (5 s)
CROWD_DEADLINE_S = 60.0
NEVER_CACHED = "/example.com/e2e/not-in-any-cache/@v/list"


@dataclass(frozen=True)
class QueueingThresholds(Thresholds):
    """The default policy's keys at test scale: queueing (wait p99 > 100 ms
    while TTFB p99 > 150 ms, with overflows) for 1 s rejects; slowness alone
    would need 10 minutes, so the verdict can only be the queueing rule's."""

    def yaml(self) -> str:
        return """\
sidecar:
  config:
    thresholds:
      ttfb_p99_ms: 150
      ttfb_p99_for_s: 600
      error_rate: 0.5
      min_requests: 5
      queue_wait_p99_ms: 100
      queue_for_s: 1
      min_span_s: 1
    breaker:
      cooldown_s: 8
      probes: 2
"""


class Overloaded:
    """A reverse proxy in front of the primary nginx that serves CAPACITY
    requests at a time, SERVICE_S each; the others wait their turn in it."""

    def __init__(self, target: str, session: aiohttp.ClientSession) -> None:
        self.target = target
        self.session = session
        self.slots = asyncio.Semaphore(CAPACITY)
        self.received: list[str] = []
        self.inflight = 0
        self.peak = 0

    async def handle(self, request: web.Request) -> web.Response:
        path = request.raw_path
        self.received.append(path)
        async with self.slots:
            self.inflight += 1
            self.peak = max(self.peak, self.inflight)
            try:
                await asyncio.sleep(SERVICE_S)
                async with self.session.get(self.target + path) as r:
                    body = await r.read()
                    return web.Response(status=r.status, body=body, content_type=r.content_type)
            finally:
                self.inflight -= 1


@asynccontextmanager
async def overloaded_primary(world: Stack) -> AsyncIterator[Overloaded]:
    """Start Overloaded on loopback and point toxiproxy's primary at it."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        upstream = Overloaded(world.primary.url, session)
        app = web.Application()
        app.router.add_get("/{tail:.*}", upstream.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            await world.toxiproxy._call(
                "POST", f"/proxies/{PRIMARY}", {"upstream": f"127.0.0.1:{port}"}
            )
            yield upstream
        finally:
            await runner.cleanup()


async def firing(prometheus: str, alert: str, upstream: str) -> dict | None:
    timeout = aiohttp.ClientTimeout(total=2)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"{prometheus}/api/v1/alerts") as r,
    ):
        body = await r.json()
    for a in body["data"]["alerts"]:
        labels = a["labels"]
        if (
            labels.get("alertname") == alert
            and labels.get("upstream") == upstream
            and a["state"] == "firing"
        ):
            return a
    return None


async def query(prometheus: str, promql: str) -> list[dict]:
    timeout = aiohttp.ClientTimeout(total=2)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"{prometheus}/api/v1/query", params={"query": promql}) as r,
    ):
        body = await r.json()
    return body["data"]["result"]


class Crowd:
    """CLIENTS loops asking for unique, never-cached lists until told to stop."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.stop = asyncio.Event()
        self.answers: collections.Counter[tuple[int, str]] = collections.Counter()

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=CROWD_DEADLINE_S)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await asyncio.gather(*(self._client(session, i) for i in range(CLIENTS)))

    async def _client(self, session: aiohttp.ClientSession, i: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CROWD_DEADLINE_S
        n = 0
        while not self.stop.is_set() and loop.time() < deadline:
            n += 1
            url = f"{self.base}/example.com/e2e/overload/c{i}/r{n}/@v/list"
            async with session.get(url) as r:
                text = await r.text()
                retry_after = r.headers.get("Retry-After")
                self.answers[(r.status, classify(r.status, retry_after, text))] += 1
            if r.status == 503:
                await asyncio.sleep(0.2)  # keep the shed load modest on a 2-core machine


def classify(status: int, retry_after: str | None, text: str) -> str:
    if status != 503:
        return ""
    if "no upstream could take the request now" in text:
        return f"overflow retry-after={retry_after}"
    if "shedding load" in text:
        return f"policy retry-after={retry_after}"
    return text[:80]


async def test_an_overloaded_upstream_overflows_then_sheds_load_with_an_alert(
    stack, prometheus, alert_rules
):
    world = await stack(QueueingThresholds(), primary_pool=POOL)
    prom = await prometheus(world.sidecar.url.removeprefix("http://"), alert_rules)
    async with overloaded_primary(world) as primary:
        crowd = Crowd(world.sidecar.url)
        running = asyncio.create_task(crowd.run())
        try:
            view = await world.sidecar.wait_breaker(PRIMARY, 45, action="reject")
        finally:
            crowd.stop.set()
            await running
        assert view["alert"] is True and "queueing" in view["reason"], view
        assert view["stats"]["errors"] == 0, view  # busy, and slow: never an error
        assert primary.peak <= CAPACITY
        # Before the verdict, requests that waited out pool.max_wait overflowed:
        # the backup has no such module, so the answer was a quick "try again".
        assert crowd.answers[(503, "overflow retry-after=1")] >= 1, crowd.answers
        metrics = await world.sidecar.metrics()
        overflows = metrics.value("goproxy_sidecar_upstream_overflows_total", upstream=PRIMARY)
        assert overflows >= crowd.answers[(503, "overflow retry-after=1")], overflows
        waits = metrics.value("goproxy_sidecar_upstream_queue_wait_seconds_count", upstream=PRIMARY)
        assert waits >= 1, waits

        # The verdict: rejected at once, without asking the primary.
        async with (
            aiohttp.ClientSession() as session,
            session.get(world.sidecar.url + NEVER_CACHED) as r,
        ):
            text = await r.text()
            assert r.status == 503 and r.headers.get("Retry-After"), (r.status, r.headers)
            assert "shedding load" in text, text
        assert NEVER_CACHED not in primary.received
        result = await world.go.download(deadline_s=60)
        assert not result.ok, result
        assert "503 Service Unavailable" in result.output and "shedding load" in result.output

    metrics = await world.sidecar.metrics()
    rejected = metrics.value(
        "goproxy_sidecar_rejected_requests_total", upstream=PRIMARY, reason="policy"
    )
    assert rejected >= 2, rejected
    assert metrics.value("goproxy_sidecar_upstream_pool_limit", upstream=PRIMARY) == POOL
    assert metrics.transitions(PRIMARY).get(("closed", "open", "reject")) == 1

    try:
        alert = await wait_until(
            f"{ALERT} to fire in Prometheus",
            lambda: firing(prom, ALERT, PRIMARY),
            20,
            every_s=0.2,
        )
    except AssertionError as exc:
        seen = await query(prom, "max_over_time(goproxy_sidecar_breaker_alert[1m])")
        state = await query(prom, 'max_over_time(goproxy_sidecar_breaker_state{state="open"}[1m])')
        raise AssertionError(
            f"{exc}\nPrometheus saw breaker_alert {seen}\nopen state {state}"
            f"\n/breakers now: {await world.sidecar.breakers()}"
        ) from None
    assert alert["labels"]["severity"] == "critical"
