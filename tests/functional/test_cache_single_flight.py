"""Single flight: concurrent clients of one uncached key share one upstream fetch."""

from __future__ import annotations

import asyncio
import os
import time

import aiohttp
import pytest

from sidecar.config import HedgeConfig
from tests.functional import test_cache_support
from tests.functional.test_cache_support import (
    INFO,
    LIST,
    ZIP,
    keys_on_disk,
    metric,
    settled,
    temp_files,
    wait_for,
)
from tests.upstream import Reply

cached_sidecar = test_cache_support.cached_sidecar  # the fixture

JOINS = "goproxy_sidecar_cache_single_flight_joins_total"
REQUESTS = "goproxy_sidecar_requests_total"


async def fetch(client, path: str) -> tuple[int, bytes, str]:
    resp = await client.get("/" + path)
    return resp.status, await resp.read(), resp.headers.get("X-Sidecar-Upstream", "")


async def test_twenty_clients_one_upstream_fetch(fake_upstreams, cached_sidecar, tmp_path):
    [(up, url)] = await fake_upstreams(1)
    body = os.urandom(4 * 1024 * 1024)
    up.set(ZIP, Reply(body=body, delay=0.1, chunk_delay=0.01))
    client, sc = await cached_sidecar([url])
    results = await asyncio.gather(*(fetch(client, ZIP) for _ in range(20)))
    assert all(status == 200 and got == body for status, got, _ in results)
    assert up.received == [ZIP]
    assert metric(sc, JOINS) == 19
    await settled(sc, 1)
    assert keys_on_disk(tmp_path / "cache") == [ZIP] and temp_files(tmp_path / "cache") == []
    assert sc.windows["up0"].snapshot().requests == 1  # one attempt recorded, not twenty


async def test_twenty_clients_of_a_small_answer_share_one_fetch(fake_upstreams, cached_sidecar):
    [(up, url)] = await fake_upstreams(1)
    up.set(INFO, Reply(body=b'{"Version":"v1.0.0"}', delay=0.2))
    client, sc = await cached_sidecar([url])
    results = await asyncio.gather(*(fetch(client, INFO) for _ in range(20)))
    assert results == [(200, b'{"Version":"v1.0.0"}', "up0")] * 20
    assert up.received == [INFO]
    assert metric(sc, JOINS) == 19


async def test_late_joiner_gets_bytes_before_the_fetch_ends(fake_upstreams, cached_sidecar):
    [(up, url)] = await fake_upstreams(1)
    body = os.urandom(4 * 1024 * 1024)
    up.set(ZIP, Reply(body=body, chunk_delay=0.02))  # ~1.3 s for the whole body
    client, sc = await cached_sidecar([url])
    first = await client.get("/" + ZIP)
    head = await first.content.readexactly(1024 * 1024)
    started = time.monotonic()
    late = await client.get("/" + ZIP)
    late_head = await late.content.readexactly(64 * 1024)
    first_byte_s = time.monotonic() - started
    assert up.completed == 0, "the late joiner waited for the end of the fetch"
    assert late_head == body[: 64 * 1024]
    assert late.headers["X-Sidecar-Upstream"] == "up0"
    assert int(late.headers["Content-Length"]) == len(body)
    assert head + await first.read() == body
    assert late_head + await late.read() == body
    assert first_byte_s < 0.5
    assert up.received == [ZIP] and metric(sc, JOINS) == 1


async def test_first_client_hanging_up_does_not_stop_the_others(
    fake_upstreams, cached_sidecar, tmp_path
):
    [(up, url)] = await fake_upstreams(1)
    body = os.urandom(3 * 1024 * 1024)
    up.set(ZIP, Reply(body=body, chunk_delay=0.01))
    client, sc = await cached_sidecar([url])
    leader = await client.get("/" + ZIP)
    await leader.content.readexactly(64 * 1024)
    follower = asyncio.ensure_future(fetch(client, ZIP))
    await wait_for(lambda: metric(sc, JOINS) == 1)
    leader.close()
    status, got, _ = await follower
    assert status == 200 and got == body
    await wait_for(lambda: up.completed == 1, what="the upstream to finish sending")
    assert up.cancelled == 0
    await settled(sc, 1)
    assert keys_on_disk(tmp_path / "cache") == [ZIP]


