"""The control loop: stats → policy → breakers → a new plan, every interval.

It is the only writer of ``Sidecar.plan``. The policy never runs on the
request path: requests read whichever plan is current. When the engine
fails, the breakers keep their last good decisions; once those are older
than the staleness bound, no new trips happen (every upstream is treated
as ``allow``) until the engine answers again.

Every upstream has two breakers and two windows, one per traffic class
(``TrafficClass``): module requests and checksum-database requests. The
policy input carries the module stats as ``upstreams.<name>`` and the
checksum stats as ``upstreams.<name>.sumdb``; a decision's ``sumdb`` drives
the second breaker.

A window that sees a run of failures (``RUN_WAKE`` in a row, or as many
masked failures) wakes the loop: the next step comes as soon as
``EARLY_SHARE`` of the interval has passed since the last one, not at the
end of the interval. The policy still decides, on the same input; it only
decides sooner while an upstream is failing, which is when every request
that still goes there pays a failed attempt before its fallback (the p99 of
issue 14). A healthy sidecar never ticks faster.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from sidecar.breaker.machine import Breaker
from sidecar.breaker.state import ALLOW, Action, Decision, State, TrafficClass, Transition
from sidecar.errors import PolicyError, UpstreamBusy, UpstreamError
from sidecar.policy.base import PolicyEngine
from sidecar.stats.window import UpstreamWindow, WindowSnapshot

if TYPE_CHECKING:
    from sidecar.app import Sidecar

log = logging.getLogger("sidecar.control")

RECENT_TRANSITIONS: Final = 50  # kept for /status; a bounded ring, memory stays flat
STALE_AFTER_INTERVALS: Final = 10
STALE_AFTER_MIN_S: Final = 30.0
# A woken loop steps at most this often (share of policy.interval): four times
# the usual evaluations while an upstream fails, and only then.
EARLY_SHARE: Final = 0.25
# The synthetic probes, one per traffic class. Every GOPROXY server answers
# them (200 or 404/410) and no private path can leak through them: the module
# one names a module under .invalid (RFC 2606: never resolves, so a proxy
# that looks it up fails fast and answers 404), the checksum one asks whether
# the default checksum database is proxied.
SELF_PROBE_PATHS: Final = {
    TrafficClass.MODULE: "goproxy-sidecar.invalid/self-probe/@v/list",
    TrafficClass.SUMDB: "sumdb/sum.golang.org/supported",
}
# How a probe that reached nothing reads (sidecar/upstreams/connect.py words
# the failure): nothing listens there, or the name does not resolve. An
# upstream that is simply absent (a quick start without Athens) repeats the
# same cycle every cool-down: it is logged at info, its trip at warning.
ABSENT_PROBE_REASONS: Final = (
    "probe failed: cannot connect: ",
    "probe failed: cannot resolve host: ",
)


@dataclass(frozen=True, slots=True)
class RecentTransition:
    """One breaker transition as /status lists it; ``at`` is wall-clock time
    (the transition's own ``at`` is the breaker's clock, meaningless to people)."""

    at: float
    klass: TrafficClass
    transition: Transition


class ControlLoop:
    def __init__(self, sidecar: Sidecar, engine: Callable[[], PolicyEngine]) -> None:
        self.sidecar = sidecar
        self.engine = engine
        cfg = sidecar.config.policy
        self.interval = cfg.interval
        self.shadow = cfg.mode.value == "shadow"
        self.stale_after = max(STALE_AFTER_MIN_S, STALE_AFTER_INTERVALS * cfg.interval)
        self.timeout = max(0.05, min(cfg.interval * 0.9, 5.0))
        self.last_good: dict[str, Decision] = {}
        self.last_good_at: float | None = None
        self.last_input: dict[str, Any] = {}
        self.decided_at: float | None = None
        self._probes: set[asyncio.Task[None]] = set()
        self._woken = asyncio.Event()
        self._learned_at: float | None = None

    async def run(self) -> None:
        for klass in TrafficClass:
            for window in windows_of(self.sidecar, klass).values():
                window.wake_on_runs(self._woken.set)
        while True:
            started = time.monotonic()
            self._woken.clear()  # failures from now on ask for the next step
            try:
                await self.step(self._learns(started))
            except Exception:  # the loop must outlive any single bad step
                log.exception("control step failed")
            await self._rest(started)

    def _learns(self, now: float) -> bool:
        """Whether this step teaches the hedge delays: at the regular pace, early
        steps or not (the delays rise by at most RISE a step, and a failing
        upstream would otherwise teach them up to four times as fast). The
        tolerance of one early share keeps a timer that fires a little early
        from skipping a regular step."""
        due = self._learned_at is None or now - self._learned_at >= self.interval * (
            1 - EARLY_SHARE
        )
        if due:
            self._learned_at = now
        return due

    async def _rest(self, started: float) -> None:
        """Until the next step: the interval, or less once a window reports a run
        of failures (never less than ``EARLY_SHARE`` of it)."""
        try:
            async with asyncio.timeout(max(0.0, self.interval - (time.monotonic() - started))):
                await self._woken.wait()
        except TimeoutError:
            return
        early_at = started + self.interval * EARLY_SHARE
        await asyncio.sleep(max(0.0, early_at - time.monotonic()))

    async def step(self, learn: bool = True) -> None:
        """One evaluation. ``learn``: the hedge delays follow this step's snapshots."""
        sc = self.sidecar
        for klass in TrafficClass:
            for breaker in breakers_of(sc, klass).values():
                breaker.tick()
        self.last_input = build_input(sc, learn=learn)
        decisions = await self._evaluate(self.last_input)
        if decisions is not None:
            self._apply(decisions)
        self._self_probe()
        sc.swap_plan()
        self._export_gauges()

    async def _evaluate(self, doc: dict[str, Any]) -> dict[str, Decision] | None:
        engine = self.engine()
        m = self.sidecar.metrics
        m.policy_evaluations.labels(engine.name).inc()
        started = time.perf_counter()
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a
            # cancellation that races with completion, and the loop never stops.
            async with asyncio.timeout(self.timeout):
                decisions = await engine.evaluate(doc)
        except (PolicyError, TimeoutError) as exc:
            reason = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
            m.policy_failures.labels(engine.name, reason).inc()
            log.warning(
                "policy evaluation failed",
                extra={"engine": engine.name, "reason": reason, "error": str(exc)},
            )
            return self._fallback()
        m.policy_duration.labels(engine.name).observe(time.perf_counter() - started)
        self.last_good, self.last_good_at = decisions, time.time()
        self.decided_at = self.last_good_at
        m.policy_last_success.set(self.last_good_at)
        m.policy_stale.set(0)
        return decisions

    def _fallback(self) -> dict[str, Decision] | None:
        """Last good decisions while fresh; ``allow`` for everyone once stale."""
        age = None if self.last_good_at is None else time.time() - self.last_good_at
        if age is not None and age <= self.stale_after:
            return None  # breakers already hold the last good decisions
        self.sidecar.metrics.policy_stale.set(1)
        if self.last_good:
            log.warning(
                "policy decisions stale: falling back to allow",
                extra={"age_s": None if age is None else round(age, 1)},
            )
            self.last_good = {}
        return {name: ALLOW for name in self.sidecar.breakers}

    def _apply(self, decisions: dict[str, Decision]) -> None:
        sc = self.sidecar
        cooldown_s, probes = self.engine().breaker_settings()
        for name in sc.breakers:
            decision = decisions.get(name, ALLOW)
            sc.would[name] = decision
            for klass in TrafficClass:
                self._apply_one(name, klass, decision.for_class(klass), cooldown_s, probes)

    def _apply_one(
        self, name: str, klass: TrafficClass, decision: Decision, cooldown_s: float, probes: int
    ) -> None:
        sc = self.sidecar
        breaker = breakers_of(sc, klass)[name]
        sc.metrics.decisions.labels(name, klass.value, decision.action.value).inc()
        applied = decision
        if self.shadow and decision.action is not Action.ALLOW:
            # The breaker never moves in shadow mode, but its reason still says
            # why (the would_* fields of /breakers carry the verdict itself).
            reason = f"shadow mode, would {decision.action.value}: {decision.reason}"
            applied = Decision(Action.ALLOW, reason)
        breaker.apply(applied, cooldown_s, probes)
        # A breaker that sheds load stays open for its cool-down, but the policy
        # says "allow" again as soon as the rejects have emptied the pool: the
        # alert follows what the breaker does, not the latest verdict.
        alert = decision.alert if self.shadow else breaker.alert
        sc.metrics.breaker_alert.labels(name, klass.value).set(1 if alert else 0)

    def _self_probe(self) -> None:
        for klass in TrafficClass:
            for name, breaker in breakers_of(self.sidecar, klass).items():
                if breaker.needs_self_probe(self.interval) and breaker.try_acquire_probe():
                    task = asyncio.create_task(self._probe(name, klass, breaker))
                    self._probes.add(task)
                    task.add_done_callback(self._probes.discard)

    async def _probe(self, name: str, klass: TrafficClass, breaker: Breaker) -> None:
        sc = self.sidecar
        period = breaker.probe_period
        ok, detail = False, ""
        try:
            resp = await sc.upstreams[name].open(SELF_PROBE_PATHS[klass])
            resp.release(reuse=False)
            ok = True
        except UpstreamError as exc:
            detail = exc.message
        except UpstreamBusy:
            breaker.cancel_probe(period=period)  # no connection in time: no verdict
            return
        sc.metrics.probes.labels(name, "self", "ok" if ok else "failed").inc()
        breaker.release_probe(ok, detail, period=period)

    def _export_gauges(self) -> None:
        m = self.sidecar.metrics
        for name, doc in self.last_input.get("upstreams", {}).items():
            for klass, stats in ((TrafficClass.MODULE, doc), (TrafficClass.SUMDB, doc["sumdb"])):
                m.ttfb_p99.labels(name, klass.value).set(stats["ttfb_ms"]["p99"] / 1000.0)
                m.error_rate.labels(name, klass.value).set(stats["error_rate"])
            m.pool_saturation.labels(name).set(doc["pool"]["saturation"])

    async def close(self) -> None:
        for task in list(self._probes):
            task.cancel()


