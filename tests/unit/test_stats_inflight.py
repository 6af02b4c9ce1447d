"""The in-flight registry on a fake clock: ages, the silence of an upstream that
answers nothing, timeouts handed on as latency."""

from __future__ import annotations

import pytest

from sidecar.stats.inflight import IDLE, Ending, InFlight
from tests.control_support import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(100.0)


def test_nothing_waiting_is_idle(clock: FakeClock) -> None:
    waits = InFlight(clock)
    assert waits.snapshot() == IDLE
    token = waits.begin()
    waits.end(token, Ending.ANSWERED)
    assert waits.snapshot() == IDLE
    assert waits.count == 0


def test_ages_of_the_requests_waiting(clock: FakeClock) -> None:
    waits = InFlight(clock)
    first = waits.begin()
    clock.advance(2.0)
    second = waits.begin()
    clock.advance(1.0)
    snap = waits.snapshot()
    assert (snap.count, snap.oldest_s) == (2, 3.0)
    assert list(waits.starts()) == [100.0, 102.0]
    waits.end(first, Ending.ANSWERED)
    assert waits.snapshot().oldest_s == 1.0  # the oldest left: the next is the oldest
    waits.end(second, Ending.ABANDONED)
    assert waits.count == 0


def test_an_upstream_that_answers_nothing_is_silent(clock: FakeClock) -> None:
    waits = InFlight(clock)
    tokens = [waits.begin() for _ in range(3)]
    clock.advance(3.5)
    snap = waits.snapshot()
    assert (snap.silent_s, snap.unanswered) == (3.5, 3)
    waits.end(tokens[0], Ending.ANSWERED)  # it spoke: the others wait on a fresh silence
    clock.advance(0.5)
    snap = waits.snapshot()
    assert (snap.count, snap.silent_s, snap.unanswered, snap.oldest_s) == (2, 0.5, 2, 4.0)


def test_a_refusal_is_an_answer_a_timeout_is_not(clock: FakeClock) -> None:
    waits = InFlight(clock)
    a, b, c = waits.begin(), waits.begin(), waits.begin()
    clock.advance(2.0)
    waits.end(a, Ending.TIMED_OUT)
    assert waits.snapshot().silent_s == 2.0
    waits.end(b, Ending.ANSWERED)  # e.g. connection refused: fast, not hung
    assert waits.snapshot().silent_s == 0.0
    waits.end(c, Ending.ANSWERED)


def test_silence_goes_on_across_requests_given_up_on(clock: FakeClock) -> None:
    """A hedged client: each request to the hung upstream is given up on after
    a second, and its next request follows at once. No single request waits
    long, but the upstream has answered nothing for all that time."""
    waits = InFlight(clock)
    for _ in range(4):
        token = waits.begin()
        clock.advance(1.0)
        waits.end(token, Ending.ABANDONED)
        clock.advance(0.01)
    waits.begin()
    snap = waits.snapshot()
    assert snap.count == 1 and snap.oldest_s == 0.0
    assert snap.silent_s == pytest.approx(4.04)
    assert snap.unanswered == 5


def test_short_hedged_waits_a_moment_apart_keep_the_silence(clock: FakeClock) -> None:
    """A go command against a hung upstream: each module request is hedged
    away after 200 ms, and the next one comes 400 ms later (a checksum lookup
    of the other class went in between): pauses longer than the silence of
    each wait, but a moment apart all the same."""
    waits = InFlight(clock)
    for _ in range(8):
        token = waits.begin()
        clock.advance(0.2)
        waits.end(token, Ending.ABANDONED)
        clock.advance(0.4)
    waits.begin()
    snap = waits.snapshot()
    assert snap.silent_s == pytest.approx(8 * 0.6)
    assert snap.unanswered == 9


def test_an_upstream_left_alone_starts_afresh(clock: FakeClock) -> None:
    """One request given up on long ago does not make the next one part of an outage."""
    waits = InFlight(clock)
    token = waits.begin()
    clock.advance(3.0)
    waits.end(token, Ending.ABANDONED)
    clock.advance(3.5)  # alone for longer than it had been silent
    waits.begin()
    snap = waits.snapshot()
    assert (snap.silent_s, snap.unanswered) == (0.0, 1)


def test_a_short_pause_keeps_the_silence(clock: FakeClock) -> None:
    waits = InFlight(clock)
    token = waits.begin()
    clock.advance(3.0)
    waits.end(token, Ending.ABANDONED)
    clock.advance(2.5)  # shorter than the silence before it
    waits.begin()
    assert waits.snapshot().silent_s == 5.5


