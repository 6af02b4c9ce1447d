"""Checksum verification of what upstreams serve (issue 15), with real parts:
a real Go checksum database (tests/sumdb/server), loopback upstreams serving
its GOPROXY folder and its /sumdb/<name>/ path, and the real go command with
GOPROXY set to the sidecar and GOSUMDB naming the database's key (it reaches
the database through the sidecar's sumdb/ path, as the sidecar does).

The primary serves a tampered zip (a valid zip with one file changed) and a
tampered go.mod; the backup serves the genuine ones.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import zipfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from sidecar.cache.layout import Layout
from sidecar.config import CacheConfig, VerifyConfig
from tests.sumdb.gosumdb import (  # noqa: F401 - the fixture is used by name
    GoSumdb,
    go_env,
    start_sumdb,
    sumdb_server_binary,
)
from tests.tools import require_tool

BIG = ("example.com/big", "v1.0.0")  # a zip larger than the small-body limit: a cache fill
SMALL = ("example.com/small", "v1.1.0")  # a small zip: the small-body path
PRIVATE = ("corp.example/secret", "v1.0.0")  # never in the database
TIMEOUT_S = 120


def write_module(root: Path, module: str, version: str, files: dict[str, bytes]) -> str:
    src = root / "src" / module.replace("/", "_") / version
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    return f"{module} {version} {src}\n"


@pytest.fixture(scope="module")
def database(
    sumdb_server_binary: Path,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[GoSumdb, Path]]:
    root = tmp_path_factory.mktemp("integrity")
    noise = random.Random(15).randbytes(600 * 1024)  # incompressible: the zip stays large
    listing = root / "modules.txt"
    listing.write_text(
        write_module(
            root,
            *BIG,
            {
                b"go.mod".decode(): b"module example.com/big\n\ngo 1.21\n",
                "big.go": b'package big\n\nconst Name = "big"\n',
                "testdata/noise.bin": noise,
            },
        )
        + write_module(
            root,
            *SMALL,
            {"go.mod": b"module example.com/small\n\ngo 1.21\n", "small.go": b"package small\n"},
        )
    )
    with start_sumdb(sumdb_server_binary, listing, filler=40, proxy_dir=root / "proxy") as db:
        yield db, root / "proxy"


def escaped(module: str) -> str:
    return "".join(f"!{c.lower()}" if c.isupper() else c for c in module)


def tampered_zip(data: bytes) -> bytes:
    """The same zip with one file's content changed: still a valid zip."""
    import io

    out = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(data)) as genuine,
        zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as changed,
    ):
        for info in genuine.infolist():
            body = genuine.read(info)
            if info.filename.endswith(".go"):
                body = body.replace(b"package", b"package /* evil */", 1)
            changed.writestr(info, body)
    return out.getvalue()


@dataclass
class Upstream:
    """A GOPROXY folder over HTTP plus the database under /sumdb/<name>/."""

    proxy: Path
    db: GoSumdb
    tamper: dict[str, bytes] = field(default_factory=dict)  # path -> body served instead
    sumdb: bool = True  # serves /sumdb/<name>/
    asked: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path.lstrip("/")
        self.asked.append(path)
        prefix = f"sumdb/{self.db.name}/"
        if path.startswith(prefix):
            if not self.sumdb:
                return web.Response(status=404, text="not here")
            if path == prefix + "supported":
                return web.Response(text="")
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{self.db.url}/{path[len(prefix) :]}") as answer,
            ):
                return web.Response(status=answer.status, body=await answer.read())
        if path in self.tamper:
            return web.Response(body=self.tamper[path])
        file = self.proxy / path
        if not file.is_file():
            return web.Response(status=404, text="not found")
        return web.Response(body=file.read_bytes())


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Upstream], Any]]:
    servers: list[TestServer] = []

    async def start(upstream: Upstream) -> str:
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", upstream.handle)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


def artifact(module: str, version: str, ext: str) -> str:
    return f"{escaped(module)}/@v/{version}.{ext}"


