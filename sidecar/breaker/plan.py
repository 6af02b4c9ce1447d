"""The routing plan: an immutable snapshot the control loop swaps atomically.

The request path reads ``app[PLAN]`` once per request and never sees a plan
change under its feet; only ``breaker`` (for half-open probes) is live.
Each upstream appears twice, once per traffic class: module requests follow
its module breaker, checksum-database requests its sumdb breaker.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sidecar.breaker.machine import Breaker
from sidecar.breaker.state import SUMDB_KINDS, Action, State
from sidecar.goproxy import Kind


@dataclass(frozen=True, slots=True)
class UpstreamPlan:
    """What the request path does with one upstream. ``action`` may differ from
    ``breaker.action`` (shadow mode plans ``allow`` while the breaker is open)."""

    name: str
    action: Action
    state: State
    breaker: Breaker

    @classmethod
    def of(cls, breaker: Breaker) -> UpstreamPlan:
        """Enforce mode: follow the breaker."""
        return cls(breaker.name, breaker.action, breaker.state, breaker)


@dataclass(frozen=True, slots=True)
class Plan:
    """Upstreams in preference order, first is the primary: ``upstreams`` for
    module traffic, ``sumdb`` (same upstreams, same order) for checksum traffic."""

    upstreams: tuple[UpstreamPlan, ...]
    version: int
    created_at: float
    sumdb: tuple[UpstreamPlan, ...]

    def targets(self, kind: Kind) -> tuple[UpstreamPlan, ...]:
        """The upstreams as the breakers of ``kind``'s traffic class see them."""
        return self.sumdb if kind in SUMDB_KINDS else self.upstreams

    def by_name(self, name: str) -> UpstreamPlan | None:
        """An upstream's module-traffic plan."""
        # A handful of upstreams: a scan beats building and keeping a dict.
        for upstream in self.upstreams:
            if upstream.name == name:
                return upstream
        return None

    @classmethod
    def from_breakers(
        cls,
        breakers: Iterable[Breaker],
        sumdb_breakers: Iterable[Breaker],
        version: int,
        created_at: float,
    ) -> Plan:
        return cls(
            tuple(UpstreamPlan.of(b) for b in breakers),
            version,
            created_at,
            tuple(UpstreamPlan.of(b) for b in sumdb_breakers),
        )
