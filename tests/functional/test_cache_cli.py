"""``goproxy-sidecar cache ls|purge|verify`` and ``warm``, run as real processes."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from sidecar.cache.layout import Layout, Record, new_blob_id, prepare
from sidecar.cache.pack import Pack
from sidecar.sumdb.dirhash import hash_gomod, hash_zip
from tests.functional.test_cache_support import (
    ZIP,
    cache_config,
    keys_on_disk,
    settled,
    temp_files,
    wait_for,
)
from tests.upstream import Reply

A = "github.com/!azure/go-autorest"
KEYS = [
    f"{A}/@v/v1.0.0.zip",
    f"{A}/@v/v1.0.0.mod",
    f"{A}/@v/v1.0.0.info",
    f"{A}/@v/v1.1.0.mod",
    f"{A}/@v/list",
    f"{A}/@latest",
    f"{A}/autorest/@v/v0.1.0.mod",
    f"sumdb/sum.golang.org/lookup/{A}@v1.0.0",
]


async def cli(*args: str, cwd: Path | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=str(cwd or Path(__file__).resolve().parents[2]),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def write_config(tmp_path: Path, urls: list[str], cache_dir: Path) -> Path:
    cfg = tmp_path / "sidecar.yaml"
    ups = "".join(f'  - {{name: up{i}, url: "{u}"}}\n' for i, u in enumerate(urls))
    cfg.write_text(
        f'listen: "127.0.0.1:3001"\nupstreams:\n{ups}'
        f'cache: {{dir: "{cache_dir}", mutable_ttl: 1h}}\n'
    )
    return cfg


async def populate(fake_upstreams, sidecar_client, tmp_path: Path):
    [(up, url)] = await fake_upstreams(1)
    for key in KEYS:
        up.set(key, key.encode() * 10)
    client, sc = await sidecar_client([url], run_control=False, cache=cache_config(tmp_path))
    await sc.cache.wait_loaded()
    for key in KEYS:
        assert (await client.get("/" + key)).status == 200
    await settled(sc, len(KEYS))
    return client, sc, up, url


async def test_ls_lists_entries_with_size_age_kind_and_verification(
    fake_upstreams, sidecar_client, tmp_path
):
    _, _, _, url = await populate(fake_upstreams, sidecar_client, tmp_path)
    cfg = write_config(tmp_path, [url], tmp_path / "cache")
    code, out, err = await cli("cache", "ls", "--config", str(cfg))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["SIZE", "AGE", "KIND", "VERIFIED", "KEY"]
    assert len(lines) == len(KEYS) + 2 and lines[-1].startswith(f"{len(KEYS)} entries")
    zip_line = next(line for line in lines if line.endswith(".zip"))
    assert zip_line.split()[:3] == [f"{len(KEYS[0]) * 10}B", "0s", "zip"]
    assert "list,fresh" in out and "sumdb-lookup,fresh" in out and "ago" in zip_line
    code, out, _ = await cli("cache", "ls", "--json", "--config", str(cfg))
    rows = json.loads(out)
    assert sorted(r["key"] for r in rows) == sorted(KEYS)
    assert all(r["present"] and r["size"] > 0 for r in rows)


async def test_purge_one_version_then_the_whole_module(fake_upstreams, sidecar_client, tmp_path):
    await populate(fake_upstreams, sidecar_client, tmp_path)
    cfg = write_config(tmp_path, ["http://127.0.0.1:9"], tmp_path / "cache")
    code, out, err = await cli(
        "cache", "purge", "github.com/Azure/go-autorest@v1.0.0", "--config", str(cfg)
    )
    assert code == 0, err
    assert "purged 4 entries" in out
    assert keys_on_disk(tmp_path / "cache") == sorted(
        [f"{A}/@v/v1.1.0.mod", f"{A}/@v/list", f"{A}/@latest", f"{A}/autorest/@v/v0.1.0.mod"]
    )
    code, out, _ = await cli("cache", "purge", "github.com/Azure/go-autorest", "--config", str(cfg))
    assert code == 0 and "purged 3 entries" in out
    assert keys_on_disk(tmp_path / "cache") == [f"{A}/autorest/@v/v0.1.0.mod"]  # another module
    code, _, err = await cli("cache", "purge", "../../etc", "--config", str(cfg))
    assert code == 2 and "malformed module path" in err


async def test_purge_while_the_sidecar_runs_means_fetch_again(
    fake_upstreams, sidecar_client, tmp_path
):
    client, sc, _up, url = await populate(fake_upstreams, sidecar_client, tmp_path)
    cfg = write_config(tmp_path, [url], tmp_path / "cache")
    assert (
        await cli("cache", "purge", "github.com/Azure/go-autorest@v1.0.0", "--config", str(cfg))
    )[0] == 0
    # The running sidecar re-reads the index within about a second, so even
    # entries it holds in memory are fetched again.
    await wait_for(lambda: sc.cache.summary()["entries"] == len(KEYS) - 4, what="purge seen")
    resp = await client.get("/" + KEYS[0])
    assert resp.status == 200 and resp.headers["X-Sidecar-Upstream"] == "up0"
    assert await resp.read() == KEYS[0].encode() * 10


async def test_verify_reports_and_evicts_mismatches(fake_upstreams, sidecar_client, tmp_path):
    await populate(fake_upstreams, sidecar_client, tmp_path)
    cfg = write_config(tmp_path, ["http://127.0.0.1:9"], tmp_path / "cache")
    code, out, _ = await cli("cache", "verify", "--config", str(cfg))
    assert code == 0 and f"verified {len(KEYS)} entries" in out and "0 bad" in out
    # Every entry here is small (a row of the pack): flip a byte of one row.
    pack = Layout.at(str(tmp_path / "cache")).pack
    with sqlite3.connect(pack) as db:
        [(body,)] = db.execute("SELECT body FROM entries WHERE key = ?", (KEYS[0],))
        flipped = bytes([body[0] ^ 0xFF]) + body[1:]
        db.execute("UPDATE entries SET body = ? WHERE key = ?", (flipped, KEYS[0]))
    code, out, _ = await cli("cache", "verify", "--config", str(cfg))
    assert code == 1
    assert f"MISMATCH {KEYS[0]}" in out and "1 bad" in out
    assert KEYS[0] not in keys_on_disk(tmp_path / "cache")
    assert (await cli("cache", "verify", "--config", str(cfg)))[0] == 0


def module_zip(prefix: str, files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(f"{prefix}/{name}", data)
    return out.getvalue()


AUTOREST_ZIP = module_zip(
    "github.com/!azure/go-autorest@v1.0.0", {"go.mod": b"module x\n", "noise": os.urandom(300_000)}
)
AUTOREST_MOD = b"module github.com/Azure/go-autorest\n"
TEXT_MOD = b"module golang.org/x/text\n"
# go.sum lines carry the real h1: of what the upstreams serve: warm checks them.
GO_SUM = f"""\
github.com/Azure/go-autorest v1.0.0 {hash_zip(io.BytesIO(AUTOREST_ZIP))}
github.com/Azure/go-autorest v1.0.0/go.mod {hash_gomod(AUTOREST_MOD)}
golang.org/x/text v0.3.0/go.mod {hash_gomod(TEXT_MOD)}
example.com/missing v0.1.0 h1:dddd=

