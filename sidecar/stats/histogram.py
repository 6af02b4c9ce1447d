"""A fixed-size log-linear latency histogram (HdrHistogram's bucket layout).

Values are recorded in seconds and counted in whole microseconds. Below
``2 * SUB_BUCKETS`` µs every microsecond has its own bucket; above that each
power of two is cut into ``SUB_BUCKETS`` equal sub-buckets, so a bucket is never
wider than 1/32 of its lower bound. A quantile is reported as the midpoint of
the bucket that holds the exact nearest-rank sample, hence within
1/64 ≈ 1.6 % of the exact value for anything from 32 µs up to
``MAX_TRACKABLE_S`` (about 71 minutes). Larger values land in the top bucket;
negative ones in bucket 0.

The bucket array never grows: ``record`` is a few integer operations and one
list increment, whatever the number of samples.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from itertools import accumulate
from operator import add

SUB_BUCKET_BITS = 5
SUB_BUCKETS = 1 << SUB_BUCKET_BITS  # 32 sub-buckets per power of two
_LINEAR_LIMIT = 2 * SUB_BUCKETS  # below this many µs, one bucket per µs
_MAX_BIT_LENGTH = 32  # 2**32 µs ≈ 71.6 min is the largest value tracked exactly
_SHIFT_OFFSET = SUB_BUCKET_BITS + 1
BUCKETS = ((_MAX_BIT_LENGTH - _SHIFT_OFFSET) << SUB_BUCKET_BITS) + _LINEAR_LIMIT
MAX_TRACKABLE_S = (1 << _MAX_BIT_LENGTH) / 1e6
_TOP = BUCKETS - 1
_ZEROS = (0,) * BUCKETS


def nearest_rank(q: float, n: int) -> int:
    """1-based nearest rank of quantile ``q`` among ``n`` samples: ceil(q * n), at least 1.

    The small epsilon keeps ``0.29 * 100`` (28.999999999999996) at rank 29.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be within [0, 1], got {q!r}")
    return max(1, math.ceil(q * n - 1e-9))


def bucket_index(value_s: float) -> int:
    """The bucket that counts ``value_s`` seconds (exposed for tests)."""
    v = int(value_s * 1_000_000.0)
    if v < _LINEAR_LIMIT:
        return v if v > 0 else 0
    shift = v.bit_length() - _SHIFT_OFFSET
    index = (shift << SUB_BUCKET_BITS) + (v >> shift)
    return index if index < BUCKETS else _TOP


def bucket_midpoint_us(index: int) -> float:
    """The midpoint of bucket ``index`` in microseconds."""
    if index < _LINEAR_LIMIT:
        return index + 0.5
    shift = (index >> SUB_BUCKET_BITS) - 1
    lower = ((index & (SUB_BUCKETS - 1)) + SUB_BUCKETS) << shift
    return lower + (1 << shift) / 2


class Histogram:
    """Counts of latency samples in ``BUCKETS`` fixed log-linear buckets."""

    __slots__ = ("_counts", "_total")

    def __init__(self) -> None:
        self._counts: list[int] = [0] * BUCKETS
        self._total = 0

    @property
    def count(self) -> int:
        return self._total

    @property
    def bucket_count(self) -> int:
        """Length of the internal bucket array (constant)."""
        return len(self._counts)

    def record(self, value_s: float) -> None:
        """Count one sample of ``value_s`` seconds. O(1), no allocation beyond ints."""
        # Inlined bucket_index(): this is on the per-request path.
        v = int(value_s * 1_000_000.0)
        if v < _LINEAR_LIMIT:
            index = v if v > 0 else 0
        else:
            shift = v.bit_length() - _SHIFT_OFFSET
            index = (shift << SUB_BUCKET_BITS) + (v >> shift)
            if index > _TOP:
                index = _TOP
        self._counts[index] += 1
        self._total += 1

    def merge_into(self, other: Histogram) -> None:
        """Add this histogram's counts to ``other`` (``self`` is unchanged)."""
        if not self._total:
            return
        other._counts[:] = map(add, other._counts, self._counts)
        other._total += self._total

    def reset(self) -> None:
        """Forget every sample; the bucket array keeps its size."""
        if self._total:
            self._counts[:] = _ZEROS
            self._total = 0

    def quantile(self, q: float) -> float:
        """Nearest-rank quantile ``q`` (0..1) in milliseconds; 0.0 when empty."""
        return self.quantiles((q,))[0]

    def quantiles(self, qs: Sequence[float]) -> list[float]:
        """Several nearest-rank quantiles in milliseconds with one pass over the buckets."""
        ranks = [nearest_rank(q, self._total) for q in qs]
        if not self._total:
            return [0.0] * len(ranks)
        cumulative = list(accumulate(self._counts))
        return [bucket_midpoint_us(bisect_left(cumulative, rank)) / 1000.0 for rank in ranks]

    @classmethod
    def merged(cls, histograms: Iterable[Histogram]) -> Histogram:
        """A new histogram holding the sum of ``histograms``."""
        result = cls()
        for h in histograms:
            h.merge_into(result)
        return result
