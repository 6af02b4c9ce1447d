"""``/status``: one server-rendered HTML page for people (HAProxy's stats page,
Envoy's admin, Traefik's dashboard are the anchors).

It reads what the sidecar already keeps, and computes nothing new: the
breakers, the last policy input the control loop built (its series slices
become the sparklines), the ring of recent transitions, the cache summary,
the router's rules and the policy's settings. Plain HTML with inline CSS, no
script and no external asset, refreshed by ``<meta http-equiv="refresh">``.

Every text is escaped: reasons come from a policy file an operator edits and
patterns from config. URLs are shown without userinfo, query or fragment, and
auth as the names of its environment variables, never their values.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from html import escape
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from sidecar.breaker.state import TrafficClass
from sidecar.config import PolicyEngineKind, UpstreamConfig
from sidecar.status_svg import sparkline
from sidecar.units import format_size

if TYPE_CHECKING:
    from sidecar.app import Sidecar

REFRESH_S: Final = 5
HTML: Final = "text/html; charset=utf-8"
NO_DATA: Final = "-"  # no evaluation has seen this figure yet

_CSS: Final = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.2em;color:#1d2330;background:#f6f7f9}
h1{font-size:1.3em;margin:0 0 .2em}h2{font-size:1.05em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff;width:100%}
th,td{border:1px solid #d5d9e0;padding:3px 6px;text-align:left;vertical-align:middle}
th{background:#e8ebf0;font-weight:600}td.num{text-align:right;white-space:nowrap}
.meta{color:#5a6270}.reason{min-width:16em;max-width:30em;word-break:break-word}
table{font-size:13px}code{font-size:12px}
.state{font-weight:700;padding:1px 6px;border-radius:3px;color:#fff}
.closed{background:#2e8540}.open{background:#c62828}.half-open{background:#d98c00}
.alert{color:#c62828;font-weight:700}.would{color:#8a4b00;font-style:italic}
.sub td{background:#fafbfc}
.spark .line{fill:none;stroke:#2f5fa7;stroke-width:1.5}.spark .area{fill:#dbe6f6}
.spark .empty{stroke:#c5cad3;stroke-dasharray:3 3}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px;margin:0}
dt{color:#5a6270}dd{margin:0}code{background:#eef0f3;padding:0 3px}
"""


def render_status(sc: Sidecar, view: Mapping[str, Any]) -> bytes:
    """The whole page, UTF-8. ``view`` is what /breakers answers (live breakers,
    shadow verdicts, and the policy input the last decision saw)."""
    now = time.time()
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH_S}">',
        "<title>goproxy-sidecar status</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>goproxy-sidecar</h1>",
        f'<p class="meta">{e(_clock(now))} · refreshes every {REFRESH_S} s · '
        'JSON: <a href="/breakers">/breakers</a> <a href="/routes">/routes</a> '
        '<a href="/metrics">/metrics</a></p>',
        _upstreams(sc, view),
        _transitions(sc),
        _policy(sc, now),
        _cache(sc),
        _routing(sc),
        "</body></html>",
    ]
    return "\n".join(parts).encode()


def e(value: object) -> str:
    """Escaped for text and attribute values alike."""
    return escape(str(value), quote=True)


# --- upstreams ---------------------------------------------------------------------

_HEAD: Final = (
    "<tr><th>Upstream</th><th>Class</th><th>State</th><th>Action</th><th>Alert</th>"
    "<th>In state</th><th>Reason</th><th>TTFB p99</th><th>Error rate</th>"
    "<th>Queue wait p99 / overflows</th><th>Hedges</th></tr>"
)


def _upstreams(sc: Sidecar, view: Mapping[str, Any]) -> str:
    rows = []
    for cfg in sc.config.upstreams:
        name = cfg.name
        module = view[name]
        label = (
            f"<strong>{e(name)}</strong> <span class=meta>({e(sc.upstreams[name].role)})</span>"
            f"<br><code>{e(safe_url(cfg.url))}</code><br><span class=meta>{e(_auth(cfg))}</span>"
        )
        rows.append(_row(label, TrafficClass.MODULE, module, admission=True, span=2))
        rows.append(_row(None, TrafficClass.SUMDB, module["sumdb"], admission=False, span=0))
    return f"<h2>Upstreams</h2><table>{_HEAD}{''.join(rows)}</table>"


def _row(
    label: str | None,
    klass: TrafficClass,
    breaker: Mapping[str, Any],
    admission: bool,
    span: int,
) -> str:
    stats = breaker.get("stats") or {}
    state = str(breaker["state"])
    series = list(reversed(stats.get("series") or []))  # the input is newest first
    name = "module" if klass is TrafficClass.MODULE else "sumdb"
    cells = [
        f'<td rowspan="{span}">{label}</td>' if label is not None else "",
        f"<td>{name}</td>",
        f'<td><span class="state {e(state)}">{e(state)}</span>{_probes(breaker)}</td>',
        f"<td>{e(breaker['action'])}{_would(breaker, 'would_action')}</td>",
        _alert(breaker),
        f'<td class="num">{_age(float(breaker["state_age_s"]))}</td>',
        f'<td class="reason">{e(breaker["reason"]) or "<span class=meta>none</span>"}'
        f"{_would(breaker, 'would_reason')}</td>",
        _chart(series, "TTFB p99", "ms", lambda s: float(s["p99_ms"]), _ms(stats, "ttfb_ms")),
        _chart(
            series,
            "error rate",
            "%",
            lambda s: 100.0 * float(s["error_rate"]),
            _pct(stats.get("error_rate")),
        ),
    ]
    if admission:
        pool = stats.get("pool") or {}
        queue = f"{_ms(pool, 'queue_wait_ms')} / {e(pool.get('overflows', NO_DATA))}"
        cells.append(
            _chart(
                series,
                "queue wait p99",
                "ms",
                lambda s: float(s["queue_wait_ms"]["p99"]),
                queue,
            )
        )
        cells.append(
            _chart(
                series, "hedges", "", lambda s: float(s["hedges"]), e(stats.get("hedges", NO_DATA))
            )
        )
    else:  # checksum traffic has no admission of its own: the module row shows the pool
        cells.append('<td colspan="2" class="meta">shares the module pool</td>')
    cls = "" if klass is TrafficClass.MODULE else ' class="sub"'
    return f"<tr{cls}>{''.join(cells)}</tr>"