this line is not go.sum
"""


async def test_warm_prefetches_a_go_sum_through_the_chain(fake_upstreams, tmp_path):
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    a.set(f"{A}/@v/v1.0.0.zip", Reply(status=500))  # failure: falls through
    a.set(f"{A}/@v/v1.0.0.mod", AUTOREST_MOD)
    b.set(f"{A}/@v/v1.0.0.zip", AUTOREST_ZIP)
    b.set(f"{A}/@v/v1.0.0.info", b'{"Version":"v1.0.0"}')
    b.set("golang.org/x/text/@v/v0.3.0.mod", TEXT_MOD)
    go_sum = tmp_path / "go.sum"
    go_sum.write_text(GO_SUM)
    cache_dir = tmp_path / "cache"
    cfg = write_config(tmp_path, [url_a, url_b], cache_dir)
    code, out, err = await cli("warm", str(go_sum), "--config", str(cfg), "--jobs", "3")
    assert code == 1  # one artifact missing everywhere, one bad line
    assert "warm: 7 artifacts: 4 fetched" in out and "3 failed" in out
    assert "FAILED example.com/missing@v0.1.0.zip" in out
    assert "SKIPPED line 6" in out
    assert "warm: " in err and "(100%)" in err  # progress on stderr
    assert keys_on_disk(cache_dir) == sorted(
        [
            f"{A}/@v/v1.0.0.zip",
            f"{A}/@v/v1.0.0.mod",
            f"{A}/@v/v1.0.0.info",
            "golang.org/x/text/@v/v0.3.0.mod",
        ]
    )
    assert a.received.count(f"{A}/@v/v1.0.0.mod") == 1  # go.sum's two lines, one fetch
    assert temp_files(cache_dir) == []
    code, out, _ = await cli("warm", str(go_sum), "--config", str(cfg))
    assert "0 fetched" in out and "4 already cached" in out


async def test_ls_while_a_fill_is_in_flight_shows_only_complete_entries(
    fake_upstreams, sidecar_client, tmp_path
):
    [(up, url)] = await fake_upstreams(1)
    up.set(ZIP, Reply(body=os.urandom(4 * 1024 * 1024), chunk_delay=0.02))
    client, sc = await sidecar_client([url], run_control=False, cache=cache_config(tmp_path))
    await sc.cache.wait_loaded()
    resp = await client.get("/" + ZIP)
    await resp.content.readexactly(256 * 1024)
    assert len(temp_files(tmp_path / "cache")) == 1
    cfg = write_config(tmp_path, [url], tmp_path / "cache")
    code, out, _ = await cli("cache", "ls", "--config", str(cfg))
    assert code == 0 and out.splitlines()[-1].startswith("0 entries")
    await resp.read()
    await settled(sc, 1)
    code, out, _ = await cli("cache", "ls", "--config", str(cfg))
    assert out.splitlines()[-1].startswith("1 entries") and ZIP in out


def write_routed_config(tmp_path: Path, url: str, cache_dir: Path) -> Path:
    cfg = tmp_path / "routed.yaml"
    cfg.write_text(
        f'listen: "127.0.0.1:3001"\nupstreams:\n  - {{name: up0, url: "{url}"}}\n'
        f'cache: {{dir: "{cache_dir}"}}\n'
        "routing:\n"
        "  private: [corp.example]\n"  # and up0 has no private_ok
        "  rules:\n"
        "    - {match: example.com/volatile, cache: false}\n"
        "    - {match: example.com/banned, deny: true}\n"
    )
    return cfg


ROUTED_GO_SUM = f"""\
example.com/volatile v1.0.0 h1:aaaa=
example.com/volatile v1.0.0/go.mod h1:bbbb=
example.com/banned v0.1.0/go.mod h1:cccc=
corp.example/lib v1.2.0/go.mod h1:dddd=
golang.org/x/text v0.3.0/go.mod {hash_gomod(TEXT_MOD)}
not a go.sum line
"""


async def test_warm_skips_what_routing_keeps_out_of_the_cache_and_exits_0(fake_upstreams, tmp_path):
    [(up, url)] = await fake_upstreams(1)
    up.set("golang.org/x/text/@v/v0.3.0.mod", TEXT_MOD)
    go_sum = tmp_path / "go.sum"
    go_sum.write_text(ROUTED_GO_SUM)
    cfg = write_routed_config(tmp_path, url, tmp_path / "cache")
    code, out, err = await cli("warm", str(go_sum), "--config", str(cfg))
    assert code == 0, out + err
    lines = out.splitlines()
    assert lines[:4] == [
        "SKIPPED line 6: not a go.sum line: not a go.sum line",
        "SKIPPED example.com/volatile@v1.0.0 (zip, info, mod): "
        "not cached by routing rule 'example.com/volatile'",
        "SKIPPED example.com/banned@v0.1.0 (mod): denied by routing rule 'example.com/banned'",
        "SKIPPED corp.example/lib@v1.2.0 (mod): "
        "private module, and no upstream it may go to has private_ok",
    ]
    assert lines[4:] == [
        "warm: 6 artifacts: 1 fetched (25B), 0 already cached, 5 skipped by routing rules, "
        "0 failed, 1 go.sum lines skipped"
    ]
    assert "FAILED" not in out
    assert up.received == ["golang.org/x/text/@v/v0.3.0.mod"]  # nothing kept out was asked for
    assert keys_on_disk(tmp_path / "cache") == ["golang.org/x/text/@v/v0.3.0.mod"]


async def test_warm_fails_only_for_failed_fetches(fake_upstreams, tmp_path):
    [(up, url)] = await fake_upstreams(1)
    up.set("golang.org/x/text/@v/v0.3.0.mod", Reply(status=503))
    go_sum = tmp_path / "go.sum"
    go_sum.write_text(ROUTED_GO_SUM)
    cfg = write_routed_config(tmp_path, url, tmp_path / "cache")
    code, out, _ = await cli("warm", str(go_sum), "--config", str(cfg))
    assert code == 1
    assert "FAILED golang.org/x/text@v0.3.0.mod: up0: " in out and "1 failed" in out


def pack_entries(cache_dir: Path, entries: list[tuple[str, str, bool]], stored: float) -> None:
    """Entries (key, kind, immutable) written straight into the pack, as the sidecar would."""
    layout = Layout.at(str(cache_dir))
    prepare(layout)
    pack = Pack(layout.pack)
    items = []
    for key, kind, immutable in entries:
        body = key.encode()
        digest = hashlib.sha256(body).hexdigest()
        record = Record(
            key,
            kind,
            new_blob_id(),
            len(body),
            digest,
            "text/plain",
            stored,
            stored,
            immutable,
            "up0",
        )
        items.append((record, body))
    pack.put_many(items)
    pack.close()


async def test_ls_sizes_its_columns_to_their_content(tmp_path):
    old = time.time() - 7 * 86400  # every mutable entry stale
    pack_entries(
        tmp_path / "cache",
        [
            ("sumdb/sum.golang.org/supported", "sumdb-supported", False),
            (f"{A}/@v/v1.0.0.mod", "mod", True),
            (f"{A}/@v/list", "list", False),
        ],
        old,
    )
    cfg = write_config(tmp_path, ["http://127.0.0.1:9"], tmp_path / "cache")
    code, out, err = await cli("cache", "ls", "--config", str(cfg))
    assert code == 0, err
    header, *rows, total = out.splitlines()
    assert total.startswith("3 entries")
    kinds = {row.split()[2] for row in rows}
    assert kinds == {"sumdb-supported,stale", "mod", "list,stale"}
    # Every cell of a column starts where its header does; the widest kind still
    # leaves two spaces before VERIFIED.
    for name in ("KIND", "VERIFIED", "KEY"):
        start = header.index(name)
        assert all(row[start - 2 : start] == "  " and row[start] != " " for row in rows), name
    assert "sumdb-supported,stale  7d ago" in out


@pytest.mark.parametrize("args", [["cache", "ls"], ["cache", "ls", "--json"]])
def test_a_reader_that_stops_early_ends_it_quietly(tmp_path, args):
    # Far more output than a pipe holds (64 KiB), so the writer is still
    # writing when `head` exits.
    pack_entries(
        tmp_path / "cache",
        [(f"example.com/m/@v/v0.0.{i}.mod", "mod", True) for i in range(3000)],
        time.time(),
    )
    cfg = write_config(tmp_path, ["http://127.0.0.1:9"], tmp_path / "cache")
    writer = subprocess.Popen(
        [sys.executable, "-m", "sidecar", *args, "--config", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=str(Path(__file__).resolve().parents[2]),
    )
    assert writer.stdout is not None and writer.stderr is not None
    head = subprocess.run(["head", "-n", "2"], stdin=writer.stdout, capture_output=True, timeout=60)
    writer.stdout.close()
    err = writer.stderr.read()
    writer.stderr.close()
    assert writer.wait(60) == 141  # as a shell reports a writer killed by SIGPIPE
    assert err == b""  # no traceback, no "Exception ignored" at exit
    assert len(head.stdout.splitlines()) == 2


def hear_ctrl_c() -> None:
    """In the child before exec: SIGINT back to its default. A shell without job
    control starts a background command with SIGINT ignored, the test run
    inherits that, and so would the warm (Python keeps an ignored SIGINT
    ignored): it then ran to its 15 s first-byte timeout and exited 1 in CI
    runs started that way."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def test_ctrl_c_during_warm_ends_it_quietly_with_130(fake_upstreams, tmp_path):
    [(up, url)] = await fake_upstreams(1)
    up.set("golang.org/x/text/@v/v0.3.0.mod", Reply(body=b"module x\n", delay=30))
    go_sum = tmp_path / "go.sum"
    go_sum.write_text("golang.org/x/text v0.3.0/go.mod h1:eeee=\n")
    cfg = write_config(tmp_path, [url], tmp_path / "cache")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "warm",
        str(go_sum),
        "--config",
        str(cfg),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=str(Path(__file__).resolve().parents[2]),
        preexec_fn=hear_ctrl_c,
    )
    await wait_for(lambda: up.received != [], timeout=30, what="the fetch under way")
    proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 130, (out, err)  # what it said, should it ever fail
    assert out == b"" and err == b"", err
    assert temp_files(tmp_path / "cache") == []


