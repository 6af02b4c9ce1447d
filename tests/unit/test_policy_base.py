"""The engine contract helpers: decision parsing, breaker settings, make_engine."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.breaker.state import Action, Decision
from sidecar.config import PolicyConfig, PolicyEngineKind
from sidecar.errors import PolicyEvalError
from sidecar.policy import EmbeddedEngine, make_engine, opa_timeout
from sidecar.policy.base import (
    decision_path,
    parse_breaker_settings,
    parse_decisions,
    upstream_names,
)
from sidecar.policy.opa_server import OpaServerEngine


def test_parse_decisions() -> None:
    raw = {
        "a": {"action": "reroute", "reason": "slow", "alert": False},
        "b": {"action": "reject", "reason": "full", "alert": True},
        "not-in-input": {"action": "allow"},
    }
    assert parse_decisions(raw, ["a", "b"], "d") == {
        "a": Decision(Action.REROUTE, "slow", False),
        "b": Decision(Action.REJECT, "full", True),
    }


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("garbage", "must be an object keyed by upstream"),
        ([{"action": "allow"}], "must be an object keyed by upstream"),
        ({}, "no decision for upstream 'a'"),
        ({"a": "allow"}, "d['a']: decision must be an object"),
        ({"a": {"action": "explode"}}, "decision.action must be one of"),
        ({"a": {"action": "allow", "alert": "yes"}}, "decision.alert must be a boolean"),
    ],
)
def test_parse_decisions_refuses_garbage(raw: Any, fragment: str) -> None:
    with pytest.raises(PolicyEvalError, match=None) as caught:
        parse_decisions(raw, ["a"], "d")
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        (None, (30.0, 5)),
        ({}, (30.0, 5)),
        ({"cooldown_s": 10, "probes": 2}, (10.0, 2)),
        ({"cooldown_s": 0.5, "probes": 3.0}, (0.5, 3)),
    ],
)
def test_breaker_settings(raw: Any, want: tuple[float, int]) -> None:
    assert parse_breaker_settings(raw) == want


@pytest.mark.parametrize(
    "raw",
    [
        [],
        {"cooldown_s": -1},
        {"cooldown_s": "30s"},
        {"probes": 0},
        {"probes": 1.5},
        {"probes": True},
    ],
)
def test_bad_breaker_settings(raw: Any) -> None:
    with pytest.raises(ValueError, match=r"sidecar\.config\.breaker"):
        parse_breaker_settings(raw)


@pytest.mark.parametrize(
    "given",
    [
        "sidecar/breaker/decisions",
        "/sidecar/breaker/decisions/",
        "data.sidecar.breaker.decisions",
        "sidecar.breaker.decisions",
    ],
)
def test_decision_path_forms(given: str) -> None:
    assert decision_path(given) == "sidecar/breaker/decisions"


def test_upstream_names_needs_an_object() -> None:
    assert upstream_names({"upstreams": {"a": {}, "b": {}}}) == ["a", "b"]
    with pytest.raises(PolicyEvalError, match="no 'upstreams' object"):
        upstream_names({"upstreams": []})


def test_make_engine() -> None:
    embedded = make_engine(PolicyConfig())
    assert isinstance(embedded, EmbeddedEngine)
    assert embedded.name == "embedded"
    assert embedded.paths == ()
    assert embedded.decision == "sidecar/breaker/decisions"
    config = PolicyConfig(engine=PolicyEngineKind.OPA, opa_url="http://127.0.0.1:9", interval=5.0)
    opa = make_engine(config)
    assert isinstance(opa, OpaServerEngine)
    assert opa.name == "opa"
    assert opa.timeout == opa_timeout(config) == 2.0
    fast = PolicyConfig(engine=PolicyEngineKind.OPA, interval=0.25)
    assert opa_timeout(fast) == 0.25
