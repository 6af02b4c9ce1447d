"""Log-linear histogram: accuracy against exact nearest-rank quantiles, merge, reset."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.stats.histogram import (
    BUCKETS,
    MAX_TRACKABLE_S,
    Histogram,
    bucket_index,
    bucket_midpoint_us,
    nearest_rank,
)

MIN_S = 0.05e-3  # 0.05 ms: lower end of the accuracy contract
MAX_S = 120.0
QS = (0.5, 0.9, 0.99)

# Log-uniform latencies between 0.05 ms and 120 s.
latencies = st.floats(min_value=math.log(MIN_S), max_value=math.log(MAX_S)).map(math.exp)


def exact_quantile_ms(values: list[float], q: float) -> float:
    """Nearest rank by sorting: the k-th smallest with k = ceil(q * n), at least 1."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered) - 1e-9))
    return ordered[rank - 1] * 1000.0


def relative_error(got: float, want: float) -> float:
    return abs(got - want) / want


@settings(max_examples=300, deadline=None)
@given(st.lists(latencies, min_size=1, max_size=3000))
def test_quantiles_within_two_percent_of_exact(values: list[float]) -> None:
    h = Histogram()
    for v in values:
        h.record(v)
    for q in QS:
        assert relative_error(h.quantile(q), exact_quantile_ms(values, q)) <= 0.02, q


@settings(max_examples=100, deadline=None)
@given(
    st.lists(latencies, min_size=1, max_size=500),
    st.floats(min_value=0.0, max_value=1.0),
)
def test_any_quantile_within_two_percent(values: list[float], q: float) -> None:
    h = Histogram()
    for v in values:
        h.record(v)
    assert relative_error(h.quantile(q), exact_quantile_ms(values, q)) <= 0.02


def test_bucket_error_bound_over_the_whole_range() -> None:
    # Geometric grid from 0.05 ms to 120 s, ~0.1 % apart: every bucket is hit.
    worst = 0.0
    v = MIN_S
    while v <= MAX_S:
        mid_s = bucket_midpoint_us(bucket_index(v)) / 1e6
        worst = max(worst, relative_error(mid_s, v))
        v *= 1.001
    assert worst <= 1 / 64 + 1e-9  # half of the widest relative bucket


@given(latencies, latencies)
def test_bucket_index_is_monotonic(a: float, b: float) -> None:
    lo, hi = sorted((a, b))
    assert bucket_index(lo) <= bucket_index(hi)


def test_bucket_edges_are_contiguous() -> None:
    seen = {bucket_index(us / 1e6 + 1e-12) for us in range(0, 1 << 16)}
    assert seen == set(range(len(seen)))  # no bucket skipped while counting up


def test_out_of_range_values_are_clamped() -> None:
    h = Histogram()
    h.record(-1.0)
    h.record(0.0)
    h.record(MAX_TRACKABLE_S * 10)
    h.record(float(10**9))
    assert h.count == 4
    assert h.quantile(0.0) == pytest.approx(0.0005)  # bucket 0 midpoint: 0.5 µs
    assert h.quantile(1.0) == pytest.approx(MAX_TRACKABLE_S * 1000, rel=0.02)
    assert h.bucket_count == BUCKETS


def test_empty_histogram_reports_zero() -> None:
    h = Histogram()
    assert h.count == 0
    assert h.quantile(0.99) == 0.0
    assert h.quantiles(QS) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("q", [-0.1, 1.5, math.nan])
def test_quantile_outside_zero_one_is_refused(q: float) -> None:
    h = Histogram()
    with pytest.raises(ValueError):
        h.quantile(q)
    h.record(0.01)
    with pytest.raises(ValueError):
        h.quantile(q)


def test_nearest_rank_definition() -> None:
    assert nearest_rank(0.5, 10) == 5
    assert nearest_rank(0.9, 10) == 9
    assert nearest_rank(0.99, 10) == 10
    assert nearest_rank(0.29, 100) == 29  # 0.29 * 100 is 28.999999999999996
    assert nearest_rank(0.0, 10) == 1
    assert nearest_rank(1.0, 10) == 10


def test_single_value_is_every_quantile() -> None:
    h = Histogram()
    h.record(0.8)
    for q in (0.0, *QS, 1.0):
        assert h.quantile(q) == pytest.approx(800.0, rel=0.02)


@settings(deadline=None)
@given(st.lists(latencies, max_size=300), st.lists(latencies, max_size=300))
def test_merge_equals_recording_everything_in_one(a: list[float], b: list[float]) -> None:
    ha, hb, both = Histogram(), Histogram(), Histogram()
    for v in a:
        ha.record(v)
        both.record(v)
    for v in b:
        hb.record(v)
        both.record(v)
    before_a = ha.quantiles(QS)
    ha.merge_into(hb)
    assert hb.count == both.count == len(a) + len(b)
    assert hb.quantiles(QS) == both.quantiles(QS)
    assert ha.count == len(a) and ha.quantiles(QS) == before_a  # source unchanged
    assert Histogram.merged([ha, Histogram()]).quantiles(QS) == before_a


def test_reset_forgets_samples_and_keeps_the_array() -> None:
    h = Histogram()
    for i in range(1, 1000):
        h.record(i / 1000)
    h.reset()
    assert h.count == 0
    assert h.quantile(0.5) == 0.0
    assert h.bucket_count == BUCKETS
    h.record(0.002)
    assert h.quantile(0.5) == pytest.approx(2.0, rel=0.02)


def test_array_length_is_constant_after_many_records() -> None:
    h = Histogram()
    for i in range(100_000):
        h.record((i % 5000 + 1) * 1e-4)
    assert h.count == 100_000
    assert h.bucket_count == BUCKETS
