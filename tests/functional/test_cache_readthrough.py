"""Read-through caching against real loopback upstreams: hits, misses, TTL, stale serving."""

from __future__ import annotations

import asyncio
import os

import aiohttp
import pytest

from sidecar.breaker.state import Action, Decision
from tests.functional import test_cache_support
from tests.functional.test_cache_support import (
    BRANCH_INFO,
    INFO,
    LATEST,
    LIST,
    MOD,
    ZIP,
    all_blobs,
    keys_on_disk,
    metric,
    record_of,
    settled,
    temp_files,
    wait_for,
)
from tests.upstream import Reply

cached_sidecar = test_cache_support.cached_sidecar  # the fixture

IMMUTABLE = [
    (MOD, b"module github.com/Azure/go-autorest\n", "text/plain; charset=utf-8"),
    (INFO, b'{"Version":"v1.0.0","Time":"2020-01-01T00:00:00Z"}', "application/json"),
    (ZIP, os.urandom(3 * 1024 * 1024 + 17), "application/zip"),
    ("sumdb/sum.golang.org/tile/8/0/001", os.urandom(8192), "application/octet-stream"),
]


@pytest.mark.parametrize(("path", "body", "ctype"), IMMUTABLE, ids=["mod", "info", "zip", "tile"])
async def test_immutable_artifact_is_fetched_once_then_served_from_disk(
    fake_upstreams, cached_sidecar, tmp_path, path, body, ctype
):
    [(up, url)] = await fake_upstreams(1)
    up.set(path, Reply(body=body, headers={"Content-Type": ctype}))
    client, sc = await cached_sidecar([url])
    first = await client.get("/" + path)
    assert first.status == 200 and await first.read() == body
    assert first.headers["X-Sidecar-Upstream"] == "up0"
    await settled(sc, 1)
    for _ in range(3):
        hit = await client.get("/" + path)
        assert hit.status == 200 and await hit.read() == body
        assert hit.headers["X-Sidecar-Upstream"] == "cache"
        assert hit.headers["Content-Type"].startswith(ctype.split(";")[0])
        assert int(hit.headers["Age"]) >= 0
        assert "X-Sidecar-Stale" not in hit.headers
    assert up.received == [path]
    assert metric(sc, "goproxy_sidecar_cache_misses_total", kind=_kind(path)) == 1
    await wait_for(lambda: metric(sc, "goproxy_sidecar_cache_hits_total", kind=_kind(path)) == 3)
    assert metric(sc, "goproxy_sidecar_cache_entries") == 1
    assert metric(sc, "goproxy_sidecar_cache_bytes") == len(body)
    assert keys_on_disk(tmp_path / "cache") == [path]
    assert record_of(tmp_path / "cache", path).size == len(body)
    assert temp_files(tmp_path / "cache") == []


def _kind(path: str) -> str:
    return "sumdb-tile" if "/tile/" in path else path.rsplit(".", 1)[-1]


async def test_head_is_answered_from_the_cache(fake_upstreams, cached_sidecar):
    [(up, url)] = await fake_upstreams(1)
    up.set(ZIP, Reply(body=b"z" * 5000, headers={"Content-Type": "application/zip"}))
    client, sc = await cached_sidecar([url])
    assert await (await client.get("/" + ZIP)).read() == b"z" * 5000
    await settled(sc, 1)
    resp = await client.head("/" + ZIP)
    assert resp.status == 200 and resp.headers["Content-Length"] == "5000"
    assert resp.headers["X-Sidecar-Upstream"] == "cache"
    assert await resp.read() == b""
    assert up.received == [ZIP]


async def test_range_and_conditional_requests_on_a_hit(fake_upstreams, cached_sidecar):
    [(up, url)] = await fake_upstreams(1)
    body = bytes(range(256)) * 40
    up.set(ZIP, body)
    client, sc = await cached_sidecar([url])
    await (await client.get("/" + ZIP)).read()
    await settled(sc, 1)
    part = await client.get("/" + ZIP, headers={"Range": "bytes=10-19"})
    assert part.status == 206 and await part.read() == body[10:20]
    assert part.headers["Content-Range"] == f"bytes 10-19/{len(body)}"
    whole = await client.get("/" + ZIP, headers={"Range": "bytes=0-1", "If-Range": '"x"'})
    assert whole.status == 200 and await whole.read() == body  # no validators: whole
    past = await client.get("/" + ZIP, headers={"Range": f"bytes={len(body)}-"})
    assert past.status == 416 and past.headers["Content-Range"] == f"bytes */{len(body)}"
    assert up.received == [ZIP]


