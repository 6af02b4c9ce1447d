"""The embedded (regopy) engine on the shipped policy and on broken ones."""

from __future__ import annotations

import asyncio
import copy
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.breaker.state import Action
from sidecar.errors import PolicyEvalError, PolicyLoadError
from sidecar.policy import SMOKE_INPUT, EmbeddedEngine
from sidecar.policy.base import SMOKE_UPSTREAM

REPO_POLICIES = Path(__file__).resolve().parents[2] / "policies"
DECISION = "sidecar/breaker/decisions"

DECISIONS_OF = """package sidecar.breaker

decisions := {name: {"action": "allow", "reason": "ok", "alert": false} |
	some name, _ in input.upstreams
}
"""


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    """A copy of the shipped policies that a test may break."""
    target = tmp_path / "policies"
    shutil.copytree(REPO_POLICIES, target)
    return target


@pytest.fixture
async def engine() -> AsyncIterator[EmbeddedEngine]:
    engine = EmbeddedEngine((), DECISION)
    assert await engine.load() is None
    yield engine
    await engine.close()


def slow_input(p99: float) -> dict[str, Any]:
    doc = copy.deepcopy(SMOKE_INPUT)
    for s in doc["upstreams"][SMOKE_UPSTREAM]["series"]:
        s["p99_ms"] = p99
    return doc


async def load(paths: list[str]) -> EmbeddedEngine:
    engine = EmbeddedEngine(paths, DECISION)
    try:
        await engine.load()
    except BaseException:
        await engine.close()
        raise
    return engine


async def test_shipped_policy_decides(engine: EmbeddedEngine) -> None:
    assert engine.name == "embedded"
    assert engine.version is not None
    assert engine.breaker_settings() == (30.0, 5)
    allow = await engine.evaluate(SMOKE_INPUT)
    assert allow[SMOKE_UPSTREAM].action is Action.ALLOW
    slow = await engine.evaluate(slow_input(912.4))
    assert slow[SMOKE_UPSTREAM].action is Action.REROUTE
    assert slow[SMOKE_UPSTREAM].reason == "ttfb p99 912ms > 800ms for 120s"
    # The compiled policy is reused: the next input is not polluted by the last.
    again = await engine.evaluate(SMOKE_INPUT)
    assert again[SMOKE_UPSTREAM].action is Action.ALLOW