def test_a_timeout_hands_its_wait_on(clock: FakeClock) -> None:
    waited: list[float] = []
    waits = InFlight(clock, waited.append)
    token = waits.begin()
    other = waits.begin()
    clock.advance(15.0)
    waits.end(token, Ending.TIMED_OUT)
    waits.end(other, Ending.ABANDONED)  # a client that left hands nothing on
    assert waited == [15.0]


def test_restart_silence_keeps_the_requests(clock: FakeClock) -> None:
    waits = InFlight(clock)
    waits.begin()
    waits.begin()
    clock.advance(5.0)
    waits.restart_silence()
    clock.advance(1.0)
    snap = waits.snapshot()
    assert (snap.count, snap.oldest_s, snap.silent_s, snap.unanswered) == (2, 6.0, 1.0, 2)


def test_a_token_ends_once(clock: FakeClock) -> None:
    waited: list[float] = []
    waits = InFlight(clock, waited.append)
    token = waits.begin()
    waits.begin()
    waits.end(token, Ending.TIMED_OUT)
    waits.end(token, Ending.TIMED_OUT)
    waits.end(token, Ending.ANSWERED)
    assert waits.count == 1 and len(waited) == 1
    assert waits.snapshot().silent_s == 0.0  # the second end changed nothing


def test_policy_input_shape(clock: FakeClock) -> None:
    waits = InFlight(clock)
    waits.begin()
    clock.advance(0.0123456)
    assert waits.snapshot().as_policy_input() == {
        "count": 1,
        "oldest_ms": 12.35,
        "silent_ms": 12.35,
        "unanswered": 1,
        "overtaken": 0,
    }
    assert IDLE.as_policy_input() == {
        "count": 0,
        "oldest_ms": 0.0,
        "silent_ms": 0.0,
        "unanswered": 0,
        "overtaken": 0,
    }


def test_the_silence_stands_still_while_nobody_waits(clock: FakeClock) -> None:
    """Requests given up on (hedged elsewhere, clients gone): the upstream was
    silent while they waited, not while it was left alone."""
    waits = InFlight(clock)
    a, b = waits.begin(), waits.begin()
    clock.advance(1.5)
    waits.end(a, Ending.ABANDONED)
    waits.end(b, Ending.ABANDONED)
    clock.advance(1.0)
    snap = waits.snapshot()
    assert (snap.count, snap.silent_s, snap.unanswered) == (0, 1.5, 2)
    clock.advance(60.0)
    assert waits.snapshot().silent_s == 1.5


def test_a_silence_whose_requests_were_overtaken_goes_on_while_nobody_waits(
    clock: FakeClock,
) -> None:
    """A hung upstream whose last requests were all hedged away is still
    silent after its clients stop: it said nothing, the next upstream did."""
    waits = InFlight(clock)
    for _ in range(3):
        token = waits.begin()
        clock.advance(0.2)
        waits.end(token, Ending.ABANDONED)
        waits.overtake()
    clock.advance(5.0)
    snap = waits.snapshot()
    assert (snap.count, snap.unanswered, snap.overtaken) == (0, 3, 3)
    assert snap.silent_s == pytest.approx(5.6)
    token = waits.begin()  # an answer ends it, as always
    waits.end(token, Ending.ANSWERED)
    assert waits.snapshot() == IDLE


def test_requests_overtaken_by_their_hedge_count_within_the_silence(clock: FakeClock) -> None:
    """A hedge's answer while this upstream said nothing is evidence of the
    silence; an answer here ends the silence and the count with it."""
    waits = InFlight(clock)
    waits.overtake()  # no silence yet: nothing to count
    assert waits.snapshot().overtaken == 0
    for _ in range(3):
        token = waits.begin()
        clock.advance(0.2)
        waits.end(token, Ending.ABANDONED)
        waits.overtake()
    assert waits.snapshot().overtaken == 3
    assert waits.snapshot().as_policy_input()["overtaken"] == 3
    waits.end(waits.begin(), Ending.ANSWERED)
    assert waits.snapshot().overtaken == 0
    token = waits.begin()
    waits.overtake()
    waits.restart_silence()  # a breaker transition: fresh evidence
    assert waits.snapshot().overtaken == 0
    waits.end(token, Ending.ANSWERED)