def breakers_of(sc: Sidecar, klass: TrafficClass) -> dict[str, Breaker]:
    return sc.sumdb_breakers if klass is TrafficClass.SUMDB else sc.breakers


def windows_of(sc: Sidecar, klass: TrafficClass) -> dict[str, UpstreamWindow]:
    return sc.sumdb_windows if klass is TrafficClass.SUMDB else sc.windows


def build_input(sc: Sidecar, learn: bool = True) -> dict[str, Any]:
    """The policy input document (the README's "Input" is the contract).
    ``learn``: the hedge delays follow the snapshots."""
    upstreams: dict[str, Any] = {}
    for name, up in sc.upstreams.items():
        peak = up.take_peak()
        window = sc.windows[name]
        # Kept for dashboards and custom policies; no default rule reads it:
        # a pool that is full at the instant of a tick is busy, not sick.
        window.sample_saturation(peak / up.limit)
        snapshot = window.snapshot()
        if learn:
            _learn(sc, sc.breakers[name], snapshot)
        doc = snapshot.as_policy_input(admission=True)
        doc.update(
            role=up.role,
            **_breaker_input(sc.breakers[name]),
            pool={
                "limit": up.limit,
                "in_use": min(peak, up.limit),
                "waiting": max(0, peak - up.limit),
                **snapshot.pool_input(),
                "saturation": round(peak / up.limit, 4),
            },
        )
        sumdb_snapshot = sc.sumdb_windows[name].snapshot()
        if learn:
            _learn(sc, sc.sumdb_breakers[name], sumdb_snapshot)
        sumdb = sumdb_snapshot.as_policy_input(admission=False)
        sumdb.update(_breaker_input(sc.sumdb_breakers[name]))
        doc["sumdb"] = sumdb
        upstreams[name] = doc
    return {"now": round(time.time(), 3), "upstreams": upstreams, "cache": sc.cache_summary()}


