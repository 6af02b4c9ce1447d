"""``policy`` and ``stats``: the engine that judges upstreams, and the window of
figures it judges them on.
"""

from __future__ import annotations

import enum
import os
from dataclasses import replace

from sidecar.config.common import POSITIVE
from sidecar.config_kinds import (
    RULE_PATH,
    Check,
    Choice,
    HttpUrl,
    Integer,
    Strings,
    section,
    setting,
)
from sidecar.units import format_duration

DEFAULT_POLICY_DECISION = "sidecar/breaker/decisions"
DEFAULT_OPA_URL = "http://127.0.0.1:8181"
DEFAULT_POLICY_INTERVAL_S = 1.0
DEFAULT_REJECT_STATUS = 503
DEFAULT_STATS_WINDOW_S = 120.0
DEFAULT_STATS_SLICE_S = 5.0
MAX_STATS_SLICES = 1000


class PolicyEngineKind(enum.Enum):
    EMBEDDED = "embedded"
    OPA = "opa"


class PolicyMode(enum.Enum):
    ENFORCE = "enforce"
    SHADOW = "shadow"


@section
class PolicyConfig:
    engine: PolicyEngineKind = setting(Choice(PolicyEngineKind), default=PolicyEngineKind.EMBEDDED)
    # empty: the policies shipped inside the package
    paths: tuple[str, ...] = setting(Strings(paths=True), default=())
    decision: str = setting(RULE_PATH, default=DEFAULT_POLICY_DECISION)
    opa_url: str = setting(HttpUrl(), default=DEFAULT_OPA_URL)
    interval: float = setting(POSITIVE, default=DEFAULT_POLICY_INTERVAL_S)
    mode: PolicyMode = setting(Choice(PolicyMode), default=PolicyMode.ENFORCE)
    reject_status: int = setting(Integer(400, 599), default=DEFAULT_REJECT_STATUS)

    def finish(self, check: Check) -> PolicyConfig:
        # Relative to the config file's directory: policies ship beside their config.
        base = check.base_dir
        paths = (os.path.normpath(os.path.join(base, os.path.expanduser(p))) for p in self.paths)
        return replace(self, paths=tuple(paths))


@section
class StatsConfig:
    window: float = setting(POSITIVE, default=DEFAULT_STATS_WINDOW_S)
    slice: float = setting(POSITIVE, default=DEFAULT_STATS_SLICE_S)

    def finish(self, check: Check) -> StatsConfig:
        if check.refused:  # an unreadable value: no follow-up complaint about the pair
            return self
        slices = self.window / self.slice
        width, window = format_duration(self.slice), format_duration(self.window)
        if abs(slices - round(slices)) > 1e-6 * max(1.0, slices):
            check.fail(f"must be a whole multiple of stats.slice ({width}), got {window}", "window")
        elif round(slices) > MAX_STATS_SLICES:
            longest = format_duration(self.slice * MAX_STATS_SLICES)
            check.fail(
                f"at most {MAX_STATS_SLICES} slices of {width} ({longest}), got {window}", "window"
            )
        return self
