"""``goproxy-sidecar cache verify --sumdb`` as a real process, against the real Go
checksum database (tests/sumdb/server) reached through a loopback upstream's
``sumdb/<name>/`` path or directly (``verify.url``).

The cache is filled by a sidecar in report mode from a primary that serves a
tampered zip and go.mod of one module (report serves and caches them), and the
genuine bodies of another.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import CacheConfig, VerifyConfig, VerifyMode
from tests.functional import test_integrity as base
from tests.functional.test_cache_support import keys_on_disk, wait_for
from tests.functional.test_integrity import BIG, SMALL, Upstream, artifact, tamper_both
from tests.sumdb import gosumdb
from tests.sumdb.gosumdb import GoSumdb

# The fixtures of test_integrity.py, used by name.
sumdb_server_binary = gosumdb.sumdb_server_binary
database = base.database
serve = base.serve

REPO = Path(__file__).resolve().parents[2]


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=str(REPO),
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def config_file(tmp_path: Path, url: str, cache_dir: Path, verify: str) -> Path:
    cfg = tmp_path / "cli.yaml"
    cfg.write_text(
        f'listen: "127.0.0.1:3001"\nupstreams: [{{name: up0, url: "{url}"}}]\n'
        f'cache: {{dir: "{cache_dir}"}}\nverify: {verify}\n'
    )
    return cfg


# The database, its GOPROXY folder, the cache folder and the keys of the bodies in it.
Filled = tuple[GoSumdb, Path, Path, list[str]]


@pytest.fixture
async def filled_cache(
    database: tuple[GoSumdb, Path],
    serve: Callable[[Upstream], Any],
    sidecar_client: Any,
    tmp_path: Path,
) -> Filled:
    """BIG tampered and SMALL genuine, .mod and .zip of each, in a cache."""
    db, proxy = database
    cache = tmp_path / "cache"
    primary = Upstream(proxy, db, tamper=tamper_both(proxy, *BIG))
    client, sidecar = await sidecar_client(
        [await serve(primary)],
        run_control=False,
        cache=CacheConfig(dir=str(cache)),
        verify=VerifyConfig(mode=VerifyMode.REPORT, key=db.verifier_key),
    )
    await sidecar.cache.wait_loaded()
    keys = [artifact(*m, ext) for m in (BIG, SMALL) for ext in ("zip", "mod")]
    for key in keys:
        assert (await client.get("/" + key)).status == 200
    # The database's answers are cached too: wait for the four bodies, then stop.
    await wait_for(lambda: set(keys) <= set(keys_on_disk(cache)), 30, "the four bodies")
    await sidecar.cache.written()
    await client.close()
    return db, proxy, cache, keys


async def test_cache_verify_sumdb_evicts_mismatches_and_keeps_the_rest(
    filled_cache: Filled, serve: Callable[[Upstream], Any], tmp_path: Path
) -> None:
    db, proxy, cache, _ = filled_cache
    genuine = Upstream(proxy, db)
    cfg = config_file(tmp_path, await serve(genuine), cache, f"{{key: {db.verifier_key!r}}}")

    code, out, err = await cli("cache", "verify", "--sumdb", "--config", str(cfg))
    assert code == 1, out + err
    record = db.modules["@".join(BIG)]
    mismatches = sorted(line for line in out.splitlines() if line.startswith("MISMATCH"))
    assert len(mismatches) == 2, out
    assert mismatches[0].startswith(f"MISMATCH {artifact(*BIG, 'mod')}: ")
    assert record.gomod in mismatches[0] and "(evicted)" in mismatches[0]
    assert mismatches[1].startswith(f"MISMATCH {artifact(*BIG, 'zip')}: ")
    assert record.zip in mismatches[1]
    assert "checked 4 .mod/.zip entries against sumdb.test.localhost: 2 mismatched" in out
    left = keys_on_disk(cache)
    assert artifact(*BIG, "zip") not in left and artifact(*BIG, "mod") not in left
    assert artifact(*SMALL, "zip") in left and artifact(*SMALL, "mod") in left
    assert any(p.startswith(f"sumdb/{db.name}/lookup/") for p in genuine.asked)

    code, out, err = await cli("cache", "verify", "--sumdb", "--config", str(cfg))
    assert code == 0, out + err
    assert "checked 2 .mod/.zip entries against sumdb.test.localhost: 0 mismatched" in out


async def test_cache_verify_sumdb_reports_what_it_cannot_vouch_for_and_skips(
    filled_cache: Filled, serve: Callable[[Upstream], Any], tmp_path: Path
) -> None:
    db, proxy, cache, keys = filled_cache
    nothing = Upstream(proxy, db, sumdb=False)  # 404 to every sumdb/ path
    url = await serve(nothing)
    cfg = config_file(tmp_path, url, cache, f"{{key: {db.verifier_key!r}}}")
    code, out, err = await cli("cache", "verify", "--sumdb", "--config", str(cfg))
    assert code == 1, out + err
    unvouched = [line for line in out.splitlines() if line.startswith("UNVOUCHED")]
    assert len(unvouched) == 4 and "cannot vouch" in unvouched[0], out
    assert "0 mismatched, 4 cannot vouch" in out
    assert set(keys) <= set(keys_on_disk(cache))  # kept: nothing proves them wrong

    # Skipped modules are never looked up: verify.skip and GONOSUMDB.
    nothing.asked.clear()
    skip = f'{{key: {db.verifier_key!r}, skip: ["example.com/big"]}}'
    cfg = config_file(tmp_path, url, cache, skip)
    env = {"PATH": "/usr/bin:/bin", "GONOSUMDB": "example.com/small"}
    code, out, err = await cli("cache", "verify", "--sumdb", "--config", str(cfg), env=env)
    assert code == 0, out + err
    assert "0 cannot vouch, 4 skipped (never looked up)" in out
    assert [p for p in nothing.asked if p.startswith("sumdb/")] == []


async def test_cache_verify_sumdb_through_a_direct_url(
    filled_cache: Filled, serve: Callable[[Upstream], Any], tmp_path: Path
) -> None:
    db, proxy, cache, _ = filled_cache
    nothing = Upstream(proxy, db, sumdb=False)
    verify = f"{{key: {db.verifier_key!r}, url: {db.url!r}}}"
    cfg = config_file(tmp_path, await serve(nothing), cache, verify)
    code, out, err = await cli("cache", "verify", "--sumdb", "--config", str(cfg))
    assert code == 1, out + err
    assert "2 mismatched, 0 cannot vouch" in out
    assert [p for p in nothing.asked if p.startswith("sumdb/")] == []
