"""The sidecar's own endpoints: /healthz, /readyz, /metrics, /breakers, /routes, /status."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sidecar.breaker.machine import Breaker
from sidecar.breaker.state import Action, TrafficClass
from sidecar.server.exchange import TEXT_PLAIN as TEXT
from sidecar.status import HTML, render_status

if TYPE_CHECKING:
    from sidecar.app import Sidecar


Answer = tuple[int, str, bytes]  # status, content type, body
Endpoint = Callable[[], Answer]
JSON = "application/json; charset=utf-8"


def endpoints(sidecar: Sidecar) -> dict[str, Endpoint]:
    """Path -> a function answering it; GET and HEAD only (the server checks)."""

    def healthz() -> Answer:
        return 200, TEXT, b"ok\n"

    def readyz() -> Answer:
        problem = not_ready(sidecar)
        if problem:
            return 503, TEXT, f"not ready: {problem}\n".encode()
        return 200, TEXT, b"ready\n"

    def metrics() -> Answer:
        refresh_pool_gauges(sidecar)
        return 200, CONTENT_TYPE_LATEST, generate_latest(sidecar.metrics.registry)

    def breakers() -> Answer:
        return 200, JSON, (json.dumps(breakers_view(sidecar), indent=2) + "\n").encode()

    def routes() -> Answer:
        assert sidecar.router is not None
        return 200, JSON, (json.dumps(sidecar.router.describe(), indent=2) + "\n").encode()

    def status() -> Answer:
        return 200, HTML, render_status(sidecar, breakers_view(sidecar))

    return {
        "/status": status,
        "/routes": routes,
        "/healthz": healthz,
        "/readyz": readyz,
        "/metrics": metrics,
        "/breakers": breakers,
    }


def not_ready(sidecar: Sidecar) -> str:
    """Empty when a policy is loaded and at least one target can serve."""
    if sidecar.policy is None or not sidecar.policy.loaded:
        return "no policy loaded"
    servable = [p for p in sidecar.plan.upstreams if p.action is not Action.REJECT]
    if not servable and sidecar.cache is None:
        return "every upstream is shedding load and there is no cache"
    return ""


def breakers_view(sidecar: Sidecar) -> dict[str, Any]:
    """Keyed by upstream: its module-traffic breaker, with its checksum-traffic
    breaker nested under ``sumdb`` in the same shape.

    ``stats`` is the policy input the last decision saw, without the breaker's
    own ``state`` and ``state_age_s``: those are shown once, live, beside it
    (the input's were as old as ``decided_at``, and two ages confused)."""
    control = sidecar.control
    seen = control.last_input.get("upstreams", {}) if control else {}
    decided_at = control.decided_at if control else None
    out: dict[str, Any] = {}
    for name, breaker in sidecar.breakers.items():
        stats = seen.get(name)
        view = _breaker_view(sidecar, name, breaker, TrafficClass.MODULE)
        view["stats"] = _seen(stats)
        view["decided_at"] = decided_at
        sumdb = _breaker_view(sidecar, name, sidecar.sumdb_breakers[name], TrafficClass.SUMDB)
        sumdb["stats"] = _seen(stats.get("sumdb") if stats else None)
        view["sumdb"] = sumdb
        out[name] = view
    return out


_BREAKER_OWN = frozenset({"sumdb", "state", "state_age_s"})


def _seen(stats: dict[str, Any] | None) -> dict[str, Any] | None:
    """The statistics of one policy input entry (nested classes and breaker fields apart)."""
    if not stats:
        return None
    return {k: v for k, v in stats.items() if k not in _BREAKER_OWN}


def _breaker_view(
    sidecar: Sidecar, name: str, breaker: Breaker, klass: TrafficClass
) -> dict[str, Any]:
    view = breaker.as_dict()
    if sidecar.config.policy.mode.value == "shadow":
        would = sidecar.would.get(name)
        decision = would.for_class(klass) if would else None
        view["would_action"] = decision.action.value if decision else "allow"
        view["would_reason"] = decision.reason if decision else ""
        view["would_alert"] = decision.alert if decision else False
    return view


def refresh_pool_gauges(sidecar: Sidecar) -> None:
    m = sidecar.metrics
    for name, up in sidecar.upstreams.items():
        m.pool_in_use.labels(name).set(up.in_use)
        m.pool_limit.labels(name).set(up.limit)
        m.pool_waiting.labels(name).set(up.waiting)
