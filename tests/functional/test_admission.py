"""Admission (issue 13, "Busy is not sick"): a connection limit and a bounded
pending queue per upstream, overflow per request (next upstream, a stale
copy, a 503 with Retry-After), never a breaker failure; real loopback
upstreams and the embedded default policy."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from sidecar.app import Sidecar
from sidecar.config import (
    DEFAULT_POOL_MAX_PENDING,
    DEFAULT_POOL_MAX_WAIT_S,
    CacheConfig,
    PolicyConfig,
    PoolConfig,
    TimeoutsConfig,
    UpstreamConfig,
)
from sidecar.goproxy import parse_request_path
from tests.polling import until

INFO = "example.com/mod/@v/v1.0.0.info"
LIST = "example.com/mod/@v/list"
HELD = "example.com/held/@v/v1.0.0.info"  # answered only once the test lets it go
LONG_WAIT_S = 30.0  # a pool.max_wait no test reaches


class Capacity:
    """A GOPROXY upstream that counts what it serves at once. ``HELD`` waits
    for ``let_go``; everything else takes ``service_s``."""

    def __init__(self, service_s: float = 0.0) -> None:
        self.service_s = service_s
        self.inflight = 0
        self.peak = 0
        self.received: list[str] = []
        self.let_go = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        path = request.raw_path.lstrip("/")
        self.received.append(path)
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        try:
            if path == HELD:
                await self.let_go.wait()
            elif self.service_s:
                await asyncio.sleep(self.service_s)
        finally:
            self.inflight -= 1
        if path.endswith("/@v/list"):
            return web.Response(body=b"v1.0.0\n", content_type="text/plain")
        return web.Response(body=b'{"Version":"v1.0.0"}', content_type="application/json")


Start = Callable[..., Awaitable[Any]]


@pytest.fixture
async def capacity_upstream(aiohttp_server: Any) -> Start:
    async def start(service_s: float = 0.0) -> tuple[Capacity, str]:
        upstream = Capacity(service_s)
        app = web.Application()
        app.router.add_get("/{tail:.*}", upstream.handle)
        server: TestServer = await aiohttp_server(app, host="127.0.0.1")
        return upstream, str(server.make_url("")).rstrip("/")

    return start


def upstream(
    name: str,
    url: str,
    connections: int = 1,
    pending: int = 4,
    wait: float = LONG_WAIT_S,
) -> UpstreamConfig:
    return UpstreamConfig(
        name,
        url,
        pool=PoolConfig(max_connections=connections, max_pending=pending, max_wait=wait),
        timeouts=TimeoutsConfig(),  # generous: a shared machine is slow; TTFB is not judged here
    )


async def hold(client: TestClient[Any, Any], up: Capacity) -> asyncio.Task[Any]:
    """A request that keeps the upstream's only connection until ``up.let_go``."""
    task = asyncio.create_task(client.get("/" + HELD))
    await until("the held request to reach the upstream", lambda: up.inflight == 1)
    return task


async def breakers_closed(client: TestClient[Any, Any], sc: Sidecar) -> dict[str, Any]:
    """One policy evaluation with the embedded default policy; every breaker must stay closed."""
    await sc.control.step()
    view: dict[str, Any] = await (await client.get("/breakers")).json()
    for name, breaker in view.items():
        assert breaker["state"] == "closed", (name, breaker)
    return view


def transitions(sc: Sidecar) -> float:
    return sum(
        s.value
        for metric in sc.metrics.breaker_transitions.collect()
        for s in metric.samples
        if s.name.endswith("_total")
    )


async def test_a_healthy_burst_queues_and_is_never_shed(
    capacity_upstream: Start, sidecar_client: Start
) -> None:
    up, url = await capacity_upstream(service_s=0.003)
    client, sc = await sidecar_client(
        [url],
        upstreams=(
            upstream(
                "up0",
                url,
                connections=8,
                pending=DEFAULT_POOL_MAX_PENDING,
                wait=DEFAULT_POOL_MAX_WAIT_S,
            ),
        ),
        policy=PolicyConfig(interval=0.1),  # the embedded default policy, evaluated often
    )
    clients, rounds = 256, 4
    statuses: collections.Counter[int] = collections.Counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one_client(i: int) -> None:
            for j in range(rounds):
                url = client.make_url(f"/example.com/m{i}x{j}/@v/v1.0.0.info")
                async with session.get(url) as r:
                    await r.read()
                    statuses[r.status] += 1

        await asyncio.gather(*(one_client(i) for i in range(clients)))
    assert statuses == {200: clients * rounds}
    assert up.peak <= 8  # admission is the only gate, and it held
    snapshot = sc.windows["up0"].snapshot()
    assert snapshot.queue_wait_p99_ms > 0  # the burst did queue
    assert snapshot.overflows == 0 and snapshot.errors == 0
    await breakers_closed(client, sc)
    assert transitions(sc) == 0


async def test_an_overflowing_request_goes_to_the_backup(
    capacity_upstream: Start, sidecar_client: Start
) -> None:
    (primary, url_a), (backup, url_b) = [await capacity_upstream() for _ in range(2)]
    client, sc = await sidecar_client(
        [url_a, url_b],
        upstreams=(upstream("up0", url_a, pending=0), upstream("up1", url_b)),
    )
    held = await hold(client, primary)
    resp = await client.get("/" + INFO)
    assert resp.status == 200 and resp.headers["X-Sidecar-Upstream"] == "up1"
    assert INFO not in primary.received and INFO in backup.received
    primary.let_go.set()
    assert (await held).headers["X-Sidecar-Upstream"] == "up0"
    window = sc.windows["up0"].snapshot()
    assert (window.overflows, window.errors, window.requests) == (1, 0, 1)
    text = await (await client.get("/metrics")).text()
    assert 'goproxy_sidecar_upstream_overflows_total{upstream="up0"} 1.0' in text
    await breakers_closed(client, sc)