async def test_fetch_goes_on_and_is_kept_when_every_client_left(
    fake_upstreams, cached_sidecar, tmp_path
):
    [(up, url)] = await fake_upstreams(1)
    body = os.urandom(8 * 1024 * 1024)
    up.set(ZIP, Reply(body=body, chunk_delay=0.005))
    client, sc = await cached_sidecar([url])
    responses = [await client.get("/" + ZIP) for _ in range(3)]
    for resp in responses:
        await resp.content.readexactly(64 * 1024)
    assert up.received == [ZIP]
    for resp in responses:
        resp.close()
    await wait_for(lambda: up.completed == 1, 20, "the upstream to finish sending")
    await settled(sc, 1)
    assert up.cancelled == 0 and keys_on_disk(tmp_path / "cache") == [ZIP]
    aborts = {"upstream": "up0", "kind": "zip", "outcome": "client_abort"}
    await wait_for(lambda: metric(sc, REQUESTS, **aborts) == 3)
    assert sc.windows["up0"].snapshot().requests == 1  # the fetch, once, and fine
    assert sc.windows["up0"].snapshot().errors == 0
    again = await client.get("/" + ZIP)
    assert await again.read() == body and again.headers["X-Sidecar-Upstream"] == "cache"
    assert up.received == [ZIP] and temp_files(tmp_path / "cache") == []


async def test_failed_fetch_cuts_every_client_that_had_headers(
    fake_upstreams, cached_sidecar, tmp_path
):
    [(up, url)] = await fake_upstreams(1)
    up.set(
        ZIP, Reply(body=b"z" * (4 * 1024 * 1024), truncate_at=2 * 1024 * 1024, chunk_delay=0.005)
    )
    client, sc = await cached_sidecar([url])

    async def one() -> str:
        resp = await client.get("/" + ZIP)
        assert resp.status == 200
        try:
            data = await resp.read()
        except aiohttp.ClientPayloadError:
            return "cut"
        return f"complete {len(data)} bytes"  # must never happen

    outcomes = await asyncio.gather(*(one() for _ in range(5)))
    assert outcomes == ["cut"] * 5
    assert up.received == [ZIP]
    await asyncio.sleep(0.05)
    assert temp_files(tmp_path / "cache") == [] and keys_on_disk(tmp_path / "cache") == []
    assert sc.windows["up0"].snapshot().errors == 1  # one failure, however many readers
    up.set(ZIP, b"whole")
    assert await fetch(client, ZIP) == (200, b"whole", "up0")  # the key is free again


async def test_small_truncated_answer_falls_through_once_for_every_joiner(
    fake_upstreams, cached_sidecar
):
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    a.set(INFO, Reply(body=b"x" * 1000, truncate_at=100, delay=0.2))
    b.set(INFO, b'{"Version":"v1.0.0"}')
    # Not hedged: the primary's 0.2 s would race a hedge to the backup.
    client, sc = await cached_sidecar([url_a, url_b], hedge=HedgeConfig(enabled=False))
    results = await asyncio.gather(*(fetch(client, INFO) for _ in range(5)))
    assert results == [(200, b'{"Version":"v1.0.0"}', "up1")] * 5
    assert metric(sc, JOINS) == 4
    # a small body is read whole before anyone is answered: the leader met the
    # broken primary, moved on, and every joiner got the backup's bytes
    assert len(a.received) == 1 and len(b.received) == 1
    await settled(sc, 1)


async def test_joiners_walk_by_themselves_when_the_leader_gets_nothing(
    fake_upstreams, cached_sidecar
):
    [(a, url_a)] = await fake_upstreams(1)
    a.set(INFO, Reply(status=500, body=b"boom", delay=0.2))
    client, sc = await cached_sidecar([url_a])
    results = await asyncio.gather(*(fetch(client, INFO) for _ in range(5)))
    assert [status for status, _body, _src in results] == [502] * 5
    assert metric(sc, JOINS) == 4
    assert len(a.received) == 5  # each joiner tried the chain itself
    assert sc.cache.summary()["entries"] == 0


async def test_pending_joiners_share_a_404(fake_upstreams, cached_sidecar):
    [(up, url)] = await fake_upstreams(1)
    up.set(LIST, Reply(status=404, body=b"not found: no such module", delay=0.2))
    client, sc = await cached_sidecar([url])
    results = await asyncio.gather(*(client.get("/" + LIST) for _ in range(10)))
    assert [r.status for r in results] == [404] * 10
    assert all(["no such module" in await r.text() for r in results])
    assert up.received == [LIST]
    assert sc.cache.summary()["entries"] == 0  # shared, never stored


@pytest.mark.parametrize("n", [2, 20])
async def test_concurrent_stale_if_error_joiners_all_get_an_answer(
    fake_upstreams, cached_sidecar, n
):
    [(up, url)] = await fake_upstreams(1)
    up.set(LIST, b"v1.0.0\n")
    client, sc = await cached_sidecar([url], cache_kw={"mutable_ttl": 0.05})
    await fetch(client, LIST)
    await settled(sc, 1)
    await asyncio.sleep(0.1)
    up.set(LIST, Reply(status=500, delay=0.1))
    results = await asyncio.gather(*(fetch(client, LIST) for _ in range(n)))
    assert results == [(200, b"v1.0.0\n", "cache")] * n