async def test_ranges_on_a_hit_held_in_memory(fake_upstreams, cached_sidecar):
    [(up, url)] = await fake_upstreams(1)
    body = b'{"Version":"v1.0.0","Time":"2020-01-01T00:00:00Z"}'
    up.set(INFO, body)
    client, sc = await cached_sidecar([url])
    await (await client.get("/" + INFO)).read()
    await settled(sc, 1)
    await (await client.get("/" + INFO)).read()  # verified and held from here
    tail = await client.get("/" + INFO, headers={"Range": "bytes=-5"})
    assert tail.status == 206 and await tail.read() == body[-5:]
    past = await client.get("/" + INFO, headers={"Range": "bytes=999-"})
    assert past.status == 416 and await past.read() == b""
    head = await client.head("/" + INFO, headers={"Range": "bytes=0-3"})
    assert head.status == 200 and head.headers["Content-Length"] == str(len(body))
    assert up.received == [INFO]


async def test_404_and_failures_are_never_cached(fake_upstreams, cached_sidecar, tmp_path):
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    a.set(INFO, Reply(status=500))
    client, sc = await cached_sidecar([url_a, url_b])
    for _ in range(2):
        resp = await client.get("/" + INFO)
        assert resp.status == 404
    assert b.received == [INFO, INFO]  # asked again: a 404 is not stored
    assert keys_on_disk(tmp_path / "cache") == []
    assert sc.cache.summary() == {"entries": 0, "bytes": 0}


async def test_truncated_body_is_never_cached(fake_upstreams, cached_sidecar, tmp_path):
    [(up, url)] = await fake_upstreams(1)
    up.set(ZIP, Reply(body=b"z" * (2 * 1024 * 1024), truncate_at=1024 * 1024))
    client, sc = await cached_sidecar([url])
    resp = await client.get("/" + ZIP)
    assert resp.status == 200  # headers went out before the cut
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    await asyncio.sleep(0.1)
    assert keys_on_disk(tmp_path / "cache") == [] and temp_files(tmp_path / "cache") == []
    assert all_blobs(tmp_path / "cache") == []
    assert sc.windows["up0"].snapshot().errors == 1
    up.set(ZIP, b"good")
    resp = await client.get("/" + ZIP)
    assert await resp.read() == b"good"  # fetched again, not served short from disk
    await settled(sc, 1)


async def test_small_truncated_body_falls_through_and_the_good_one_is_cached(
    fake_upstreams, cached_sidecar, tmp_path
):
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    a.set(INFO, Reply(body=b"x" * 1000, truncate_at=100))
    b.set(INFO, b'{"Version":"v1.0.0"}')
    client, sc = await cached_sidecar([url_a, url_b])
    resp = await client.get("/" + INFO)
    assert resp.status == 200 and await resp.read() == b'{"Version":"v1.0.0"}'
    await settled(sc, 1)
    assert record_of(tmp_path / "cache", INFO).upstream == "up1"
    assert sc.windows["up0"].snapshot().errors == 1
    assert (await client.get("/" + INFO)).headers["X-Sidecar-Upstream"] == "cache"


async def test_entry_larger_than_the_cache_is_served_but_not_kept(
    fake_upstreams, cached_sidecar, tmp_path
):
    [(up, url)] = await fake_upstreams(1)
    body = os.urandom(300_000)
    up.set(ZIP, body)
    client, sc = await cached_sidecar([url], cache_kw={"max_bytes": 100_000})
    assert await (await client.get("/" + ZIP)).read() == body  # announced too large
    await asyncio.sleep(0.05)
    assert sc.cache.summary()["entries"] == 0
    assert temp_files(tmp_path / "cache") == []
    assert metric(sc, "goproxy_sidecar_cache_write_errors_total") == 0


async def test_a_client_hanging_up_alone_does_not_stop_the_fetch(
    fake_upstreams, cached_sidecar, tmp_path
):
    [(a, url)] = await fake_upstreams(1)
    a.set(ZIP, Reply(body=b"z" * (8 * 1024 * 1024), chunk_delay=0.005))
    client, sc = await cached_sidecar([url])
    resp = await client.get("/" + ZIP)
    await resp.content.read(64 * 1024)
    resp.close()
    await wait_for(lambda: a.completed == 1, 20, "the upstream to finish sending")
    await settled(sc, 1)
    assert a.cancelled == 0 and keys_on_disk(tmp_path / "cache") == [ZIP]
    assert sc.windows["up0"].snapshot().errors == 0  # a hang-up is no upstream failure
    requests = "goproxy_sidecar_requests_total"
    assert metric(sc, requests, upstream="up0", kind="zip", outcome="client_abort") == 1
    assert temp_files(tmp_path / "cache") == []


# ------------------------------------------------------------------ mutable entries

