"""The sidecar's own endpoints: /healthz, /readyz, /metrics, /breakers."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sidecar.breaker.state import Action
from sidecar.server.exchange import TEXT_PLAIN as TEXT

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

    return {
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
    control = sidecar.control
    seen = control.last_input.get("upstreams", {}) if control else {}
    decided_at = control.decided_at if control else None
    shadow = sidecar.config.policy.mode.value == "shadow"
    out: dict[str, Any] = {}
    for name, breaker in sidecar.breakers.items():
        view = breaker.as_dict()
        if shadow:
            would = sidecar.would.get(name)
            view["would_action"] = would.action.value if would else "allow"
            view["would_reason"] = would.reason if would else ""
            view["would_alert"] = would.alert if would else False
        view["stats"] = seen.get(name)
        view["decided_at"] = decided_at
        out[name] = view
    return out


def refresh_pool_gauges(sidecar: Sidecar) -> None:
    m = sidecar.metrics
    for name, up in sidecar.upstreams.items():
        m.pool_in_use.labels(name).set(up.in_use)
        m.pool_limit.labels(name).set(up.limit)
        m.pool_waiting.labels(name).set(up.waiting)