async def test_warm_checks_go_sum_hashes_and_keeps_no_mismatch(fake_upstreams, tmp_path):
    """A zip or go.mod that does not hash to its go.sum line is a FAILED line
    naming both hashes and is not cached; the next upstream's genuine one is."""
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    wrong_zip = module_zip("github.com/!azure/go-autorest@v1.0.0", {"go.mod": b"module evil\n"})
    a.set(f"{A}/@v/v1.0.0.zip", wrong_zip)
    a.set(f"{A}/@v/v1.0.0.mod", AUTOREST_MOD + b"// evil\n")
    a.set(f"{A}/@v/v1.0.0.info", b'{"Version":"v1.0.0"}')
    a.set("golang.org/x/text/@v/v0.3.0.mod", TEXT_MOD + b"// evil\n")
    b.set(f"{A}/@v/v1.0.0.zip", AUTOREST_ZIP)
    b.set(f"{A}/@v/v1.0.0.mod", AUTOREST_MOD)
    go_sum = tmp_path / "go.sum"
    go_sum.write_text("\n".join(GO_SUM.splitlines()[:3]) + "\n")
    cache_dir = tmp_path / "cache"
    cfg = write_config(tmp_path, [url_a, url_b], cache_dir)
    code, out, err = await cli("warm", str(go_sum), "--config", str(cfg))
    assert code == 1, out + err
    failed = [line for line in out.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1, out  # x/text: only a has it, and a's is wrong
    want, got = hash_gomod(TEXT_MOD), hash_gomod(TEXT_MOD + b"// evil\n")
    assert failed[0].startswith("FAILED golang.org/x/text@v0.3.0.mod: up0: ")
    assert want in failed[0] and got in failed[0] and "go.sum" in failed[0]
    assert "3 fetched" in out and "1 failed" in out
    assert keys_on_disk(cache_dir) == sorted(
        [f"{A}/@v/v1.0.0.zip", f"{A}/@v/v1.0.0.mod", f"{A}/@v/v1.0.0.info"]
    )
    kept = [p.read_bytes() for p in cache_dir.rglob("*") if p.is_file()]
    assert not any(b"evil" in blob for blob in kept)
    assert AUTOREST_ZIP in kept and any(AUTOREST_MOD in blob for blob in kept)
