"""The policy engine contract, shared by the embedded and the OPA-server engines.

An engine turns one input document (DESIGN.md, "Policy contract") into one
``Decision`` per upstream. It is built cheaply, made ready by ``load()``, asked
by ``evaluate()`` once per control-loop tick, and released by ``close()``.
Errors cross this boundary only as ``PolicyLoadError`` (a file was refused,
with file and line when known) and ``PolicyEvalError`` (this evaluation failed
or returned something that is not a decision); the caller keeps the last good
decision on either.
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Iterable, Mapping
from typing import Any

from sidecar.breaker.state import Decision
from sidecar.errors import PolicyEvalError

DEFAULT_COOLDOWN_S = 30.0
DEFAULT_PROBES = 5
BREAKER_DATA_PATH = ("sidecar", "config", "breaker")
MAX_TIMEOUT_S = 2.0  # the longest an OPA server query may take (one policy interval at most)

# A healthy upstream in the input shape of the README ("Input"). A policy that cannot
# decide on this is not put in service (see PolicyReloader and load()).
SMOKE_UPSTREAM = "smoke-test"


def _smoke_stats(requests: int, admission: bool) -> dict[str, Any]:
    """A healthy window of one traffic class, as ``WindowSnapshot.as_policy_input``."""
    pool_figures = {
        "saturation": 0.02,
        "queue_wait_ms": {"p50": 0.0, "p99": 0.0},
        "overflows": 0,
        "masked_failures": 0,
    }
    return {
        "window_s": 120,
        "requests": requests,
        "errors": 0,
        "not_found": 0,
        "timeouts": 0,
        "error_rate": 0.0,
        "not_found_rate": 0.0,
        "masked_failures": 0,
        "integrity_failures": 0,
        "ttfb_ms": {"p50": 10.0, "p90": 20.0, "p99": 30.0},
        "consecutive_failures": 0,
        "inflight": {"count": 1, "oldest_ms": 12.0, "silent_ms": 12.0, "unanswered": 1},
        "series": [
            {
                "age_s": age,
                "requests": requests // 12,
                "error_rate": 0.0,
                "p99_ms": 30.0,
                **(pool_figures if admission else {}),
            }
            for age in range(0, 120, 10)
        ],
    }


SMOKE_INPUT: dict[str, Any] = {
    "now": 0.0,
    "upstreams": {
        SMOKE_UPSTREAM: {
            "role": "primary",
            "state": "closed",
            "state_age_s": 0.0,
            **_smoke_stats(120, admission=True),
            "pool": {
                "limit": 64,
                "in_use": 1,
                "waiting": 0,
                "overflows": 0,
                "queue_wait_ms": {"p50": 0.0, "p99": 0.0},
                "saturation": 0.02,
            },
            "sumdb": {"state": "closed", "state_age_s": 0.0, **_smoke_stats(24, admission=False)},
        }
    },
    "cache": {"enabled": True, "entries": 0, "bytes": 0},
}


class PolicyEngine(abc.ABC):
    """One way of evaluating the breaker policy. Not shared between event loops."""

    # True when the engine evaluates local files that the sidecar can vet
    # before use (the reloader then refuses a policy failing SMOKE_INPUT);
    # False when the policy lives elsewhere (OPA server) and is not ours to refuse.
    from_files = False

    def __init__(self, decision: str) -> None:
        self.decision = decision_path(decision)
        self._breaker = (DEFAULT_COOLDOWN_S, DEFAULT_PROBES)

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """``embedded`` or ``opa``: the ``engine`` label of the policy metrics."""

    @property
    def version(self) -> str | None:
        """Fingerprint of the loaded policy files, when the engine loads files."""
        return None

    @abc.abstractmethod
    async def load(self) -> str | None:
        """Make the engine ready.

        Raises ``PolicyLoadError`` when the policy cannot be used at all (a
        syntax error, a missing decision rule). Returns a warning to log when
        the engine is usable but degraded (an OPA server that is not reachable
        yet: evaluations fail until it is), else None.
        """

    @abc.abstractmethod
    async def evaluate(self, input: Mapping[str, Any]) -> dict[str, Decision]:
        """One decision per upstream of ``input["upstreams"]``; ``PolicyEvalError`` if not."""

    async def close(self) -> None:  # noqa: B027 - engines without resources keep it
        """Release threads and connections. Evaluating after close fails."""

    def breaker_settings(self) -> tuple[float, int]:
        """``(cooldown_s, probes)`` from data ``sidecar.config.breaker``, or the defaults."""
        return self._breaker


def decision_path(decision: str) -> str:
    """``sidecar/breaker/decisions``, also from ``data.sidecar.breaker.decisions``."""
    path = decision.strip().strip("/")
    if "/" not in path:
        path = path.replace(".", "/")
    if path.startswith("data/"):
        path = path[len("data/") :]
    return path


def upstream_names(input: Mapping[str, Any]) -> list[str]:
    upstreams = input.get("upstreams") if isinstance(input, Mapping) else None
    if not isinstance(upstreams, Mapping):
        raise PolicyEvalError("policy input has no 'upstreams' object")
    return [str(name) for name in upstreams]


def parse_decisions(raw: object, upstreams: Iterable[str], where: str) -> dict[str, Decision]:
    """Validate the policy output: an object with a decision for every upstream.

    Keys for upstreams that are not in the input are ignored.
    """
    if not isinstance(raw, Mapping):
        raise PolicyEvalError(f"{where} must be an object keyed by upstream, got {_short(raw)}")
    decisions = {}
    for name in upstreams:
        if name not in raw:
            raise PolicyEvalError(f"{where} has no decision for upstream {name!r}")
        try:
            decisions[name] = Decision.from_json(raw[name])
        except PolicyEvalError as exc:
            raise PolicyEvalError(f"{where}[{name!r}]: {exc}") from exc
    return decisions


def parse_breaker_settings(raw: object) -> tuple[float, int]:
    """``(cooldown_s, probes)`` from ``{"cooldown_s": 30, "probes": 5}``; ValueError if bad.

    A missing object or key takes the default.
    """
    if raw is None:
        return DEFAULT_COOLDOWN_S, DEFAULT_PROBES
    if not isinstance(raw, Mapping):
        raise ValueError(f"sidecar.config.breaker must be an object, got {_short(raw)}")
    cooldown = raw.get("cooldown_s", DEFAULT_COOLDOWN_S)
    probes = raw.get("probes", DEFAULT_PROBES)
    if isinstance(cooldown, bool) or not isinstance(cooldown, int | float) or cooldown < 0:
        raise ValueError(
            f"sidecar.config.breaker.cooldown_s must be a number >= 0, got {_short(cooldown)}"
        )
    if isinstance(probes, float) and probes.is_integer():
        probes = int(probes)
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(
            f"sidecar.config.breaker.probes must be an integer >= 1, got {_short(probes)}"
        )
    return float(cooldown), probes


async def smoke_test(engine: PolicyEngine) -> None:
    """Evaluate ``SMOKE_INPUT``; ``PolicyEvalError`` unless it yields a decision."""
    await engine.evaluate(SMOKE_INPUT)


async def call_back(callback: Any, *args: Any) -> None:
    """Call a sync or async callback."""
    result = callback(*args)
    if inspect.isawaitable(result):
        await result


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
