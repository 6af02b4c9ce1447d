"""The status page's sections below the upstreams: recent transitions, policy,
cache and routing. Each reads what its part of the sidecar keeps."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sidecar.config import PolicyEngineKind
from sidecar.status_html import NO_DATA, age, clock, codes, dl, e, safe_url
from sidecar.units import format_size

if TYPE_CHECKING:
    from sidecar.app import Sidecar


def transitions(sc: Sidecar) -> str:
    if not sc.transitions:
        return "<h2>Recent transitions</h2><p class=meta>none since start</p>"
    rows = []
    for recent in reversed(sc.transitions):  # newest first
        t = recent.transition
        rows.append(
            f"<tr><td>{e(clock(recent.at))}</td><td>{e(t.upstream)}</td>"
            f"<td>{e(recent.klass.value)}</td>"
            f'<td><span class="state {e(t.from_state.value)}">{e(t.from_state.value)}</span> → '
            f'<span class="state {e(t.to_state.value)}">{e(t.to_state.value)}</span></td>'
            f'<td>{e(t.action.value)}</td><td class="reason">{e(t.reason)}</td></tr>'
        )
    head = (
        "<tr><th>At</th><th>Upstream</th><th>Class</th><th>Transition</th>"
        "<th>Action</th><th>Reason</th></tr>"
    )
    return (
        f"<h2>Recent transitions</h2><p class=meta>last {len(sc.transitions)}, newest first</p>"
        f"<table>{head}{''.join(rows)}</table>"
    )


def policy(sc: Sidecar, now: float) -> str:
    cfg = sc.config.policy
    control = sc.control
    decided = control.decided_at if control else None
    last = "none yet" if decided is None else f"{clock(decided)} ({age(now - decided)} ago)"
    items: list[tuple[str, str]] = [
        ("engine", cfg.engine.value),
        ("mode", cfg.mode.value),
        ("decision", cfg.decision),
        ("files", ", ".join(cfg.paths) or "the policy shipped with the sidecar"),
        *([("OPA server", safe_url(cfg.opa_url))] if cfg.engine is PolicyEngineKind.OPA else []),
        ("interval", f"{cfg.interval:g} s"),
        ("last evaluation", last),
    ]
    if control is not None and decided is not None and now - decided > control.stale_after:
        items.append(
            (
                "stale",
                f"no successful evaluation for over {control.stale_after:g} s: "
                "no new trips until the engine answers again",
            )
        )
    if sc.policy is not None and sc.policy.warning:
        items.append(("warning", sc.policy.warning))
    return "<h2>Policy</h2>" + dl(items)


def cache(sc: Sidecar) -> str:
    if sc.cache is None:
        return "<h2>Cache</h2><p class=meta>disabled</p>"
    summary = sc.cache.summary()
    hits = _counter_total(sc.metrics.cache_hits)
    misses = _counter_total(sc.metrics.cache_misses)
    ratio = NO_DATA if hits + misses == 0 else f"{100.0 * hits / (hits + misses):.1f}%"
    max_bytes = sc.config.cache.max_bytes
    items = [
        ("directory", sc.config.cache.dir),
        ("entries", str(summary["entries"])),
        ("size", f"{format_size(summary['bytes'])} of {format_size(max_bytes)}"),
        ("hit ratio since start", f"{ratio} ({hits:.0f} hits, {misses:.0f} misses)"),
    ]
    return "<h2>Cache</h2>" + dl(items)


def _counter_total(counter: Any) -> float:
    return sum(  # prometheus_client is untyped here: a float per sample
        float(s.value)
        for metric in counter.collect()
        for s in metric.samples
        if s.name.endswith("_total")
    )


def routing(sc: Sidecar) -> str:
    if sc.router is None:
        return ""
    rules = sc.router.describe()
    items = [
        ("private patterns", codes(rules["private"]) or "none"),
        ("private may go to", codes(rules["private_ok"]) or "none"),
    ]
    out = "<h2>Routing</h2>" + dl(items, escaped=True)
    if not rules["rules"]:
        return out + "<p class=meta>no rules: every module may use every upstream</p>"
    rows = "".join(
        f"<tr><td><code>{e(r['match'])}</code></td><td>{codes(r['upstreams'])}</td>"
        f"<td>{'deny' if r['deny'] else ''}</td><td>{'yes' if r['cache'] else 'no'}</td></tr>"
        for r in rules["rules"]
    )
    return (
        f"{out}<table><tr><th>Rule</th><th>Upstreams</th><th>Deny</th><th>Cache</th></tr>"
        f"{rows}</table>"
    )