MUTABLE = [
    (LIST, b"v1.0.0\nv1.1.0\n"),
    (LATEST, b'{"Version":"v1.1.0"}'),
    (BRANCH_INFO, b'{"Version":"v1.1.1-0.20200101000000-abcdefabcdef"}'),
    ("sumdb/sum.golang.org/lookup/golang.org/x/text@v0.3.0", b"123\ngolang.org/x/text h1:x\n"),
    ("sumdb/sum.golang.org/latest", b"go.sum database tree\n123\n"),
]


@pytest.mark.parametrize(("path", "body"), MUTABLE, ids=[m[0][-20:] for m in MUTABLE])
async def test_mutable_answer_is_fresh_for_the_ttl_then_asked_again(
    fake_upstreams, cached_sidecar, path, body
):
    [(up, url)] = await fake_upstreams(1)
    up.set(path, body)
    client, sc = await cached_sidecar([url], cache_kw={"mutable_ttl": 0.3})
    assert await (await client.get("/" + path)).read() == body
    await settled(sc, 1)
    fresh = await client.get("/" + path)
    assert fresh.headers["X-Sidecar-Upstream"] == "cache" and await fresh.read() == body
    assert up.received == [path]
    await asyncio.sleep(0.35)
    up.set(path, body + b"new\n")
    after = await client.get("/" + path)
    assert after.headers["X-Sidecar-Upstream"] == "up0"
    assert await after.read() == body + b"new\n"
    assert up.received == [path, path]
    await asyncio.sleep(0.05)
    again = await client.get("/" + path)  # the refreshed copy replaced the old one
    assert again.headers["X-Sidecar-Upstream"] == "cache" and await again.read() == body + b"new\n"
    assert sc.cache.summary()["entries"] == 1


async def test_stale_copy_is_served_when_no_upstream_answers(
    fake_upstreams, cached_sidecar, tmp_path
):
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    a.set(LIST, b"v1.0.0\n")
    client, sc = await cached_sidecar([url_a, url_b], cache_kw={"mutable_ttl": 0.1})
    assert await (await client.get("/" + LIST)).read() == b"v1.0.0\n"
    await settled(sc, 1)
    await asyncio.sleep(0.15)
    a.set(LIST, Reply(status=502))
    b.set(LIST, Reply(reset=True))
    resp = await client.get("/" + LIST)
    assert resp.status == 200 and await resp.read() == b"v1.0.0\n"
    assert resp.headers["X-Sidecar-Upstream"] == "cache"
    assert resp.headers["X-Sidecar-Stale"] == "1"
    assert resp.headers["Warning"].startswith("110")
    assert int(resp.headers["Age"]) >= 0
    await wait_for(
        lambda: (
            metric(
                sc, "goproxy_sidecar_requests_total", upstream="cache", kind="list", outcome="stale"
            )
            == 1
        )
    )
    assert metric(sc, "goproxy_sidecar_cache_stale_serves_total", kind="list") == 1


async def test_no_stale_copy_when_upstreams_answer_404(fake_upstreams, cached_sidecar):
    [(a, url)] = await fake_upstreams(1)
    a.set(LIST, b"v1.0.0\n")
    client, sc = await cached_sidecar([url], cache_kw={"mutable_ttl": 0.1})
    await (await client.get("/" + LIST)).read()
    await settled(sc, 1)
    await asyncio.sleep(0.15)
    del a.routes[LIST]
    resp = await client.get("/" + LIST)
    assert resp.status == 404  # a valid answer: the module is gone, do not resurrect it


async def test_breaker_cache_action_serves_the_cache_and_spares_the_upstream(
    fake_upstreams, cached_sidecar
):
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    a.set(LIST, b"v1.0.0\n")
    a.set(MOD, b"module m\n")
    b.set(INFO, b"{}")
    client, sc = await cached_sidecar([url_a, url_b], cache_kw={"mutable_ttl": 0.1})
    await (await client.get("/" + LIST)).read()
    await (await client.get("/" + MOD)).read()
    await settled(sc, 2)
    await asyncio.sleep(0.15)
    sc.breakers["up0"].apply(Decision(Action.CACHE, "error rate 12% > 5%"), 60.0, 1)
    sc.swap_plan()
    seen = len(a.received)
    stale = await client.get("/" + LIST)
    assert await stale.read() == b"v1.0.0\n" and stale.headers["X-Sidecar-Stale"] == "1"
    hit = await client.get("/" + MOD)
    assert hit.headers["X-Sidecar-Upstream"] == "cache" and "X-Sidecar-Stale" not in hit.headers
    miss = await client.get("/" + INFO)  # not cached: goes on to the next upstream
    assert miss.status == 200 and miss.headers["X-Sidecar-Upstream"] == "up1"
    assert len(a.received) == seen
