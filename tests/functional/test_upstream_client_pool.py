"""The upstream client's pool: limits, FIFO waiters, cancellation, stale keep-alives,
idle expiry, and flow control with a slow consumer."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.errors import UpstreamBusy, UpstreamConnectError
from sidecar.upstreams import Upstream
from sidecar.upstreams.http1 import HIGH_WATER
from sidecar.upstreams.pool import Pool
from sidecar.upstreams.response import UpstreamResponse
from tests.functional.test_upstream_client import (
    LOOPS,
    Runner,
    answer,
    fetch,
    keep_alive_server,
    loop_runner,
    raw_server,
    read_request,
    upstream,
)


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Runner:
    return loop_runner(request.param)


MIB = 1024 * 1024


def pool_of(up: Upstream) -> Pool:
    return up.sender.pool


class Gate:
    """A server that holds each request until the test lets it through."""

    def __init__(self) -> None:
        self.arrived: list[str] = []
        self.open_connections = 0
        self.most_connections = 0
        self.gates: dict[str, asyncio.Event] = {}

    async def handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_connections += 1
        self.most_connections = max(self.most_connections, self.open_connections)
        try:
            while True:
                request = await read_request(reader)
                path = request.split(b" ")[1].decode().lstrip("/")
                self.arrived.append(path)
                gate = self.gates.setdefault(path, asyncio.Event())
                await gate.wait()
                writer.write(answer(path.encode()))
                await writer.drain()
        finally:
            self.open_connections -= 1

    def let(self, path: str) -> None:
        self.gates.setdefault(path, asyncio.Event()).set()


async def until(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_the_pool_is_bounded_and_waiters_are_served_first_come_first_served(run) -> None:
    gate = Gate()

    async def scenario() -> None:
        async with raw_server(gate.handler) as url, upstream(url, limit=2) as up:
            pool = pool_of(up)
            tasks = []
            for i in range(6):
                tasks.append(asyncio.create_task(fetch(up, f"p{i}")))
                await asyncio.sleep(0.01)  # issue order = queue order
            await until(lambda: len(gate.arrived) == 2)
            assert sorted(gate.arrived) == ["p0", "p1"]
            assert up.active == 6 and up.in_use == 2 and up.waiting == 4
            # The queue is admission's (sidecar.upstreams.admission), never the pool's.
            assert pool.size == 2 and pool.waiting == 0 and up.admission.waiting == 4
            assert up.saturation == 3.0
            for i in (1, 0, 2, 3, 4, 5):  # let them through out of order at first
                gate.let(f"p{i}")
                await asyncio.sleep(0.02)
            results = await asyncio.gather(*tasks)
            assert [body for _, body in results] == [f"p{i}".encode() for i in range(6)]
            assert gate.arrived == ["p0", "p1", "p2", "p3", "p4", "p5"][:2] + gate.arrived[2:]
            assert gate.arrived[2:] == ["p2", "p3", "p4", "p5"]  # FIFO
            assert gate.most_connections == 2 and pool.opened == 2
            assert up.active == 0 and up.take_peak() == 6 and up.peak == 0
            assert pool.idle == 2 and pool.size == 2

    run(scenario())


def test_waiting_for_a_connection_is_bounded_by_max_wait_not_the_first_byte_timeout(run) -> None:
    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
        await writer.drain()
        await asyncio.sleep(10)

    async def scenario() -> None:
        async with (
            raw_server(stalls) as url,
            upstream(url, limit=1, first_byte=0.1, idle=5.0, max_wait=0.3) as up,
        ):
            holder = await up.open("slow")  # headers in time, then the body stalls
            with pytest.raises(UpstreamBusy) as err:  # not a timeout: nothing was sent
                await up.open("queued")
            assert err.value.waited > 0.25 and "pool.max_wait" in err.value.message
            assert up.active == 1 and up.admission.waiting == 0 and pool_of(up).waiting == 0
            holder.release(reuse=False)
            assert up.active == 0 and pool_of(up).size == 0

    run(scenario())


def test_cancellation_frees_the_slot_wherever_it_happens(run) -> None:
    gate = Gate()

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
        while True:
            writer.write(b"t" * 1000)
            await writer.drain()
            await asyncio.sleep(0.01)

    async def scenario() -> None:
        async with raw_server(gate.handler) as url, upstream(url, limit=1) as up:
            pool = pool_of(up)
            # 1. waiting for headers
            task = asyncio.create_task(up.open("hang"))
            await until(lambda: gate.arrived == ["hang"])
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert up.active == 0 and pool.size == 0 and pool.idle == 0
            # 2. queued behind a busy connection
            holder = asyncio.create_task(fetch(up, "held"))
            await until(lambda: "held" in gate.arrived)
            queued = asyncio.create_task(up.open("queued"))
            await until(lambda: up.admission.waiting == 1)
            queued.cancel()
            with pytest.raises(asyncio.CancelledError):
                await queued
            assert up.admission.waiting == 0 and up.active == 1 and up.in_use == 1
            gate.let("held")
            assert await holder == (200, b"held")
            assert up.active == 0 and pool.idle == 1
        # 3. while the body is read (the caller never calls release)
        async with raw_server(trickle) as url, upstream(url, limit=1) as up:
            pool = pool_of(up)
            resp = await up.open("m/@v/v1.0.0.zip")

            async def consume() -> None:
                async for _ in resp.chunks():
                    pass

            reader = asyncio.create_task(consume())
            await asyncio.sleep(0.05)
            reader.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reader
            assert up.active == 0 and pool.size == 0 and pool.idle == 0

    run(scenario())


def test_a_stale_keep_alive_is_retried_once_on_a_fresh_connection(run) -> None:
    requests: list[int] = []  # per request: how many the connection had carried before

    async def flaky(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        while True:
            await read_request(reader)
            requests.append(served)
            if served:  # closed "while idle": the second request finds it dead
                return
            served += 1
            writer.write(answer(b"ok"))
            await writer.drain()

    async def scenario() -> None:
        async with raw_server(flaky) as url, upstream(url) as up:
            for _ in range(4):
                assert await fetch(up) == (200, b"ok")
            # request 1: fresh; requests 2-4: stale keep-alive, retried fresh
            assert requests == [0, 1, 0, 1, 0, 1, 0]
            assert pool_of(up).opened == 4
            assert up.active == 0

    run(scenario())


def test_the_retry_happens_once_only(run) -> None:
    count = 0

    async def first_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        while True:
            await read_request(reader)
            count += 1
            if count > 1:
                return  # every later request, fresh connection or not, is dropped
            writer.write(answer(b"ok"))
            await writer.drain()

    async def scenario() -> None:
        async with raw_server(first_only) as url, upstream(url) as up:
            assert await fetch(up) == (200, b"ok")
            with pytest.raises(UpstreamConnectError) as err:
                await fetch(up)
            assert "before answering" in err.value.message
            assert count == 3  # the stale try and one retry
            assert up.active == 0 and pool_of(up).size == 0

    run(scenario())


def test_connections_closed_by_the_server_while_idle_are_dropped(run) -> None:
    async def closes_soon(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"ok"))  # keep-alive announced, then closed after 20 ms
        await writer.drain()
        await asyncio.sleep(0.02)

    async def scenario() -> None:
        async with raw_server(closes_soon) as url, upstream(url) as up:
            pool = pool_of(up)
            assert await fetch(up) == (200, b"ok")
            await until(lambda: pool.idle == 0)
            assert pool.size == 0
            assert await fetch(up) == (200, b"ok")
            assert pool.opened == 2

    run(scenario())


def test_idle_connections_are_closed_after_the_idle_timeout(run) -> None:
    closed = asyncio.Event

    async def scenario() -> None:
        gone = closed()

        async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await keep_alive_server(lambda _: answer(b"ok"))(reader, writer)
            finally:
                gone.set()

        async with raw_server(server) as url, upstream(url, idle=0.2) as up:
            pool = pool_of(up)
            assert await fetch(up) == (200, b"ok")
            assert pool.idle == 1
            await asyncio.wait_for(gone.wait(), 2.0)
            assert pool.idle == 0 and pool.size == 0

    run(scenario())


def test_a_slow_consumer_keeps_the_buffer_bounded(run) -> None:
    size = 200 * MIB
    block = bytes(range(256)) * 4096  # 1 MiB

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()
        await read_request(reader)  # keep the connection open

    async def scenario() -> None:
        async with raw_server(big) as url, upstream(url, idle=5.0) as up:
            resp = await up.open("m/@v/v1.0.0.zip")
            assert isinstance(resp, UpstreamResponse)
            received = chunks = 0
            worst = 0
            async for chunk in resp.chunks():
                received += len(chunk)
                chunks += 1
                worst = max(worst, resp.buffered)
                if chunks % 4 == 0:
                    await asyncio.sleep(0.001)  # slower than loopback
            peak = resp.peak_buffered
            resp.release()
            assert received == size
            # Filled up to the mark (the consumer was the slow side) but never
            # more than the mark plus one read of the transport.
            assert HIGH_WATER <= peak <= HIGH_WATER + 512 * 1024
            assert worst <= peak
            assert pool_of(up).idle == 1  # read to the end: kept

    run(scenario())
