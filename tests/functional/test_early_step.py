"""A run of failures wakes the control loop (issue 14): the policy judges a
failing upstream before the next regular tick, so fewer requests pay a failed
attempt before their fallback. Real loopback upstreams and the sidecar's own
loop with the embedded default policy; the tests wait for state, bounded, and
the regular tick is too far away to be the one that trips.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from sidecar.app import Sidecar
from sidecar.config import PolicyConfig, StatsConfig
from sidecar.stats.window import RUN_WAKE, Outcome, UpstreamWindow
from tests.conftest import make_config
from tests.control_support import FAST_THRESHOLDS, FakeClock, Sidecars, Start, scaled_policies
from tests.upstream import Reply

INFO = "example.com/mod/@v/v1.0.0.info"
INTERVAL_S = 20.0  # an early step comes after EARLY_SHARE of it (5 s)
LIMIT_S = 12.0  # bound on every wait: the regular tick after the first is later


@pytest.fixture
async def start_sidecar(tmp_path: Path) -> AsyncIterator[Start]:
    sidecars = Sidecars()

    async def start(urls: list[str]) -> tuple[TestClient[Any, Any], Sidecar]:
        policies = scaled_policies(tmp_path / f"policies{len(sidecars)}", FAST_THRESHOLDS)
        config = make_config(
            urls,
            tmp_path,
            policy=PolicyConfig(paths=(str(policies),), interval=INTERVAL_S),
            stats=StatsConfig(window=120, slice=10),
        )
        return await sidecars.start(config, time.monotonic, run_control=True)

    yield start
    await sidecars.close()


async def until(predicate: Callable[[], bool], what: str) -> None:
    for _ in range(int(LIMIT_S / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"gave up waiting for {what}")


async def get(client: TestClient[Any, Any], path: str = INFO) -> int:
    async with client.get("/" + path) as resp:
        await resp.read()
        return resp.status


async def test_failures_in_a_row_trip_before_the_next_regular_tick(
    fake_upstreams: Any, start_sidecar: Start
) -> None:
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    a.default = Reply(status=502)
    b.set(INFO, b"{}")
    client, sc = await start_sidecar([url_a, url_b])
    assert sc.control is not None
    await until(lambda: sc.control is not None and sc.control.decided_at is not None, "1st step")
    first = sc.control.decided_at
    for _ in range(5):  # the default policy's consecutive_failures
        assert await get(client) == 200  # each falls through to the backup
    await until(lambda: sc.breakers["up0"].state.value == "open", "the primary's breaker open")
    assert sc.breakers["up0"].reason == "5 failures in a row (>= 5)"
    assert sc.control.decided_at != first  # a step the failures asked for
    seen = len(a.received)
    assert await get(client) == 200
    assert len(a.received) == seen  # open: the failing primary is not asked


def test_only_runs_and_dense_failures_wake() -> None:
    """One failure is no run (healthy traffic with a failure now and then never
    wakes the loop); RUN_WAKE in a row are, and so are masked ones, and so is
    a failure one answer after another (an upstream failing every other
    request never makes a run)."""
    window = UpstreamWindow(120, 10, FakeClock(1000.0))
    woken: list[int] = []
    window.wake_on_runs(lambda: woken.append(1))
    for _ in range(10):
        window.record(Outcome.ERROR)
        window.record(Outcome.OK)
        window.record(Outcome.NOT_FOUND)
    assert woken == []
    window.record(Outcome.ERROR)
    window.record(Outcome.OK)
    window.record(Outcome.TIMEOUT)
    assert len(woken) == 1
    window.record(Outcome.OK)
    window.record(Outcome.OK)
    woken.clear()
    for _ in range(RUN_WAKE):
        window.record(Outcome.TIMEOUT)
    assert len(woken) == 1
    window.record(Outcome.ERROR)
    assert len(woken) == 2  # every failure of a run: the loop limits its pace
    window.record(Outcome.OK)
    for _ in range(RUN_WAKE):
        window.record(Outcome.NOT_FOUND)
        window.record_masked()
    assert len(woken) == 3