async def test_evaluation_runs_off_the_event_loop(engine: EmbeddedEngine) -> None:
    upstream = SMOKE_INPUT["upstreams"][SMOKE_UPSTREAM]
    big = {"now": 0, "upstreams": {f"u{i}": upstream for i in range(60)}}
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.001)
            ticks += 1

    task = asyncio.create_task(ticker())
    started = time.perf_counter()
    decisions = await engine.evaluate(big)
    elapsed = time.perf_counter() - started
    task.cancel()
    assert len(decisions) == 60
    # A blocking evaluation would starve the ticker for its whole duration.
    assert ticks >= min(5, int(elapsed * 1000) // 4), (ticks, elapsed)


async def test_concurrent_evaluations_do_not_mix_inputs(engine: EmbeddedEngine) -> None:
    inputs = [slow_input(912.0) if i % 2 else SMOKE_INPUT for i in range(20)]
    results = await asyncio.gather(*(engine.evaluate(doc) for doc in inputs))
    for i, decisions in enumerate(results):
        want = Action.REROUTE if i % 2 else Action.ALLOW
        assert decisions[SMOKE_UPSTREAM].action is want


async def test_thresholds_and_breaker_settings_come_from_data(policy_dir: Path) -> None:
    (policy_dir / "thresholds.yaml").write_text(
        "sidecar:\n  config:\n    thresholds: {ttfb_p99_ms: 20}\n"
        "    breaker: {cooldown_s: 7.5, probes: 2}\n"
    )
    engine = await load([str(policy_dir)])
    try:
        assert engine.breaker_settings() == (7.5, 2)
        decisions = await engine.evaluate(SMOKE_INPUT)
        assert decisions[SMOKE_UPSTREAM].reason == "ttfb p99 30ms > 20ms for 120s"
    finally:
        await engine.close()


async def test_syntax_error_names_file_and_line(policy_dir: Path) -> None:
    broken = policy_dir / "sidecar" / "breaker.rego"
    lines = broken.read_text().splitlines(keepends=True)
    lines.insert(30, "oops := [1, 2\n")  # becomes line 31
    broken.write_text("".join(lines))
    with pytest.raises(PolicyLoadError) as caught:
        await load([str(policy_dir)])
    assert caught.value.file == str(broken)
    assert caught.value.line == 31
    assert str(caught.value).startswith(f"{broken}:31: ")


async def test_parse_error_in_a_second_module(policy_dir: Path) -> None:
    extra = policy_dir / "sidecar" / "extra.rego"
    extra.write_text("package sidecar.extra\n\nx := {\n")
    with pytest.raises(PolicyLoadError) as caught:
        await load([str(policy_dir)])
    assert caught.value.file == str(extra)
    assert caught.value.line == 3


async def test_bad_breaker_settings_name_the_data_file(policy_dir: Path) -> None:
    thresholds = policy_dir / "thresholds.yaml"
    thresholds.write_text("sidecar:\n  config:\n    breaker: {probes: 0}\n")
    with pytest.raises(PolicyLoadError) as caught:
        await load([str(policy_dir)])
    assert caught.value.file == str(thresholds)
    assert "breaker.probes: expected an integer >= 1, got 0" in caught.value.message


async def test_policy_that_outputs_a_string_is_refused(tmp_path: Path) -> None:
    (tmp_path / "p.rego").write_text('package sidecar.breaker\n\ndecisions := "all good"\n')
    with pytest.raises(PolicyLoadError) as caught:
        await load([str(tmp_path)])
    assert "must be an object keyed by upstream" in str(caught.value)
    assert isinstance(caught.value.__cause__, PolicyEvalError)


async def test_garbage_output_at_evaluation_is_an_eval_error(tmp_path: Path) -> None:
    (tmp_path / "p.rego").write_text(
        DECISIONS_OF.replace(
            "decisions :=", 'decisions := "garbage" if input.now == 666\n\ndecisions :=', 1
        ).replace("\n}\n", "\n} if input.now != 666\n")
    )
    engine = await load([str(tmp_path)])
    try:
        ok = await engine.evaluate(SMOKE_INPUT)
        assert ok[SMOKE_UPSTREAM].action is Action.ALLOW
        with pytest.raises(PolicyEvalError, match="must be an object keyed by upstream"):
            await engine.evaluate({**SMOKE_INPUT, "now": 666})
    finally:
        await engine.close()


async def test_missing_decision_rule_is_refused(tmp_path: Path) -> None:
    (tmp_path / "p.rego").write_text("package sidecar.other\n\nx := 1\n")
    with pytest.raises(PolicyLoadError, match=r"data\.sidecar\.breaker\.decisions is undefined"):
        await load([str(tmp_path)])


async def test_unknown_function_is_caught_by_the_sample_evaluation(tmp_path: Path) -> None:
    # rego-cpp compiles this; only evaluating shows the error (OPA refuses it at once).
    (tmp_path / "p.rego").write_text(
        DECISIONS_OF.replace('"reason": "ok"', '"reason": no_such_function(name)')
    )
    with pytest.raises(PolicyLoadError) as caught:
        await load([str(tmp_path)])
    assert "Function not found: no_such_function" in str(caught.value)
    assert caught.value.file == str(tmp_path / "p.rego")


async def test_upstream_missing_from_the_output(tmp_path: Path) -> None:
    (tmp_path / "p.rego").write_text(
        DECISIONS_OF.replace(
            "some name, _ in input.upstreams",
            'some name, _ in input.upstreams\n\tname != "skipped"',
        )
    )
    engine = await load([str(tmp_path)])
    try:
        doc: dict[str, Any] = {"upstreams": {"kept": {}, "skipped": {}}}
        with pytest.raises(PolicyEvalError, match="no decision for upstream 'skipped'"):
            await engine.evaluate(doc)
    finally:
        await engine.close()


async def test_input_that_is_not_json(engine: EmbeddedEngine) -> None:
    with pytest.raises(PolicyEvalError, match="not valid JSON"):
        await engine.evaluate({"upstreams": {"a": {"requests": float("nan")}}})
    with pytest.raises(PolicyEvalError, match="no 'upstreams' object"):
        await engine.evaluate({"now": 1})


async def test_closed_or_unloaded_engine_refuses_to_evaluate() -> None:
    engine = EmbeddedEngine((), DECISION)
    with pytest.raises(PolicyEvalError, match="not loaded"):
        await engine.evaluate(SMOKE_INPUT)
    await engine.load()
    await engine.close()
    with pytest.raises(PolicyEvalError):
        await engine.evaluate(SMOKE_INPUT)
    await engine.close()  # twice is fine


async def test_rego_cpp_prints_nothing_on_stdout(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "p.rego").write_text("package sidecar.breaker\n\ndecisions := [\n")
    with pytest.raises(PolicyLoadError):
        await load([str(tmp_path)])
    out, err = capfd.readouterr()
    assert out == ""
    assert err == ""


async def test_conflicting_outputs_are_worded(tmp_path: Path) -> None:
    # Two complete definitions that both hold when now == 666: OPA fails such an
    # evaluation with eval_conflict_error; rego-cpp's own wording must come through.
    (tmp_path / "p.rego").write_text(DECISIONS_OF + "\ndecisions := {} if input.now == 666\n")
    engine = await load([str(tmp_path)])
    try:
        with pytest.raises(PolicyEvalError, match="must not produce multiple outputs"):
            await engine.evaluate({**SMOKE_INPUT, "now": 666})
    finally:
        await engine.close()