def _learn(sc: Sidecar, breaker: Breaker, snapshot: WindowSnapshot) -> None:
    """The automatic hedge delay follows the window (read here: a snapshot per tick)."""
    if sc.hedging is not None:
        sc.hedging.learn(breaker, snapshot.ttfb_p95_ms, snapshot.requests)


def _breaker_input(breaker: Breaker) -> dict[str, Any]:
    return {"state": breaker.state.value, "state_age_s": round(breaker.state_age(), 3)}


def on_transition(sc: Sidecar, klass: TrafficClass, transition: Transition) -> None:
    """Every state change of one class's breaker: a fresh window for that class,
    metrics, one log line, a new plan."""
    name = transition.upstream
    windows_of(sc, klass)[name].reset()
    sc.transitions.append(RecentTransition(time.time(), klass, transition))
    m = sc.metrics
    for state in State:
        m.breaker_state.labels(name, klass.value, state.value).set(
            1 if state is transition.to_state else 0
        )
    m.breaker_transitions.labels(
        name,
        klass.value,
        transition.from_state.value,
        transition.to_state.value,
        _reason_label(transition),
    ).inc()
    figures = sc.control.last_input.get("upstreams", {}).get(name, {}) if sc.control else {}
    if klass is TrafficClass.SUMDB:
        figures = figures.get("sumdb", {})
    log.log(
        logging.INFO if _absent_cycle(sc, klass, transition) else logging.WARNING,
        "breaker transition",
        extra={
            "upstream": name,
            "class": klass.value,
            "from": transition.from_state.value,
            "to": transition.to_state.value,
            "action": transition.action.value,
            "reason": transition.reason,
            "input": {k: v for k, v in figures.items() if k not in ("series", "sumdb")},
        },
    )
    sc.swap_plan()


def _absent_cycle(sc: Sidecar, klass: TrafficClass, transition: Transition) -> bool:
    """A probe that found nothing there, or the cool-down that follows one."""
    if transition.to_state is State.OPEN:
        return transition.from_state is State.HALF_OPEN and _absent(transition)
    if transition.to_state is not State.HALF_OPEN:
        return False
    # The cool-down's own reason says nothing of why the breaker was open: the
    # transition before it does (this one is already the ring's last).
    earlier = (
        recent.transition
        for recent in reversed(sc.transitions)
        if recent.klass is klass
        and recent.transition.upstream == transition.upstream
        and recent.transition is not transition
    )
    previous = next(earlier, None)
    return previous is not None and _absent(previous)


def _absent(transition: Transition) -> bool:
    return transition.reason.startswith(ABSENT_PROBE_REASONS)


def _reason_label(transition: Transition) -> str:
    """A bounded label: the action that tripped, or how half-open ended."""
    if transition.to_state is State.OPEN:
        return (
            "probe_failed"
            if transition.from_state is State.HALF_OPEN
            else str(transition.action.value)
        )
    if transition.to_state is State.HALF_OPEN:
        return "cooldown"
    return "probes_ok"
