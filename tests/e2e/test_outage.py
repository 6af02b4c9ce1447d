"""Scenario 3: the primary dies in the middle of a build, then every upstream is
gone. The build finishes from the backup; a later build of the same program
is served by the sidecar's cache alone."""

from __future__ import annotations

import asyncio

import pytest

from tests.e2e.gocmd import cancel_all
from tests.e2e.processes import wait_until

pytestmark = pytest.mark.e2e

# Slows every answer of the primary a little (under the 150 ms TTFB threshold)
# so that the kill lands while the build still has requests to make.
LATENCY_MS = 60
# What `go build` of the corpus fetches: a .zip and a .mod for each of these
# modules (tests/e2e/corpus/go.mod), then their .info files.
BUILD_MODULES = 10


async def test_primary_killed_mid_build_then_every_upstream_gone(stack):
    world = await stack()
    await world.add_toxic("latency", latency=LATENCY_MS)
    build = asyncio.create_task(world.go.build())

    # The go command (1.2x) fetches every .zip and .mod first, then the .info
    # files. Kill the primary once the zips are through: what is left in
    # flight then is a few tiny bodies, never half a zip (a body cut after
    # its headers went out cannot be retried by anyone, and would fail the
    # build for a reason that is not this scenario's).
    try:
        zips = await wait_until(
            "the primary to serve the zips", lambda: _zips_done(world, build), 60, every_s=0.005
        )
        world.primary.proc.kill()
        served_by_primary = len(world.primary.requests())
        result = await build
    finally:
        await cancel_all([build])
    assert result.ok, result
    assert len(world.primary.requests()) == served_by_primary  # dead: it served no more
    assert world.backup.count(".info") >= 1  # the rest of the build came from the backup
    await world.sidecar.wait_breaker("primary", 5, state="open")
    # The first transition is the trip; later ones are failed probes of the dead primary.
    trip = next(t for t in world.sidecar.logged_transitions() if t["upstream"] == "primary")
    assert trip["action"] == "cache" and "failures in a row" in trip["reason"], trip
    metrics = await world.sidecar.metrics()
    assert metrics.value("goproxy_sidecar_upstream_failures_total", upstream="primary") >= 5
    assert metrics.value("goproxy_sidecar_requests_total", upstream="primary", kind="zip") == zips
    assert metrics.transitions("primary").get(("closed", "open", "cache")) == 1

    # Every upstream gone: the backup dies too, and toxiproxy with it.
    world.backup.proc.kill()
    world.toxiproxy.proc.kill()
    before = await world.sidecar.metrics()
    again = await world.go.build()  # fresh GOMODCACHE: every file asked for again
    assert again.ok, again
    after = await world.sidecar.metrics()
    served = {
        up: after.value("goproxy_sidecar_requests_total", upstream=up)
        - before.value("goproxy_sidecar_requests_total", upstream=up)
        for up in ("cache", "primary", "backup", "sidecar")
    }
    # Every .zip, .mod and .info of the build, and nothing from anywhere else.
    assert served["cache"] == 3 * BUILD_MODULES, served
    assert served["primary"] == served["backup"] == 0, served
    assert served["sidecar"] == 0, served  # no 502/503 answered by the sidecar itself
    hits = after.value("goproxy_sidecar_cache_hits_total") - before.value(
        "goproxy_sidecar_cache_hits_total"
    )
    assert hits == served["cache"]


async def _zips_done(world, build: asyncio.Task) -> int | None:
    if build.done():
        raise AssertionError(
            f"the build ended before the primary could be killed: {build.result()}"
        )
    zips = world.primary.count(".zip")
    done = zips >= BUILD_MODULES and world.primary.count(".mod") >= BUILD_MODULES
    return zips if done else None
