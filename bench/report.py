"""Medians, spreads and ratios of the runs, and the printed table."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

from bench.cases import PARALLEL, RATE, Case

Record = dict[str, Any]
MAX_ERROR_RATIO = 0.01  # a run with more failed requests than this does not count


def valid(rec: Record) -> bool:
    """Enough answers without errors; a run of many large bodies may end before
    any of them did (it counts by bytes then, and may have no error)."""
    requests = rec.get("requests") or 0
    errors = rec.get("errors") or 0
    if requests == 0:
        return bool(rec.get("bytes")) and errors == 0
    return errors <= MAX_ERROR_RATIO * requests


def _stats(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def _median(values: Sequence[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def summarize(
    records: Sequence[Record], cases: Sequence[Case], layouts: Sequence[str]
) -> list[Record]:
    """One row per layout, case and contender; ratios within the layout ("direct"
    is measured in one layout only: its row is every layout's reference)."""
    out: list[Record] = []
    for case in cases:
        direct_runs = [r for r in records if r["case"] == case.name and r["contender"] == "direct"]
        direct = _summarize_runs(case, "direct", direct_runs) if direct_runs else None
        for layout in layouts:
            rows: dict[str, Record] = {}
            if direct is not None and direct_runs[0].get("layout") == layout:
                rows["direct"] = direct
            for name in case.contenders:
                runs = [
                    r
                    for r in records
                    if r["case"] == case.name
                    and r["contender"] == name
                    and r.get("layout") == layout
                    and name != "direct"
                ]
                if runs:
                    rows[name] = _summarize_runs(case, name, runs)
                    rows[name]["layout"] = layout
            for row in rows.values():
                _add_ratios(case, row, {**({"direct": direct} if direct else {}), **rows})
                out.append(row)
    return out


def worst(summary: Sequence[Record], cases: Sequence[Case]) -> list[Record]:
    """Per case and contender (not "direct", not the reference): the worse layout's
    ratio to nginx (throughput cases) and the highest peak RSS of any layout."""
    out: list[Record] = []
    for case in cases:
        for name in case.contenders:
            if name in ("direct", case.ref_nginx):
                continue
            rows = [r for r in summary if r["case"] == case.name and r["contender"] == name]
            if not rows:
                continue
            ratios = {r["layout"]: r.get("ratio_nginx") for r in rows}
            known = {k: v for k, v in ratios.items() if v is not None}
            refs = [
                r
                for r in summary
                if r["case"] == case.name and r["contender"] == case.ref_nginx and r["peak_rss_mb"]
            ]
            rss = [r["peak_rss_mb"]["max"] for r in rows if r["peak_rss_mb"]]
            out.append(
                {
                    "case": case.name,
                    "contender": name,
                    "ref": case.ref_nginx,
                    "ratio_by_layout": ratios,
                    "worst_ratio": min(known.values()) if known else None,
                    "worst_layout": min(known, key=lambda k: known[k]) if known else None,
                    "peak_rss_mb": max(rss) if rss else None,
                    "ref_peak_rss_mb": max(r["peak_rss_mb"]["max"] for r in refs) if refs else None,
                }
            )
    return out


def worst_table(rows: Sequence[Record]) -> str:
    lines = ["worse layout (ratio to the reference nginx; peak RSS over every layout):"]
    for r in rows:
        by = ", ".join(f"{k} {_x(v)}" for k, v in r["ratio_by_layout"].items())
        ratio = "-" if r["worst_ratio"] is None else f"{r['worst_ratio']:.2f}x {r['ref']}"
        rss = "-" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f} MB"
        ref = r["ref_peak_rss_mb"]
        ref_rss = "" if ref is None else f" ({r['ref']} {ref:.0f})"
        lines.append(
            f"  {r['case']:<24} {r['contender']:<16} {ratio:<20} [{by}]  peak RSS {rss}{ref_rss}"
        )
    return "\n".join(lines)


def _summarize_runs(case: Case, name: str, runs: Sequence[Record]) -> Record:
    good = [r for r in runs if valid(r)]
    use = good or list(runs)

    def col(key: str) -> list[float]:
        return [r[key] for r in use if r.get(key) is not None]

    ncores = max(len(r.get("cores_busy_pct", [])) for r in use)
    row: Record = {
        "case": case.name,
        "kind": case.kind,
        "contender": name,
        "runs": len(runs),
        "valid_runs": len(good),
        "errors": sum(r.get("errors") or 0 for r in runs),
        "check": runs[-1].get("check", ""),
        "rps": _stats(col("rps")),
        "mbps": _stats(col("mbps")),
        "p50_ms": _stats(col("p50_ms")),
        "p99_ms": _stats(col("p99_ms")),
        "p999_ms": _stats(col("p999_ms")),
        "peak_rss_mb": _stats(col("peak_rss_mb")),
        "server_cpu_us_per_req": _median(col("server_cpu_us_per_req")),
        "cores_busy_pct": [
            _median([r["cores_busy_pct"][i] for r in use if len(r.get("cores_busy_pct", [])) > i])
            for i in range(ncores)
        ],
    }
    if case.kind == PARALLEL:
        row["vmhwm_mb"] = _stats(col("vmhwm_mb"))
        row["idle_rss_mb"] = _stats(col("idle_rss_mb"))
    if case.kind == RATE:
        row["service_p99_ms"] = _stats(col("service_p99_ms"))
    return row


def _ratio(row: Record, ref: Record | None, key: str) -> float | None:
    if ref is None or not row.get(key) or not ref.get(key) or not ref[key]["median"]:
        return None
    return round(float(row[key]["median"]) / float(ref[key]["median"]), 3)


