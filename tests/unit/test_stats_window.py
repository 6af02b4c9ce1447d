"""Sliding time window: accounting, slice rotation and expiry, series, reset, memory."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.stats.histogram import BUCKETS
from sidecar.stats.inflight import IDLE, Ending
from sidecar.stats.window import LAST_ANSWERS, Outcome, UpstreamWindow, WindowSnapshot
from tests.control_support import FakeClock

WINDOW_S = 120.0
SLICE_S = 10.0
START = 1000.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def window(clock: FakeClock) -> UpstreamWindow:
    return UpstreamWindow(WINDOW_S, SLICE_S, clock=clock)


def test_empty_window(window: UpstreamWindow) -> None:
    snap = window.snapshot()
    assert snap == WindowSnapshot(
        window_s=120.0,
        requests=0,
        errors=0,
        not_found=0,
        timeouts=0,
        masked_failures=0,
        error_rate=0.0,
        not_found_rate=0.0,
        ttfb_p50_ms=0.0,
        ttfb_p90_ms=0.0,
        ttfb_p99_ms=0.0,
        queue_wait_p50_ms=0.0,
        queue_wait_p99_ms=0.0,
        overflows=0,
        consecutive_failures=0,
        inflight=IDLE,
        series=snap.series,
    )
    assert len(snap.series) == 1
    assert snap.series[0].age_s == 0
    assert snap.series[0].error_rate == 0.0
    assert snap.series[0].p99_ms == 0.0


def test_outcome_accounting(window: UpstreamWindow) -> None:
    for _ in range(6):
        window.record(Outcome.OK, 0.010)
    for _ in range(2):
        window.record(Outcome.NOT_FOUND, 0.010)
    window.record(Outcome.ERROR, 0.010)
    window.record(Outcome.ERROR, None)  # e.g. connection refused: no headers
    window.record(Outcome.TIMEOUT, None)  # before headers: its wait comes from InFlight
    window.record(Outcome.TIMEOUT, 0.010)  # an idle timeout in the body: headers came in 10 ms
    snap = window.snapshot()
    assert snap.requests == 12
    assert snap.errors == 4  # ERROR + TIMEOUT
    assert snap.timeouts == 2
    assert snap.not_found == 2
    assert snap.error_rate == pytest.approx(4 / 12)
    assert snap.not_found_rate == pytest.approx(2 / 12)
    assert snap.ttfb_p99_ms == pytest.approx(10.0, rel=0.02)  # 10 samples, all 10 ms
    assert snap.series[0].error_rate == pytest.approx(4 / 12)
    assert snap.consecutive_failures == 4  # the last four records failed


def test_ttfb_quantiles_cover_ok_not_found_and_error(window: UpstreamWindow) -> None:
    for i in range(1, 101):
        outcome = (Outcome.OK, Outcome.NOT_FOUND, Outcome.ERROR)[i % 3]
        window.record(outcome, i / 1000)  # 1 .. 100 ms
    snap = window.snapshot()
    assert snap.ttfb_p50_ms == pytest.approx(50.0, rel=0.02)
    assert snap.ttfb_p90_ms == pytest.approx(90.0, rel=0.02)
    assert snap.ttfb_p99_ms == pytest.approx(99.0, rel=0.02)


def test_masked_failures_do_not_count_as_requests(window: UpstreamWindow) -> None:
    window.record(Outcome.NOT_FOUND, 0.005)
    window.record_masked()
    window.record_masked()
    snap = window.snapshot()
    assert snap.masked_failures == 2
    assert snap.requests == 1
    assert snap.not_found == 1
    assert snap.errors == 0


def test_integrity_failures_are_counted_apart_and_expire(
    window: UpstreamWindow, clock: FakeClock
) -> None:
    window.record(Outcome.ERROR, 0.005)  # the failed attempt, recorded as any failure
    window.record_integrity()
    snap = window.snapshot()
    assert (snap.requests, snap.errors, snap.integrity_failures) == (1, 1, 1)
    assert snap.as_policy_input(admission=False)["integrity_failures"] == 1
    clock.advance(WINDOW_S)
    assert window.snapshot().integrity_failures == 0


def test_masked_failures_expire_with_their_slice(window: UpstreamWindow, clock: FakeClock) -> None:
    window.record_masked()
    clock.advance(WINDOW_S)
    assert window.snapshot().masked_failures == 0


def test_saturation_keeps_the_max_per_slice(window: UpstreamWindow, clock: FakeClock) -> None:
    for value in (0.2, 0.95, 0.5):
        window.sample_saturation(value)
        clock.advance(1)
    clock.advance(SLICE_S)  # next slice
    window.sample_saturation(0.1)
    series = window.snapshot().series
    assert [s.saturation for s in series] == [0.1, 0.95]


def test_slice_without_saturation_samples_reports_zero(
    window: UpstreamWindow, clock: FakeClock
) -> None:
    window.sample_saturation(0.7)
    clock.advance(SLICE_S)
    assert [s.saturation for s in window.snapshot().series] == [0.0, 0.7]


def test_queue_waits_and_overflows_per_slice_and_over_the_window(
    window: UpstreamWindow, clock: FakeClock
) -> None:
    for i in range(1, 101):
        window.record_queue_wait(i / 1000)  # 1 .. 100 ms
    window.record_overflow()
    clock.advance(SLICE_S)
    for _ in range(10):
        window.record_queue_wait(0.0)  # admitted at once: a wait of 0 still counts
    newest, older = window.snapshot().series
    assert (newest.queue_wait_p50_ms, newest.queue_wait_p99_ms, newest.overflows) == (
        pytest.approx(0.0005),
        pytest.approx(0.0005),
        0,
    )
    assert older.queue_wait_p50_ms == pytest.approx(50.0, rel=0.02)
    assert older.queue_wait_p99_ms == pytest.approx(99.0, rel=0.02)
    assert older.overflows == 1
    snap = window.snapshot()
    assert snap.overflows == 1
    assert snap.queue_wait_p99_ms == pytest.approx(98.0, rel=0.03)  # 110 samples, rank 109
    assert snap.requests == 0  # admission is not an upstream request
    assert snap.series[0].requests == 0


def test_queue_figures_expire_and_reset(window: UpstreamWindow, clock: FakeClock) -> None:
    window.record_queue_wait(0.5)
    window.record_overflow()
    clock.advance(WINDOW_S)
    snap = window.snapshot()
    assert (snap.queue_wait_p99_ms, snap.overflows) == (0.0, 0)
    window.record_queue_wait(0.5)
    window.record_overflow()
    window.reset()
    snap = window.snapshot()
    assert (snap.queue_wait_p99_ms, snap.overflows, snap.series[0].overflows) == (0.0, 0, 0)


def test_series_is_newest_first_with_slice_ages(window: UpstreamWindow, clock: FakeClock) -> None:
    for requests in (1, 2, 3):
        clock.advance(3)  # somewhere inside the slice
        for _ in range(requests):
            window.record(Outcome.OK, 0.001 * requests)
        clock.advance(SLICE_S - 3)
    clock.advance(4)  # now 4 s into the fourth slice, which is empty
    series = window.snapshot().series
    assert [s.age_s for s in series] == [0, 10, 20, 30]
    assert [s.requests for s in series] == [0, 3, 2, 1]
    assert [s.p99_ms for s in series][1:] == pytest.approx([3.0, 2.0, 1.0], rel=0.02)


def test_series_grows_to_the_window_and_stops(window: UpstreamWindow, clock: FakeClock) -> None:
    lengths = []
    for _ in range(20):
        lengths.append(len(window.snapshot().series))
        clock.advance(SLICE_S)
    assert lengths == [*range(1, 13), *[12] * 8]
    assert [s.age_s for s in window.snapshot().series] == [i * 10 for i in range(12)]


def test_slice_boundary_is_exact(window: UpstreamWindow, clock: FakeClock) -> None:
    window.record(Outcome.OK, 0.001)
    clock.advance(SLICE_S - 1e-6)
    assert len(window.snapshot().series) == 1
    clock.advance(1e-6)
    series = window.snapshot().series
    assert len(series) == 2 and series[1].requests == 1 and series[0].requests == 0


def test_records_expire_after_the_window(window: UpstreamWindow, clock: FakeClock) -> None:
    window.record(Outcome.ERROR, 0.5)
    clock.advance(5)
    window.record(Outcome.OK, 0.001)
    clock.advance(WINDOW_S - 5 - 1e-6)  # the first slice is still the oldest of the window
    snap = window.snapshot()
    assert (snap.requests, snap.errors) == (2, 1)
    assert snap.series[-1].age_s == 110
    clock.advance(1e-6)  # the first slice leaves the window
    snap = window.snapshot()
    assert (snap.requests, snap.errors) == (0, 0)
    assert snap.ttfb_p99_ms == 0.0
    assert len(snap.series) == 12


def test_slices_are_cleared_when_reused(window: UpstreamWindow, clock: FakeClock) -> None:
    # One request per slice for two full turns of the ring: never more than 12 counted.
    for _ in range(24):
        window.record(Outcome.OK, 0.001)
        assert window.snapshot().requests <= 12
        clock.advance(SLICE_S)
    assert window.snapshot().requests == 11  # the current slice is new and empty


def test_long_idle_gap_clears_everything(window: UpstreamWindow, clock: FakeClock) -> None:
    for _ in range(12):
        window.record(Outcome.TIMEOUT, None)
        window.sample_saturation(1.0)
        clock.advance(SLICE_S)
    clock.advance(10_000)
    snap = window.snapshot()
    assert snap.requests == snap.timeouts == 0
    assert all(s.requests == 0 and s.saturation == 0.0 for s in snap.series)
    window.record(Outcome.OK, 0.002)
    assert window.snapshot().requests == 1


def test_reset_starts_a_short_series(window: UpstreamWindow, clock: FakeClock) -> None:
    for _ in range(30):
        window.record(Outcome.ERROR, 0.9)
        window.record_masked()
        window.sample_saturation(0.99)
        clock.advance(SLICE_S)
    clock.advance(7)  # reset in the middle of a slice
    window.reset()
    snap = window.snapshot()
    assert (snap.requests, snap.errors, snap.masked_failures) == (0, 0, 0)
    assert len(snap.series) == 1
    assert snap.series[0].saturation == 0.0
    clock.advance(SLICE_S)  # slices are aligned to the reset, not to the old origin
    assert [s.age_s for s in window.snapshot().series] == [0, 10]
    clock.advance(SLICE_S - 1e-6)
    assert len(window.snapshot().series) == 2


def test_clock_going_backwards_is_harmless(window: UpstreamWindow, clock: FakeClock) -> None:
    clock.advance(25)
    window.record(Outcome.OK, 0.001)
    clock.advance(-20)
    window.record(Outcome.OK, 0.001)
    snap = window.snapshot()
    assert snap.requests == 2
    assert len(snap.series) == 3


def test_memory_is_constant(window: UpstreamWindow, clock: FakeClock) -> None:
    slices_before = list(window._slices)
    outcomes = list(Outcome)
    for i in range(100_000):
        window.record(outcomes[i % 4], (i % 997 + 1) * 1e-4)
        if i % 1000 == 0:
            window.record_masked()
            window.sample_saturation((i % 100) / 100)
            window.record_queue_wait((i % 13) * 1e-3)
            window.record_overflow()
            clock.advance(0.7)
    window.snapshot()
    assert len(window._slices) == window.slice_count == 12
    assert all(a is b for a, b in zip(window._slices, slices_before, strict=True))
    assert all(s.ttfb.bucket_count == BUCKETS for s in window._slices)
    assert all(s.queue.bucket_count == BUCKETS for s in window._slices)
    assert window._scratch.bucket_count == window._queue_scratch.bucket_count == BUCKETS


def test_policy_input_shape_and_rounding(window: UpstreamWindow, clock: FakeClock) -> None:
    for i in range(3):
        window.record(Outcome.OK, 0.0121234)
        window.record(Outcome.ERROR if i == 0 else Outcome.NOT_FOUND, 0.0403)
    window.sample_saturation(0.312345)
    window.record_queue_wait(0.2501234)
    window.record_overflow()
    clock.advance(SLICE_S)
    window.record(Outcome.TIMEOUT, None)
    snap = window.snapshot()
    doc = snap.as_policy_input(admission=True)
    assert set(doc) >= {
        "window_s",
        "requests",
        "errors",
        "not_found",
        "timeouts",
        "error_rate",
        "not_found_rate",
        "masked_failures",
        "integrity_failures",
        "ttfb_ms",
        "consecutive_failures",
        "consecutive_masked",
        "last_answers",
        "inflight",
        "series",
    }
    assert doc["window_s"] == 120 and isinstance(doc["window_s"], int)
    assert (doc["requests"], doc["errors"], doc["timeouts"], doc["not_found"]) == (7, 2, 1, 2)
    assert doc["error_rate"] == 0.2857
    assert doc["not_found_rate"] == 0.2857
    assert doc["consecutive_failures"] == 1
    assert doc["last_answers"] == [1, 0, 0, 0, 0, 1, 0]  # newest first, 1: failed
    assert doc["inflight"] == {
        "count": 0,
        "oldest_ms": 0.0,
        "silent_ms": 0.0,
        "unanswered": 0,
        "overtaken": 0,
    }
    assert set(doc["ttfb_ms"]) == {"p50", "p90", "p99"}
    assert doc["ttfb_ms"]["p50"] == pytest.approx(12.1, rel=0.02)
    assert doc["ttfb_ms"]["p99"] == round(doc["ttfb_ms"]["p99"], 2)
    newest, older = doc["series"]
    assert (
        newest.items()
        >= {
            "age_s": 0,
            "requests": 1,
            "error_rate": 1.0,
            "p99_ms": 0.0,
            "saturation": 0.0,
            "queue_wait_ms": {"p50": 0.0, "p99": 0.0},
            "overflows": 0,
            "masked_failures": 0,
        }.items()
    )
    assert older["age_s"] == 10 and older["saturation"] == 0.3123
    assert older["overflows"] == 1
    assert older["queue_wait_ms"]["p99"] == pytest.approx(250.1, rel=0.02)
    assert older["queue_wait_ms"]["p99"] == round(older["queue_wait_ms"]["p99"], 2)
    assert json.loads(json.dumps(doc)) == doc
    pool = snap.pool_input()
    assert pool["overflows"] == 1
    assert pool["queue_wait_ms"] == older["queue_wait_ms"]
    # Without the pool's figures (the checksum-traffic window): the same stats.
    bare = snap.as_policy_input(admission=False)
    assert {k: v for k, v in bare.items() if k != "series"} == {
        k: v for k, v in doc.items() if k != "series"
    }
    assert bare["series"][1] == {
        "age_s": 10,
        "requests": 6,
        "error_rate": 0.1667,
        "p99_ms": older["p99_ms"],
    }


def test_fractional_slices(clock: FakeClock) -> None:
    w = UpstreamWindow(1.5, 0.25, clock=clock)
    assert w.slice_count == 6
    clock.advance(0.3)
    assert [s.age_s for s in w.snapshot().series] == [0.0, 0.25]
    assert w.snapshot().as_policy_input(admission=True)["series"][1]["age_s"] == 0.25


@pytest.mark.parametrize(
    ("window_s", "slice_s"),
    [(120, 0), (120, -1), (5, 10), (120, 7), (120, math.nan), (math.nan, 10)],
)
def test_bad_window_geometry_is_refused(window_s: float, slice_s: float) -> None:
    with pytest.raises(ValueError):
        UpstreamWindow(window_s, slice_s)


def test_default_clock_is_monotonic() -> None:
    w = UpstreamWindow(60, 10)
    w.record(Outcome.OK, 0.001)
    assert w.snapshot().requests == 1


# A model-based check: random records at random times against a naive model.
events = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=40.0),  # time step before the event
        st.sampled_from([*Outcome, "masked", "reset"]),
    ),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(events)
def test_window_matches_a_naive_model(steps: list[tuple[float, Outcome | str]]) -> None:
    clock = FakeClock(0.0)
    w = UpstreamWindow(60.0, 10.0, clock=clock)
    origin = 0.0
    log: list[tuple[float, Outcome | str]] = []  # (time, event) since the last reset
    for step, event in steps:
        clock.advance(step)
        if event == "reset":
            w.reset()
            origin, log = clock.now, []
        elif event == "masked":
            w.record_masked()
            log.append((clock.now, event))
        else:
            assert isinstance(event, Outcome)
            w.record(event, 0.01)
            log.append((clock.now, event))
    snap = w.snapshot()

    def epoch(t: float) -> int:
        # Slice edges are origin + k * 10 (as the window computes them), so the
        # model decides "which slice" by comparing against those sums, not by
        # dividing: the two roundings differ right at an edge.
        k = math.floor((t - origin) / 10.0)
        if origin + (k + 1) * 10.0 <= t:
            k += 1
        elif origin + k * 10.0 > t:
            k -= 1
        return k

    now_epoch = epoch(clock.now)
    live = [e for t, e in log if epoch(t) > now_epoch - 6]
    # The run of failures is a sequence since the last reset, not windowed.
    run = 0
    for _, e in log:
        if isinstance(e, Outcome):
            run = run + 1 if e in (Outcome.ERROR, Outcome.TIMEOUT) else 0
    assert snap.consecutive_failures == run
    outcomes = [e for e in live if isinstance(e, Outcome)]
    assert snap.requests == len(outcomes)
    assert snap.errors == sum(e in (Outcome.ERROR, Outcome.TIMEOUT) for e in outcomes)
    assert snap.timeouts == outcomes.count(Outcome.TIMEOUT)
    assert snap.not_found == outcomes.count(Outcome.NOT_FOUND)
    assert snap.masked_failures == live.count("masked")
    assert len(snap.series) == min(now_epoch + 1, 6)
    for age, s in enumerate(snap.series):
        assert s.age_s == age * 10.0
        in_slice = [e for t, e in log if epoch(t) == now_epoch - age and e != "masked"]
        assert s.requests == len(in_slice)


# --- requests still waiting, timeouts as latency, failures in a row -------------


def test_a_timeout_enters_ttfb_at_no_less_than_its_timeout(
    window: UpstreamWindow, clock: FakeClock
) -> None:
    for _ in range(20):
        window.record(Outcome.OK, 0.010)
    token = window.inflight.begin()
    clock.advance(15.0)  # timeouts.first_byte
    window.inflight.end(token, Ending.TIMED_OUT)
    window.record(Outcome.TIMEOUT, None)
    snap = window.snapshot()
    assert (snap.requests, snap.timeouts) == (21, 1)
    assert snap.ttfb_p99_ms == pytest.approx(15000.0, rel=0.02)
    assert snap.series[0].p99_ms == pytest.approx(15000.0, rel=0.02)  # the slice it ended in
    assert snap.series[1].p99_ms == pytest.approx(10000.0, rel=0.02)  # waiting at its end
    assert snap.ttfb_p50_ms == pytest.approx(10.0, rel=0.02)


def test_requests_waiting_now_are_slow_now(window: UpstreamWindow, clock: FakeClock) -> None:
    for _ in range(20):
        window.record(Outcome.OK, 0.010)
    window.inflight.begin()
    clock.advance(5.0)
    snap = window.snapshot()
    assert snap.requests == 20  # a waiting request is not an ended one
    assert snap.series[0].p99_ms == pytest.approx(5000.0, rel=0.02)
    assert snap.ttfb_p99_ms == pytest.approx(5000.0, rel=0.02)
    assert (snap.inflight.count, snap.inflight.oldest_s) == (1, 5.0)
    doc = snap.as_policy_input(admission=False)
    assert doc["inflight"]["oldest_ms"] == 5000.0


def test_a_slice_in_which_nothing_ended_is_slow_when_requests_waited(
    window: UpstreamWindow, clock: FakeClock
) -> None:
    """A hung upstream: two requests wait across two slice edges."""
    clock.advance(1.0)
    window.inflight.begin()
    window.inflight.begin()
    clock.advance(24.0)  # START + 25: two edges crossed, at +10 and +20
    series = window.snapshot().series
    assert [s.requests for s in series] == [0, 0, 0]
    assert series[2].p99_ms == pytest.approx(9000.0, rel=0.02)  # waited 9 s at its end
    assert series[1].p99_ms == pytest.approx(19000.0, rel=0.02)
    assert series[0].p99_ms == pytest.approx(24000.0, rel=0.02)  # waiting now


def test_slices_edges_count_only_requests_started_before_them(
    window: UpstreamWindow, clock: FakeClock
) -> None:
    clock.advance(12.0)
    window.inflight.begin()  # in the second slice
    clock.advance(10.0)
    series = window.snapshot().series
    assert series[2].p99_ms == 0.0
    assert series[1].p99_ms == pytest.approx(8000.0, rel=0.02)


def test_ended_requests_leave_no_trace_at_the_edge(
    window: UpstreamWindow, clock: FakeClock
) -> None:
    token = window.inflight.begin()
    clock.advance(0.02)
    window.inflight.end(token, Ending.ANSWERED)
    window.record(Outcome.OK, 0.02)
    clock.advance(SLICE_S)
    series = window.snapshot().series
    assert series[1].p99_ms == pytest.approx(20.0, rel=0.02)
    assert window.snapshot().inflight == IDLE


def test_failures_in_a_row(window: UpstreamWindow, clock: FakeClock) -> None:
    for _ in range(3):
        window.record(Outcome.ERROR, None)
    window.record_overflow()  # admission: not a failure, not an answer
    window.record_masked()
    window.record(Outcome.TIMEOUT, None)
    assert window.snapshot().consecutive_failures == 4
    window.record(Outcome.NOT_FOUND, 0.001)  # an answer: the run ends
    assert window.snapshot().consecutive_failures == 0
    window.record(Outcome.ERROR, None)
    clock.advance(WINDOW_S * 3)  # a run is a sequence: it does not expire with its slice
    window.record(Outcome.ERROR, None)
    assert window.snapshot().consecutive_failures == 2
    window.record(Outcome.OK, 0.001)
    assert window.snapshot().consecutive_failures == 0


def test_last_answers_keep_the_newest_in_order(window: UpstreamWindow, clock: FakeClock) -> None:
    """The last LAST_ANSWERS answers, newest first: failures (errors, timeouts)
    1, other answers 0; overflows and masked 404s are no answers. They are a
    sequence: they outlive their slices, and a reset clears them."""
    for i in range(LAST_ANSWERS + 7):
        window.record(Outcome.ERROR if i % 2 else Outcome.OK, None)
    window.record_overflow()
    window.record_masked()
    window.record(Outcome.TIMEOUT, None)
    window.record(Outcome.NOT_FOUND, 0.001)
    clock.advance(WINDOW_S * 3)
    last = window.snapshot().last_answers
    assert len(last) == LAST_ANSWERS
    assert last[:4] == (0, 1, 0, 1) and sum(last) == 1 + (LAST_ANSWERS - 2) // 2
    window.reset()
    assert window.snapshot().last_answers == ()
    window.record(Outcome.TIMEOUT, None)
    assert window.snapshot().as_policy_input(admission=False)["last_answers"] == [1]


def test_reset_restarts_the_run_and_the_silence_not_the_waits(
    window: UpstreamWindow, clock: FakeClock
) -> None:
    window.record(Outcome.ERROR, None)
    window.inflight.begin()
    clock.advance(4.0)
    window.reset()
    clock.advance(1.0)
    snap = window.snapshot()
    assert snap.consecutive_failures == 0
    assert (snap.inflight.count, snap.inflight.oldest_s, snap.inflight.silent_s) == (1, 5.0, 1.0)
    assert snap.series[0].p99_ms == pytest.approx(5000.0, rel=0.02)  # still waiting: still slow


def test_masked_failures_per_slice(window: UpstreamWindow, clock: FakeClock) -> None:
    window.record(Outcome.NOT_FOUND, 0.001)
    window.record_masked()
    clock.advance(SLICE_S)
    doc = window.snapshot().as_policy_input(admission=True)
    assert [s["masked_failures"] for s in doc["series"]] == [0, 1]
    assert "masked_failures" not in window.snapshot().as_policy_input(admission=False)["series"][1]


def test_masked_failures_in_a_row(window: UpstreamWindow, clock: FakeClock) -> None:
    for _ in range(3):
        window.record(Outcome.NOT_FOUND, 0.001)
        window.record_masked()  # the next upstream served it
    # Neither a plain 404 (a module nobody has) nor a failure ends the run ...
    window.record(Outcome.NOT_FOUND, 0.001)
    window.record(Outcome.ERROR, None)
    window.record_overflow()
    clock.advance(WINDOW_S * 3)  # ... nor time: a run is a sequence
    window.record(Outcome.NOT_FOUND, 0.001)
    window.record_masked()
    snap = window.snapshot()
    assert snap.consecutive_masked == 4
    assert snap.as_policy_input(admission=True)["consecutive_masked"] == 4
    assert snap.consecutive_failures == 0  # the 404 after the error ended that run
    window.record(Outcome.OK, 0.001)  # this upstream served: the run ends
    assert window.snapshot().consecutive_masked == 0
    window.record(Outcome.NOT_FOUND, 0.001)
    window.record_masked()
    window.reset()  # a breaker transition restarts it like every figure
    assert window.snapshot().consecutive_masked == 0


def test_plain_not_found_never_makes_a_masked_run(window: UpstreamWindow) -> None:
    # go get nonexistent/module through a healthy primary: every upstream says 404.
    for _ in range(50):
        window.record(Outcome.NOT_FOUND, 0.001)
    snap = window.snapshot()
    assert (snap.consecutive_masked, snap.masked_failures, snap.not_found) == (0, 0, 50)


def test_an_answer_on_a_slice_edge_stays_in_the_slice_a_snapshot_then_calls_current() -> None:
    # origin + 40.0 rounds to a time whose distance from origin divides to
    # 3.999...: the window once filed the answer in slice 3 with slice 4's
    # edge at that very instant, so a snapshot at the same time showed it a
    # slice old (found by test_window_matches_a_naive_model).
    clock = FakeClock(0.0)
    w = UpstreamWindow(60.0, 10.0, clock=clock)
    clock.advance(216.6607243077215)
    w.reset()
    clock.advance(40.0)
    assert clock.now - 216.6607243077215 < 40.0  # the rounding this is about
    w.record(Outcome.OK, 0.01)
    assert [s.requests for s in w.snapshot().series] == [1, 0, 0, 0, 0]
