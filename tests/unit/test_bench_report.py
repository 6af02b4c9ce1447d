"""bench/report.py: ratios within a layout, the worse layout kept, and runs of
large bodies that end before any download did."""

from __future__ import annotations

from typing import Any

from bench.cases import CASES, PARALLEL, WRK, Case
from bench.report import summarize, valid, worst, worst_table

HIT = Case("h", WRK, ("direct", "nginx-cache", "sidecar"), 100, "", ref_nginx="nginx-cache")
BIG = Case("b", WRK, ("nginx", "sidecar-nocache"), 50, "", ratio_key="mbps")
RSS = Case("r", PARALLEL, ("nginx-cache", "sidecar"), 50, "", ref_nginx="nginx-cache")


def run(case: str, layout: str, contender: str, **figures: Any) -> dict[str, Any]:
    base = {"requests": 1000, "errors": 0, "cores_busy_pct": [50.0, 50.0], "bytes": 1}
    return {"case": case, "layout": layout, "contender": contender, "rep": 0, **base, **figures}


def test_the_worse_layout_is_kept_with_both_ratios() -> None:
    records = [
        run("h", "load", "direct", rps=300.0),
        run("h", "load", "nginx-cache", rps=100.0),
        run("h", "load", "sidecar", rps=120.0, peak_rss_mb=80.0),
        run("h", "proxy", "nginx-cache", rps=100.0),
        run("h", "proxy", "sidecar", rps=70.0, peak_rss_mb=95.0),
    ]
    summary = summarize(records, [HIT], ["load", "proxy"])
    by = {(r.get("layout", "alone"), r["contender"]): r for r in summary}
    assert by[("load", "sidecar")]["ratio_nginx"] == 1.2
    assert by[("proxy", "sidecar")]["ratio_nginx"] == 0.7
    assert by[("proxy", "sidecar")]["ratio_direct"] == round(70 / 300, 3)  # direct: one layout
    [row] = worst(summary, [HIT])
    assert row["contender"] == "sidecar" and row["worst_layout"] == "proxy"
    assert row["worst_ratio"] == 0.7 and row["ratio_by_layout"] == {"load": 1.2, "proxy": 0.7}
    assert row["peak_rss_mb"] == 95.0
    assert "0.70x nginx-cache" in worst_table([row])


def test_large_bodies_compare_bytes_and_count_without_a_finished_request() -> None:
    records = [
        run("b", "load", "nginx", rps=4.0, mbps=400.0),
        run("b", "load", "sidecar-nocache", rps=0.0, mbps=460.0, requests=0, bytes=4_600_000),
    ]
    summary = summarize(records, [BIG], ["load"])
    row = next(r for r in summary if r["contender"] == "sidecar-nocache")
    assert row["valid_runs"] == 1 and row["ratio_nginx"] == 1.15


def test_validity() -> None:
    assert valid({"requests": 0, "bytes": 10, "errors": 0})
    assert not valid({"requests": 0, "bytes": 0, "errors": 0})
    assert not valid({"requests": 0, "bytes": 10, "errors": 1})
    assert not valid({"requests": 100, "errors": 2})
    assert valid({"requests": 1000, "errors": 2})


def test_peak_rss_cases_report_the_highest_of_any_layout() -> None:
    records = [
        run("r", layout, name, peak_rss_mb=rss, rps=1.0, vmhwm_mb=rss, idle_rss_mb=50.0)
        for layout, name, rss in (
            ("load", "nginx-cache", 24.0),
            ("load", "sidecar", 110.0),
            ("proxy", "nginx-cache", 25.0),
            ("proxy", "sidecar", 118.0),
        )
    ]
    [row] = worst(summarize(records, [RSS], ["load", "proxy"]), [RSS])
    assert row["peak_rss_mb"] == 118.0 and row["ref_peak_rss_mb"] == 25.0
    assert row["worst_ratio"] is None


def test_the_cases_of_record_exist() -> None:
    names = {c.name for c in CASES}
    for name in (
        "small-hit",
        "small-uncached",
        "zip50m-hit",
        "zip50m-hit-c100",
        "zip50m-uncached",
        "zip50m-uncached-c100",
        "rss-100x50m-hit",
        "rss-200x50m-hit",
        "rss-100x50m-miss",
        "rss-200x50m-miss",
    ):
        assert name in names
    small_hit = next(c for c in CASES if c.name == "small-hit")
    assert small_hit.urls == 1000 and small_hit.hit
