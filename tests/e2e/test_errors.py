"""Scenario 4: a primary that fails (connections reset, or answers never come).
The build falls through to the backup and the breaker trips: resets are a run
of failures (`cache`: the sidecar stops asking the primary and serves what it
has); answers that never come are a run of timeouts, which are also latency
(`cache` or `reroute`, whichever rule sees it first). Either way the primary is
not asked again during the cool-down."""

from __future__ import annotations

import pytest

from tests.e2e.stack import Thresholds

pytestmark = pytest.mark.e2e

FIRST_BYTE = "500ms"  # the primary's first_byte timeout in this scenario

TOXICS = {
    # toxic type: (attributes, the sidecar's failure class in metrics,
    # the rules that may trip: action -> the reasons it may give)
    "reset_peer": ({"timeout": 0}, "connect", {"cache": ("failures in a row",)}),  # RST at once
    "timeout": (  # swallows everything, never answers
        {"timeout": 0},
        "timeout",
        # Hedges win while it says nothing: "stalled" usually sees it first.
        {"cache": ("failures in a row",), "reroute": ("ttfb p99 ", "stalled: no answer for ")},
    ),
}


@pytest.mark.parametrize("kind", sorted(TOXICS))
async def test_failing_primary_trips_the_cache_action(stack, kind):
    attributes, failure, rules = TOXICS[kind]
    world = await stack(Thresholds(cooldown_s=10), primary_first_byte=FIRST_BYTE)
    await world.add_toxic(kind, **attributes)

    build = await world.go.build()
    assert build.ok, build
    assert world.backup.count(".zip") >= 5

    view = await world.sidecar.wait_breaker("primary", 5, state="open")
    assert view["action"] in rules, view
    assert any(reason in view["reason"] for reason in rules[view["action"]]), view
    metrics = await world.sidecar.metrics()
    failed = metrics.value(
        "goproxy_sidecar_upstream_failures_total", upstream="primary", failure=failure
    )
    # Answers that never come are hedged to the backup after the hedge delay, so
    # most of them end as hedges won, not timeouts: both are evidence.
    hedged = metrics.value("goproxy_sidecar_hedges_total", upstream="primary", result="won")
    assert failed + hedged >= 2
    assert failed == metrics.value("goproxy_sidecar_upstream_failures_total", upstream="primary")
    assert metrics.transitions("primary") == {("closed", "open", view["action"]): 1}
    assert metrics.value("goproxy_sidecar_requests_total", upstream="sidecar") == 0
    # nginx did answer (the toxics act on the way back), but not one answer got through.
    assert metrics.value("goproxy_sidecar_requests_total", upstream="primary") == 0

    # The breaker skips the primary: a build needs nothing the cache lacks, and
    # the primary is not asked again.
    failures_before = failed
    again = await world.go.build()
    assert again.ok, again
    metrics = await world.sidecar.metrics()
    assert (
        metrics.value("goproxy_sidecar_upstream_failures_total", upstream="primary")
        == failures_before
    )
    assert metrics.value("goproxy_sidecar_cache_hits_total", kind="zip") >= 5
