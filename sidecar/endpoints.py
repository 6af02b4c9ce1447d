"""The sidecar's own endpoints: /healthz, /readyz, /metrics, /breakers."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sidecar.breaker.state import Action

if TYPE_CHECKING:
    from sidecar.app import Sidecar


def add_routes(app: web.Application, sidecar: Sidecar) -> None:
    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        problem = not_ready(sidecar)
        if problem:
            return web.Response(status=503, text=f"not ready: {problem}\n")
        return web.Response(text="ready\n")

    async def metrics(request: web.Request) -> web.Response:
        refresh_pool_gauges(sidecar)
        return web.Response(
            body=generate_latest(sidecar.metrics.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )

    async def breakers(request: web.Request) -> web.Response:
        return web.Response(
            text=json.dumps(breakers_view(sidecar), indent=2) + "\n",
            content_type="application/json",
        )

    async def routes(request: web.Request) -> web.Response:
        assert sidecar.router is not None
        return web.Response(
            text=json.dumps(sidecar.router.describe(), indent=2) + "\n",
            content_type="application/json",
        )

    app.router.add_get("/routes", routes)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/breakers", breakers)


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
