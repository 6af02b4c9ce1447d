"""The lookup verifier against a real Go checksum database (tests/sumdb/server:
golang.org/x/mod/sumdb's server and tlog), and the go command as the judge.

The database serves a tree of 300 filler records and a few generated modules,
whose zips x/mod's zip package built into a GOPROXY folder. Genuine records
verify and their hashes match what Python computes from the zips; a tampered
record line, signature, key or tile, and a forked tree, are refused; and the
go command agrees with the verdicts on the same files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sidecar.errors import SumdbUnavailable, SumdbVerifyError
from sidecar.sumdb.dirhash import hash_gomod, hash_zip
from sidecar.sumdb.lookup import Fetch, SumdbVerifier
from sidecar.sumdb.note import parse_verifier_key
from sidecar.sumdb.tile import Tile, TileHashReader, parse_data_tile
from sidecar.sumdb.tlog import record_hash, stored_hash_index
from tests.sumdb.gosumdb import (  # noqa: F401 - the fixture is used by name
    GoSumdb,
    go_env,
    signer_key,
    start_sumdb,
    sumdb_server_binary,
)
from tests.tools import require_tool

FILLER = 300
MODULES = {
    # module, version -> files of its source folder
    ("example.com/alpha", "v1.0.0"): {
        "go.mod": "module example.com/alpha\n\ngo 1.21\n",
        "alpha.go": 'package alpha\n\nconst Name = "alpha"\n',
        "internal/vendor/x/x.go": "package x\n",  # nested vendor/ (Athens #2145)
    },
    ("example.com/Upper", "v1.2.3"): {
        "go.mod": "module example.com/Upper\n\ngo 1.21\n",
        "upper.go": "package upper\n",
    },
    ("example.com/beta/v2", "v2.0.1"): {
        "go.mod": "module example.com/beta/v2\n\ngo 1.21\n",
        "beta.go": "package beta\n\n// Ünïcode in content\n",
        "LICENSE": "MIT\n",
    },
}
EXTRA = ("example.com/gamma", "v0.1.0")


def write_sources(root: Path, modules: list[tuple[str, str]]) -> Path:
    """Source folders for ``modules`` and the -modules file naming them."""
    lines = []
    for module, version in modules:
        src = root / "src" / module.replace("/", "_") / version
        files = MODULES.get((module, version)) or {"go.mod": f"module {module}\n\ngo 1.21\n"}
        for name, text in files.items():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_text(text)
        lines.append(f"{module} {version} {src}\n")
    listing = root / "modules.txt"
    listing.write_text("".join(lines))
    return listing


@pytest.fixture(scope="module")
def database(
    sumdb_server_binary: Path,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[GoSumdb, Path]]:
    """One database for the module's tests, and its GOPROXY folder."""
    root = tmp_path_factory.mktemp("sumdb")
    listing = write_sources(root, list(MODULES))
    with start_sumdb(sumdb_server_binary, listing, filler=FILLER, proxy_dir=root / "proxy") as db:
        yield db, root / "proxy"


