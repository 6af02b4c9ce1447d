"""Small misses: indexed and answered from memory at once, written to disk behind.

Also: a running sidecar sees entries another process purged or warmed.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

from sidecar.cache.layout import Layout
from sidecar.cache.writeback import WriteBehind
from tests.functional.test_cache_cli import (
    AUTOREST_MOD,
    AUTOREST_ZIP,
    GO_SUM,
    TEXT_MOD,
    A,
    cli,
    write_config,
)
from tests.functional.test_cache_support import (
    INFO,
    cache_config,
    keys_on_disk,
    metric,
    settled,
    temp_files,
    wait_for,
)

WRITE_ERRORS = "goproxy_sidecar_cache_write_errors_total"
WRITE_SKIPS = "goproxy_sidecar_cache_write_skips_total"


def info(n: int) -> str:
    return f"example.com/m{n}/@v/v1.0.{n}.info"


async def cache_one_info_then_stop(fake_upstreams, sidecar_client, tmp_path):
    """Cache INFO in a sidecar and stop it (stop() writes the queue): a restart
    then has an entry that is on disk but not yet verified in this process."""
    [(up, url)] = await fake_upstreams(1)
    up.set(INFO, b'{"Version":"v1.0.0"}')
    cache = cache_config(tmp_path)
    client, sc = await sidecar_client([url], run_control=False, cache=cache)
    await sc.cache.wait_loaded()
    await (await client.get("/" + INFO)).read()
    await client.close()
    return up, url, cache


async def test_graceful_stop_writes_every_queued_small_entry(
    fake_upstreams, sidecar_client, tmp_path
):
    [(up, url)] = await fake_upstreams(1)
    for n in range(200):
        up.set(info(n), f'{{"Version":"v1.0.{n}"}}'.encode())
    cache = cache_config(tmp_path)
    client, sc = await sidecar_client([url], run_control=False, cache=cache)
    await sc.cache.wait_loaded()
    statuses = await asyncio.gather(*(client.get("/" + info(n)) for n in range(200)))
    assert [r.status for r in statuses] == [200] * 200
    await client.close()  # no wait for the writer: stop() must finish its queue
    assert keys_on_disk(tmp_path / "cache") == sorted(info(n) for n in range(200))
    assert temp_files(tmp_path / "cache") == []
    # A new process serves them all from disk, the upstream unreachable.
    client, sc = await sidecar_client(["http://127.0.0.1:9"], run_control=False, cache=cache)
    await sc.cache.wait_loaded()
    for n in (0, 99, 199):
        resp = await client.get("/" + info(n))
        assert resp.status == 200 and resp.headers["X-Sidecar-Upstream"] == "cache"
        assert await resp.read() == f'{{"Version":"v1.0.{n}"}}'.encode()


async def test_failed_small_write_is_forgotten_and_leaves_nothing(
    fake_upstreams, sidecar_client, tmp_path
):
    [(up, url)] = await fake_upstreams(1)
    up.set(INFO, b'{"Version":"v1.0.0"}')
    client, sc = await sidecar_client([url], run_control=False, cache=cache_config(tmp_path))
    await sc.cache.wait_loaded()
    Path(Layout.at(str(tmp_path / "cache")).pack).mkdir()  # the pack cannot be opened
    resp = await client.get("/" + INFO)
    assert resp.status == 200 and await resp.read() == b'{"Version":"v1.0.0"}'
    await wait_for(lambda: metric(sc, WRITE_ERRORS) == 1, what="the write error")
    assert sc.cache.summary()["entries"] == 0  # not kept in memory only
    assert keys_on_disk(tmp_path / "cache") == []
    resp = await client.get("/" + INFO)
    assert resp.headers["X-Sidecar-Upstream"] == "up0" and up.received == [INFO, INFO]


async def test_running_sidecar_adopts_what_warm_fetched(fake_upstreams, sidecar_client, tmp_path):
    [(up, url)] = await fake_upstreams(1)
    up.set(f"{A}/@v/v1.0.0.mod", AUTOREST_MOD)
    up.set(f"{A}/@v/v1.0.0.zip", AUTOREST_ZIP)
    up.set("golang.org/x/text/@v/v0.3.0.mod", TEXT_MOD)
    cache_dir = tmp_path / "cache"
    client, sc = await sidecar_client(
        [url], run_control=False, cache=cache_config(tmp_path, dir=cache_dir)
    )
    await sc.cache.wait_loaded()
    go_sum = tmp_path / "go.sum"
    go_sum.write_text(GO_SUM)
    cfg = write_config(tmp_path, [url], cache_dir)
    code, out, _ = await cli("warm", str(go_sum), "--config", str(cfg))
    assert code == 1 and "3 fetched" in out, out  # 1: missing artifacts in GO_SUM
    await wait_for(lambda: sc.cache.summary()["entries"] == 3, what="warmed entries adopted")
    asked = len(up.received)
    resp = await client.get(f"/{A}/@v/v1.0.0.zip")
    assert await resp.read() == AUTOREST_ZIP and resp.headers["X-Sidecar-Upstream"] == "cache"
    assert len(up.received) == asked


async def test_purge_reaches_entries_held_in_memory(fake_upstreams, sidecar_client, tmp_path):
    [(up, url)] = await fake_upstreams(1)
    up.set(INFO, b'{"Version":"v1.0.0"}')
    client, sc = await sidecar_client([url], run_control=False, cache=cache_config(tmp_path))
    await sc.cache.wait_loaded()
    await (await client.get("/" + INFO)).read()
    await settled(sc, 1)
    hit = await client.get("/" + INFO)
    assert hit.headers["X-Sidecar-Upstream"] == "cache"
    cfg = write_config(tmp_path, [url], tmp_path / "cache")
    code, out, _ = await cli("cache", "purge", "github.com/Azure/go-autorest", "--config", str(cfg))
    assert code == 0 and "purged 1 entries" in out
    await wait_for(lambda: sc.cache.summary()["entries"] == 0, what="purge seen")
    resp = await client.get("/" + INFO)
    assert resp.headers["X-Sidecar-Upstream"] == "up0" and up.received == [INFO, INFO]


async def test_a_writer_that_is_behind_skips_caching_and_says_so(
    fake_upstreams, sidecar_client, tmp_path
):
    [(up, url)] = await fake_upstreams(1)
    for n in range(10):
        up.set(info(n), f'{{"Version":"v1.0.{n}"}}'.encode())
    client, sc = await sidecar_client([url], run_control=False, cache=cache_config(tmp_path))
    await sc.cache.wait_loaded()
    await sc.cache._writeback.stop()
    sc.cache._writeback = WriteBehind(
        sc.cache.layout, sc.cache.pack, sc.cache._written, backlog_items=3
    )
    sc.cache._writeback.start()
    # A slow disk: every worker thread busy, so the writer's batch waits.
    loop = asyncio.get_running_loop()
    gate = threading.Event()
    busy = [loop.run_in_executor(None, gate.wait) for _ in range(64)]
    try:
        for n in range(10):
            resp = await client.get("/" + info(n))
            assert resp.status == 200
            assert await resp.read() == f'{{"Version":"v1.0.{n}"}}'.encode()
        assert metric(sc, WRITE_SKIPS) == 7  # 3 held for the disk, 7 served uncached
    finally:
        gate.set()
        await asyncio.gather(*busy)
    await sc.cache.written()
    assert keys_on_disk(tmp_path / "cache") == sorted(info(n) for n in range(3))
    resp = await client.get("/" + info(9))  # asked again: cached this time
    assert resp.headers["X-Sidecar-Upstream"] == "up0"
    await settled(sc, 4)
    assert (await client.get("/" + info(9))).headers["X-Sidecar-Upstream"] == "cache"


async def test_flipped_byte_in_a_packed_row_is_caught_after_a_restart(
    fake_upstreams, sidecar_client, tmp_path
):
    _up, url, cache = await cache_one_info_then_stop(fake_upstreams, sidecar_client, tmp_path)
    with sqlite3.connect(Layout.at(str(tmp_path / "cache")).pack) as db:
        db.execute("UPDATE entries SET body = ?", (b'{"Version":"v6.6.6"}',))
    client, sc = await sidecar_client([url], run_control=False, cache=cache)
    await sc.cache.wait_loaded()
    assert sc.cache.summary()["entries"] == 1
    resp = await client.get("/" + INFO)
    assert (
        await resp.read() == b'{"Version":"v1.0.0"}' and resp.headers["X-Sidecar-Upstream"] == "up0"
    )
    assert metric(sc, "goproxy_sidecar_cache_integrity_failures_total") == 1
    await settled(sc, 1)
    hit = await client.get("/" + INFO)
    assert hit.headers["X-Sidecar-Upstream"] == "cache"
    assert await hit.read() == b'{"Version":"v1.0.0"}'


async def test_an_unreadable_pack_is_set_aside_and_the_cache_starts_empty(
    fake_upstreams, sidecar_client, tmp_path, caplog
):
    [(up, url)] = await fake_upstreams(1)
    up.set(INFO, b'{"Version":"v1.0.0"}')
    layout = Layout.at(str(tmp_path / "cache"))
    Path(layout.base).mkdir(parents=True)
    Path(layout.pack).write_bytes(b"not a database" * 1000)
    client, sc = await sidecar_client([url], run_control=False, cache=cache_config(tmp_path))
    await sc.cache.wait_loaded()
    assert "cache pack unreadable; set aside" in caplog.text
    assert [p.name for p in Path(layout.base).glob("small.db.broken-*")]
    resp = await client.get("/" + INFO)
    assert resp.status == 200 and resp.headers["X-Sidecar-Upstream"] == "up0"
    await settled(sc, 1)
    assert keys_on_disk(tmp_path / "cache") == [INFO]  # a new pack


async def test_a_packed_row_removed_behind_the_sidecars_back_is_fetched_again(
    fake_upstreams, sidecar_client, tmp_path
):
    up, url, cache = await cache_one_info_then_stop(fake_upstreams, sidecar_client, tmp_path)
    client, sc = await sidecar_client([url], run_control=False, cache=cache)
    await sc.cache.wait_loaded()
    assert sc.cache.summary()["entries"] == 1  # loaded, not read yet
    with sqlite3.connect(Layout.at(str(tmp_path / "cache")).pack) as db:
        db.execute("DELETE FROM entries")
    resp = await client.get("/" + INFO)
    assert resp.status == 200 and resp.headers["X-Sidecar-Upstream"] == "up0"
    assert await resp.read() == b'{"Version":"v1.0.0"}'
    assert up.received == [INFO, INFO]
