"""Integrity: what is on disk is what was fetched, or it is not served.

Covers a flipped byte (caught by the first-serve hash after a restart), a
blob changed after it was served (caught by the identity check of every hit:
rewritten, replaced by rename, truncated, vanished; a touch is re-hashed and
kept), what that check cannot see (a same-size write with the mtime put back,
a pack row changed through SQLite: the scrub finds them), records written
before identities existed, the start-up sweep of leftovers, and a real
sidecar process killed with SIGKILL in the middle of a transfer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from sidecar.cache.layout import (
    HASH_CHUNK,
    RECORD_FIELDS,
    Identity,
    Layout,
    Record,
    new_blob_id,
    write_atomic,
)
from sidecar.cache.scrub import Scrub
from tests.functional.test_cache_support import (
    INFO,
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
SCRUBBED = "goproxy_sidecar_cache_scrub_entries_total"
SCRUB_BYTES = "goproxy_sidecar_cache_scrub_bytes_total"


async def start(sidecar_client, urls, tmp_path, **kw):
    client, sc = await sidecar_client(urls, run_control=False, cache=cache_config(tmp_path, **kw))
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


# ------------------------------------------------------- changed after a serve


async def _served_twice(up, client, sc, body: bytes, entries: int = 1) -> None:
    """Fetched, committed, then served from the cache: verified and trusted."""
    up.set(ZIP, body)
    assert await (await client.get("/" + ZIP)).read() == body
    await settled(sc, entries)
    hit = await client.get("/" + ZIP)
    assert hit.headers["X-Sidecar-Upstream"] == "cache" and await hit.read() == body


async def _trusted_zip(fake_upstreams, sidecar_client, tmp_path, size: int):
    """A sidecar whose cache holds ZIP, ``size`` random bytes served twice:
    (upstream, its url, client, sidecar, body)."""
    [(up, url)] = await fake_upstreams(1)
    body = os.urandom(size)
    client, sc = await start(sidecar_client, [url], tmp_path)
    await _served_twice(up, client, sc, body)
    return up, url, client, sc, body


def _flip_in_place(blob: Path) -> None:
    with open(blob, "r+b") as f:
        f.seek(os.path.getsize(blob) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))


def _flip_and_rename_over(blob: Path) -> None:
    """A corrupt copy with the same size and mtime, renamed over: only the inode differs."""
    st = blob.stat()
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    copy = blob.with_name(blob.name + ".new")
    copy.write_bytes(bytes(data))
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.rename(copy, blob)


@pytest.mark.parametrize("change", [_flip_in_place, _flip_and_rename_over])
async def test_a_blob_changed_after_a_serve_is_never_served(
    fake_upstreams, sidecar_client, tmp_path, change
):
    up, _, client, sc, body = await _trusted_zip(
        fake_upstreams, sidecar_client, tmp_path, 1024 * 1024 + 3
    )
    blob = blob_of(tmp_path / "cache", ZIP)
    change(blob)

    resp = await client.get("/" + ZIP)
    assert resp.status == 200 and await resp.read() == body  # right bytes, fetched again
    assert resp.headers["X-Sidecar-Upstream"] == "up0"
    assert up.received == [ZIP, ZIP] and metric(sc, FAILURES) == 1
    await settled(sc, 1)
    hit = await client.get("/" + ZIP)
    assert hit.headers["X-Sidecar-Upstream"] == "cache" and await hit.read() == body


async def test_a_touched_blob_is_hashed_again_kept_and_its_identity_recorded(
    fake_upstreams, sidecar_client, tmp_path
):
    up, _, client, sc, body = await _trusted_zip(fake_upstreams, sidecar_client, tmp_path, 300_000)
    blob = blob_of(tmp_path / "cache", ZIP)
    os.utime(blob, ns=(1, 1_234_567_890_123))  # a backup restore, a careless touch

    for _ in range(2):
        hit = await client.get("/" + ZIP)
        assert hit.headers["X-Sidecar-Upstream"] == "cache" and await hit.read() == body
    assert up.received == [ZIP] and metric(sc, FAILURES) == 0
    now = Identity.of(blob.stat())
    await wait_for(
        lambda: record_of(tmp_path / "cache", ZIP).identity == now, what="the new identity"
    )


async def test_a_record_without_identity_is_hashed_on_first_serve_then_recorded(
    fake_upstreams, sidecar_client, tmp_path
):
    up, url, client, sc, body = await _trusted_zip(
        fake_upstreams, sidecar_client, tmp_path, 200_000
    )
    await client.close()
    layout = Layout.at(str(tmp_path / "cache"))
    old = record_of(tmp_path / "cache", ZIP)
    raw = json.loads(old.to_json())
    del raw["identity"]  # as the previous version wrote it
    write_atomic(layout, layout.record_path(ZIP), json.dumps(raw).encode())

    client, sc = await start(sidecar_client, [url], tmp_path)
    assert sc.cache.summary()["entries"] == 1
    hit = await client.get("/" + ZIP)
    assert hit.headers["X-Sidecar-Upstream"] == "cache" and await hit.read() == body
    assert up.received == [ZIP]
    await wait_for(
        lambda: record_of(tmp_path / "cache", ZIP).identity == old.identity,
        what="the identity written to the old record",
    )


# ------------------------------------------------------------------ the scrub


async def _scrub_metrics(client) -> dict[str, float]:
    text = await (await client.get("/metrics")).text()
    out = {}
    for line in text.splitlines():
        if line.startswith("goproxy_sidecar_cache_scrub_"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def test_the_scrub_finds_a_same_size_write_with_the_mtime_put_back(
    fake_upstreams, sidecar_client, tmp_path
):
    [(up, url)] = await fake_upstreams(1)
    body = os.urandom(3 * HASH_CHUNK + 5)
    up.set(MOD, b"module m\n")
    client, sc = await start(sidecar_client, [url], tmp_path, scrub_rate=1024**3)
    await (await client.get("/" + MOD)).read()
    await _served_twice(up, client, sc, body, entries=2)
    blob = blob_of(tmp_path / "cache", ZIP)
    before = blob.stat()
    _flip_in_place(blob)
    os.utime(blob, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert Identity.of(blob.stat()) == Identity.of(before)  # invisible to one fstat

    result = await sc.cache.scrub.run_pass()
    assert (result.ok, result.corrupt) == (1, 1)  # the .mod row is fine
    assert sc.cache.summary()["entries"] == 1 and metric(sc, FAILURES) == 1
    scraped = await _scrub_metrics(client)
    assert scraped[f'{SCRUBBED}{{result="corrupt"}}'] == 1
    assert scraped[f'{SCRUBBED}{{result="ok"}}'] == 1
    assert scraped[SCRUB_BYTES] == len(body) + len(b"module m\n")
    assert scraped["goproxy_sidecar_cache_scrub_last_pass_timestamp_seconds"] > 0
    await wait_for(lambda: not blob.exists(), what="the corrupt blob to be removed")

    resp = await client.get("/" + ZIP)
    assert resp.headers["X-Sidecar-Upstream"] == "up0" and await resp.read() == body
    assert up.received == [MOD, ZIP, ZIP]


async def test_the_scrub_finds_a_pack_row_changed_behind_a_copy_in_memory(
    fake_upstreams, sidecar_client, tmp_path
):
    [(up, url)] = await fake_upstreams(1)
    info = b'{"Version":"v1.0.0","Time":"2024-01-01T00:00:00Z"}'
    up.set(INFO, info)
    client, sc = await start(sidecar_client, [url], tmp_path, scrub_rate=1024**3)
    await (await client.get("/" + INFO)).read()
    await settled(sc, 1)
    with sqlite3.connect(Layout.at(str(tmp_path / "cache")).pack) as db:
        db.execute("UPDATE entries SET body = ?", (info.replace(b"v1", b"v6"),))
    db.close()
    hit = await client.get("/" + INFO)  # the copy in memory was hashed when it was kept
    assert hit.headers["X-Sidecar-Upstream"] == "cache" and await hit.read() == info

    result = await sc.cache.scrub.run_pass()
    assert (result.ok, result.corrupt) == (0, 1)
    assert sc.cache.summary()["entries"] == 0 and metric(sc, FAILURES) == 1
    await wait_for(lambda: keys_on_disk(tmp_path / "cache") == [], what="the row to go")
    resp = await client.get("/" + INFO)
    assert resp.headers["X-Sidecar-Upstream"] == "up0" and await resp.read() == info


async def test_the_background_scrub_keeps_its_rate_and_stops_between_two_reads(
    fake_upstreams, sidecar_client, tmp_path
):
    [(up, url)] = await fake_upstreams(1)
    body = os.urandom(4 * HASH_CHUNK)
    client, sc = await start(sidecar_client, [url], tmp_path, scrub_rate=0)
    assert sc.cache.scrub is None  # 0 turns it off
    await _served_twice(up, client, sc, body)
    blob = str(blob_of(tmp_path / "cache", ZIP))

    fast = Scrub(sc.cache, 1024**3, sc.metrics, delay=0)
    task = asyncio.create_task(fast.run())
    await wait_for(lambda: metric(sc, SCRUBBED, result="ok") == 1, what="a first pass")
    assert metric(sc, SCRUB_BYTES) == len(body)
    assert not task.done()  # waiting for the next pass
    task.cancel()

    slow = Scrub(sc.cache, 64 * 1024, sc.metrics, delay=0)  # 1 MiB takes 16 s
    task = asyncio.create_task(slow.run())
    await wait_for(lambda: metric(sc, SCRUB_BYTES) > len(body), what="a first read")
    assert metric(sc, SCRUB_BYTES) == len(body) + HASH_CHUNK  # then it waits its turn
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    assert task.cancelled()
    assert not [fd for fd in os.listdir("/proc/self/fd") if _points_at(fd, blob)]
    hit = await client.get("/" + ZIP)
    assert hit.headers["X-Sidecar-Upstream"] == "cache" and await hit.read() == body


def _points_at(fd: str, path: str) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == path
    except OSError:
        return False


def _plant(layout: Layout, key: str, like: Record, blob: str) -> None:
    path = layout.record_path(key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fields = {name: getattr(like, name) for name in RECORD_FIELDS}
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
        # Checksum verification holds every byte of a zip until it is whole; this
        # test needs a client reading while the body is still arriving.
        "verify: {mode: off}\n"
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
