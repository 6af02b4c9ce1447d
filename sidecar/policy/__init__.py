"""Policy engines: the breaker policy evaluated in-process or by an OPA server.

    PolicyEngine (base.py)        load / evaluate / close / breaker_settings
    ├── EmbeddedEngine            regopy (rego-cpp) in a worker thread
    └── OpaServerEngine           a running OPA, via opa-python-client
    PolicyReloader (reloader.py)  hot reload of the embedded engine's files

``make_engine(config.policy)`` builds the configured engine (not loaded yet).
"""

from __future__ import annotations

from sidecar.config import PolicyConfig, PolicyEngineKind
from sidecar.policy.base import (
    MAX_TIMEOUT_S,
    SMOKE_INPUT,
    PolicyEngine,
    smoke_test,
)
from sidecar.policy.embedded import EmbeddedEngine
from sidecar.policy.files import PACKAGED_POLICIES, resolve_paths
from sidecar.policy.reloader import PolicyReloader

__all__ = [
    "PACKAGED_POLICIES",
    "SMOKE_INPUT",
    "EmbeddedEngine",
    "PolicyEngine",
    "PolicyReloader",
    "make_engine",
    "opa_timeout",
    "resolve_paths",
    "smoke_test",
]


def opa_timeout(config: PolicyConfig) -> float:
    """Deadline of one OPA query: one policy interval, at most 2 s."""
    return min(config.interval, MAX_TIMEOUT_S)


def make_engine(config: PolicyConfig) -> PolicyEngine:
    """The engine ``config.engine`` names, ready for ``await engine.load()``."""
    if config.engine is PolicyEngineKind.OPA:
        # Imported here: its client brings aiohttp, requests and urllib3, 16 MB
        # of RSS a sidecar with the embedded engine never uses (85.0 -> 68.9 MB
        # at start-up, measured).
        from sidecar.policy.opa_server import OpaServerEngine

        return OpaServerEngine(config.opa_url, config.decision, timeout=opa_timeout(config))
    return EmbeddedEngine(config.paths, config.decision)
