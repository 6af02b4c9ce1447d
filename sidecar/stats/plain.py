"""The children of the per-request counters and histograms (``PlainCounter``,
``PlainHistogram`` in ``sidecar.metrics``): plain numbers the event loop
alone writes, read at scrape time.

Apart from ``sidecar.metrics`` so that they are compiled with the request
path (``sidecar.compiled``): the metrics module subclasses prometheus_client's
``Collector`` and stays interpreted, and a call from compiled code into an
interpreted method costs more than the addition it makes.
"""

from __future__ import annotations

import time
from bisect import bisect_left


class PlainCount:
    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class PlainBuckets:
    __slots__ = ("bounds", "counts", "created", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound
        self.total = 0.0
        self.created = time.time()

    def observe(self, seconds: float) -> None:
        # bisect_left: the first bound >= seconds, as Histogram's ``amount <= bound``.
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds
