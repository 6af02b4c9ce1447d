"""Scenario 5: pool saturation. A slow primary behind a 2-connection pool and a
fan-out of concurrent `go mod download`s: the breaker rejects at once with a
503 + Retry-After instead of queueing, and the real Prometheus fires
GoproxySidecarLoadShedding from deploy/prometheus/alerts.yml."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from tests.e2e.gocmd import cancel_all
from tests.e2e.processes import wait_until
from tests.e2e.stack import Thresholds

pytestmark = pytest.mark.e2e

ALERT = "GoproxySidecarLoadShedding"
CLIENTS = 6
LATENCY_MS = 300
NEVER_CACHED = "/example.com/e2e/not-in-any-cache/@v/list"


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


async def timed_get(url: str) -> tuple[int, dict[str, str], float]:
    started = time.monotonic()
    async with aiohttp.ClientSession() as session, session.get(url) as r:
        await r.read()
        return r.status, dict(r.headers), time.monotonic() - started


async def test_saturated_pool_sheds_load_fast_and_alerts(stack, prometheus, alert_rules):
    # The reject lasts one cool-down: long enough for a 1 s scrape and evaluation.
    # Slowness is not this scenario's subject: the TTFB threshold is out of reach
    # (a queue in front of 2 connections makes every TTFB long), so the policy's
    # verdict stays "reject" rather than turning to "reroute".
    world = await stack(Thresholds(cooldown_s=8, ttfb_p99_ms=60_000), primary_pool=2)
    prom = await prometheus(world.sidecar.url.removeprefix("http://"), alert_rules)
    await world.add_toxic("latency", latency=LATENCY_MS)

    downloads = [asyncio.create_task(world.go.download(deadline_s=60)) for _ in range(CLIENTS)]
    try:
        view = await world.sidecar.wait_breaker("primary", 15, action="reject")
        assert view["alert"] is True and "pool saturation" in view["reason"], view
        status, headers, seconds = await timed_get(world.sidecar.url + NEVER_CACHED)
        assert status == 503 and headers.get("Retry-After"), (status, headers)
        assert seconds < LATENCY_MS / 1000 / 2, seconds  # did not wait for the slow primary
        results = await asyncio.gather(*downloads)
    finally:
        await cancel_all(downloads)
    shed = [r for r in results if not r.ok]
    assert shed, "no go command saw the load shedding:\n" + "\n".join(map(str, results))
    for r in shed:
        assert "503 Service Unavailable" in r.output and "shedding load" in r.output, r
    metrics = await world.sidecar.metrics()
    rejected = metrics.value(
        "goproxy_sidecar_rejected_requests_total", upstream="primary", reason="policy"
    )
    assert rejected >= 1 + len(shed), rejected
    assert metrics.value("goproxy_sidecar_upstream_pool_limit", upstream="primary") == 2
    assert metrics.transitions("primary").get(("closed", "open", "reject")) == 1

    try:
        alert = await wait_until(
            f"{ALERT} to fire in Prometheus",
            lambda: firing(prom, ALERT, "primary"),
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
