"""Small cached bodies (.info, .mod) are served from memory after their first hit."""

from __future__ import annotations

import os
import sqlite3

from tests.functional import test_cache_support
from tests.functional.test_cache_support import INFO, ZIP, settled
from tests.upstream import Reply

cached_sidecar = test_cache_support.cached_sidecar  # the fixture


async def test_small_hit_is_served_from_memory_once_read(fake_upstreams, cached_sidecar):
    [(up, url)] = await fake_upstreams(1)
    body = b'{"Version":"v1.0.0","Time":"2020-01-01T00:00:00Z"}'
    up.set(INFO, Reply(body=body, headers={"Content-Type": "application/json"}))
    client, sc = await cached_sidecar([url])
    assert await (await client.get("/" + INFO)).read() == body
    await settled(sc, 1)
    assert await (await client.get("/" + INFO)).read() == body  # first hit: read into memory
    [entry] = list(sc.cache._index.lru())
    assert entry.body == body and entry.packed  # 51 bytes: a row of the pack
    with sqlite3.connect(sc.cache.layout.pack) as db:  # only the memory copy can answer now
        db.execute("DELETE FROM entries")
    hit = await client.get("/" + INFO)
    assert hit.status == 200 and await hit.read() == body
    assert hit.headers["X-Sidecar-Upstream"] == "cache"
    assert up.received == [INFO]


async def test_large_hits_stay_on_disk(fake_upstreams, cached_sidecar):
    [(up, url)] = await fake_upstreams(1)
    body = os.urandom(64 * 1024)
    up.set(ZIP, Reply(body=body, headers={"Content-Type": "application/zip"}))
    client, sc = await cached_sidecar([url])
    await (await client.get("/" + ZIP)).read()
    await settled(sc, 1)
    assert await (await client.get("/" + ZIP)).read() == body
    [entry] = list(sc.cache._index.lru())
    assert entry.body is None
