"""Integrity: what is on disk is what was fetched, or it is not served.

Covers a flipped byte (caught by the first-serve hash after a restart), a
truncated or vanished blob (caught by the size/open guard on every hit), the
start-up sweep of leftovers, and a real sidecar process killed with SIGKILL
in the middle of a transfer.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp

from sidecar.cache.layout import Layout, Record, new_blob_id, write_atomic
from tests.functional.test_cache_support import (
    MOD,
    ZIP,
    all_blobs,
    blob_of,
    cache_config,
    keys_on_disk,
    metric,
    record_of,
    settled,
    temp_files,
    wait_for,
)
from tests.upstream import Reply, wait_healthy

FAILURES = "goproxy_sidecar_cache_integrity_failures_total"


async def start(sidecar_client, urls, tmp_path):
    client, sc = await sidecar_client(urls, run_control=False, cache=cache_config(tmp_path))
    await sc.cache.wait_loaded()
    return client, sc


async def test_flipped_byte_is_caught_evicted_and_fetched_again(
    fake_upstreams, sidecar_client, tmp_path
):
    [(up, url)] = await fake_upstreams(1)
    body = os.urandom(1024 * 1024 + 3)
    up.set(ZIP, body)
    client, sc = await start(sidecar_client, [url], tmp_path)
    assert await (await client.get("/" + ZIP)).read() == body
    await settled(sc, 1)
    await client.close()  # a restart: nothing on disk is verified any more

    blob = blob_of(tmp_path / "cache", ZIP)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))

    client, sc = await start(sidecar_client, [url], tmp_path)
    assert sc.cache.summary()["entries"] == 1
    resp = await client.get("/" + ZIP)
    assert resp.status == 200 and await resp.read() == body  # the client gets correct bytes
    assert resp.headers["X-Sidecar-Upstream"] == "up0"
    assert metric(sc, FAILURES) == 1
    assert up.received == [ZIP, ZIP]
    await settled(sc, 1)
    await wait_for(lambda: not blob.exists(), what="the corrupt blob to be removed")
    hit = await client.get("/" + ZIP)
    assert hit.headers["X-Sidecar-Upstream"] == "cache" and await hit.read() == body


async def test_intact_entry_is_hashed_once_after_a_restart(
    fake_upstreams, sidecar_client, tmp_path
):
    [(up, url)] = await fake_upstreams(1)
    up.set(MOD, b"module m\n")
    client, sc = await start(sidecar_client, [url], tmp_path)
    await (await client.get("/" + MOD)).read()
    await settled(sc, 1)
    await client.close()
    client, sc = await start(sidecar_client, [url], tmp_path)
    results = await asyncio.gather(*(client.get("/" + MOD) for _ in range(5)))
    for resp in results:
        assert resp.headers["X-Sidecar-Upstream"] == "cache"
        assert await resp.read() == b"module m\n"
    assert up.received == [MOD] and metric(sc, FAILURES) == 0


async def test_truncated_blob_of_a_verified_entry_is_not_served_short(
    fake_upstreams, sidecar_client, tmp_path
):
    [(up, url)] = await fake_upstreams(1)
    body = os.urandom(500_000)
    up.set(ZIP, body)
    client, sc = await start(sidecar_client, [url], tmp_path)
    await (await client.get("/" + ZIP)).read()
    await settled(sc, 1)
    blob = blob_of(tmp_path / "cache", ZIP)
    with open(blob, "r+b") as f:
        f.truncate(1000)
    resp = await client.get("/" + ZIP)
    assert resp.status == 200 and await resp.read() == body
    assert resp.headers["X-Sidecar-Upstream"] == "up0"
    assert metric(sc, FAILURES) == 1
    await settled(sc, 1)


async def test_vanished_blob_is_fetched_again_not_a_404(fake_upstreams, sidecar_client, tmp_path):
    [(up, url)] = await fake_upstreams(1)
    body = os.urandom(10_000)  # above the in-memory size: hits read the file
    up.set(ZIP, body)
    client, sc = await start(sidecar_client, [url], tmp_path)
    await (await client.get("/" + ZIP)).read()
    await settled(sc, 1)
    blob_of(tmp_path / "cache", ZIP).unlink()
    resp = await client.get("/" + ZIP)
    assert resp.status == 200 and await resp.read() == body
    assert up.received == [ZIP, ZIP]
    await settled(sc, 1)
    assert (await client.get("/" + ZIP)).headers["X-Sidecar-Upstream"] == "cache"


async def test_start_sweeps_leftovers_and_drops_broken_entries(
    fake_upstreams, sidecar_client, tmp_path
):
    [(up, url)] = await fake_upstreams(1)
    up.set(MOD, b"module m\n")
    client, sc = await start(sidecar_client, [url], tmp_path)
    await (await client.get("/" + MOD)).read()
    await settled(sc, 1)
    await client.close()

    layout = Layout.at(str(tmp_path / "cache"))
    tmp = Path(layout.tmp)
    (tmp / f"{os.getpid()}-{new_blob_id()}.part").write_bytes(b"partial from an earlier life")
    (tmp / f"999999999-{new_blob_id()}.part").write_bytes(b"partial of a dead process")
    (tmp / "garbage").write_bytes(b"?")
    live = tmp / f"1-{new_blob_id()}.part"  # pid 1 is alive: another process's fill
    live.write_bytes(b"in progress elsewhere")
    old_orphan = Path(layout.blob_path(new_blob_id()))
    old_orphan.parent.mkdir(parents=True, exist_ok=True)
    old_orphan.write_bytes(b"blob whose record never landed")
    os.utime(old_orphan, (time.time() - 3600, time.time() - 3600))
    young_orphan = Path(layout.blob_path(new_blob_id()))
    young_orphan.parent.mkdir(parents=True, exist_ok=True)
    young_orphan.write_bytes(b"maybe another process's commit in flight")
    good = record_of(tmp_path / "cache", MOD)
    _plant(layout, "example.com/a/@v/v1.0.0.mod", good, blob=new_blob_id())  # blob missing
    wrong = Path(layout.blob_path(new_blob_id()))
    wrong.parent.mkdir(parents=True, exist_ok=True)
    wrong.write_bytes(b"short")
    _plant(layout, "example.com/b/@v/v1.0.0.mod", good, blob=wrong.name)  # size mismatch
    bad = Path(layout.index) / "example.com/c/@v/v1.0.0.mod"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    elsewhere = Path(layout.index) / "example.com/d/@v/v1.0.0.mod"  # a record under the wrong key
    elsewhere.parent.mkdir(parents=True)
    elsewhere.write_bytes(good.to_json())

    client, sc = await start(sidecar_client, [url], tmp_path)
    assert sc.cache.summary()["entries"] == 1
    assert keys_on_disk(tmp_path / "cache") == [MOD]
    assert temp_files(tmp_path / "cache") == [live.name]
    assert not old_orphan.exists() and young_orphan.exists() and not wrong.exists()
    resp = await client.get("/" + MOD)
    assert resp.headers["X-Sidecar-Upstream"] == "cache"
    assert up.received == [MOD]


def _plant(layout: Layout, key: str, like: Record, blob: str) -> None:
    path = layout.record_path(key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fields = {name: getattr(like, name) for name in Record.__slots__}
    write_atomic(layout, path, Record(**{**fields, "key": key, "blob": blob}).to_json())


# ------------------------------------------------------------------ kill -9


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _spawn(cfg: Path, port: int, log: Path) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "run",
        "--config",
        str(cfg),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=open(log, "ab"),  # noqa: SIM115
        cwd=str(Path(__file__).resolve().parents[2]),
    )
    if await wait_healthy(port, 20):
        return proc
    proc.kill()
    await proc.wait()
    raise AssertionError(f"sidecar did not start: {log.read_text()[-2000:]}")


async def test_kill_9_mid_transfer_leaves_no_partial_entry(fake_upstreams, tmp_path):
    [(up, url)] = await fake_upstreams(1)
    body = os.urandom(8 * 1024 * 1024)
    up.set(ZIP, Reply(body=body, chunk_delay=0.01))  # ~1.3 s to send
    up.set(MOD, b"module m\n")
    port = _free_port()
    cache_dir = tmp_path / "cache"
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(
        f'listen: "127.0.0.1:{port}"\nupstreams:\n  - {{name: athens, url: "{url}"}}\n'
        f'cache: {{dir: "{cache_dir}", max_bytes: 1GiB}}\n'
    )
    log = tmp_path / "sidecar.log"
    proc = await _spawn(cfg, port, log)
    base = f"http://127.0.0.1:{port}/"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(base + MOD) as r:
                assert await r.read() == b"module m\n"
            await wait_for(lambda: keys_on_disk(cache_dir) == [MOD], what="the .mod commit")
            async with session.get(base + ZIP) as r:
                await r.content.readexactly(2 * 1024 * 1024)
                await wait_for(lambda: len(temp_files(cache_dir)) == 1, what="a temp file")
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
                try:
                    await r.read()
                    raise AssertionError("a killed sidecar delivered a whole body")
                except aiohttp.ClientPayloadError:
                    pass
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    assert up.completed <= 1  # the .mod
    leftovers = temp_files(cache_dir)
    assert len(leftovers) == 1 and leftovers[0].endswith(".part")
    assert keys_on_disk(cache_dir) == [MOD]  # no record for the zip: nothing visible
    assert all_blobs(cache_dir) == []  # the .mod is a row of the pack

    proc = await _spawn(cfg, port, log)
    try:
        await wait_for(lambda: temp_files(cache_dir) == [], what="the start-up sweep")
        async with aiohttp.ClientSession() as session:
            async with session.get(base + ZIP) as r:
                assert r.headers["X-Sidecar-Upstream"] == "athens"
                assert await r.read() == body
            await wait_for(lambda: keys_on_disk(cache_dir) == sorted([MOD, ZIP]), 10)
            async with session.get(base + ZIP) as r:
                assert r.headers["X-Sidecar-Upstream"] == "cache"
                assert await r.read() == body
            async with session.get(base + MOD) as r:
                assert r.headers["X-Sidecar-Upstream"] == "cache"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0, log.read_text()[-2000:]
    assert temp_files(cache_dir) == []