class Remote:
    """fetch() for sumdb/<name>/... paths over HTTP; ``tamper`` may rewrite answers."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url
        self.paths: list[str] = []
        self.tamper: dict[str, bytes] = {}

    async def fetch(self, path: str) -> bytes:
        self.paths.append(path)
        try:
            async with self.session.get(f"{self.url}/{path}") as response:
                body = await response.read()
        except aiohttp.ClientError as exc:
            raise SumdbUnavailable(f"{path}: {exc}") from exc
        if response.status != 200:
            raise SumdbUnavailable(f"{path}: HTTP {response.status}")
        return self.tamper.get(path, body)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        yield s


def verifier_for(db: GoSumdb, fetch: Fetch, height: int = 8) -> SumdbVerifier:
    return SumdbVerifier(parse_verifier_key(db.verifier_key), fetch, height)


def proxy_file(proxy: Path, module: str, version: str, suffix: str) -> Path:
    escaped = "".join(f"!{c.lower()}" if c.isupper() else c for c in module)
    return proxy / escaped / "@v" / f"{version}{suffix}"


# --- genuine records -------------------------------------------------------------


@pytest.mark.parametrize("height", [8, 2])
async def test_genuine_records_verify(
    database: tuple[GoSumdb, Path], session: aiohttp.ClientSession, height: int
) -> None:
    db, proxy = database
    assert db.size == FILLER + len(MODULES)
    verifier = verifier_for(db, Remote(session, db.url).fetch, height)
    for module, version in MODULES:
        record = db.modules[f"{module}@{version}"]
        hashes = await verifier.lookup(module, version)
        assert (hashes.zip, hashes.gomod, hashes.record_id) == (record.zip, record.gomod, record.id)
        assert hashes.tree.n == db.size
        # Python's dirhash of the files Go zipped gives the hashes Go put in the log.
        assert hash_zip(proxy_file(proxy, module, version, ".zip")) == record.zip
        gomod = proxy_file(proxy, module, version, ".mod").read_bytes()
        assert hash_gomod(gomod) == record.gomod


async def test_records_anywhere_in_the_tree_verify(
    database: tuple[GoSumdb, Path], session: aiohttp.ClientSession
) -> None:
    db, _ = database
    verifier = verifier_for(db, Remote(session, db.url).fetch)
    for i in (0, 1, 127, 255, 256, 299):
        hashes = await verifier.lookup(f"example.com/filler/m{i:05d}", "v1.0.0")
        assert hashes.record_id == i
        assert hashes.zip is not None and hashes.zip.startswith("h1:")


async def test_one_tree_head_is_checked_once(
    database: tuple[GoSumdb, Path], session: aiohttp.ClientSession
) -> None:
    """Every lookup carries the database's signed tree head; while the tree does not
    grow it is the same bytes, and its signature is checked for the first only."""
    db, _ = database
    key = parse_verifier_key(db.verifier_key)
    counting = CountingKey(key.public_key)
    verifier = SumdbVerifier(
        dataclasses.replace(key, public_key=counting), Remote(session, db.url).fetch, 8
    )
    for i in (3, 4, 200, 260):
        hashes = await verifier.lookup(f"example.com/filler/m{i:05d}", "v1.0.0")
        assert (hashes.record_id, hashes.tree.n) == (i, db.size)
    assert counting.checked == 1


class CountingKey(Ed25519PublicKey):
    """The database's real key, counting the signatures it checks (the verifier
    is compiled: its calls cannot be patched, so the count is taken at the key)."""

    def __init__(self, real: Ed25519PublicKey) -> None:
        self.real = real
        self.checked = 0

    def verify(self, signature: bytes, data: bytes) -> None:
        self.checked += 1
        self.real.verify(signature, data)

    def public_bytes(self, encoding: Any, format: Any) -> bytes:
        return self.real.public_bytes(encoding, format)

    def public_bytes_raw(self) -> bytes:
        return self.real.public_bytes_raw()

    def __eq__(self, other: object) -> bool:
        return self is other

    __hash__ = object.__hash__

    def __copy__(self) -> CountingKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> CountingKey:
        return self


async def test_data_tiles_hold_the_records_the_hash_tiles_prove(
    database: tuple[GoSumdb, Path], session: aiohttp.ClientSession
) -> None:
    db, _ = database
    remote = Remote(session, db.url)
    verifier = verifier_for(db, remote.fetch)
    await verifier.lookup("example.com/alpha", "v1.0.0")
    tree = verifier.latest
    assert tree is not None
    width = db.size - 256
    data = await remote.fetch(f"sumdb/{db.name}/{Tile(8, -1, 1, width).path}")
    records = parse_data_tile(data, width)
    assert b"example.com/alpha v1.0.0 h1:" in b"".join(records)

    async def read_tiles(tiles: list[Tile]) -> list[bytes]:
        return [await remote.fetch(f"sumdb/{db.name}/{t.path}") for t in tiles]

    reader = TileHashReader(tree, 8, read_tiles)
    leaves = await reader.read_hashes([stored_hash_index(0, 256 + i) for i in range(width)])
    assert leaves == [record_hash(text) for text in records]


# --- hostile answers ---------------------------------------------------------------


async def alpha_lookup(session: aiohttp.ClientSession, db: GoSumdb) -> tuple[Remote, str, bytes]:
    """A Remote to ``db``, and the path and answer of its lookup of
    example.com/alpha v1.0.0 (for a test to tamper with)."""
    remote = Remote(session, db.url)
    path = f"sumdb/{db.name}/lookup/example.com/alpha@v1.0.0"
    return remote, path, await remote.fetch(path)


async def test_a_tampered_record_line_is_refused(
    database: tuple[GoSumdb, Path], session: aiohttp.ClientSession
) -> None:
    db, _ = database
    remote, path, answer = await alpha_lookup(session, db)
    genuine = db.modules["example.com/alpha@v1.0.0"].zip
    forged = db.modules["example.com/beta/v2@v2.0.1"].zip
    remote.tamper[path] = answer.replace(genuine.encode(), forged.encode())
    with pytest.raises(SumdbVerifyError, match="cannot authenticate the record"):
        await verifier_for(db, remote.fetch).lookup("example.com/alpha", "v1.0.0")


async def test_a_wrong_signature_is_refused(
    database: tuple[GoSumdb, Path], session: aiohttp.ClientSession
) -> None:
    db, _ = database
    remote, path, answer = await alpha_lookup(session, db)
    head, _, signature = answer.rpartition(f"— {db.name} ".encode())
    # keep the key hash (first 4 bytes = 6 base64 chars), change the signature bytes
    changed = signature[:10] + (b"A" if signature[10:11] != b"A" else b"B") + signature[11:]
    remote.tamper[path] = head + f"— {db.name} ".encode() + changed
    with pytest.raises(SumdbVerifyError, match="invalid signature"):
        await verifier_for(db, remote.fetch).lookup("example.com/alpha", "v1.0.0")


async def test_a_wrong_key_is_refused(
    database: tuple[GoSumdb, Path], session: aiohttp.ClientSession
) -> None:
    db, _ = database
    _, other_key = signer_key(db.name)
    verifier = SumdbVerifier(parse_verifier_key(other_key), Remote(session, db.url).fetch)
    with pytest.raises(SumdbVerifyError, match="no signature"):
        await verifier.lookup("example.com/alpha", "v1.0.0")


async def test_every_tampered_tile_is_refused(
    database: tuple[GoSumdb, Path], session: aiohttp.ClientSession
) -> None:
    db, _ = database
    remote = Remote(session, db.url)
    await verifier_for(db, remote.fetch).lookup("example.com/filler/m00007", "v1.0.0")
    tiles = [p for p in remote.paths if "/tile/" in p]
    assert len(tiles) >= 3  # level 0 full + partial, level 1 partial
    for path in tiles:
        data = bytearray(await remote.fetch(path))
        data[-1] ^= 0x01
        tampering = Remote(session, db.url)
        tampering.tamper[path] = bytes(data)
        with pytest.raises(SumdbVerifyError, match="inconsistent"):
            await verifier_for(db, tampering.fetch).lookup("example.com/filler/m00007", "v1.0.0")


async def test_a_forked_tree_is_refused_and_a_grown_one_accepted(
    sumdb_server_binary: Path,  # noqa: F811
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """Two databases signing with one key: B grew from A (consistent), C forked from A."""
    skey, _ = signer_key("fork.test.localhost")
    base = list(MODULES)[:2]
    lists = {
        "a": write_sources(tmp_path / "a", base),
        "b": write_sources(tmp_path / "b", [*base, EXTRA]),
        "c": write_sources(tmp_path / "c", [base[0], EXTRA, base[1]]),
    }
    run = {"binary": sumdb_server_binary, "filler": 20, "key": skey, "name": "fork.test.localhost"}
    proxies = {k: tmp_path / k / "proxy" for k in lists}
    with (
        start_sumdb(modules_file=lists["a"], proxy_dir=proxies["a"], **run) as a,  # type: ignore[arg-type]
        start_sumdb(modules_file=lists["b"], proxy_dir=proxies["b"], **run) as b,  # type: ignore[arg-type]
        start_sumdb(modules_file=lists["c"], proxy_dir=proxies["c"], **run) as c,  # type: ignore[arg-type]
    ):
        assert a.verifier_key == b.verifier_key == c.verifier_key
        urls = {"a": a.url, "b": b.url, "c": c.url}
        current = {"db": "a"}

        async def fetch(path: str) -> bytes:
            return await Remote(session, urls[current["db"]]).fetch(path)

        verifier = verifier_for(a, fetch)
        await verifier.lookup(*base[0])
        current["db"] = "b"
        grown = await verifier.lookup(*EXTRA)
        assert grown.tree.n == b.size == a.size + 1
        current["db"] = "c"  # same size as B, another history: C's tree hash differs
        with pytest.raises(SumdbVerifyError, match="forked"):
            await verifier.lookup(*base[1])


# --- unavailable is not wrong -----------------------------------------------------


async def test_unknown_module_and_stopped_database_are_unavailable(
    database: tuple[GoSumdb, Path], session: aiohttp.ClientSession
) -> None:
    db, _ = database
    with pytest.raises(SumdbUnavailable, match="404"):
        await verifier_for(db, Remote(session, db.url).fetch).lookup("example.com/none", "v1.0.0")
    closed = Remote(session, "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(SumdbUnavailable):
        await verifier_for(db, closed.fetch).lookup("example.com/alpha", "v1.0.0")


# --- the go command agrees ---------------------------------------------------------


def go_download(
    tmp: Path, proxy: Path, db: GoSumdb, target: str
) -> subprocess.CompletedProcess[str]:
    go = require_tool("go")
    env = go_env(
        GOPROXY=proxy.as_uri(),
        GOSUMDB=f"{db.verifier_key} {db.url}",
        GONOSUMDB="",
        GOPRIVATE="",
        GONOPROXY="",
        GOFLAGS="-modcacherw",
        GOMODCACHE=str(tmp / "modcache"),
        GOPATH=str(tmp / "gopath"),  # the go command keeps the database's tree head here
    )
    return subprocess.run(
        [str(go), "mod", "download", "-json", target],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_the_go_command_accepts_what_the_verifier_vouches_for(
    database: tuple[GoSumdb, Path], session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    db, proxy = database
    verifier = verifier_for(db, Remote(session, db.url).fetch)
    for module, version in MODULES:
        work = tmp_path / module.replace("/", "_")
        work.mkdir()
        result = go_download(work, proxy, db, f"{module}@{version}")
        assert result.returncode == 0, result.stderr
        info = json.loads(result.stdout)
        hashes = await verifier.lookup(module, version)
        assert (info["Sum"], info["GoModSum"]) == (hashes.zip, hashes.gomod)
        assert hash_zip(info["Zip"]) == hashes.zip


async def test_the_go_command_refuses_what_the_verifier_refuses(
    database: tuple[GoSumdb, Path], session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A valid zip with one file changed: Python's hash differs from the record, and
    the go command fails the download with a checksum mismatch."""
    db, proxy = database
    tampered = tmp_path / "proxy"
    shutil.copytree(proxy, tampered)
    zip_path = proxy_file(tampered, "example.com/alpha", "v1.0.0", ".zip")
    with (
        zipfile.ZipFile(proxy_file(proxy, "example.com/alpha", "v1.0.0", ".zip")) as genuine,
        zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as out,
    ):
        for info in genuine.infolist():
            data = genuine.read(info)
            if info.filename.endswith("/alpha.go"):
                data = data.replace(b'"alpha"', b'"evil!"')
            out.writestr(info, data)
    hashes = await verifier_for(db, Remote(session, db.url).fetch).lookup(
        "example.com/alpha", "v1.0.0"
    )
    assert hash_zip(zip_path) != hashes.zip
    result = go_download(tmp_path, tampered, db, "example.com/alpha@v1.0.0")
    assert result.returncode != 0
    assert "checksum mismatch" in result.stdout + result.stderr
    assert hash_zip(zip_path) in result.stdout + result.stderr  # "downloaded: h1:..."
    assert os.path.getsize(zip_path) > 0
