"""Breaker vocabulary: states, actions, traffic classes, policy decisions, transitions.

The legal transitions are an explicit table (resilience4j habit)::

    CLOSED ──trip──▶ OPEN ──cooldown──▶ HALF_OPEN ──probes good──▶ CLOSED
                      ▲                     │
                      └────probe failed─────┘

Anything else is a bug in the sidecar and raises ``IllegalTransitionError``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from sidecar.errors import PolicyEvalError, SidecarError
from sidecar.goproxy import Kind


class State(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class Action(enum.StrEnum):
    ALLOW = "allow"  # use this upstream
    REROUTE = "reroute"  # skip it, go to the next upstream
    CACHE = "cache"  # serve from the local cache; a miss goes on to the next upstream
    REJECT = "reject"  # answer policy.reject_status at once (load shedding)


class TrafficClass(enum.StrEnum):
    """What one breaker of an upstream judges: each upstream has one per class.

    An upstream that cannot reach its checksum database (Athens proxying
    ``sumdb/`` to an unreachable host answers 502 to every lookup) still
    serves modules: its checksum traffic is routed around, its module
    traffic stays.
    """

    MODULE = "module"
    SUMDB = "sumdb"


SUMDB_KINDS: frozenset[Kind] = frozenset(
    {Kind.SUMDB_SUPPORTED, Kind.SUMDB_LOOKUP, Kind.SUMDB_TILE, Kind.SUMDB_LATEST}
)


def traffic_class(kind: Kind) -> TrafficClass:
    return TrafficClass.SUMDB if kind in SUMDB_KINDS else TrafficClass.MODULE


LEGAL_TRANSITIONS: frozenset[tuple[State, State]] = frozenset(
    {
        (State.CLOSED, State.OPEN),
        (State.OPEN, State.HALF_OPEN),
        (State.HALF_OPEN, State.CLOSED),
        (State.HALF_OPEN, State.OPEN),
    }
)


class IllegalTransitionError(SidecarError):
    """Internal error: the state machine tried a transition outside the table."""


def check_transition(from_state: State, to_state: State) -> None:
    """Raise ``IllegalTransitionError`` unless ``from_state -> to_state`` is in the table."""
    if (from_state, to_state) not in LEGAL_TRANSITIONS:
        raise IllegalTransitionError(
            f"illegal breaker transition {from_state.value} -> {to_state.value}"
        )


_MAX_REASON = 1000  # a reason ends up in logs, metrics and /breakers: keep it bounded


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy's verdict for one upstream.

    ``sumdb`` is the verdict for its checksum-database traffic; None when the
    policy gave none, and then that traffic follows this decision (a policy
    that knows nothing of the split judges the upstream as a whole).
    """

    action: Action
    reason: str = ""
    alert: bool = False
    sumdb: Decision | None = None

    def for_class(self, klass: TrafficClass) -> Decision:
        """The verdict for one traffic class of this upstream."""
        if klass is TrafficClass.SUMDB and self.sumdb is not None:
            return self.sumdb
        return self

    def as_json(self) -> dict[str, object]:
        """The shape ``from_json`` reads (``sumdb`` only when there is one)."""
        out: dict[str, object] = {
            "action": self.action.value,
            "reason": self.reason,
            "alert": self.alert,
        }
        if self.sumdb is not None:
            out["sumdb"] = self.sumdb.as_json()
        return out

    @classmethod
    def from_json(cls, obj: object) -> Decision:
        """Parse ``{"action": ..., "reason": ..., "alert": ..., "sumdb": {...}}``.

        ``action`` is required; ``reason`` defaults to "" and ``alert`` to
        false; ``sumdb``, if present, is a decision of the same shape (without
        a ``sumdb`` of its own). Unknown keys are ignored. Anything else
        raises ``PolicyEvalError``.
        """
        decision = cls._parse(obj)
        if not isinstance(obj, Mapping) or obj.get("sumdb") is None:
            return decision
        try:
            sumdb = cls._parse(obj["sumdb"])
        except PolicyEvalError as exc:
            raise PolicyEvalError(f"sumdb: {exc}") from None
        return cls(decision.action, decision.reason, decision.alert, sumdb)

    @classmethod
    def _parse(cls, obj: object) -> Decision:
        if not isinstance(obj, Mapping):
            raise PolicyEvalError(f"decision must be an object, got {_short(obj)}")
        raw_action = obj.get("action")
        if not isinstance(raw_action, str):
            raise PolicyEvalError(f"decision.action must be a string, got {_short(raw_action)}")
        try:
            action = Action(raw_action)
        except ValueError:
            allowed = ", ".join(a.value for a in Action)
            raise PolicyEvalError(
                f"decision.action must be one of {allowed}, got {_short(raw_action)}"
            ) from None
        reason = obj.get("reason", "")
        if not isinstance(reason, str):
            raise PolicyEvalError(f"decision.reason must be a string, got {_short(reason)}")
        alert = obj.get("alert", False)
        if not isinstance(alert, bool):
            raise PolicyEvalError(f"decision.alert must be a boolean, got {_short(alert)}")
        return cls(action, reason[:_MAX_REASON], alert)


ALLOW = Decision(Action.ALLOW)


@dataclass(frozen=True, slots=True)
class Transition:
    """One state change of one breaker; ``at`` is the breaker's clock time."""

    upstream: str
    from_state: State
    to_state: State
    reason: str
    action: Action
    at: float

    def __post_init__(self) -> None:
        check_transition(self.from_state, self.to_state)
