"""The admission gate on its own: FIFO hand-over, bounded queue, expiry, cancellation."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.errors import UpstreamBusy
from sidecar.metrics import Metrics
from sidecar.upstreams.admission import Admission

LONG_S = 30.0  # a max_wait no test reaches


async def settle() -> None:
    """Let every ready callback and woken task run."""
    for _ in range(5):
        await asyncio.sleep(0)


def gate(limit: int = 2, max_pending: int = 4, max_wait: float = LONG_S) -> Admission:
    return Admission("up", limit, max_pending, max_wait)


async def test_below_the_limit_admits_at_once_and_reports_no_wait() -> None:
    g = gate(limit=2)
    waits: list[float] = []
    g.on_wait = waits.append
    await g.acquire()
    await g.acquire()
    assert (g.in_use, g.waiting, waits) == (2, 0, [0.0, 0.0])
    g.release()
    g.release()
    assert g.in_use == 0


async def test_waiters_are_admitted_first_come_first_served() -> None:
    g = gate(limit=1)
    await g.acquire()
    order: list[int] = []

    async def wait(i: int) -> None:
        await g.acquire()
        order.append(i)

    tasks = [asyncio.create_task(wait(i)) for i in range(3)]
    await settle()
    assert (g.in_use, g.waiting) == (1, 3)
    for expected in range(3):
        g.release()
        await settle()
        assert order == list(range(expected + 1))
        assert (g.in_use, g.waiting) == (1, 2 - expected)
    await asyncio.gather(*tasks)
    g.release()
    assert g.in_use == 0


async def test_a_newcomer_does_not_overtake_the_queue() -> None:
    g = gate(limit=1)
    await g.acquire()
    first = asyncio.create_task(g.acquire())
    await settle()
    g.release()  # the slot goes to ``first`` before it even runs
    late = asyncio.create_task(g.acquire())
    await settle()
    assert first.done() and not late.done()
    assert (g.in_use, g.waiting) == (1, 1)
    g.release()
    await late
    g.release()
    assert (g.in_use, g.waiting) == (0, 0)


async def test_a_full_queue_overflows_at_once() -> None:
    g = gate(limit=1, max_pending=2)
    await g.acquire()
    waiters = [asyncio.create_task(g.acquire()) for _ in range(2)]
    await settle()
    with pytest.raises(UpstreamBusy) as caught:
        await g.acquire()
    assert caught.value.waited == 0.0 and "max_pending 2" in caught.value.message
    assert (g.in_use, g.waiting) == (1, 2)
    for _ in range(3):
        g.release()
        await settle()
    await asyncio.gather(*waiters)
    assert (g.in_use, g.waiting) == (0, 0)


async def test_no_pending_queue_means_overflow_whenever_all_slots_are_held() -> None:
    g = gate(limit=1, max_pending=0)
    await g.acquire()
    with pytest.raises(UpstreamBusy):
        await g.acquire()
    g.release()
    await g.acquire()
    assert g.in_use == 1


async def test_a_waiter_that_waits_out_max_wait_overflows_and_holds_nothing() -> None:
    g = gate(limit=1, max_wait=0.02)
    waits: list[float] = []
    await g.acquire()
    g.on_wait = waits.append
    with pytest.raises(UpstreamBusy) as caught:
        await g.acquire()
    assert caught.value.waited > 0.015 and "pool.max_wait" in caught.value.message
    assert waits == [caught.value.waited]
    assert (g.in_use, g.waiting) == (1, 0)
    g.release()  # nobody live is queued: the slot returns to the pool
    assert g.in_use == 0


async def test_a_cancelled_waiter_frees_nothing_it_did_not_hold() -> None:
    g = gate(limit=1)
    await g.acquire()
    leaver = asyncio.create_task(g.acquire())
    stayer = asyncio.create_task(g.acquire())
    await settle()
    leaver.cancel()
    await settle()
    assert leaver.cancelled()
    assert (g.in_use, g.waiting) == (1, 1)
    g.release()  # skips the cancelled waiter
    await stayer
    assert (g.in_use, g.waiting) == (1, 0)
    g.release()
    assert g.in_use == 0


async def test_a_waiter_cancelled_after_the_hand_over_passes_the_slot_on() -> None:
    g = gate(limit=1)
    await g.acquire()
    leaver = asyncio.create_task(g.acquire())
    stayer = asyncio.create_task(g.acquire())
    await settle()
    g.release()  # hands the slot to ``leaver``, which has not resumed yet
    leaver.cancel()
    await settle()
    assert leaver.cancelled() and stayer.done()
    assert (g.in_use, g.waiting) == (1, 0)
    g.release()
    assert g.in_use == 0


async def test_expired_and_cancelled_waiters_do_not_grow_the_queue_without_bound() -> None:
    g = gate(limit=1, max_pending=2)
    await g.acquire()
    for _ in range(50):
        task = asyncio.create_task(g.acquire())
        await settle()
        task.cancel()
        await settle()
    assert g.waiting == 0
    assert len(g._queue) <= 2 * 2 + 1
    g.release()
    assert g.in_use == 0


def test_queue_waits_are_exported_as_a_prometheus_histogram() -> None:
    metrics = Metrics()
    name = "goproxy_sidecar_upstream_queue_wait_seconds"
    child = metrics.upstream_queue_wait.labels("up")
    for seconds in (0.0, 0.0, 0.003, 0.3, 20.0):
        child.observe(seconds)
    samples = {
        (s.name, s.labels.get("le")): s.value
        for family in metrics.registry.collect()
        if family.name == name
        for s in family.samples
    }
    assert samples[(f"{name}_bucket", "0.001")] == 2
    assert samples[(f"{name}_bucket", "0.005")] == 3
    assert samples[(f"{name}_bucket", "0.5")] == 4
    assert samples[(f"{name}_bucket", "10.0")] == 4
    assert samples[(f"{name}_bucket", "+Inf")] == 5
    assert samples[(f"{name}_count", None)] == 5
    assert samples[(f"{name}_sum", None)] == pytest.approx(20.303)
