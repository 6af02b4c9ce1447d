"""Breaker state machine with a fake clock: apply, cooldown, probes, self-probe, callback."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.breaker.machine import Breaker
from sidecar.breaker.state import (
    ALLOW,
    Action,
    Decision,
    IllegalTransitionError,
    State,
    Transition,
)
from sidecar.errors import PolicyEvalError

START = 1000.0
COOLDOWN = 30.0
PROBES = 3
SLOW = Decision(Action.REROUTE, "ttfb p99 > 800ms for 120s", False)
ERRORS = Decision(Action.CACHE, "error rate > 5%", False)
SATURATED = Decision(Action.REJECT, "queueing: wait p99 900ms > 250ms", True)


class FakeClock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Harness:
    """A breaker, its fake clock, and every transition its callback received."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.seen: list[Transition] = []
        self.breaker = Breaker("athens", clock=self.clock, on_transition=self.seen.append)

    def apply(self, decision: Decision) -> Transition | None:
        return self.breaker.apply(decision, COOLDOWN, PROBES)

    def open(self, decision: Decision = SLOW) -> None:
        assert self.apply(decision) is not None
        assert self.breaker.state is State.OPEN

    def half_open(self, decision: Decision = SLOW) -> None:
        self.open(decision)
        self.clock.advance(COOLDOWN)
        assert self.breaker.tick() is not None
        assert self.breaker.state is State.HALF_OPEN


@pytest.fixture
def h() -> Harness:
    return Harness()


# -- initial state and read side ---------------------------------------------


def test_starts_closed(h: Harness) -> None:
    b = h.breaker
    assert (b.state, b.action, b.reason, b.alert) == (State.CLOSED, Action.ALLOW, "", False)
    assert b.state_since == START
    h.clock.advance(12.5)
    assert b.state_age() == 12.5
    assert b.as_dict() == {
        "state": "closed",
        "action": "allow",
        "reason": "",
        "alert": False,
        "state_age_s": 12.5,
    }
    assert h.seen == []


# -- apply() in each state -----------------------------------------------------


def test_closed_allow_does_nothing(h: Harness) -> None:
    assert h.apply(ALLOW) is None
    assert h.breaker.state is State.CLOSED
    assert h.seen == []


@pytest.mark.parametrize("decision", [SLOW, ERRORS, SATURATED])
def test_closed_trips_open_with_the_decision(h: Harness, decision: Decision) -> None:
    h.clock.advance(5)
    t = h.apply(decision)
    assert t == Transition(
        "athens", State.CLOSED, State.OPEN, decision.reason, decision.action, START + 5
    )
    b = h.breaker
    assert (b.state, b.action, b.reason, b.alert) == (
        State.OPEN,
        decision.action,
        decision.reason,
        decision.alert,
    )
    assert b.state_since == START + 5
    assert h.seen == [t]


def test_open_refreshes_action_without_transition(h: Harness) -> None:
    h.open(SLOW)
    h.clock.advance(10)
    assert h.apply(SATURATED) is None
    b = h.breaker
    assert (b.state, b.action, b.reason, b.alert) == (
        State.OPEN,
        Action.REJECT,
        SATURATED.reason,
        True,
    )
    assert b.state_since == START  # the cooldown is not restarted by a refresh
    assert len(h.seen) == 1


def test_open_ignores_allow(h: Harness) -> None:
    h.open(ERRORS)
    assert h.apply(ALLOW) is None
    assert (h.breaker.state, h.breaker.action) == (State.OPEN, Action.CACHE)


def test_half_open_ignores_decisions(h: Harness) -> None:
    h.half_open(SLOW)
    for decision in (ALLOW, ERRORS, SATURATED):
        assert h.apply(decision) is None
    b = h.breaker
    assert (b.state, b.action, b.reason) == (
        State.HALF_OPEN,
        Action.REROUTE,
        "cooldown of 30s elapsed",
    )
    assert len(h.seen) == 2


def test_apply_remembers_settings_in_every_state(h: Harness) -> None:
    b = h.breaker
    b.apply(ALLOW, 12.0, 7)
    assert (b.cooldown_s, b.probes) == (12.0, 7)
    b.apply(SLOW, 40.0, 2)  # trips
    assert (b.cooldown_s, b.probes) == (40.0, 2)
    h.clock.advance(40)
    b.tick()
    b.apply(ALLOW, 50.0, 9)  # half-open: ignored, but the settings are kept
    assert (b.cooldown_s, b.probes) == (50.0, 9)