def _probes(breaker: Mapping[str, Any]) -> str:
    probes = breaker.get("probes")
    if not probes:
        return ""
    return (
        f"<br><span class=meta>probes {e(probes['succeeded'])}/{e(probes['limit'])} ok, "
        f"{e(probes['in_flight'])} in flight</span>"
    )


def _would(breaker: Mapping[str, Any], key: str) -> str:
    """Shadow mode: what the policy would do; the breaker itself never moves."""
    if key not in breaker:
        return ""
    return f"<br><span class=would>shadow: {e(breaker[key]) or 'no reason'}</span>"


def _alert(breaker: Mapping[str, Any]) -> str:
    if breaker["alert"]:
        return '<td class="alert">ALERT</td>'
    if breaker.get("would_alert"):
        return '<td class="alert">ALERT<br><span class=would>(shadow)</span></td>'
    return "<td>no</td>"


def _chart(
    series: list[Any], label: str, unit: str, pick: Callable[[Any], float], figure: str
) -> str:
    values = [pick(s) for s in series]
    return f'<td class="num">{sparkline(values, label, unit)}<br>{figure}</td>'


def _ms(doc: Mapping[str, Any], key: str) -> str:
    value = (doc.get(key) or {}).get("p99")
    return NO_DATA if value is None else f"{float(value):.0f} ms"


def _pct(value: object) -> str:
    return NO_DATA if not isinstance(value, (int, float)) else f"{100.0 * value:.1f}%"


def _auth(cfg: UpstreamConfig) -> str:
    if cfg.auth.basic is not None:
        basic = cfg.auth.basic
        return f"auth: basic from ${basic.username_env} / ${basic.password_env}"
    return "auth: netrc" if cfg.auth.netrc else "auth: none"


def safe_url(url: str) -> str:
    """``url`` without userinfo, query or fragment: nothing secret can show."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


# --- transitions, policy, cache, routing -------------------------------------------


def _transitions(sc: Sidecar) -> str:
    if not sc.transitions:
        return "<h2>Recent transitions</h2><p class=meta>none since start</p>"
    rows = []
    for recent in reversed(sc.transitions):  # newest first
        t = recent.transition
        rows.append(
            f"<tr><td>{e(_clock(recent.at))}</td><td>{e(t.upstream)}</td>"
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


def _policy(sc: Sidecar, now: float) -> str:
    cfg = sc.config.policy
    control = sc.control
    decided = control.decided_at if control else None
    last = "none yet" if decided is None else f"{_clock(decided)} ({_age(now - decided)} ago)"
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
    return "<h2>Policy</h2>" + _dl(items)


def _cache(sc: Sidecar) -> str:
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
    return "<h2>Cache</h2>" + _dl(items)


def _counter_total(counter: Any) -> float:
    return sum(  # prometheus_client is untyped here: a float per sample
        float(s.value)
        for metric in counter.collect()
        for s in metric.samples
        if s.name.endswith("_total")
    )


def _routing(sc: Sidecar) -> str:
    if sc.router is None:
        return ""
    rules = sc.router.describe()
    items = [
        ("private patterns", _codes(rules["private"]) or "none"),
        ("private may go to", _codes(rules["private_ok"]) or "none"),
    ]
    out = "<h2>Routing</h2>" + _dl(items, escaped=True)
    if not rules["rules"]:
        return out + "<p class=meta>no rules: every module may use every upstream</p>"
    rows = "".join(
        f"<tr><td><code>{e(r['match'])}</code></td><td>{_codes(r['upstreams'])}</td>"
        f"<td>{'deny' if r['deny'] else ''}</td><td>{'yes' if r['cache'] else 'no'}</td></tr>"
        for r in rules["rules"]
    )
    return (
        f"{out}<table><tr><th>Rule</th><th>Upstreams</th><th>Deny</th><th>Cache</th></tr>"
        f"{rows}</table>"
    )


def _codes(values: Iterable[object]) -> str:
    return " ".join(f"<code>{e(v)}</code>" for v in values)


def _dl(items: list[tuple[str, str]], escaped: bool = False) -> str:
    body = "".join(f"<dt>{e(k)}</dt><dd>{v if escaped else e(v)}</dd>" for k, v in items)
    return f"<dl>{body}</dl>"


def _clock(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def _age(seconds: float) -> str:
    s = int(max(0.0, seconds))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"
