"""The shape of ``data.sidecar.config``: the default policy's thresholds and the breaker.

A typo there (``error_rat: 0.05``) would otherwise pass silently: the policy
reads ``object.get(configured, key, default)``, so the default applies and
nobody is told. ``check`` and every (re)load therefore refuse unknown keys,
wrong types and out-of-range values, naming the key. Only this namespace is
checked: operators may keep other data beside it for their own policies.

This is the loader's own validator, not OPA's JSON Schema annotations: those
only type-check the policy's references when OPA compiles it (``opa check
--schema``), never the data's values, and rego-cpp (the embedded engine)
ignores them.

A removed key is accepted with a warning rather than refused: a ConfigMap
written for an older sidecar must not stop the new one from starting (the
first load has no good policy to fall back on), yet its author is told that
the value no longer does anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

from sidecar.config_kinds import show, suggest
from sidecar.stats.window import LAST_ANSWERS

CONFIG_PATH = ("sidecar", "config")

# Leaf kinds: what the value must be, in the words of the error message.
_AMOUNT = "a number >= 0"  # milliseconds or seconds
_COUNT = "an integer >= 1"
_RATE = "a number in [0, 1]"
_LAST = "an integer in [1, 32]"  # the answers a window keeps in order (LAST_ANSWERS)

SCHEMA: dict[str, dict[str, str]] = {
    "thresholds": {
        "ttfb_p99_ms": _AMOUNT,
        "ttfb_p99_for_s": _AMOUNT,
        "error_rate": _RATE,
        "min_requests": _COUNT,
        "queue_wait_p99_ms": _AMOUNT,
        "queue_for_s": _AMOUNT,
        "min_span_s": _AMOUNT,
        "consecutive_failures": _COUNT,
        "stall_ms": _AMOUNT,
        "stall_requests": _COUNT,
        "stall_hedged_ms": _AMOUNT,
        "stall_hedges": _COUNT,
        "masked_failure_rate": _RATE,
        "min_masked_failures": _COUNT,
        "consecutive_masked": _COUNT,
        "recent_answers": _LAST,
        "recent_failure_rate": _RATE,
    },
    "breaker": {
        "cooldown_s": _AMOUNT,
        "probes": _COUNT,
    },
}

# Keys an older sidecar read, with what replaced them.
REMOVED: dict[tuple[str, str], str] = {
    ("thresholds", "pool_saturation"): (
        "the queueing rule reads queue_wait_p99_ms and queue_for_s instead"
    ),
}


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem (or warning) at ``data.<keys>``."""

    keys: tuple[str, ...]
    message: str

    def __str__(self) -> str:
        return f"{'.'.join(self.keys)}: {self.message}"


def validate(data: Mapping[str, Any]) -> tuple[list[Finding], list[Finding]]:
    """``(problems, warnings)`` for ``data.sidecar.config`` of the merged data."""
    sidecar = data.get(CONFIG_PATH[0])
    if not isinstance(sidecar, Mapping) or CONFIG_PATH[1] not in sidecar:
        return [], []
    problems: list[Finding] = []
    warnings: list[Finding] = []
    config = sidecar[CONFIG_PATH[1]]
    if not isinstance(config, Mapping):
        return [Finding(CONFIG_PATH, f"expected a mapping, got {show(config)}")], []
    for name, section in config.items():
        keys = (*CONFIG_PATH, name)
        if name not in SCHEMA:
            problems.append(Finding(keys, f"unknown key{suggest(name, SCHEMA)}"))
        elif not isinstance(section, Mapping):
            problems.append(Finding(keys, f"expected a mapping, got {show(section)}"))
        else:
            _check_section(keys, section, SCHEMA[name], problems, warnings)
    return problems, warnings


def _check_section(
    path: tuple[str, ...],
    section: Mapping[str, Any],
    schema: dict[str, str],
    problems: list[Finding],
    warnings: list[Finding],
) -> None:
    for name, value in section.items():
        keys = (*path, name)
        replaced_by = REMOVED.get((path[-1], name))
        if replaced_by is not None:
            warnings.append(Finding(keys, f"removed key, ignored ({replaced_by})"))
        elif name not in schema:
            problems.append(Finding(keys, f"unknown key{suggest(name, schema)}"))
        elif not _CHECKS[schema[name]](value):
            problems.append(Finding(keys, f"expected {schema[name]}, got {show(value)}"))


def _number(value: object) -> TypeGuard[int | float]:
    # A bool is an int to Python, not a number to OPA; JSON has no NaN nor infinity.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _non_negative(value: object) -> bool:
    return _number(value) and value >= 0


def _count(value: object) -> bool:
    # 20.0 is 20 to OPA (JSON has one number type).
    return _number(value) and float(value).is_integer() and value >= 1


def _fraction(value: object) -> bool:
    return _number(value) and 0 <= value <= 1


def _last(value: object) -> bool:
    return _number(value) and float(value).is_integer() and 1 <= value <= LAST_ANSWERS


_CHECKS: dict[str, Callable[[object], bool]] = {
    _AMOUNT: _non_negative,
    _COUNT: _count,
    _RATE: _fraction,
    _LAST: _last,
}
