"""Bounds and bad disks: LRU eviction to cache.max_bytes, and write errors that
turn into "proxy without caching" instead of failed requests."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from sidecar.cache.layout import Layout
from tests.functional.test_cache_support import (
    ZIP,
    cache_config,
    keys_on_disk,
    metric,
    settled,
    temp_files,
    wait_for,
)
from tests.tools import missing
from tests.upstream import Reply

EVICTIONS = "goproxy_sidecar_cache_evictions_total"
WRITE_ERRORS = "goproxy_sidecar_cache_write_errors_total"


def mod(name: str) -> str:
    return f"example.com/{name}/@v/v1.0.0.mod"


async def start(sidecar_client, urls, cache):
    client, sc = await sidecar_client(urls, run_control=False, cache=cache)
    await sc.cache.wait_loaded()
    return client, sc


async def get(client, path: str) -> tuple[bytes, str]:
    resp = await client.get("/" + path)
    assert resp.status == 200, (path, resp.status)
    return await resp.read(), resp.headers["X-Sidecar-Upstream"]


async def test_lru_eviction_order_and_bound(fake_upstreams, sidecar_client, tmp_path):
    [(up, url)] = await fake_upstreams(1)
    for name in "abcdef":
        up.set(mod(name), name.encode() * 1000)
    client, sc = await start(sidecar_client, [url], cache_config(tmp_path, max_bytes=3000))
    for name in "abc":
        await get(client, mod(name))
        await settled(sc, "abc".index(name) + 1)
    assert await get(client, mod("a")) == (b"a" * 1000, "cache")  # a is now the newest
    await get(client, mod("d"))  # over the bound: b is the least recently used
    await wait_for(lambda: metric(sc, EVICTIONS) == 1)
    assert sc.cache.summary() == {"entries": 3, "bytes": 3000}
    await wait_for(lambda: keys_on_disk(tmp_path / "cache") == sorted(map(mod, "acd")))
    await get(client, mod("e"))  # next out: c
    await wait_for(lambda: metric(sc, EVICTIONS) == 2)
    await wait_for(lambda: keys_on_disk(tmp_path / "cache") == sorted(map(mod, "ade")))
    assert (await get(client, mod("b")))[1] == "up0"  # evicted means fetched again
    await wait_for(lambda: metric(sc, EVICTIONS) == 3)
    assert sc.cache.summary()["bytes"] <= 3000
    assert metric(sc, "goproxy_sidecar_cache_bytes") <= 3000
    assert metric(sc, "goproxy_sidecar_cache_entries") == 3


async def test_lru_order_survives_a_restart(fake_upstreams, sidecar_client, tmp_path):
    [(up, url)] = await fake_upstreams(1)
    for name in "abcd":
        up.set(mod(name), name.encode() * 1000)
    cache = cache_config(tmp_path, max_bytes=3000)
    client, sc = await start(sidecar_client, [url], cache)
    for i, name in enumerate("abc"):
        await get(client, mod(name))
        await settled(sc, i + 1)
        await asyncio.sleep(0.01)
    await get(client, mod("a"))
    await client.close()  # access times are persisted on the way out
    client, sc = await start(sidecar_client, [url], cache)
    await get(client, mod("d"))
    await wait_for(lambda: metric(sc, EVICTIONS) == 1)
    await wait_for(lambda: keys_on_disk(tmp_path / "cache") == sorted(map(mod, "acd")))


async def test_bound_holds_under_many_fills(fake_upstreams, sidecar_client, tmp_path):
    [(up, url)] = await fake_upstreams(1)
    sizes = [37_000, 120_000, 5_000, 260_000, 90_000, 1, 300_000, 44_444] * 3
    for i, size in enumerate(sizes):
        up.set(mod(f"m{i}"), os.urandom(size))
    client, sc = await start(sidecar_client, [url], cache_config(tmp_path, max_bytes=400_000))
    await asyncio.gather(*(get(client, mod(f"m{i}")) for i in range(len(sizes))))
    # every body is committed (commits land after the replies), then evicted or kept
    await wait_for(
        lambda: (
            sc.cache.summary()["entries"] + metric(sc, EVICTIONS) == len(sizes)
            and sc.cache.summary()["bytes"] <= 400_000
        ),
        what="commits and eviction",
    )
    blobs = Path(Layout.at(str(tmp_path / "cache")).blobs)
    await wait_for(
        lambda: sum(p.stat().st_size for p in blobs.rglob("*") if p.is_file()) <= 400_000,
        what="evicted blobs to be deleted",
    )
    assert metric(sc, EVICTIONS) > 0
    await wait_for(
        lambda: sc.cache.summary()["entries"] == len(keys_on_disk(tmp_path / "cache")),
        what="evicted records to be deleted",
    )


# ------------------------------------------------------------------ write errors


@pytest.fixture
def small_fs(tmp_path):
    """A real 1 MiB filesystem (tmpfs) to fill up; skipped where mount is not
    allowed on a developer's machine, a failure in CI (it runs as root)."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    if shutil.which("mount") is None:
        missing("no mount(8) here")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        missing(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


async def test_full_disk_proxies_without_caching(fake_upstreams, sidecar_client, small_fs):
    [(up, url)] = await fake_upstreams(1)
    body = os.urandom(3 * 1024 * 1024)
    up.set(ZIP, Reply(body=body, chunk_delay=0.005))
    up.set(mod("small"), b"module small\n")
    client, sc = await start(sidecar_client, [url], cache_config(small_fs, dir=small_fs / "c"))
    results = await asyncio.gather(*(get(client, ZIP) for _ in range(3)))
    assert results == [(body, "up0")] * 3  # every client got every byte
    assert up.received == [ZIP]  # still one fetch for all three
    assert metric(sc, WRITE_ERRORS) == 1
    await wait_for(lambda: temp_files(small_fs / "c") == [], what="the temp file to go")
    assert keys_on_disk(small_fs / "c") == [] and sc.cache.summary()["entries"] == 0
    # the space came back: the next small entry is cached
    assert await get(client, mod("small")) == (b"module small\n", "up0")
    await settled(sc, 1)
    assert await get(client, mod("small")) == (b"module small\n", "cache")


async def test_file_where_the_temp_dir_should_be(fake_upstreams, sidecar_client, tmp_path):
    [(up, url)] = await fake_upstreams(1)
    up.set(ZIP, b"z" * 400_000)
    client, sc = await start(sidecar_client, [url], cache_config(tmp_path))
    tmp = Path(Layout.at(str(tmp_path / "cache")).tmp)
    shutil.rmtree(tmp)
    tmp.write_text("not a directory")
    results = await asyncio.gather(*(get(client, ZIP) for _ in range(3)))
    assert results == [(b"z" * 400_000, "up0")] * 3
    assert up.received == [ZIP]  # single flight still holds, from memory
    assert metric(sc, WRITE_ERRORS) == 1
    assert sc.cache.summary()["entries"] == 0


async def test_file_where_a_record_directory_should_be(fake_upstreams, sidecar_client, tmp_path):
    [(up, url)] = await fake_upstreams(1)
    up.set(ZIP, b"z" * 10_000)
    client, sc = await start(sidecar_client, [url], cache_config(tmp_path))
    (Path(Layout.at(str(tmp_path / "cache")).index) / "github.com").write_text("in the way")
    assert await get(client, ZIP) == (b"z" * 10_000, "up0")
    await wait_for(lambda: metric(sc, WRITE_ERRORS) == 1)
    await wait_for(lambda: temp_files(tmp_path / "cache") == [])
    assert sc.cache.summary()["entries"] == 0


async def test_symlink_out_of_the_cache_is_refused(fake_upstreams, sidecar_client, tmp_path):
    [(up, url)] = await fake_upstreams(1)
    up.set(ZIP, b"z" * 10_000)
    outside = tmp_path / "outside"
    outside.mkdir()
    client, sc = await start(sidecar_client, [url], cache_config(tmp_path))
    (Path(Layout.at(str(tmp_path / "cache")).index) / "github.com").symlink_to(outside)
    assert await get(client, ZIP) == (b"z" * 10_000, "up0")
    await wait_for(lambda: metric(sc, WRITE_ERRORS) == 1)
    assert list(outside.iterdir()) == []  # not even a directory was created out there
    assert sc.cache.summary()["entries"] == 0
