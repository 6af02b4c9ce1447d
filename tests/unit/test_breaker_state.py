"""Breaker vocabulary: transition table, Decision parsing, Transition."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest

from sidecar.breaker.state import (
    ALLOW,
    LEGAL_TRANSITIONS,
    SUMDB_KINDS,
    Action,
    Decision,
    IllegalTransitionError,
    State,
    TrafficClass,
    Transition,
    check_transition,
    traffic_class,
)
from sidecar.errors import PolicyEvalError, SidecarError
from sidecar.goproxy import Kind

LEGAL = {
    (State.CLOSED, State.OPEN),
    (State.OPEN, State.HALF_OPEN),
    (State.HALF_OPEN, State.CLOSED),
    (State.HALF_OPEN, State.OPEN),
}
ALL_PAIRS = list(itertools.product(State, State))


def test_wire_values() -> None:
    assert [s.value for s in State] == ["closed", "open", "half-open"]
    assert [a.value for a in Action] == ["allow", "reroute", "cache", "reject"]
    assert (
        json.dumps({"s": State.HALF_OPEN, "a": Action.CACHE}) == '{"s": "half-open", "a": "cache"}'
    )
    assert f"{State.OPEN}" == "open"


def test_table_is_exactly_the_four_legal_transitions() -> None:
    assert LEGAL_TRANSITIONS == LEGAL


@pytest.mark.parametrize(("src", "dst"), sorted(LEGAL))
def test_legal_transition_passes(src: State, dst: State) -> None:
    check_transition(src, dst)
    t = Transition("athens", src, dst, "why", Action.REROUTE, 1.0)
    assert (t.from_state, t.to_state) == (src, dst)


@pytest.mark.parametrize(("src", "dst"), [p for p in ALL_PAIRS if p not in LEGAL])
def test_illegal_transition_raises(src: State, dst: State) -> None:
    with pytest.raises(IllegalTransitionError, match=f"{src.value} -> {dst.value}"):
        check_transition(src, dst)
    with pytest.raises(IllegalTransitionError):
        Transition("athens", src, dst, "why", Action.REROUTE, 1.0)


def test_illegal_transition_error_is_in_the_tree() -> None:
    assert issubclass(IllegalTransitionError, SidecarError)


def test_transition_is_frozen() -> None:
    t = Transition("athens", State.CLOSED, State.OPEN, "slow", Action.REROUTE, 5.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.reason = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"action": "allow", "reason": "", "alert": False}, Decision(Action.ALLOW, "", False)),
        (
            {"action": "reroute", "reason": "ttfb p99 > 800ms for 120s", "alert": False},
            Decision(Action.REROUTE, "ttfb p99 > 800ms for 120s", False),
        ),
        (
            {"action": "cache", "reason": "errors", "alert": True},
            Decision(Action.CACHE, "errors", True),
        ),
        ({"action": "reject"}, Decision(Action.REJECT, "", False)),
        ({"action": "allow", "extra": [1, 2]}, ALLOW),
    ],
)
def test_decision_from_json(obj: object, expected: Decision) -> None:
    assert Decision.from_json(obj) == expected


@pytest.mark.parametrize(
    "obj",
    [
        None,
        "allow",
        ["allow"],
        42,
        {},
        {"action": None},
        {"action": "ALLOW"},
        {"action": "open"},
        {"action": 1},
        {"action": "allow", "reason": 5},
        {"action": "allow", "reason": None},
        {"action": "allow", "alert": "yes"},
        {"action": "allow", "alert": 1},
        {"action": "allow", "alert": None},
    ],
)
def test_decision_from_garbage_raises(obj: object) -> None:
    with pytest.raises(PolicyEvalError):
        Decision.from_json(obj)


def test_decision_error_message_is_bounded() -> None:
    with pytest.raises(PolicyEvalError) as info:
        Decision.from_json({"action": "x" * 10_000})
    assert len(str(info.value)) < 200


def test_decision_reason_is_bounded() -> None:
    d = Decision.from_json({"action": "reject", "reason": "r" * 5000})
    assert len(d.reason) == 1000


def test_decision_with_a_sumdb_verdict() -> None:
    raw = {
        "action": "allow",
        "reason": "ok",
        "sumdb": {"action": "cache", "reason": "error rate 100.0%", "ignored": 1},
    }
    d = Decision.from_json(raw)
    assert d == Decision(Action.ALLOW, "ok", False, Decision(Action.CACHE, "error rate 100.0%"))
    assert d.for_class(TrafficClass.MODULE) is d
    assert d.for_class(TrafficClass.SUMDB) == Decision(Action.CACHE, "error rate 100.0%")
    assert Decision.from_json(d.as_json()) == d
    assert d.as_json()["sumdb"] == {
        "action": "cache",
        "reason": "error rate 100.0%",
        "alert": False,
    }


def test_without_a_sumdb_verdict_checksum_traffic_follows_the_upstream() -> None:
    d = Decision.from_json({"action": "reroute", "reason": "slow", "sumdb": None})
    assert d.sumdb is None
    assert d.for_class(TrafficClass.SUMDB) is d
    assert "sumdb" not in d.as_json()


@pytest.mark.parametrize("bad", [{"action": "panic"}, "cache", {"reason": "no action"}])
def test_a_bad_sumdb_verdict_is_refused_and_named(bad: object) -> None:
    with pytest.raises(PolicyEvalError, match=r"^sumdb: decision"):
        Decision.from_json({"action": "allow", "sumdb": bad})


def test_traffic_class_of_every_kind() -> None:
    sumdb = {k for k in Kind if traffic_class(k) is TrafficClass.SUMDB}
    assert sumdb == SUMDB_KINDS == {k for k in Kind if k.value.startswith("sumdb-")}
    assert traffic_class(Kind.ZIP) is TrafficClass.MODULE
