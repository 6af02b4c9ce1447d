"""What checksum verification costs on 50 MiB zip misses, and on hits (issue 15).

    python3 -m bench.verify_cost [--rounds 3] [--versions 3] [--content random|source]

Parts, all on loopback:
- the real Go checksum database of tests/sumdb/server (built with the go
  command), vouching for ``--versions`` versions of a module whose zip holds
  50 MiB of files: incompressible ones (``random``, the zip is 50 MiB too), or
  the Go source files of this machine's GOROOT (``source``: what module zips
  hold; the zip is ~4x smaller, and checking it is mostly inflating it); it
  writes their GOPROXY tree;
- an upstream (aiohttp, in this process) serving that tree from memory and
  the database under ``/sumdb/<name>/``, as a proxy does;
- the sidecar (``python -m sidecar run``, its own process) with a fresh cache
  per run, ``verify`` enforce (the default, through the upstream's sumdb/
  path) or off, alternating A/B/A/B.

Each run fetches every version once (cold misses: the lookup, the download,
storing, hashing, then serving) and then the first version ``HITS`` times.
It prints MB/s per run and the enforce/off ratios of the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from bench.checksums import build_database
from tests.sumdb.gosumdb import GoSumdb, start_sumdb

MODULE = "example.com/fifty"
ZIP_MIB = 50
FILE_MIB = 1
HITS = 3
START_S = 30.0
REPO = Path(__file__).resolve().parents[1]


def write_modules(work: Path, versions: int, content: str) -> Path:
    listing = []
    rng = random.Random(15)
    sources = go_sources(ZIP_MIB << 20) if content == "source" else []
    for v in range(versions):
        version = f"v1.0.{v}"
        src = work / "src" / version
        src.mkdir(parents=True)
        (src / "go.mod").write_text(f"module {MODULE}\n\ngo 1.21\n")
        (src / "fifty.go").write_text("package fifty\n")
        if content == "source":
            for i, (name, data) in enumerate(sources):
                (src / f"src{i:05d}_{name}").write_bytes(data)
        else:
            for i in range(ZIP_MIB // FILE_MIB):
                (src / f"data{i:03d}.bin").write_bytes(rng.randbytes(FILE_MIB << 20))
        listing.append(f"{MODULE} {version} {src}\n")
    path = work / "modules.txt"
    path.write_text("".join(listing))
    return path


def go_sources(total: int) -> list[tuple[str, bytes]]:
    """(name, content) of GOROOT's .go files, in path order, until ``total`` bytes."""
    goroot = subprocess.run(
        ["go", "env", "GOROOT"], capture_output=True, text=True, check=True
    ).stdout.strip()
    found: list[tuple[str, bytes]] = []
    size = 0
    for path in sorted((Path(goroot) / "src").rglob("*.go")):
        data = path.read_bytes()
        found.append((path.name, data))
        size += len(data)
        if size >= total:
            return found
    raise RuntimeError(f"{goroot}/src holds less than {total >> 20} MiB of Go source")


def upstream_app(proxy: Path, db: GoSumdb) -> web.Application:
    files = {str(p.relative_to(proxy)): p.read_bytes() for p in proxy.rglob("*") if p.is_file()}
    prefix = f"sumdb/{db.name}/"

    async def handle(request: web.Request) -> web.StreamResponse:
        path = request.path.lstrip("/")
        if path == prefix + "supported":
            return web.Response(text="")
        if path.startswith(prefix):
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{db.url}/{path[len(prefix) :]}") as answer,
            ):
                return web.Response(status=answer.status, body=await answer.read())
        body = files.get(path)
        if body is None:
            return web.Response(status=404, text="not found")
        return web.Response(body=body)

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handle)
    return app


