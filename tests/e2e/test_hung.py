"""Scenario 6 (issue 14): a hung primary. nginx is stopped with SIGSTOP, as a
hung Athens is: the kernel still accepts connections (toxiproxy's to it
included) and nothing ever answers. The real go command does a cold
``go mod download`` of the corpus through the sidecar, with the primary hung
from the start and hung in the middle of the download. Both succeed with no
failed request: waiting requests are hedged to the backup after the hedge
delay, the next ones at once (the primary lost a race of its silence), the
breaker trips on the silence those hedges prove (or, when the download
ends first, the silence is on record), and any request still waiting moves
at once.

The wall time of each download is printed next to a healthy one's (``-s``
shows it): a figure, never an assertion (bench/resilience.py measures it).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.e2e.gocmd import GoResult, cancel_all
from tests.e2e.processes import wait_until
from tests.e2e.stack import Stack

pytestmark = pytest.mark.e2e

# Answers the sidecar counts as failed requests (any of them fails a go command
# whose GOPROXY lists only the sidecar).
FAILED_OUTCOMES = ("failed", "unavailable", "overflow", "rejected")
# Slows the primary a little (under the 150 ms test threshold) so that the
# stop lands while the download still has requests to make.
LATENCY_MS = 60
MID_BUILD_AFTER = 4  # .mod files the primary serves before it hangs


@contextmanager
def hung(world: Stack) -> Iterator[None]:
    """The primary's nginx stopped (SIGSTOP) inside; continued on the way out,
    so that the fixture can end it."""
    pgid = world.primary.proc.pgid
    os.killpg(pgid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(pgid, signal.SIGCONT)


async def healthy_download(stack, latency_ms: int = 0) -> GoResult:
    """The reference: the same cold download through a world of its own (the
    sidecar's cache starts empty)."""
    world = await stack()
    if latency_ms:
        await world.add_toxic("latency", latency=latency_ms)
    result = await world.go.download()
    assert result.ok, result
    assert world.backup.requests() == [] or all(
        path.startswith("/sumdb/") for path, _ in world.backup.requests()
    ), world.backup.requests()
    return result


async def assert_served_and_judged(world: Stack, result: GoResult) -> None:
    """Every request served, the modules from the backup, and the primary's
    breaker open: a download whose requests were hedged at once may end
    before a second of silence, but a silence whose requests the backup
    answered goes on after the clients stop, so the breaker opens anyway."""
    assert result.ok, result
    metrics = await world.sidecar.metrics()
    for outcome in FAILED_OUTCOMES:
        assert metrics.value("goproxy_sidecar_requests_total", outcome=outcome) == 0, outcome
    assert world.backup.count(".zip") >= 5  # the modules came from the backup
    assert metrics.value("goproxy_sidecar_hedges_total", upstream="primary", result="won") >= 1

    if not any(to == "open" for (_f, to, _r) in metrics.transitions("primary")):
        await world.sidecar.wait_breaker("primary", 10, state="open")


async def report(what: str, world: Stack, result: GoResult, healthy: GoResult) -> None:
    metrics = await world.sidecar.metrics()
    hedges = {
        result: metrics.value("goproxy_sidecar_hedges_total", upstream="primary", result=result)
        for result in ("won", "lost", "budget_exhausted")
    }
    failures = metrics.value("goproxy_sidecar_upstream_failures_total", upstream="primary")
    print(
        f"\n{what}: go mod download {result.seconds:.2f}s, healthy {healthy.seconds:.2f}s "
        f"({result.seconds / healthy.seconds:.2f}x); primary: hedges {hedges}, "
        f"failures {failures:g}, transitions {metrics.transitions('primary')}"
    )


async def test_primary_hung_from_the_start(stack):
    healthy = await healthy_download(stack)
    world = await stack()
    with hung(world):
        result = await world.go.download()
        await assert_served_and_judged(world, result)
        await report("primary hung from the start", world, result, healthy)


async def test_primary_hung_mid_build(stack):
    healthy = await healthy_download(stack, LATENCY_MS)
    world = await stack()
    await world.add_toxic("latency", latency=LATENCY_MS)
    download = asyncio.create_task(world.go.download())
    try:
        await wait_until(
            "the primary to serve a few .mod files",
            lambda: _started(world, download),
            60,
            every_s=0.005,
        )
        with hung(world):
            served = len(world.primary.requests())
            result = await download
            await assert_served_and_judged(world, result)
            assert len(world.primary.requests()) == served  # it answered nothing more
            await report("primary hung mid-build", world, result, healthy)
    finally:
        await cancel_all([download])


async def _started(world: Stack, download: asyncio.Task[GoResult]) -> bool:
    if download.done():
        raise AssertionError(f"the download ended before the primary hung: {download.result()}")
    return world.primary.count(".mod") >= MID_BUILD_AFTER
