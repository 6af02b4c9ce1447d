"""Hot reload: a good change is swapped in, a broken file is refused."""

from __future__ import annotations

import asyncio
import copy
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.breaker.state import Action
from sidecar.errors import PolicyEvalError, PolicyLoadError
from sidecar.metrics import Metrics
from sidecar.policy import SMOKE_INPUT, EmbeddedEngine, PolicyReloader
from sidecar.policy.base import SMOKE_UPSTREAM
from sidecar.policy.opa_server import OpaServerEngine

REPO_POLICIES = Path(__file__).resolve().parents[2] / "policies"
DECISION = "sidecar/breaker/decisions"
THRESHOLDS = """sidecar:
  config:
    thresholds: {{ttfb_p99_ms: {ms}, ttfb_p99_for_s: 120, error_rate: 0.05,
                 min_requests: 20, queue_wait_p99_ms: 250, queue_for_s: 20, min_span_s: 10}}
    breaker: {{cooldown_s: {cooldown}, probes: 5}}
"""

Calls = list[tuple[bool, str | None]]


# The tests that call poll_once themselves must not race the reloader's own
# polling task (it would take the change first, now and then): it waits an hour.
POLL_BY_HAND = 3600.0
POLL_FAST = 0.02


class Harness:
    def __init__(self, policy_dir: Path, poll_interval: float) -> None:
        self.dir = policy_dir
        self.calls: Calls = []
        self.metrics = Metrics()
        self.reloader = PolicyReloader(
            lambda: EmbeddedEngine([str(policy_dir)], DECISION),
            [str(policy_dir)],
            poll_interval=poll_interval,
            on_reload=self.on_reload,
            metrics=self.metrics,
        )
        self.reloaded = asyncio.Event()

    def on_reload(self, ok: bool, error: str | None) -> None:
        self.calls.append((ok, error))
        self.reloaded.set()

    def set_thresholds(self, ms: int, cooldown: float = 30) -> None:
        (self.dir / "thresholds.yaml").write_text(THRESHOLDS.format(ms=ms, cooldown=cooldown))

    async def action(self) -> Action:
        doc = copy.deepcopy(SMOKE_INPUT)
        for s in doc["upstreams"][SMOKE_UPSTREAM]["series"]:
            s["p99_ms"] = 700.0
        decisions = await self.reloader.engine.evaluate(doc)
        return decisions[SMOKE_UPSTREAM].action

    def reloads(self, result: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "goproxy_sidecar_policy_reloads_total", {"result": result}
        )
        return value or 0.0


async def started(tmp_path: Path, poll_interval: float) -> Harness:
    policy_dir = tmp_path / "policies"
    shutil.copytree(REPO_POLICIES, policy_dir)
    h = Harness(policy_dir, poll_interval)
    h.set_thresholds(800)
    await h.reloader.start()
    return h


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = await started(tmp_path, POLL_BY_HAND)
    yield h
    await h.reloader.close()


@pytest.fixture
async def polling_harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = await started(tmp_path, POLL_FAST)
    yield h
    await h.reloader.close()


def break_policy(policy_dir: Path) -> tuple[Path, str]:
    rego = policy_dir / "sidecar" / "breaker.rego"
    good = rego.read_text()
    lines = good.splitlines(keepends=True)
    lines.insert(11, "decisions[name] := {\n")  # line 12, never closed
    rego.write_text("".join(lines))
    return rego, good


async def test_threshold_change_gives_new_decisions(harness: Harness) -> None:
    assert await harness.action() is Action.ALLOW
    harness.set_thresholds(600, cooldown=12)
    assert await harness.reloader.poll_once() is None  # seen once: let it settle
    assert await harness.reloader.poll_once() is True
    assert harness.calls == [(True, None)]
    assert await harness.action() is Action.REROUTE
    assert harness.reloader.engine.breaker_settings() == (12.0, 5)
    assert await harness.reloader.poll_once() is None  # nothing new
    assert harness.reloads("ok") == 1


async def test_broken_file_is_refused_and_last_good_stays(harness: Harness) -> None:
    good_engine = harness.reloader.engine
    harness.set_thresholds(600)
    rego, good = break_policy(harness.dir)
    assert await harness.reloader.reload_now() is False
    assert harness.reloader.engine is good_engine
    assert await harness.action() is Action.ALLOW  # still the 800 ms policy
    [(ok, error)] = harness.calls
    assert not ok
    assert error is not None
    assert error.startswith(f"{rego}:12: "), error
    assert harness.reloads("failed") == 1
    # The same broken content is not retried (nor reported) at every poll.
    for _ in range(3):
        assert await harness.reloader.poll_once() is None
    assert len(harness.calls) == 1

    rego.write_text(good)
    await harness.reloader.poll_once()
    assert await harness.reloader.poll_once() is True
    assert harness.calls[-1] == (True, None)
    assert harness.reloader.engine is not good_engine
    assert await harness.action() is Action.REROUTE


async def test_refused_data_file_is_reported_with_its_line(harness: Harness) -> None:
    thresholds = harness.dir / "thresholds.yaml"
    thresholds.write_text("sidecar:\n  config: [\n")
    assert await harness.reloader.reload_now() is False
    [(_, error)] = harness.calls
    assert error is not None
    assert error.startswith(f"{thresholds}:3: "), error


