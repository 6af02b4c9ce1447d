from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.proxy.ranges import UNSATISFIABLE, byte_range


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-9", 100, (0, 9)),
        ("bytes=90-", 100, (90, 99)),
        ("bytes=-10", 100, (90, 99)),
        ("bytes=-500", 100, (0, 99)),  # more than there is: all of it
        ("bytes=50-500", 100, (50, 99)),  # clipped to the end
        ("bytes=100-", 100, UNSATISFIABLE),
        ("bytes=-0", 100, UNSATISFIABLE),
        (" Bytes = 1-2 ", 100, (1, 2)),
        ("bytes=0-1,5-6", 100, None),  # several ranges: whole body
        ("items=0-1", 100, None),
        ("bytes=5-1", 100, None),
        ("bytes=a-b", 100, None),
        ("bytes=-", 100, None),
        ("bytes=1", 100, None),
        (None, 100, None),
    ],
)
def test_byte_range(header, size, expected):
    assert byte_range(header, size) == expected


def test_if_range_means_the_whole_body():
    assert byte_range("bytes=0-1", 10, if_range='"etag"') is None


@given(st.text(max_size=30), st.integers(min_value=1, max_value=10**9))
def test_a_range_is_always_inside_the_body(header, size):
    got = byte_range(header, size)
    if got not in (None, UNSATISFIABLE):
        first, last = got
        assert 0 <= first <= last < size