async def test_a_full_queue_overflows_at_once_to_a_503_and_never_trips(
    capacity_upstream: Start, sidecar_client: Start
) -> None:
    up, url = await capacity_upstream()
    client, sc = await sidecar_client([url], upstreams=(upstream("up0", url, pending=1),))
    held = await hold(client, up)
    queued = asyncio.create_task(client.get("/" + INFO))
    await until("a request to queue", lambda: sc.upstreams["up0"].waiting == 1)
    shed = 30  # above the default policy's min_requests
    for _ in range(shed):
        # pool.max_wait is 30 s: an answer now can only be the full-queue overflow.
        resp = await client.get("/" + LIST)
        assert resp.status == 503, await resp.text()
        assert resp.headers["Retry-After"] == "1"
        assert "pool.max_pending 1" in await resp.text()
    assert LIST not in up.received
    up.let_go.set()
    assert (await held).status == 200 and (await queued).status == 200
    window = sc.windows["up0"].snapshot()
    assert (window.overflows, window.errors, window.requests) == (shed, 0, 2)
    text = await (await client.get("/metrics")).text()
    assert f'goproxy_sidecar_upstream_overflows_total{{upstream="up0"}} {shed}.0' in text
    assert (
        f'goproxy_sidecar_rejected_requests_total{{reason="overflow",upstream=""}} {shed}.0' in text
    )
    assert 'goproxy_sidecar_upstream_queue_wait_seconds_count{upstream="up0"} 2.0' in text
    assert (
        'goproxy_sidecar_requests_total{kind="list",outcome="overflow",upstream="sidecar"} '
        f"{shed}.0"
    ) in text
    await breakers_closed(client, sc)


async def test_a_request_that_waits_out_max_wait_gets_a_stale_copy(
    capacity_upstream: Start, sidecar_client: Start, tmp_path: Path
) -> None:
    up, url = await capacity_upstream()
    client, sc = await sidecar_client(
        [url],
        upstreams=(upstream("up0", url, wait=0.2),),
        cache=CacheConfig(dir=str(tmp_path / "cache"), mutable_ttl=0.0),  # stale at once
    )
    first = await client.get("/" + LIST)
    assert first.status == 200 and await first.read() == b"v1.0.0\n"
    req = parse_request_path("/" + LIST)
    assert sc.cache is not None
    await until("the list to be cached", lambda: sc.cache.lookup(req, allow_stale=True) is not None)
    held = await hold(client, up)
    resp = await client.get("/" + LIST)
    assert resp.status == 200 and await resp.read() == b"v1.0.0\n"
    assert resp.headers["X-Sidecar-Stale"] == "1"
    assert up.received.count(LIST) == 1  # the second one never reached the upstream
    window = sc.windows["up0"].snapshot()
    assert window.overflows == 1 and window.errors == 0
    # The expired wait is recorded (timers may fire a clock tick early, and the
    # window's histogram reports a bucket's midpoint: within 2 %).
    assert window.queue_wait_p99_ms > 180
    up.let_go.set()
    await held
    await breakers_closed(client, sc)


async def test_a_cancelled_waiter_frees_nothing_it_did_not_hold(
    capacity_upstream: Start, sidecar_client: Start
) -> None:
    up, url = await capacity_upstream()
    client, sc = await sidecar_client([url], upstreams=(upstream("up0", url),))
    gate = sc.upstreams["up0"].admission
    held = await hold(client, up)
    leaver = asyncio.create_task(client.get("/" + LIST))
    await until("a request to queue", lambda: gate.waiting == 1)
    leaver.cancel()  # the client hangs up while queued
    await until("the waiter to leave", lambda: gate.waiting == 0)
    assert gate.in_use == 1  # still the held request's slot, and only that
    stayer = asyncio.create_task(client.get("/" + INFO))
    await until("a new request to queue", lambda: gate.waiting == 1)
    assert up.inflight == 1 and INFO not in up.received  # nothing was freed for it
    up.let_go.set()
    assert (await held).status == 200 and (await stayer).status == 200
    assert up.peak == 1 and LIST not in up.received
    await until("every slot to be released", lambda: gate.in_use == 0)
    assert sc.windows["up0"].snapshot().errors == 0


async def test_ttfb_starts_after_admission(capacity_upstream: Start, sidecar_client: Start) -> None:
    up, url = await capacity_upstream()
    client, sc = await sidecar_client([url], upstreams=(upstream("up0", url),))
    held = await hold(client, up)
    queued = asyncio.create_task(client.get("/" + INFO))
    await until("a request to queue", lambda: sc.upstreams["up0"].waiting == 1)
    await asyncio.sleep(1.0)  # the queued request waits at least this long
    up.let_go.set()
    assert (await held).status == 200 and (await queued).status == 200
    window = sc.windows["up0"].snapshot()
    assert window.queue_wait_p99_ms > 950
    # p50 of two TTFBs is the smaller: the queued request's, which an instant
    # upstream answers long before a second has passed.
    assert window.ttfb_p50_ms < 1000