@pytest.mark.parametrize(
    ("cooldown", "probes"),
    [
        (-1.0, 3),
        (float("nan"), 3),
        (float("inf"), 3),
        (30.0, 0),
        (30.0, -2),
        (30.0, 2.5),
        (30.0, True),
    ],
)
def test_bad_settings_from_policy_data_raise(h: Harness, cooldown: float, probes: int) -> None:
    with pytest.raises(PolicyEvalError):
        h.breaker.apply(SLOW, cooldown, probes)
    assert h.breaker.state is State.CLOSED


def test_integral_float_probes_accepted(h: Harness) -> None:
    h.breaker.apply(ALLOW, 30, 5.0)  # type: ignore[arg-type]  # JSON numbers from an engine
    assert h.breaker.probes == 5 and isinstance(h.breaker.probes, int)


def test_bad_constructor_settings_raise() -> None:
    with pytest.raises(PolicyEvalError):
        Breaker("x", probes=0)


# -- cooldown -------------------------------------------------------------------


def test_cooldown_boundary(h: Harness) -> None:
    h.open(SLOW)
    h.clock.advance(COOLDOWN - 0.001)
    assert h.breaker.tick() is None
    assert h.breaker.state is State.OPEN
    h.clock.advance(0.001)
    t = h.breaker.tick()
    assert t is not None
    assert (t.from_state, t.to_state, t.action) == (State.OPEN, State.HALF_OPEN, Action.REROUTE)
    assert t.at == h.breaker.state_since == START + COOLDOWN
    assert h.breaker.tick() is None  # half-open: nothing more to do


def test_tick_when_closed_does_nothing(h: Harness) -> None:
    h.clock.advance(10_000)
    assert h.breaker.tick() is None
    assert h.seen == []


def test_cooldown_follows_the_latest_setting(h: Harness) -> None:
    h.open(SLOW)
    h.clock.advance(10)
    h.breaker.apply(SLOW, 10.0, PROBES)
    assert h.breaker.tick() is not None


def test_zero_cooldown(h: Harness) -> None:
    h.breaker.apply(SLOW, 0.0, 1)
    assert h.breaker.tick() is not None
    assert h.breaker.state is State.HALF_OPEN


def test_half_open_keeps_trip_alert(h: Harness) -> None:
    h.half_open(SATURATED)
    assert (h.breaker.action, h.breaker.alert) == (Action.REJECT, True)


# -- probes -----------------------------------------------------------------------


@pytest.mark.parametrize("state", ["closed", "open"])
def test_no_probes_outside_half_open(h: Harness, state: str) -> None:
    if state == "open":
        h.open()
    assert h.breaker.try_acquire_probe() is False
    assert h.breaker.release_probe(False, "boom") is None
    h.breaker.cancel_probe()
    assert h.breaker.state is State(state)


def test_good_probes_close(h: Harness) -> None:
    h.half_open(SATURATED)
    b = h.breaker
    for i in range(PROBES):
        assert b.try_acquire_probe()
        t = b.release_probe(True)
        if i < PROBES - 1:
            assert t is None and b.state is State.HALF_OPEN
    assert t is not None
    assert (t.from_state, t.to_state, t.action, t.reason) == (
        State.HALF_OPEN,
        State.CLOSED,
        Action.ALLOW,
        "3 probes succeeded",
    )
    assert (b.state, b.action, b.alert) == (State.CLOSED, Action.ALLOW, False)
    assert b.try_acquire_probe() is False
    assert [x.to_state for x in h.seen] == [State.OPEN, State.HALF_OPEN, State.CLOSED]


def test_concurrent_probe_limit(h: Harness) -> None:
    h.half_open()
    b = h.breaker
    assert [b.try_acquire_probe() for _ in range(PROBES + 2)] == [True] * PROBES + [False] * 2
    assert b.as_dict()["probes"] == {"limit": PROBES, "in_flight": PROBES, "succeeded": 0}


def test_probe_total_is_limited_per_period(h: Harness) -> None:
    h.half_open()
    b = h.breaker
    assert b.try_acquire_probe()
    assert b.release_probe(True) is None
    assert b.try_acquire_probe() and b.try_acquire_probe()
    assert b.try_acquire_probe() is False  # 1 succeeded + 2 in flight = 3
    b.release_probe(True)
    assert b.try_acquire_probe() is False  # 2 succeeded + 1 in flight
    assert b.release_probe(True) is not None
    assert b.state is State.CLOSED


