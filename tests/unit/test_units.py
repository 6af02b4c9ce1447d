"""Durations and sizes: the spellings operators write, and the ones we refuse."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.units import format_duration, format_size, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("800ms", 0.8),
        ("2m", 120.0),
        ("1h30m", 5400.0),
        ("1h30m15s", 5415.0),
        ("1.5s", 1.5),
        ("250us", 0.00025),
        ("250µs", 0.00025),
        ("100ns", 1e-7),
        (".5s", 0.5),
        ("1.m", 60.0),
        ("0", 0.0),
        ("0s", 0.0),
        ("5", 5.0),
        ("2.5", 2.5),
        (" 10s ", 10.0),
        ("+3s", 3.0),
        (5, 5.0),
        (0.25, 0.25),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("-1s", "negative"),
        ("-5", "negative"),
        (-1, "negative"),
        ("fast", "not a duration"),
        ("1d", "unknown unit 'd'"),
        ("10S", "unknown unit 'S'"),
        ("1 s", "unknown unit ' s'"),
        ("1.5.5s", "not a duration"),
        ("s", "not a duration"),
        ("1h30", "not a duration"),
        (math.inf, "not a finite"),
        (math.nan, "not a finite"),
        (True, "not a duration"),
    ],
)
def test_parse_duration_refuses(value: str | float, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_duration(value)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("10GiB", 10 * 1024**3),
        ("512MiB", 512 * 1024**2),
        ("1.5GB", 1_500_000_000),
        ("100k", 100_000),
        ("100KB", 100_000),
        ("100kb", 100_000),
        ("4Ki", 4096),
        ("10 Gi", 10 * 1024**3),
        ("2TiB", 2 * 1024**4),
        ("1PB", 10**15),
        ("0.5KiB", 512),
        ("1.0001KiB", 1024),  # fractions round down to whole bytes
        ("100B", 100),
        ("1024", 1024),
        ("1.0", 1),
        (0, 0),
        (4096, 4096),
        (1e3, 1000),
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("", "not a size"),
        ("lots", "not a size"),
        ("10XB", "not a size"),
        ("1e3", "not a size"),
        ("GiB", "not a size"),
        ("-1", "negative"),
        ("-1GiB", "negative"),
        (-5, "negative"),
        ("1.5", "whole number of bytes"),
        ("1.5B", "whole number of bytes"),
        (1.5, "not a size"),
        (True, "not a size"),
    ],
)
def test_parse_size_refuses(value: str | int, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_size(value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.8, "800ms"),
        (0.00025, "250us"),
        (1e-7, "100ns"),
        (1.5, "1.5s"),
        (120, "2m"),
        (5400, "1h30m"),
        (5415.25, "1h30m15.25s"),
        (59.9999, "1m"),
        (-2, "-2s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0B"),
        (1023, "1023B"),
        (1024, "1KiB"),
        (1536, "1.5KiB"),
        (512 * 1024**2, "512MiB"),
        (10 * 1024**3, "10GiB"),
        (1_500_000_000, "1.4GiB"),
        (3 * 1024**5, "3PiB"),
    ],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


@given(st.integers(min_value=0, max_value=10**9))
def test_duration_round_trips_at_millisecond_precision(millis: int) -> None:
    seconds = millis / 1000
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=1e-9)


@given(st.integers(min_value=0, max_value=40), st.integers(min_value=0, max_value=5))
def test_size_round_trips_for_whole_binary_units(count: int, exponent: int) -> None:
    size = count * 1024**exponent
    assert parse_size(format_size(size)) == size
