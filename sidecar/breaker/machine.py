"""The per-upstream breaker state machine: closed -> open -> half-open -> closed.

One small class per state (resilience4j habit) holds what only that state
needs; ``Breaker`` holds what they share (action, reason, alert, since when)
and performs every transition through ``_move``, which checks the table in
``state.py``, stamps the time and calls ``on_transition`` exactly once.

Who calls what:
- the control loop, every interval: ``apply(decision, cooldown_s, probes)``
  then ``tick()``; and ``needs_self_probe(idle_s)`` to send a synthetic probe;
- the request path: ``try_acquire_probe()`` while half-open, then exactly one
  of ``release_probe(ok)`` or ``cancel_probe()`` when the probe ends.

Pure and I/O-free; time comes from an injectable clock. Not thread-safe: use
one breaker from one thread (the event loop).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sidecar.breaker.state import (
    Action,
    Decision,
    State,
    Transition,
    check_transition,
)
from sidecar.errors import PolicyEvalError

Clock = Callable[[], float]
TransitionCallback = Callable[[Transition], None]

DEFAULT_COOLDOWN_S = 30.0
DEFAULT_PROBES = 5


class _StateBehaviour:
    """What a breaker does in one state. The defaults ignore every event."""

    state: State

    def __init__(self, breaker: Breaker) -> None:
        self._breaker = breaker

    def apply(self, decision: Decision) -> Transition | None:
        return None

    def tick(self) -> Transition | None:
        return None

    def try_acquire_probe(self) -> bool:
        return False

    def release_probe(self, ok: bool, detail: str) -> Transition | None:
        return None

    def cancel_probe(self) -> None:
        return None

    def needs_self_probe(self, idle_s: float) -> bool:
        return False


class _Closed(_StateBehaviour):
    state = State.CLOSED

    def apply(self, decision: Decision) -> Transition | None:
        if decision.action is Action.ALLOW:
            # A closed breaker shows why the policy lets traffic through
            # ("ok: ... (< 20: no verdict on rates)"), not an empty reason.
            self._breaker._reason = decision.reason
            return None
        return self._breaker._move(State.OPEN, decision.action, decision.reason, decision.alert)


class _Open(_StateBehaviour):
    state = State.OPEN

    def apply(self, decision: Decision) -> Transition | None:
        # Still sick: follow the policy's current verdict (e.g. reroute -> reject).
        # An "allow" does not close an open breaker: only good probes do.
        if decision.action is not Action.ALLOW:
            self._breaker._refresh(decision)
        return None

    def tick(self) -> Transition | None:
        b = self._breaker
        cooldown = b.cooldown_s
        if b.state_age() < cooldown:
            return None
        return b._move(State.HALF_OPEN, b.action, f"cooldown of {cooldown:g}s elapsed", b.alert)


class _HalfOpen(_StateBehaviour):
    """Admits at most ``limit`` probes: in flight plus already succeeded."""

    state = State.HALF_OPEN

    def __init__(self, breaker: Breaker) -> None:
        super().__init__(breaker)
        self.limit = breaker.probes  # fixed for this half-open period
        self.in_flight = 0
        self.succeeded = 0
        self.last_acquired = breaker.state_since

    def try_acquire_probe(self) -> bool:
        if self.in_flight + self.succeeded >= self.limit:
            return False
        self.in_flight += 1
        self.last_acquired = self._breaker.now()
        return True

    def release_probe(self, ok: bool, detail: str) -> Transition | None:
        if self.in_flight == 0:
            return None  # stale: acquired in an earlier period
        self.in_flight -= 1
        b = self._breaker
        if not ok:
            reason = f"probe failed: {detail or 'bad response'}"
            return b._move(State.OPEN, b.action, reason, b.alert)
        self.succeeded += 1
        if self.succeeded < self.limit:
            return None
        return b._move(State.CLOSED, Action.ALLOW, f"{self.succeeded} probes succeeded", False)

    def cancel_probe(self) -> None:
        if self.in_flight:
            self.in_flight -= 1

    def needs_self_probe(self, idle_s: float) -> bool:
        if self.in_flight + self.succeeded >= self.limit:
            return False
        return self._breaker.now() - self.last_acquired >= idle_s


_BEHAVIOURS: dict[State, type[_StateBehaviour]] = {
    State.CLOSED: _Closed,
    State.OPEN: _Open,
    State.HALF_OPEN: _HalfOpen,
}


class Breaker:
    """The circuit breaker of one upstream. Starts CLOSED."""

    def __init__(
        self,
        name: str,
        clock: Clock = time.monotonic,
        on_transition: TransitionCallback | None = None,
        *,
        cooldown_s: float = DEFAULT_COOLDOWN_S,
        probes: int = DEFAULT_PROBES,
    ) -> None:
        self.name = name
        self._clock = clock
        self._on_transition = on_transition
        self._cooldown_s, self._probes = _checked_settings(cooldown_s, probes)
        self._action = Action.ALLOW
        self._reason = ""
        self._alert = False
        self._since = clock()
        self._period = 0
        self._behaviour: _StateBehaviour = _Closed(self)

    # -- read side -----------------------------------------------------------

    @property
    def state(self) -> State:
        return self._behaviour.state

    @property
    def action(self) -> Action:
        """The trip action while OPEN or HALF_OPEN; ALLOW when CLOSED."""
        return self._action

    @property
    def reason(self) -> str:
        return self._reason

    @property
    def alert(self) -> bool:
        return self._alert

    @property
    def state_since(self) -> float:
        """Clock time of the last transition (or of construction)."""
        return self._since

    @property
    def cooldown_s(self) -> float:
        return self._cooldown_s

    @property
    def probes(self) -> int:
        return self._probes

    @property
    def probe_period(self) -> int:
        """Count of half-open periods entered so far; see ``release_probe``."""
        return self._period

    def now(self) -> float:
        return self._clock()

    def state_age(self) -> float:
        return self._clock() - self._since

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready view for ``/breakers`` and logs."""
        view: dict[str, Any] = {
            "state": self.state.value,
            "action": self._action.value,
            "reason": self._reason,
            "alert": self._alert,
            "state_age_s": round(self.state_age(), 3),
        }
        if isinstance(self._behaviour, _HalfOpen):
            h = self._behaviour
            view["probes"] = {"limit": h.limit, "in_flight": h.in_flight, "succeeded": h.succeeded}
        return view

    # -- control loop --------------------------------------------------------

    def apply(self, decision: Decision, cooldown_s: object, probes: object) -> Transition | None:
        """Feed one policy decision; ``cooldown_s``/``probes`` are kept for later.

        CLOSED: a non-allow decision trips to OPEN; an allow one replaces the
        reason (the policy's explanation). OPEN: a non-allow decision
        refreshes action, reason and alert. HALF_OPEN: ignored (probes decide).
        A new ``probes`` applies from the next half-open period on. Both come
        from policy data as the engine gives them (5.0 for 5, or a string) and
        are checked here.
        """
        self._cooldown_s, self._probes = _checked_settings(cooldown_s, probes)
        return self._behaviour.apply(decision)

    def tick(self) -> Transition | None:
        """OPEN -> HALF_OPEN once ``cooldown_s`` has elapsed (boundary included)."""
        return self._behaviour.tick()

    def needs_self_probe(self, idle_s: float) -> bool:
        """True when HALF_OPEN, a probe slot is free and none was acquired for ``idle_s``.

        The sidecar then sends a synthetic probe itself (through
        ``try_acquire_probe``) so that a breaker never stays half-open for
        want of traffic.
        """
        return self._behaviour.needs_self_probe(idle_s)

    # -- request path --------------------------------------------------------

    def try_acquire_probe(self) -> bool:
        """HALF_OPEN only: take one of the ``probes`` slots of this period."""
        return self._behaviour.try_acquire_probe()

    def release_probe(
        self, ok: bool, detail: str = "", *, period: int | None = None
    ) -> Transition | None:
        """End an acquired probe. ``probes`` good ones close; one bad one re-opens.

        Ignored when the breaker is no longer half-open. Pass the
        ``probe_period`` read at acquire time as ``period`` to also ignore a
        late release that belongs to an earlier half-open period.
        """
        if period is not None and period != self._period:
            return None
        return self._behaviour.release_probe(ok, detail)

    def cancel_probe(self, *, period: int | None = None) -> None:
        """End an acquired probe without a verdict (the client hung up): frees its slot."""
        if period is None or period == self._period:
            self._behaviour.cancel_probe()

    # -- internals used by the state classes ---------------------------------

    def _refresh(self, decision: Decision) -> None:
        self._action = decision.action
        self._reason = decision.reason
        self._alert = decision.alert

    def _move(self, to_state: State, action: Action, reason: str, alert: bool) -> Transition:
        from_state = self.state
        check_transition(from_state, to_state)
        now = self._clock()
        transition = Transition(self.name, from_state, to_state, reason, action, now)
        self._action, self._reason, self._alert = action, reason, alert
        self._since = now
        if to_state is State.HALF_OPEN:
            self._period += 1
        self._behaviour = _BEHAVIOURS[to_state](self)
        if self._on_transition is not None:
            self._on_transition(transition)
        return transition


def _checked_settings(cooldown_s: object, probes: object) -> tuple[float, int]:
    """Validate the breaker settings that come from policy data."""
    if isinstance(cooldown_s, bool) or not isinstance(cooldown_s, int | float):
        raise PolicyEvalError(f"breaker.cooldown_s must be a number, got {cooldown_s!r}")
    if not 0 <= cooldown_s < float("inf"):
        raise PolicyEvalError(f"breaker.cooldown_s must be >= 0, got {cooldown_s!r}")
    if isinstance(probes, float) and probes.is_integer():
        probes = int(probes)  # JSON numbers may come back from the engine as 5.0
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise PolicyEvalError(f"breaker.probes must be an integer >= 1, got {probes!r}")
    return float(cooldown_s), probes
