"""Scenario 1: a healthy world. `go build` through sidecar → toxiproxy → nginx
works, and a second build with a fresh GOMODCACHE comes from the sidecar's cache."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e


async def test_build_through_the_sidecar_then_again_from_its_cache(stack):
    world = await stack()
    first = await world.go.build()
    assert first.ok, first
    zips = world.primary.count(".zip")
    mods = world.primary.count(".mod")
    assert zips >= 5 and mods >= zips, world.primary.requests()
    assert world.backup.requests() == []  # a healthy primary answers everything
    served = len(world.primary.requests())
    before = await world.sidecar.metrics()
    assert before.value("goproxy_sidecar_requests_total", upstream="primary", kind="zip") == zips
    assert before.value("goproxy_sidecar_cache_misses_total", kind="zip") == zips

    second = await world.go.build()  # fresh GOMODCACHE: every module is asked for again
    assert second.ok, second
    assert len(world.primary.requests()) == served  # not one request reached it
    after = await world.sidecar.metrics()
    hits = after.value("goproxy_sidecar_cache_hits_total", kind="zip") - before.value(
        "goproxy_sidecar_cache_hits_total", kind="zip"
    )
    assert hits == zips
    assert after.value("goproxy_sidecar_requests_total", upstream="cache", kind="mod") == mods
    answered = after.value("goproxy_sidecar_requests_total", upstream="primary")
    assert answered == served, (
        {tuple(sorted(k)): v for k, v in after.samples["goproxy_sidecar_requests_total"].items()},
        world.primary.requests(),
    )
    view = (await world.sidecar.breakers())["primary"]
    assert view["state"] == "closed" and view["action"] == "allow", view
    assert after.transitions("primary") == {}
