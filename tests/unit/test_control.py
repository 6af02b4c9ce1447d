"""The control loop on a fake clock: windows fed directly, the shipped policy
evaluated by the embedded engine, breakers and plan checked tick by tick.

What it proves: no default rule over rates or percentiles trips on one tick
or one slice of evidence, however bad; the same evidence held over two slices
does; the sequence rules (failures in a row, a silent upstream) trip at any
volume, within a tick of their threshold; checksum traffic trips its own
breaker only; the policy input has the documented shape.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sidecar.app import Sidecar, build_sidecar
from sidecar.breaker.state import Action, State
from sidecar.config import PolicyConfig, StatsConfig
from sidecar.control import ControlLoop, build_input
from sidecar.goproxy import Kind
from sidecar.policy import EmbeddedEngine
from sidecar.stats.inflight import Ending
from sidecar.stats.window import Outcome
from tests.conftest import make_config
from tests.control_support import FakeClock, scaled_policies

SLICE_S = 1.0
TICKS_PER_SLICE = 5  # policy.interval 0.2 s: many evaluations see the same slice

THRESHOLDS = {
    "ttfb_p99_ms": 800,
    "ttfb_p99_for_s": 60,
    "error_rate": 0.05,
    "min_requests": 20,
    "queue_wait_p99_ms": 250,
    "queue_for_s": 2,
    "min_span_s": 2,
}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(5000.0)


@pytest.fixture
async def loop(tmp_path: Path, clock: FakeClock) -> AsyncIterator[ControlLoop]:
    policies = scaled_policies(tmp_path / "policies", THRESHOLDS)
    config = make_config(
        ["http://127.0.0.1:9", "http://127.0.0.1:9"],
        tmp_path,
        policy=PolicyConfig(paths=(str(policies),), interval=0.2),
        stats=StatsConfig(window=60.0, slice=SLICE_S),
    )
    sc = build_sidecar(config, clock=clock)
    engine = EmbeddedEngine(config.policy.paths, config.policy.decision)
    await engine.load()
    control = sc.control = ControlLoop(sc, lambda: engine)
    yield control
    await engine.close()


def failures(sc: Sidecar, n: int, kind: Kind = Kind.INFO) -> None:
    """``n`` failures, then ``n`` successes: a 50 % error rate; with n >= 10
    neither the run of failures nor the last answers show any when the loop
    looks (they have their own rules and tests)."""
    windows = sc.sumdb_windows if kind.value.startswith("sumdb") else sc.windows
    for outcome in (Outcome.ERROR, Outcome.OK):
        for _ in range(n):
            windows["up0"].record(outcome, 0.003)


def queueing(sc: Sidecar, n: int, wait_s: float, ttfb_s: float) -> None:
    """``n`` requests that waited ``wait_s`` for a connection and were answered
    in ``ttfb_s``, and one overflow."""
    window = sc.windows["up0"]
    for _ in range(n):
        window.record_queue_wait(wait_s)
        window.record(Outcome.OK, ttfb_s)
    window.record_overflow()


async def ticks(control: ControlLoop, clock: FakeClock, n: int) -> None:
    for _ in range(n):
        await control.step()
        clock.advance(SLICE_S / TICKS_PER_SLICE / 2)  # n ticks stay within one slice


async def test_a_single_bad_tick_does_not_trip(loop: ControlLoop, clock: FakeClock) -> None:
    sc = loop.sidecar
    failures(sc, 500)  # half the requests failed, far above min_requests
    await ticks(loop, clock, TICKS_PER_SLICE)
    assert sc.breakers["up0"].state is State.CLOSED
    assert loop.last_input["upstreams"]["up0"]["error_rate"] == 0.5
    clock.now = 5000.0 + SLICE_S  # the next slice, a quiet one
    await ticks(loop, clock, TICKS_PER_SLICE)
    assert sc.breakers["up0"].state is State.CLOSED
    assert sc.plan.by_name("up0").action is Action.ALLOW


async def test_the_same_failures_over_two_slices_trip(loop: ControlLoop, clock: FakeClock) -> None:
    sc = loop.sidecar
    failures(sc, 15)
    await ticks(loop, clock, 2)
    clock.now = 5000.0 + SLICE_S
    failures(sc, 15)
    await loop.step()
    breaker = sc.breakers["up0"]
    assert (breaker.state, breaker.action) == (State.OPEN, Action.CACHE)
    assert breaker.reason == "error rate 50.0% > 5.0% over 60 requests, for 2s"
    assert sc.plan.by_name("up0").action is Action.CACHE
    assert sc.sumdb_breakers["up0"].state is State.CLOSED


async def test_queueing_for_one_slice_does_not_shed(loop: ControlLoop, clock: FakeClock) -> None:
    sc = loop.sidecar
    queueing(sc, 100, wait_s=2.0, ttfb_s=1.5)  # as bad as it gets, for one slice
    await ticks(loop, clock, TICKS_PER_SLICE)
    assert sc.breakers["up0"].state is State.CLOSED
    pool = loop.last_input["upstreams"]["up0"]["pool"]
    assert pool["overflows"] == 1 and pool["queue_wait_ms"]["p99"] > 1900
    clock.now = 5000.0 + SLICE_S
    queueing(sc, 100, wait_s=2.0, ttfb_s=1.5)  # held: now it sheds
    await loop.step()
    breaker = sc.breakers["up0"]
    assert (breaker.state, breaker.action, breaker.alert) == (State.OPEN, Action.REJECT, True)
    assert breaker.reason.startswith("queueing: wait p99 ")


async def test_busy_pool_in_front_of_a_fast_upstream_never_sheds(
    loop: ControlLoop, clock: FakeClock
) -> None:
    sc = loop.sidecar
    up = sc.upstreams["up0"]
    for second in range(10):
        clock.now = 5000.0 + second * SLICE_S
        up.peak = up.limit * 4  # every connection busy and a crowd waiting, at every tick
        queueing(sc, 100, wait_s=1.0, ttfb_s=0.003)
        await ticks(loop, clock, 2)
    assert sc.breakers["up0"].state is State.CLOSED, sc.breakers["up0"].reason
    doc = loop.last_input["upstreams"]["up0"]
    assert all(s["saturation"] == 4.0 for s in doc["series"])  # saturated in every slice
    assert doc["pool"]["overflows"] == 10


async def test_checksum_failures_trip_the_checksum_breaker_only(
    loop: ControlLoop, clock: FakeClock
) -> None:
    sc = loop.sidecar
    for second in range(2):
        clock.now = 5000.0 + second * SLICE_S
        failures(sc, 15, Kind.SUMDB_LOOKUP)
        sc.windows["up0"].record(Outcome.OK, 0.003)  # module traffic is fine
    await loop.step()
    assert sc.sumdb_breakers["up0"].state is State.OPEN
    assert sc.breakers["up0"].state is State.CLOSED
    plan = sc.plan
    assert plan.targets(Kind.SUMDB_TILE)[0].action is Action.CACHE
    assert plan.targets(Kind.ZIP)[0].action is Action.ALLOW
    assert sc.sumdb_windows["up0"].snapshot().requests == 0  # its window restarted
    assert sc.windows["up0"].snapshot().requests == 2  # the module one did not


async def test_a_run_of_failures_trips_at_once_at_low_volume(
    loop: ControlLoop, clock: FakeClock
) -> None:
    sc = loop.sidecar
    window = sc.windows["up0"]
    for _ in range(4):
        window.record(Outcome.ERROR, None)  # connection refused: 4 of 4 failed
    await loop.step()
    assert sc.breakers["up0"].state is State.CLOSED  # 4 in a row, below min_requests
    assert sc.breakers["up0"].reason.endswith(", 4 failures in a row")
    window.record(Outcome.TIMEOUT, None)
    await loop.step()  # the same slice, the same tick's worth of time: a run needs no span
    breaker = sc.breakers["up0"]
    assert (breaker.state, breaker.action) == (State.OPEN, Action.CACHE)
    assert breaker.reason == "5 failures in a row (>= 5)"
    assert loop.last_input["upstreams"]["up0"]["requests"] == 5


async def test_a_404_ends_the_run(loop: ControlLoop, clock: FakeClock) -> None:
    sc = loop.sidecar
    window = sc.windows["up0"]
    for outcome in [Outcome.ERROR] * 4 + [Outcome.NOT_FOUND] + [Outcome.ERROR] * 4:
        window.record(outcome, 0.001)
    await loop.step()
    assert sc.breakers["up0"].state is State.CLOSED
    assert loop.last_input["upstreams"]["up0"]["consecutive_failures"] == 4


async def test_a_silent_upstream_trips_within_a_tick_of_stall_ms(
    loop: ControlLoop, clock: FakeClock
) -> None:
    """Hung: two requests wait, nothing ends, nothing is answered. Default
    thresholds: stall_ms 3000, stall_requests 2."""
    sc = loop.sidecar
    waits = sc.windows["up0"].inflight
    waits.begin()
    waits.begin()
    for _ in range(15):  # 3 s in ticks of 0.2 s: silent for exactly stall_ms, not more
        await loop.step()
        clock.advance(0.2)
        assert sc.breakers["up0"].state is State.CLOSED
    await loop.step()  # 3.0 s
    assert sc.breakers["up0"].state is State.CLOSED
    clock.advance(0.2)
    await loop.step()  # 3.2 s
    breaker = sc.breakers["up0"]
    assert (breaker.state, breaker.action) == (State.OPEN, Action.REROUTE)
    assert breaker.reason == (
        "stalled: no answer for 3200ms (> 3000ms), 2 requests asked, 2 waiting"
    )
    assert sc.sumdb_breakers["up0"].state is State.CLOSED  # no checksum request waited
    doc = loop.last_input["upstreams"]["up0"]
    assert doc["requests"] == 0 and doc["inflight"]["count"] == 2
    assert doc["series"][0]["p99_ms"] == pytest.approx(3200.0, rel=0.02)


async def test_one_slow_request_among_answers_is_no_stall(
    loop: ControlLoop, clock: FakeClock
) -> None:
    sc = loop.sidecar
    waits = sc.windows["up0"].inflight
    waits.begin()  # a cold fetch that takes its time
    for _ in range(30):  # 6 s: meanwhile the upstream answers others
        token = waits.begin()
        clock.advance(0.1)
        waits.end(token, Ending.ANSWERED)
        sc.windows["up0"].record(Outcome.OK, 0.1)
        clock.advance(0.1)
        await loop.step()
    assert sc.breakers["up0"].state is State.CLOSED, sc.breakers["up0"].reason
    assert loop.last_input["upstreams"]["up0"]["inflight"]["oldest_ms"] > 5000


async def test_policy_input_shape(loop: ControlLoop) -> None:
    doc = build_input(loop.sidecar)["upstreams"]["up0"]
    assert set(doc["pool"]) == {
        "limit",
        "in_use",
        "waiting",
        "overflows",
        "queue_wait_ms",
        "saturation",
    }
    assert set(doc["pool"]["queue_wait_ms"]) == {"p50", "p99"}
    assert set(doc["series"][0]) >= {
        "age_s",
        "requests",
        "error_rate",
        "p99_ms",
        "saturation",
        "queue_wait_ms",
        "overflows",
        "masked_failures",
    }
    assert set(doc["inflight"]) == {"count", "oldest_ms", "silent_ms", "unanswered", "overtaken"}
    assert doc["consecutive_failures"] == 0
    sumdb = doc["sumdb"]
    module_keys = set(doc) - {"role", "pool", "sumdb"}
    assert set(sumdb) == module_keys  # the same stats and breaker state, nothing else
    assert sumdb["state"] == "closed"
    # The pool's figures are the upstream's, in the module stats only.
    assert set(sumdb["series"][0]) == {"age_s", "requests", "error_rate", "p99_ms"}
