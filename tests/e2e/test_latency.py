"""Scenario 2: a slow primary. A latency toxic pushes its TTFB over the test
threshold; the breaker reroutes to the backup and the build still works.
Removing the toxic heals it through half-open."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import pytest

from tests.e2e.stack import Thresholds

pytestmark = pytest.mark.e2e

LATENCY_MS = 400  # the test threshold is 150 ms for 1 s
# The go command probes path prefixes and gets many 404s; these stand in for
# them: a module no upstream has, so every one reaches the (slow) primary.
PROBE = "/example.com/e2e/absent/@v/list"


async def probe_traffic(url: str, stop: asyncio.Event, clients: int = 3) -> int:
    """Keep ``clients`` requests in flight until ``stop``; returns how many were sent."""
    sent = 0

    async def one_client(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while not stop.is_set():
            async with session.get(url + PROBE) as r:
                await r.read()
                assert r.status == 404, r.status
            sent += 1

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one_client(session) for _ in range(clients)))
    return sent


async def test_slow_primary_is_rerouted_and_heals_through_half_open(stack):
    # The cool-down outlasts the build (a few seconds; more on a loaded machine),
    # so the whole build runs while rerouted.
    world = await stack(Thresholds(cooldown_s=12))
    toxic = await world.add_toxic("latency", latency=LATENCY_MS)

    stop = asyncio.Event()
    traffic = asyncio.create_task(probe_traffic(world.sidecar.url, stop))
    try:
        tripped = await world.sidecar.wait_breaker("primary", 10, state="open")
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(traffic, 5)
    assert tripped["action"] == "reroute", tripped
    assert tripped["reason"].startswith("ttfb p99 ") and "> 150ms for 1s" in tripped["reason"]
    assert tripped["stats"]["ttfb_ms"]["p99"] > 150  # the figures the policy saw

    build = await world.go.build()
    assert build.ok, build
    view = (await world.sidecar.breakers())["primary"]
    assert view["state"] == "open" and view["action"] == "reroute", view  # still in cool-down
    assert world.primary.count(".zip", None) == 0  # rerouted: not one module asked of it
    metrics = await world.sidecar.metrics()
    zips = world.backup.count(".zip")
    assert zips >= 5
    assert metrics.value("goproxy_sidecar_requests_total", upstream="backup", kind="zip") == zips
    assert metrics.transitions("primary") == {("closed", "open", "reroute"): 1}
    assert metrics.value("goproxy_sidecar_breaker_state", upstream="primary", state="open") == 1

    await world.remove_toxic(toxic)
    healed = await world.sidecar.wait_breaker("primary", 30, state="closed")
    assert healed["action"] == "allow" and "probes succeeded" in healed["reason"], healed
    metrics = await world.sidecar.metrics()
    assert metrics.transitions("primary") == {
        ("closed", "open", "reroute"): 1,
        ("open", "half-open", "cooldown"): 1,
        ("half-open", "closed", "probes_ok"): 1,
    }
    assert (
        metrics.value("goproxy_sidecar_breaker_probes_total", upstream="primary", result="ok") >= 2
    )
    self_probe = "/goproxy-sidecar.invalid/self-probe/@v/list"
    assert world.primary.count(self_probe, 404) >= 2