def tamper_both(proxy: Path, module: str, version: str) -> dict[str, bytes]:
    zip_path, mod_path = artifact(module, version, "zip"), artifact(module, version, "mod")
    return {
        zip_path: tampered_zip((proxy / zip_path).read_bytes()),
        mod_path: (proxy / mod_path).read_bytes() + b"\n// evil\n",
    }


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def go_download(
    tmp: Path, proxy_url: str, db: GoSumdb, target: str
) -> subprocess.CompletedProcess[str]:
    go = require_tool("go")
    env = go_env(
        GOPROXY=proxy_url,
        GOSUMDB=db.verifier_key,  # no URL: through the proxy's sumdb/<name>/ path
        GONOSUMDB="",
        GOPRIVATE="",
        GONOPROXY="",
        GOFLAGS="-modcacherw",
        GOMODCACHE=str(tmp / "modcache"),
        GOPATH=str(tmp / "gopath"),
    )
    return subprocess.run(
        [str(go), "mod", "download", "-json", target],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


_SQLITE_SIDE_FILES = ("-journal", "-wal", "-shm")


def cached_files(cache: Path) -> list[Path]:
    """The files of the cache's entries. Not its temp directory: a refused
    body's temp file is removed once its fill ends, which may be just after
    its client got the 502 (a loaded run saw one there). Not SQLite's side
    files either, which come and go as the pack is written."""
    tmp = Path(Layout.at(str(cache)).tmp)
    return [
        p
        for p in cache.rglob("*")
        if p.is_file() and tmp not in p.parents and not p.name.endswith(_SQLITE_SIDE_FILES)
    ]


async def test_the_go_command_builds_through_the_backup_and_nothing_tampered_is_cached(
    database: tuple[GoSumdb, Path],
    serve: Callable[[Upstream], Any],
    sidecar_client: Any,
    tmp_path: Path,
) -> None:
    db, proxy = database
    primary = Upstream(proxy, db, tamper=tamper_both(proxy, *BIG))
    backup = Upstream(proxy, db)
    urls = [await serve(primary), await serve(backup)]
    cache_dir = tmp_path / "cache"
    client, sidecar = await sidecar_client(
        urls,
        cache=CacheConfig(dir=str(cache_dir)),
        verify=VerifyConfig(key=db.verifier_key),
    )
    url = str(client.make_url("")).rstrip("/")
    result = await asyncio.to_thread(go_download, tmp_path, url, db, "@".join(BIG))
    assert result.returncode == 0, result.stdout + result.stderr
    info = json.loads(result.stdout)
    assert (info["Sum"], info["GoModSum"]) == (
        db.modules["@".join(BIG)].zip,
        db.modules["@".join(BIG)].gomod,
    )

    metrics = await (await client.get("/metrics")).text()
    name = "goproxy_sidecar_integrity_failures_total"
    assert metric(metrics, name, upstream="up0", kind="zip") == 1
    assert metric(metrics, name, upstream="up0", kind="mod") == 1
    assert metric(metrics, name) == 2
    assert metric(metrics, name, upstream="up1") == 0

    # The breaker reroutes around the primary, with its reason, and alerts.
    await sidecar.control.step()  # one policy tick: one integrity failure is enough
    breakers = await (await client.get("/breakers")).json()
    reason = breakers["up0"]["reason"]
    assert "integrity: 2 bodies did not match the checksum database" in reason, breakers
    assert (breakers["up0"]["action"], breakers["up0"]["alert"]) == ("reroute", True)
    assert breakers["up1"]["action"] == "allow"

    # Nothing tampered is in the cache: every cached body is one of the genuine ones.
    tampered = set(primary.tamper.values())
    blobs = [p.read_bytes() for p in cached_files(cache_dir)]
    assert not any(t in blob for t in tampered for blob in blobs)
    genuine_zip = (proxy / artifact(*BIG, "zip")).read_bytes()
    assert any(blob == genuine_zip for blob in blobs)