async def test_polling_task_reloads_by_itself(polling_harness: Harness) -> None:
    harness = polling_harness
    harness.set_thresholds(600)
    await asyncio.wait_for(harness.reloaded.wait(), 5)
    assert harness.calls == [(True, None)]
    assert await harness.action() is Action.REROUTE

    harness.reloaded.clear()
    rego, good = break_policy(harness.dir)
    await asyncio.wait_for(harness.reloaded.wait(), 5)
    assert harness.calls[-1][0] is False
    assert await harness.action() is Action.REROUTE

    harness.reloaded.clear()
    rego.write_text(good)
    harness.set_thresholds(900)
    await asyncio.wait_for(harness.reloaded.wait(), 5)
    assert harness.calls[-1] == (True, None)
    assert await harness.action() is Action.ALLOW


async def test_old_engine_is_closed_after_a_swap(harness: Harness) -> None:
    old = harness.reloader.engine
    harness.set_thresholds(700)
    assert await harness.reloader.reload_now() is True
    assert harness.reloader.engine is not old
    with pytest.raises(Exception, match=r"not loaded|closed"):
        await old.evaluate(SMOKE_INPUT)


async def test_start_fails_without_a_good_policy(tmp_path: Path) -> None:
    (tmp_path / "p.rego").write_text("package sidecar.breaker\n\ndecisions := {\n")
    calls: Calls = []
    reloader = PolicyReloader(
        lambda: EmbeddedEngine([str(tmp_path)], DECISION),
        [str(tmp_path)],
        1.0,
        lambda ok, error: calls.append((ok, error)),
    )
    with pytest.raises(PolicyLoadError):
        await reloader.start()
    with pytest.raises(RuntimeError):
        _ = reloader.engine
    await reloader.close()


async def test_start_adopts_a_loaded_engine_and_async_callbacks(tmp_path: Path) -> None:
    shutil.copytree(REPO_POLICIES, tmp_path / "p")
    paths = [str(tmp_path / "p")]
    engine = EmbeddedEngine(paths, DECISION)
    await engine.load()
    seen: list[Any] = []

    async def on_reload(ok: bool, error: str | None) -> None:
        seen.append((ok, error))

    reloader = PolicyReloader(lambda: EmbeddedEngine(paths, DECISION), paths, 60.0, on_reload)
    await reloader.start(engine)
    assert reloader.engine is engine
    assert await reloader.reload_now() is True
    assert seen == [(True, None)]
    await reloader.close()


async def test_opa_engine_down_at_start_does_not_stop_the_reloader(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once closed
    calls: Calls = []
    reloader = PolicyReloader(
        lambda: OpaServerEngine(url, DECISION, timeout=0.5),
        [],
        60.0,
        lambda ok, error: calls.append((ok, error)),
    )
    await reloader.start()
    try:
        assert reloader.loaded
        assert reloader.warning is not None
        assert "not usable yet" in reloader.warning
        with pytest.raises(PolicyEvalError):
            await reloader.engine.evaluate(SMOKE_INPUT)
        assert await reloader.reload_now() is True  # SIGHUP: reconnects, still degraded
        assert reloader.warning is not None
        assert calls == [(True, None)]
    finally:
        await reloader.close()
    assert not reloader.loaded


async def test_an_engine_crashing_in_load_is_refused_too(harness: Harness) -> None:
    good = harness.reloader.engine

    class Crashing(EmbeddedEngine):
        async def load(self) -> str | None:
            raise RuntimeError("boom")

    harness.reloader._factory = lambda: Crashing([str(harness.dir)], DECISION)
    assert await harness.reloader.reload_now() is False
    assert harness.calls == [(False, "RuntimeError: boom")]
    assert harness.reloader.engine is good


async def test_typo_in_thresholds_is_refused_and_last_good_stays(harness: Harness) -> None:
    good_engine = harness.reloader.engine
    thresholds = harness.dir / "thresholds.yaml"
    # 600 would reroute, were the key spelt right and the file accepted.
    thresholds.write_text(THRESHOLDS.format(ms=600, cooldown=30).replace("error_rate", "error_rat"))
    assert await harness.reloader.reload_now() is False
    assert harness.reloader.engine is good_engine
    assert await harness.action() is Action.ALLOW  # still the 800 ms policy
    assert harness.calls == [
        (
            False,
            f"{thresholds}: sidecar.config.thresholds.error_rat: unknown key "
            "(did you mean 'error_rate'?)",
        )
    ]
    assert harness.reloads("failed") == 1


async def test_removed_key_reloads_with_a_warning(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    thresholds = harness.dir / "thresholds.yaml"
    thresholds.write_text(
        THRESHOLDS.format(ms=600, cooldown=30).replace(
            "min_span_s", "pool_saturation: 0.9, min_span_s"
        )
    )
    assert await harness.reloader.reload_now() is True
    assert await harness.action() is Action.REROUTE
    warning = harness.reloader.warning
    assert warning is not None
    assert "sidecar.config.thresholds.pool_saturation: removed key, ignored" in warning
    assert any("pool_saturation" in r.getMessage() for r in caplog.records)