def test_bad_probe_reopens_with_previous_action(h: Harness) -> None:
    h.half_open(ERRORS)
    b = h.breaker
    assert b.try_acquire_probe() and b.try_acquire_probe()
    b.release_probe(True)
    h.clock.advance(2)
    t = b.release_probe(False, "HTTP 502")
    assert t is not None
    assert (t.from_state, t.to_state, t.action) == (State.HALF_OPEN, State.OPEN, Action.CACHE)
    assert t.reason == "probe failed: HTTP 502"
    assert (b.state, b.action, b.reason) == (State.OPEN, Action.CACHE, "probe failed: HTTP 502")
    assert b.state_since == START + COOLDOWN + 2  # a fresh cooldown starts now
    h.clock.advance(COOLDOWN - 1)
    assert b.tick() is None
    h.clock.advance(1)
    assert b.tick() is not None


def test_bad_probe_without_detail(h: Harness) -> None:
    h.half_open()
    h.breaker.try_acquire_probe()
    t = h.breaker.release_probe(False)
    assert t is not None and t.reason == "probe failed: bad response"


def test_release_after_state_moved_is_ignored(h: Harness) -> None:
    h.half_open()
    b = h.breaker
    assert all(b.try_acquire_probe() for _ in range(PROBES))
    assert b.release_probe(False, "timeout") is not None  # reopened
    # The two other probes come back after the breaker moved on.
    assert b.release_probe(False, "late") is None
    assert b.release_probe(True) is None
    assert b.state is State.OPEN and b.reason == "probe failed: timeout"
    assert len(h.seen) == 3


def test_release_from_an_earlier_period_is_ignored(h: Harness) -> None:
    h.half_open()
    b = h.breaker
    old_period = b.probe_period
    assert b.try_acquire_probe() and b.try_acquire_probe()
    b.release_probe(False, "boom")
    h.clock.advance(COOLDOWN)
    b.tick()
    assert b.probe_period == old_period + 1
    assert b.try_acquire_probe()
    # The late probe of the first period must not count in the second one.
    assert b.release_probe(False, "late", period=old_period) is None
    b.cancel_probe(period=old_period)
    assert b.state is State.HALF_OPEN
    assert b.as_dict()["probes"] == {"limit": PROBES, "in_flight": 1, "succeeded": 0}
    assert b.release_probe(True, period=b.probe_period) is None
    assert b.as_dict()["probes"]["succeeded"] == 1


def test_release_without_acquire_is_ignored(h: Harness) -> None:
    h.half_open()
    assert h.breaker.release_probe(False, "never acquired") is None
    assert h.breaker.state is State.HALF_OPEN


def test_cancel_frees_a_slot(h: Harness) -> None:
    h.half_open()
    b = h.breaker
    assert all(b.try_acquire_probe() for _ in range(PROBES))
    assert b.try_acquire_probe() is False
    b.cancel_probe()
    assert b.try_acquire_probe()
    b.cancel_probe()
    b.cancel_probe()
    b.cancel_probe()
    b.cancel_probe()  # more cancels than probes: no negative count
    assert b.as_dict()["probes"]["in_flight"] == 0


def test_probe_limit_is_fixed_per_period(h: Harness) -> None:
    h.half_open()
    b = h.breaker
    b.apply(ALLOW, COOLDOWN, 1)  # ignored while half-open; kept for the next period
    assert b.try_acquire_probe()
    assert b.release_probe(True) is None  # this period still needs PROBES
    assert b.try_acquire_probe()
    b.release_probe(False)
    h.clock.advance(COOLDOWN)
    b.tick()
    assert b.try_acquire_probe()
    assert b.try_acquire_probe() is False  # the new period uses probes=1
    assert b.release_probe(True) is not None


# -- self-probe ---------------------------------------------------------------------


def test_needs_self_probe_only_when_half_open(h: Harness) -> None:
    h.clock.advance(1000)
    assert h.breaker.needs_self_probe(5.0) is False
    h.open()
    h.clock.advance(COOLDOWN - 1)
    assert h.breaker.needs_self_probe(5.0) is False


def test_needs_self_probe_after_idle(h: Harness) -> None:
    h.half_open()
    b = h.breaker
    assert b.needs_self_probe(5.0) is False
    h.clock.advance(5.0)
    assert b.needs_self_probe(5.0) is True
    assert b.try_acquire_probe()  # the synthetic probe (or real traffic) restarts the timer
    assert b.needs_self_probe(5.0) is False
    h.clock.advance(4.9)
    assert b.needs_self_probe(5.0) is False
    h.clock.advance(0.1)
    assert b.needs_self_probe(5.0) is True
    assert b.needs_self_probe(0.0) is True


def test_no_self_probe_when_all_slots_taken(h: Harness) -> None:
    h.half_open()
    b = h.breaker
    assert all(b.try_acquire_probe() for _ in range(PROBES))
    h.clock.advance(60)
    assert b.needs_self_probe(5.0) is False
    b.cancel_probe()
    assert b.needs_self_probe(5.0) is True


