"""What the tests of the control loop and its inputs share: a clock the test
moves by hand, so "held over two slices" and "after the cool-down" do not
depend on how fast this machine is; the shipped policy with its thresholds
scaled down to test time; and sidecars built on such a clock, served on
loopback."""

from __future__ import annotations

import json
import shutil
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from sidecar.app import Sidecar, SidecarService, build_sidecar
from sidecar.config import Config
from tests.serving import SidecarTestServer

POLICIES = Path(__file__).resolve().parents[1] / "policies"

# The spans scaled to slices of 0.5 s; the sequence rules keep their shipped
# defaults (5 failures in a row; 3000 ms of silence with 2 requests asked).
FAST_THRESHOLDS: Mapping[str, float] = {
    "ttfb_p99_ms": 100,
    "ttfb_p99_for_s": 1,
    "error_rate": 0.05,
    "min_requests": 5,
    "queue_wait_p99_ms": 50,
    "queue_for_s": 1,
    "min_span_s": 1,
}

Start = Callable[..., Awaitable[tuple[TestClient[Any, Any], Sidecar]]]


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def thresholds_yaml(thresholds: Mapping[str, float]) -> str:
    """The policy's thresholds file: ``thresholds``, a 30 s cool-down, two good
    probes to close."""
    data = {"thresholds": dict(thresholds), "breaker": {"cooldown_s": 30, "probes": 2}}
    return json.dumps({"sidecar": {"config": data}})  # JSON is YAML


def scaled_policies(target: Path, thresholds: Mapping[str, float]) -> Path:
    """A copy of the shipped policy at ``target`` with ``thresholds``: ``target``."""
    shutil.copytree(POLICIES, target)
    (target / "thresholds.yaml").write_text(thresholds_yaml(thresholds))
    return target


EVALUATION_TIMEOUT_S = 5.0


class Sidecars:
    """The sidecars a test starts, each on a clock of the test's choosing and
    served on loopback; ``close`` stops them all."""

    def __init__(self) -> None:
        self._clients: list[TestClient[Any, Any]] = []

    def __len__(self) -> int:
        return len(self._clients)

    async def start(
        self, config: Config, clock: Callable[[], float], run_control: bool
    ) -> tuple[TestClient[Any, Any], Sidecar]:
        sc = build_sidecar(config, clock=clock)
        client = TestClient(SidecarTestServer(SidecarService(sc, run_control)))
        await client.start_server()
        self._clients.append(client)
        assert sc.control is not None  # made by the service's start
        # These sidecars tick every 100 ms, which leaves an evaluation 90 ms
        # (sidecar.control); the embedded engine takes about 33 ms, but more on
        # a loaded 2-core machine, and a timed-out evaluation keeps the last
        # decisions: a breaker the test expects open stayed closed (1 full run
        # in 4). What a failed evaluation does is tested apart (test_breakers).
        sc.control.timeout = EVALUATION_TIMEOUT_S
        return client, sc

    async def close(self) -> None:
        for client in self._clients:
            await client.close()