async def start_sidecar(
    work: Path, upstream: str, verify: str, run: int
) -> subprocess.Popen[bytes]:
    with socket_port() as port:
        pass
    config = work / f"sidecar-{run}.yaml"
    config.write_text(
        f'listen: "127.0.0.1:{port}"\n'
        f'upstreams: [{{name: origin, url: "{upstream}", pool: {{max_connections: 16}}}}]\n'
        f'cache: {{dir: "{work / f"cache-{run}"}", max_bytes: 20GiB}}\n'
        f"verify: {verify}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run", "--config", str(config)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=open(work / f"sidecar-{run}.log", "wb"),  # noqa: SIM115 - kept by the child
    )
    proc.port = port  # type: ignore[attr-defined]
    deadline = time.monotonic() + START_S
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(f"http://127.0.0.1:{port}/readyz") as resp:
                    if resp.status == 200:
                        return proc
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    proc.kill()
    raise RuntimeError("the sidecar did not become ready")


class socket_port:
    """A free loopback port (bound, then released for the sidecar)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


async def fetch(session: aiohttp.ClientSession, url: str) -> tuple[int, float]:
    start = time.perf_counter()
    size = 0
    async with session.get(url) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: {resp.status} {await resp.text()}")
        async for chunk in resp.content.iter_any():
            size += len(chunk)
    return size, time.perf_counter() - start


async def one_run(
    work: Path, upstream: str, verify: str, run: int, versions: int
) -> tuple[float, float]:
    proc = await start_sidecar(work, upstream, verify, run)
    base = f"http://127.0.0.1:{proc.port}/{MODULE}/@v"  # type: ignore[attr-defined]
    try:
        async with aiohttp.ClientSession() as session:
            total, took = 0, 0.0
            for v in range(versions):
                size, secs = await fetch(session, f"{base}/v1.0.{v}.zip")
                total, took = total + size, took + secs
            miss = total / took / 1e6
            total, took = 0, 0.0
            for _ in range(HITS):
                size, secs = await fetch(session, f"{base}/v1.0.0.zip")
                total, took = total + size, took + secs
            hit = total / took / 1e6
            metrics = await (await session.get(f"http://127.0.0.1:{proc.port}/metrics")).text()  # type: ignore[attr-defined]
    finally:
        proc.terminate()
        proc.wait(30)
    unvouched = [
        line for line in metrics.splitlines() if line.startswith("goproxy_sidecar_verify_unavail")
    ]
    if any(not line.endswith(" 0.0") for line in unvouched):
        raise RuntimeError(f"the database could not vouch: {unvouched}")
    return miss, hit


async def main_async(rounds: int, versions: int, content: str) -> None:
    with tempfile.TemporaryDirectory(prefix="verify-cost-") as tmp:
        work = Path(tmp)
        binary = build_database(work)
        listing = write_modules(work, versions, content)
        with start_sumdb(binary, listing, filler=1000, proxy_dir=work / "proxy") as db:
            runner = web.AppRunner(upstream_app(work / "proxy", db))
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            upstream = f"http://127.0.0.1:{port}"
            modes = {"enforce": f"{{key: {db.verifier_key!r}}}", "off": "{mode: 'off'}"}
            results: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
            run = 0
            for r in range(rounds):
                for name, verify in modes.items():
                    miss, hit = await one_run(work, upstream, verify, run, versions)
                    run += 1
                    results[name].append((miss, hit))
                    print(
                        f"round {r + 1} {name:8s} miss {miss:7.0f} MB/s  hit {hit:7.0f} MB/s",
                        flush=True,
                    )
            await runner.cleanup()
    med = {
        m: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
        for m, v in results.items()
    }
    for name, (miss, hit) in med.items():
        spread = [round(x[0]) for x in results[name]]
        print(f"median {name:8s} miss {miss:7.0f} MB/s {spread}  hit {hit:7.0f} MB/s")
    print(
        f"ratio enforce/off: misses {med['enforce'][0] / med['off'][0]:.2f}x, "
        f"hits {med['enforce'][1] / med['off'][1]:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--versions", type=int, default=3, help="50 MiB zips missed per run")
    parser.add_argument(
        "--content", choices=("random", "source"), default="random", help="what the zips hold"
    )
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main_async(args.rounds, args.versions, args.content))


if __name__ == "__main__":
    main()