def _add_ratios(case: Case, row: Record, rows: dict[str, Record]) -> None:
    if case.kind == PARALLEL:
        return
    direct = rows.get("direct")
    if case.kind == RATE:
        # Everyone offers the same rate: compare latencies, not throughput.
        for q in ("p50_ms", "p99_ms"):
            if direct and row.get(q) and direct.get(q):
                row[f"added_{q}"] = round(row[q]["median"] - direct[q]["median"], 3)
        return
    key = case.ratio_key
    row["ratio_nginx"] = _ratio(row, rows.get(case.ref_nginx), key)
    row["ratio_direct"] = _ratio(row, direct, key)


# ---------------------------------------------------------------- text


def _k(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 10_000 else f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def _spread(s: dict[str, float] | None, fmt: Callable[[float], str] = _k, runs: int = 1) -> str:
    if not s:
        return "-"
    if runs <= 1 or s["min"] == s["max"]:
        return fmt(s["median"])
    return f"{fmt(s['median'])} ({fmt(s['min'])}-{fmt(s['max'])})"


def _ms(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def _x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}"


COLUMNS = (
    "case",
    "upstream",
    "contender",
    "req/s (min-max)",
    "MB/s",
    "p50 ms",
    "p99 ms (min-max)",
    "peak RSS MB",
    "xnginx",
    "xdirect",
    "core0/1 busy %",
    "srv µs/req",
    "note",
)


def _row_cells(row: Record) -> list[str]:
    n = row["valid_runs"] or row["runs"]
    cores = "/".join(f"{c:.0f}" for c in row["cores_busy_pct"] if c is not None) or "-"
    cpu = row.get("server_cpu_us_per_req")
    notes = []
    if row["valid_runs"] < row["runs"]:
        notes.append(
            f"{row['runs'] - row['valid_runs']}/{row['runs']} runs had errors "
            f"({row['errors']} failed requests)"
        )
    elif row["errors"]:
        notes.append(f"{row['errors']} failed requests")
    if row.get("check") and row["check"] not in ("ok", "hit verified"):
        notes.append(row["check"])
    if "added_p50_ms" in row:
        notes.append(f"added p50 {row['added_p50_ms']:+.3f} ms, p99 {row['added_p99_ms']:+.3f} ms")
    if row.get("vmhwm_mb"):
        notes.append(
            f"VmHWM {row['vmhwm_mb']['max']:.0f} MB, idle {row['idle_rss_mb']['median']:.0f} MB"
        )
    rss = row.get("peak_rss_mb")
    return [
        row["case"],
        "alone" if row["contender"] == "direct" else row.get("layout", "-"),
        row["contender"],
        _spread(row["rps"], runs=n),
        _spread(row["mbps"], _k, 1),
        _spread(row["p50_ms"], _ms, 1),
        _spread(row["p99_ms"], _ms, runs=n),
        f"{rss['max']:.0f}" if rss else "-",
        _x(row.get("ratio_nginx")),
        _x(row.get("ratio_direct")),
        cores,
        "-" if cpu is None else f"{cpu:.0f}",
        "; ".join(notes),
    ]


def table(summary: Sequence[Record], meta: Record) -> str:
    rows = [list(COLUMNS)] + [_row_cells(r) for r in summary]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
        if i == 0:
            lines.append("-" * (sum(widths) + 2 * len(widths) + len("note")))
    p = meta["pinning"]
    t = meta["timing"]
    lines.append("")
    lines.append(
        f"{'quick, ' if meta['quick'] else ''}{t['reps']} rep(s) x {t['duration_s']:g} s "
        f"(fixed-rate {t['rate_duration_s']:g} s), medians, spread min-max. Pinning: proxy core "
        f"{p['proxy_under_test']}, wrk/clients core {p['load_generator']}; upstream: "
        + ", ".join(
            f"with the {k} (core {v})" for k, v in p["upstream_while_proxy_measured"].items()
        )
        + f", alone on core {p['upstream_while_direct_measured']} when measured directly."
    )
    lines.append(f"sidecar environment: {meta['sidecar_env']}.")
    start, end = meta.get("loadavg_at_start"), meta.get("loadavg_at_end")
    if start and end:
        lines.append(
            f"load average (1/5/15 min) at the start {'/'.join(f'{x:.1f}' for x in start)}, "
            f"at the end {'/'.join(f'{x:.1f}' for x in end)}; elapsed {meta['elapsed_s']:.0f} s."
        )
    lines.append(
        "xnginx: req/s over plain nginx (uncached) or nginx proxy_cache (hit cases). "
        "srv µs/req: CPU of the server under test per request. core busy % includes "
        "other users of the machine."
    )
    return "\n".join(lines)


def run_line(rec: Record) -> str:
    base = (
        f"{rec['contender']:<16} rep {rec['rep']}: {rec.get('rps', 0):9.0f} req/s "
        f"{rec.get('mbps', 0):8.1f} MB/s  p50 {rec.get('p50_ms', 0):7.2f} ms  "
        f"p99 {rec.get('p99_ms', 0):7.2f} ms  rss {rec.get('peak_rss_mb', 0):6.1f} MB  "
        f"cores {rec.get('cores_busy_pct')}"
    )
    if rec.get("errors"):
        base += f"  ERRORS {rec['errors']}"
    return base


def micro_lines(micro: Record) -> str:
    if "error" in micro:
        return f"micro: {micro['error']}"
    from bench.micro import render

    return render(micro)
