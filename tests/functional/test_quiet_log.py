"""A quiet log: an upstream nothing listens at (a quick start without Athens)
gives one failure line and a summary with the count, not a line per request,
and its breaker's probe cycle every cool-down is logged at info.

Real loopback servers and a real closed port; the log is read with caplog.
The windows and breakers run on a fake clock (the cool-down is advanced, not
waited for); the summary interval is real time, shortened for the test.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from sidecar.app import Sidecar, SidecarService, build_sidecar
from sidecar.config import PolicyConfig, StatsConfig
from sidecar.proxy import handler
from tests.conftest import make_config
from tests.serving import SidecarTestServer
from tests.upstream import FakeGoproxy, make_app

INFO = "example.com/mod/@v/v1.0.0.info"
POLICIES = Path(__file__).resolve().parents[2] / "policies"
# Real time (a loop timer), not the fake clock: the compiled handler keeps its
# constant, so the test waits out one interval.
SUMMARY_EVERY_S = handler.FAILURE_LOG_EVERY_S
COOLDOWN_S = 30.0
THRESHOLDS = f"""\
sidecar:
  config:
    thresholds: {{consecutive_failures: 5}}
    breaker: {{cooldown_s: {COOLDOWN_S:g}, probes: 2}}
"""


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def closed_port_url() -> str:
    """A loopback port nothing listens at: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


Start = Callable[[list[str]], Awaitable[tuple[TestClient[Any, Any], Sidecar]]]


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[tuple[Start, FakeClock]]:
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    (policies / "thresholds.yaml").write_text(THRESHOLDS)
    clock = FakeClock()
    clients: list[TestClient[Any, Any]] = []

    async def start_sidecar(urls: list[str]) -> tuple[TestClient[Any, Any], Sidecar]:
        policy = PolicyConfig(paths=(str(policies),), interval=0.1)
        stats = StatsConfig(window=2.0, slice=0.5)
        sc = build_sidecar(make_config(urls, tmp_path, policy=policy, stats=stats), clock=clock)
        client = TestClient(SidecarTestServer(SidecarService(sc, run_control=False)))
        await client.start_server()
        clients.append(client)
        return client, sc

    yield start_sidecar, clock
    for client in clients:
        await client.close()


@pytest.fixture
async def backup(aiohttp_server: Any) -> str:
    fake = FakeGoproxy()
    fake.set(INFO, b'{"Version":"v1.0.0"}')
    server = await aiohttp_server(make_app(fake))
    return f"http://127.0.0.1:{server.port}"


def records(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == event]


async def test_repeated_failures_are_one_line_and_a_summary(
    start: tuple[Start, FakeClock], backup: str, caplog: pytest.LogCaptureFixture
) -> None:
    n = 30
    client, _ = await start[0]([closed_port_url(), backup])
    with caplog.at_level(logging.INFO, "sidecar"):
        for _ in range(n):  # the policy never runs: every request tries up0 first
            async with client.get("/" + INFO) as resp:
                assert resp.status == 200  # the backup answers
        for _ in range(int(SUMMARY_EVERY_S * 15)):  # the summary follows within an interval
            if records(caplog, "upstream failures"):
                break
            await asyncio.sleep(0.1)
    failures = records(caplog, "upstream failure")
    summaries = records(caplog, "upstream failures")
    assert summaries, "no summary line"
    # Every failure accounted for exactly once, in a handful of lines, not n.
    told = sum(r.unlogged_before for r in failures) + sum(r.count for r in summaries)
    assert len(failures) + told == n
    assert len(failures) + len(summaries) <= 4, [r.__dict__ for r in failures + summaries]
    first = failures[0]
    assert (first.upstream, first.levelname, first.unlogged_before) == ("up0", "WARNING", 0)
    assert (first.__dict__["class"], first.failure) == ("module", "connect")
    assert first.error.startswith("cannot connect: ")  # refused (the loop words it)
    assert all(
        (s.upstream, s.__dict__["class"], s.failure, s.interval_s)
        == ("up0", "module", "connect", SUMMARY_EVERY_S)
        for s in summaries
    )


async def test_an_absent_upstreams_probe_cycle_logs_at_info(
    start: tuple[Start, FakeClock], backup: str, caplog: pytest.LogCaptureFixture
) -> None:
    client, sc = await start[0]([closed_port_url(), backup])
    clock = start[1]
    breaker = sc.breakers["up0"]
    with caplog.at_level(logging.INFO, "sidecar"):
        for _ in range(10):
            async with client.get("/" + INFO) as resp:
                assert resp.status == 200
        await sc.control.step()
        assert breaker.state.value == "open"  # tripped: consecutive failures
        for _ in range(3):  # three cool-downs, each probed and failed
            clock.now += COOLDOWN_S
            await sc.control.step()  # -> half-open
            for _ in range(200):  # a self-probe is due one idle interval later
                clock.now += 0.2
                await sc.control.step()
                await asyncio.sleep(0.02)
                if breaker.state.value == "open":
                    break
            assert breaker.state.value == "open"
    seen = [
        (r.__dict__["from"], r.to, r.levelname)
        for r in records(caplog, "breaker transition")
        if r.upstream == "up0"
    ]
    assert seen == [
        ("closed", "open", "WARNING"),  # the trip, with the policy's reason
        ("open", "half-open", "WARNING"),  # not known to be absent yet
        ("half-open", "open", "INFO"),
        ("open", "half-open", "INFO"),
        ("half-open", "open", "INFO"),
        ("open", "half-open", "INFO"),
        ("half-open", "open", "INFO"),
    ]
    probe_failed = [r for r in records(caplog, "breaker transition") if r.levelname == "INFO"]
    assert probe_failed[0].reason.startswith("probe failed: cannot connect: ")
