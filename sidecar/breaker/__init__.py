"""Per-upstream circuit breakers and the immutable routing plan (pure, I/O-free)."""

from sidecar.breaker.machine import Breaker
from sidecar.breaker.plan import Plan, UpstreamPlan
from sidecar.breaker.state import (
    Action,
    Decision,
    IllegalTransitionError,
    State,
    Transition,
)

__all__ = [
    "Action",
    "Breaker",
    "Decision",
    "IllegalTransitionError",
    "Plan",
    "State",
    "Transition",
    "UpstreamPlan",
]
