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
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from sidecar.breaker.state import TrafficClass
from sidecar.config import UpstreamConfig
from sidecar.status_html import NO_DATA, age, clock, e, safe_url
from sidecar.status_sections import cache, policy, routing, transitions
from sidecar.status_svg import sparkline

if TYPE_CHECKING:
    from sidecar.app import Sidecar

REFRESH_S: Final = 5
HTML: Final = "text/html; charset=utf-8"

_CSS: Final = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.2em;color:#1d2330;background:#f6f7f9}
h1{font-size:1.3em;margin:0 0 .2em}h2{font-size:1.05em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff;width:100%;font-size:13px}
th,td{border:1px solid #d5d9e0;padding:3px 6px;text-align:left;vertical-align:middle}
th{background:#e8ebf0;font-weight:600}td.num{text-align:right;white-space:nowrap}
.meta{color:#5a6270}.reason{min-width:16em;max-width:30em;word-break:break-word}
.state{font-weight:700;padding:1px 6px;border-radius:3px;color:#fff}
.closed{background:#2e8540}.open{background:#c62828}.half-open{background:#d98c00}
.alert{color:#c62828;font-weight:700}.would{color:#8a4b00;font-style:italic}
.sub td{background:#fafbfc}
.spark .line{fill:none;stroke:#2f5fa7;stroke-width:1.5}.spark .area{fill:#dbe6f6}
.spark .empty{stroke:#c5cad3;stroke-dasharray:3 3}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px;margin:0}
dt{color:#5a6270}dd{margin:0}code{background:#eef0f3;padding:0 3px;font-size:12px}
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
        f'<p class="meta">{e(clock(now))} · refreshes every {REFRESH_S} s · '
        'JSON: <a href="/breakers">/breakers</a> <a href="/routes">/routes</a> '
        '<a href="/metrics">/metrics</a></p>',
        _upstreams(sc, view),
        transitions(sc),
        policy(sc, now),
        cache(sc),
        routing(sc),
        "</body></html>",
    ]
    return "\n".join(parts).encode()


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
        f'<td class="num">{age(float(breaker["state_age_s"]))}</td>',
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
