"""Scenario 6: the `opa` engine (a real `opa run --server` on the same policy
folder) runs one failure scenario exactly like the embedded engine: the same
transitions, with the same actions, in the same order."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.e2e.stack import Thresholds

pytestmark = pytest.mark.e2e


CONSECUTIVE = "N failures in a row (>= N)"


def normalized(reason: str) -> str:
    """Reasons carry live figures ("6 failures in a row (>= 5)"): keep the words.
    A trip names every rule that held when it was judged: the run of failures
    always, the error rate too when enough requests had failed by then, which
    depends on timing (one CI run in the OPA engine, whose answer takes an HTTP
    round trip longer). A reason with the run of failures in it stands for it."""
    findings = re.sub(r"\d+(\.\d+)?", "N", reason).split("; also ")
    return CONSECUTIVE if CONSECUTIVE in findings else "; also ".join(findings)


def in_force(transition: dict[str, Any]) -> str:
    """The action a transition carries; leaving OPEN, any sick one. An open
    breaker takes each later sick verdict's action (machine._Open.apply), and
    what the policy sees after the trip depends on the timing of the requests
    the reset primary was still answering: about one run in six carried a
    later verdict's "reroute" at half-open instead of the trip's "cache"."""
    if transition["from"] == "open" and transition["action"] in ("cache", "reroute"):
        return "sick"
    return str(transition["action"])


async def reset_then_heal(stack: Any, engine: str) -> dict[str, Any]:
    """reset_peer on the primary, `go mod download`, trip, remove the toxic, heal."""
    # The cool-down outlasts the download (the run of failures trips early in it).
    world = await stack(Thresholds(cooldown_s=10), engine=engine)
    toxic = await world.add_toxic("reset_peer", timeout=0)
    download = await world.go.download()
    assert download.ok, download
    tripped = await world.sidecar.wait_breaker("primary", 5, state="open")
    await world.remove_toxic(toxic)
    healed = await world.sidecar.wait_breaker("primary", 20, state="closed")
    metrics = await world.sidecar.metrics()
    assert metrics.value("goproxy_sidecar_policy_evaluations_total", engine=engine) > 0
    assert metrics.value("goproxy_sidecar_policy_failures_total") == 0
    return {
        "tripped": (tripped["action"], tripped["alert"], normalized(tripped["reason"])),
        "healed": (healed["action"], healed["reason"]),
        "log": [
            (t["upstream"], t["from"], t["to"], in_force(t), normalized(t["reason"]))
            for t in world.sidecar.logged_transitions()
        ],
        "counted": {up: metrics.transitions(up) for up in ("primary", "backup")},
    }


async def test_opa_server_engine_runs_like_the_embedded_engine(stack):
    embedded = await reset_then_heal(stack, "embedded")
    opa = await reset_then_heal(stack, "opa")
    assert embedded["log"] == [
        ("primary", "closed", "open", "cache", CONSECUTIVE),
        ("primary", "open", "half-open", "sick", "cooldown of Ns elapsed"),
        ("primary", "half-open", "closed", "allow", "N probes succeeded"),
    ], embedded["log"]
    assert opa == embedded
