"""bench/soak.py's figures: the later half's slope tells a leak from the
allocators settling (RSS that climbs in ever rarer steps, then stays)."""

from __future__ import annotations

from bench.soak import Sample, Soak, second_half, summarize, verdict


def sample(t_s: float, rss_mb: float) -> Sample:
    return Sample(t_s, "small-miss", rss_mb, 40, 12, 30_000, 4 << 20, 0, 0)


def soak_of(points: list[tuple[float, float]]) -> Soak:
    soak = Soak()
    soak.samples = [sample(t, rss) for t, rss in points]
    return soak


def test_settling_climbs_early_then_the_later_half_is_flat() -> None:
    # Steps at 120 and 400 s, flat from there to 1,200 s.
    points = [
        (t, 150.0 + (4.0 if t >= 120 else 0) + (5.0 if t >= 400 else 0)) for t in range(0, 1201, 20)
    ]
    summary = summarize(soak_of(points), warmup_s=60)
    assert summary["slope_mb_per_min"] > 0.2  # the whole run's fit sees the steps
    assert summary["late_slope_mb_per_min"] == 0.0
    assert summary["late_growth_mb"] == 0.0
    assert summary["late_from_t_s"] == 640  # the middle of 60..1,200 s, rounded up to a sample
    assert "0.0 MB/min from 640 s (+0.0 MB)" in verdict(summary)


def test_a_leak_still_climbs_in_the_later_half() -> None:
    points = [(t, 150.0 + 0.5 * t / 60) for t in range(0, 1201, 20)]  # 0.5 MB/min
    summary = summarize(soak_of(points), warmup_s=60)
    assert summary["late_slope_mb_per_min"] == summary["slope_mb_per_min"] == 0.5
    assert summary["late_growth_mb"] == 4.7


def test_no_samples_no_halves() -> None:
    assert second_half([]) == []
    summary = summarize(soak_of([]), warmup_s=60)
    assert summary["late_slope_mb_per_min"] is None and summary["late_growth_mb"] is None