def test_self_probe_cycle_closes(h: Harness) -> None:
    h.half_open()
    b = h.breaker
    while b.state is State.HALF_OPEN:
        h.clock.advance(5)
        assert b.needs_self_probe(5.0)
        assert b.try_acquire_probe()
        b.release_probe(True)
    assert b.state is State.CLOSED


# -- callback and transitions ----------------------------------------------------------


def test_callback_once_per_transition_in_order(h: Harness) -> None:
    returned = [h.apply(SLOW)]
    h.apply(SATURATED)  # refresh: no transition
    h.clock.advance(COOLDOWN)
    returned.append(h.breaker.tick())
    returned.append(h.breaker.tick())  # already half-open
    h.breaker.try_acquire_probe()
    returned.append(h.breaker.release_probe(False, "502"))
    h.clock.advance(COOLDOWN)
    returned.append(h.breaker.tick())
    for _ in range(PROBES):
        h.breaker.try_acquire_probe()
        returned.append(h.breaker.release_probe(True))
    transitions = [t for t in returned if t is not None]
    assert h.seen == transitions
    assert [(t.from_state, t.to_state) for t in h.seen] == [
        (State.CLOSED, State.OPEN),
        (State.OPEN, State.HALF_OPEN),
        (State.HALF_OPEN, State.OPEN),
        (State.OPEN, State.HALF_OPEN),
        (State.HALF_OPEN, State.CLOSED),
    ]
    assert [t.action for t in h.seen] == [
        Action.REROUTE,
        Action.REJECT,  # the refreshed action carries through half-open
        Action.REJECT,
        Action.REJECT,
        Action.ALLOW,
    ]
    assert all(t.upstream == "athens" for t in h.seen)


def test_callback_sees_the_new_state() -> None:
    clock = FakeClock()
    states: list[State] = []
    b: Breaker

    def on_transition(t: Transition) -> None:
        states.append(b.state)
        assert b.state_since == t.at

    b = Breaker("athens", clock=clock, on_transition=on_transition)
    b.apply(SLOW, 0.0, 1)
    b.tick()
    assert states == [State.OPEN, State.HALF_OPEN]


def test_works_without_callback() -> None:
    clock = FakeClock()
    b = Breaker("public", clock=clock)
    assert b.apply(SLOW, 1.0, 1) is not None
    clock.advance(1.0)
    assert b.tick() is not None
    assert b.try_acquire_probe()
    assert b.release_probe(True) is not None
    assert b.state is State.CLOSED


def test_internal_illegal_move_raises_and_changes_nothing(h: Harness) -> None:
    with pytest.raises(IllegalTransitionError):
        h.breaker._move(State.HALF_OPEN, Action.REROUTE, "skip open", False)
    h.open()
    with pytest.raises(IllegalTransitionError):
        h.breaker._move(State.CLOSED, Action.ALLOW, "skip half-open", False)
    assert h.breaker.state is State.OPEN
    assert len(h.seen) == 1


def test_default_clock() -> None:
    b = Breaker("athens")
    assert b.state_age() >= 0.0


# -- random operation sequences keep the invariants ------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("apply"), st.sampled_from([ALLOW, SLOW, ERRORS, SATURATED])),
        st.tuples(st.just("advance"), st.floats(min_value=0, max_value=40)),
        st.tuples(st.just("tick"), st.none()),
        st.tuples(st.just("acquire"), st.none()),
        st.tuples(st.just("release"), st.booleans()),
        st.tuples(st.just("cancel"), st.none()),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_random_operations_keep_invariants(sequence: list[tuple[str, object]]) -> None:
    h = Harness()
    b = h.breaker
    returned: list[Transition] = []
    for op, arg in sequence:
        result: Transition | None = None
        if op == "apply":
            assert isinstance(arg, Decision)
            result = h.apply(arg)
        elif op == "advance":
            assert isinstance(arg, float)
            h.clock.advance(arg)
        elif op == "tick":
            result = b.tick()
        elif op == "acquire":
            b.try_acquire_probe()
        elif op == "release":
            assert isinstance(arg, bool)
            result = b.release_probe(arg)
        else:
            b.cancel_probe()
        if result is not None:
            returned.append(result)
        assert (b.state is State.CLOSED) == (b.action is Action.ALLOW)
        if b.state is State.HALF_OPEN:
            probes = b.as_dict()["probes"]
            assert probes["in_flight"] >= 0 and 0 <= probes["succeeded"] < probes["limit"]
            assert probes["in_flight"] + probes["succeeded"] <= probes["limit"]
    assert h.seen == returned
    for prev, nxt in zip(h.seen, h.seen[1:], strict=False):
        assert prev.to_state is nxt.from_state
        assert prev.at <= nxt.at
