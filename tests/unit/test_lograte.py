"""LogRate on a fake clock: the first line of each key at once, then one per
interval carrying the count of the ones left out."""

from __future__ import annotations

from sidecar.proxy.lograte import LogRate


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_first_at_once_then_one_line_per_interval_with_the_count() -> None:
    clock = Clock()
    rate = LogRate(10.0, clock)
    assert rate.admit("a") == 0
    assert [rate.admit("a") for _ in range(5)] == [None] * 5
    clock.now += 9.9
    assert rate.admit("a") is None
    clock.now += 0.1
    assert rate.admit("a") == 6  # the six left out since the first line
    assert rate.admit("a") is None
    clock.now += 60
    assert rate.admit("a") == 1


def test_keys_are_apart() -> None:
    clock = Clock()
    rate = LogRate(10.0, clock)
    assert rate.admit(("SumdbUnavailable", "served")) == 0
    assert rate.admit(("SumdbVerifyError", "served")) == 0
    assert rate.admit(("SumdbUnavailable", "served")) is None
    assert rate.admit(("SumdbUnavailable", "refused")) == 0


def test_summaries_tell_a_burst_that_stopped_once_per_interval() -> None:
    clock = Clock()
    rate = LogRate[str](10.0, clock)
    assert rate.admit("a") == 0
    assert rate.next_due() is None  # nothing left out: nothing to tell
    for _ in range(30):
        assert rate.admit("a") is None
    clock.now += 4
    assert rate.next_due() == 6.0
    assert rate.summaries() == []  # not due yet
    clock.now += 6
    assert rate.summaries() == [("a", 30)]
    assert rate.summaries() == []  # told once
    assert rate.admit("a") is None  # a new interval began with the summary
    clock.now += 10
    assert rate.summaries() == [("a", 1)]
    clock.now += 10
    assert rate.summaries() == []  # quiet for a whole interval: forgotten
    assert rate.admit("a") == 0  # so the next one is logged at once


def test_admit_after_the_interval_still_carries_the_count_without_summaries() -> None:
    clock = Clock()
    rate = LogRate[str](10.0, clock)
    rate.admit("a")
    rate.admit("a")
    clock.now += 10
    assert rate.admit("a") == 1
    assert rate.summaries() == []  # told by that line already
