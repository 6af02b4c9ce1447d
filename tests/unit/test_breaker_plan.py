"""The immutable plan the control loop swaps and the request path reads."""

from __future__ import annotations

import dataclasses

import pytest

from sidecar.breaker.machine import Breaker
from sidecar.breaker.plan import Plan, UpstreamPlan
from sidecar.breaker.state import SUMDB_KINDS, Action, Decision, State
from sidecar.goproxy import Kind


def clock() -> float:
    return 50.0


def test_from_breakers_follows_each_breaker() -> None:
    athens = Breaker("athens", clock=clock)
    public = Breaker("public", clock=clock)
    athens.apply(Decision(Action.CACHE, "errors"), 30.0, 5)
    athens_sumdb = Breaker("athens", clock=clock)
    public_sumdb = Breaker("public", clock=clock)
    athens_sumdb.apply(Decision(Action.REROUTE, "502 on every lookup"), 30.0, 5)
    plan = Plan.from_breakers(
        [athens, public], [athens_sumdb, public_sumdb], version=7, created_at=50.0
    )
    assert [u.name for u in plan.upstreams] == ["athens", "public"]
    assert plan.upstreams[0] == UpstreamPlan("athens", Action.CACHE, State.OPEN, athens)
    assert plan.upstreams[1] == UpstreamPlan("public", Action.ALLOW, State.CLOSED, public)
    assert plan.sumdb[0] == UpstreamPlan("athens", Action.REROUTE, State.OPEN, athens_sumdb)
    assert plan.sumdb[1].breaker is public_sumdb
    assert (plan.version, plan.created_at) == (7, 50.0)


def test_targets_by_traffic_class() -> None:
    module, sumdb = Breaker("athens", clock=clock), Breaker("athens", clock=clock)
    plan = Plan.from_breakers([module], [sumdb], 1, 0.0)
    for kind in Kind:
        want = sumdb if kind in SUMDB_KINDS else module
        assert plan.targets(kind)[0].breaker is want, kind
    assert {k for k in Kind if k.value.startswith("sumdb-")} == SUMDB_KINDS


def test_by_name() -> None:
    b = Breaker("athens", clock=clock)
    plan = Plan((UpstreamPlan("athens", Action.ALLOW, State.OPEN, b),), 1, 0.0, ())
    found = plan.by_name("athens")
    assert found is not None and found.breaker is b
    assert plan.by_name("nope") is None
    assert Plan((), 0, 0.0, ()).by_name("athens") is None


def test_plan_is_immutable_and_slotted() -> None:
    b = Breaker("athens", clock=clock)
    up = UpstreamPlan.of(b)
    plan = Plan((up,), 1, 0.0, (up,))
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.version = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        up.action = Action.REJECT  # type: ignore[misc]
    assert not hasattr(plan, "__dict__") and not hasattr(up, "__dict__")


def test_plan_does_not_follow_later_breaker_changes() -> None:
    b = Breaker("athens", clock=clock)
    plan = Plan.from_breakers([b], [], 1, 0.0)
    b.apply(Decision(Action.REJECT, "saturated", True), 30.0, 5)
    assert plan.upstreams[0].action is Action.ALLOW  # a new plan is needed to see it
    assert plan.upstreams[0].breaker.state is State.OPEN  # the live breaker is shared
