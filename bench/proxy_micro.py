"""Small uncached requests: the sidecar against nginx, a bare aiohttp proxy
and the floor of a Python relay.

    python3 bench/proxy_micro.py [--reps 3] [--duration 10] [--connections 64]
                                 [--upstream-core 1] [--profile sidecar]
                                 [--contenders nginx,floor,floor-checked,bare,sidecar]

Issue 6 asked that small uncached requests through the full sidecar reach at
least 1.4x a bare aiohttp proxy; issue 18 asks 0.5x plain nginx. The
contenders, each in front of the same nginx upstream that answers any
``.info`` under ``/example.com/bench/u/`` with ~100 B from its config
(``return 200``: no file per request):

- ``nginx``: nginx's plain proxy (bench/servers.py, as in bench/run.py);
- ``floor``: the least a Python relay can do, below (``FLOOR_RELAY``):
  uvloop and httptools, one keep-alive upstream connection per client
  connection, every step a protocol callback (no task, no coroutine), no
  check, log or metric. What the sidecar costs beyond it is its own work;
- ``floor-checked``: the same relay doing the sidecar's own per-request work
  with the sidecar's compiled code (the path validated, both heads' fields
  collected, the answer's headers built, the window record, the duration
  histogram, counters): what a miss path of the floor's shape would cost;
- ``bare``: the ~40-line aiohttp streaming proxy below (ClientSession,
  ``iter_any``, uvloop, ``gc.freeze`` + ``gc.set_threshold(10000, 10, 10)``
  as in PERF-NOTES);
- ``sidecar``: ``python -m sidecar run``.

Sidecar config: one upstream, ``pool.max_connections: 256``,
``cache: {enabled: false}``, log level warning; it tunes malloc itself
(sidecar/heap.py), and the bare proxy is given the same values as ``MALLOC_*``.
Load: ``wrk -t1 -c64`` with a Lua script that asks a new, valid module path
per request (``example.com/bench/u/t0m<N>/@v/v1.0.0.info``).

The ``vs nginx`` column is req/s over nginx's in the same run (when nginx is
a contender), ``vs bare`` over the aiohttp proxy's.

Placement (2 cores): wrk on core 0; every proxy and, by default, the
upstream nginx on core 1 (``--upstream-core 0`` puts nginx with wrk as
bench/run.py does). Contenders alternate (A B A B ...) and the table
shows medians with min-max, the proxy's own CPU per request (steadier than
req/s on a shared machine) and per-core busy time.

``--profile NAME`` then samples that contender with py-spy (on core 0)
during one more wrk run: a flame graph (``--profile-out``, default
/tmp/profile.svg) and the top functions, self and inclusive, from a raw
(collapsed-stack) recording of the same length.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.procs import BenchError, Procs, free_port, stopping, wait_http  # noqa: E402
from bench.sampler import UsageMeter  # noqa: E402
from bench.servers import (  # noqa: E402
    HEALTH_PATH,
    Server,
    start_nginx,
    start_nginx_proxy,
    start_sidecar,
    upstream_conf,
)
from bench.tree import UNIQUE_PREFIX  # noqa: E402
from bench.wrk import run_wrk, write_script  # noqa: E402
from sidecar.heap import SETTINGS  # noqa: E402

LOAD_CORE = 0
PROXY_CORE = 1
CONTENDERS = ("nginx", "floor", "floor-checked", "bare", "sidecar")

# ---------------------------------------------------------------- the bare proxy

BARE_PROXY = """
import asyncio, gc, sys
import aiohttp, uvloop
from aiohttp import web

async def main(port: int, upstream: str) -> None:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=600),
        auto_decompress=False, skip_auto_headers=("Accept-Encoding",))

    async def handle(request: web.Request) -> web.StreamResponse:
        async with session.get(upstream + request.raw_path) as up:
            resp = web.StreamResponse(status=up.status)
            ctype = up.headers.get("Content-Type")
            if ctype:
                resp.headers["Content-Type"] = ctype
            if up.content_length is not None:
                resp.content_length = up.content_length
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    gc.collect()
    gc.freeze()
    gc.set_threshold(10000, 10, 10)
    await asyncio.Event().wait()

uvloop.run(main(int(sys.argv[1]), sys.argv[2]))
"""


def start_script(
    procs: Procs, work: Path, name: str, source: str, upstream: Server, *args: str
) -> Server:
    """One of this file's own proxies (``source``), run as ``name``."""
    port = free_port()
    script = work / f"{name}.py"
    script.write_text(source)
    # The sidecar's own malloc tuning (sidecar.heap), given to these proxies too:
    # the comparison is of the proxy code, not of glibc's settings.
    tuning = {s.env: str(s.value) for s in SETTINGS}
    proc = procs.start(
        name,
        [sys.executable, str(script), str(port), upstream.url, *args],
        PROXY_CORE,
        env={**os.environ, **tuning, "PYTHONPATH": str(REPO)},  # floor-checked imports sidecar
        env_note=tuning,
    )
    wait_http(proc, f"http://127.0.0.1:{port}{HEALTH_PATH}")
    return Server(name, f"http://127.0.0.1:{port}", proc)


# ---------------------------------------------------------------- the floor

FLOOR_RELAY = """
import asyncio, collections, gc, sys
import httptools, uvloop

UP_HOST, UP_PORT = sys.argv[2].removeprefix("http://").split(":")

class Upstream(asyncio.Protocol):
    def __init__(self, client):
        self.client = client
        self.parser = httptools.HttpResponseParser(self)
        self.body = []

    def connection_made(self, transport):
        self.transport = transport
        self.client.upstream_ready(self)

    def data_received(self, data):
        self.parser.feed_data(data)

    def on_body(self, body):
        self.body.append(body)

    def on_message_complete(self):
        body = b"".join(self.body)
        self.body = []
        self.client.answer(self.parser.get_status_code(), body)

    def connection_lost(self, exc):
        self.client.transport.close()

class Client(asyncio.Protocol):
    def __init__(self):
        self.parser = httptools.HttpRequestParser(self)
        self.waiting = collections.deque()  # targets not yet sent upstream
        self.busy = False
        self.upstream = None

    upstream_type = Upstream

    def connection_made(self, transport):
        self.transport = transport
        loop = asyncio.get_running_loop()
        loop.create_task(
            loop.create_connection(lambda: self.upstream_type(self), UP_HOST, int(UP_PORT)))

    def connection_lost(self, exc):
        if self.upstream is not None:
            self.upstream.transport.close()

    def data_received(self, data):
        self.parser.feed_data(data)

    def on_url(self, url):
        self.target = url

    def on_message_complete(self):
        self.waiting.append(self.target)
        self.send_next()

    def upstream_ready(self, upstream):
        self.upstream = upstream
        self.send_next()

    def send_next(self):
        if self.busy or self.upstream is None or not self.waiting:
            return
        self.busy = True
        self.upstream.transport.write(
            b"GET %s HTTP/1.1\\r\\nHost: upstream\\r\\n\\r\\n" % self.waiting.popleft())

    def answer(self, status, body):
        self.transport.write(
            b"HTTP/1.1 %d \\r\\nContent-Type: application/json\\r\\n"
            b"Content-Length: %d\\r\\n\\r\\n%s" % (status, len(body), body))
        self.busy = False
        self.send_next()

# "checked": the same relay doing the sidecar's own per-request work with the
# sidecar's compiled code: the path validated and decoded, both heads' fields
# collected, the upstream's in a case-insensitive multidict, the answer's
# headers built from it, the upstream's window record, the duration
# histogram, two counters.

class CheckedUpstream(Upstream):
    def __init__(self, client):
        super().__init__(client)
        self.fields = []

    def on_header(self, name, value):
        self.fields.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self):
        self.headers = CIMultiDictProxy(CIMultiDict(self.fields))
        self.fields = []
        self.ttfb = monotonic() - self.client.sent_at

class CheckedClient(Client):
    upstream_type = CheckedUpstream

    def __init__(self):
        super().__init__()
        self.fields = []
        self.started = collections.deque()  # when each waiting request was read

    def on_header(self, name, value):
        self.fields.append((name, value))

    def on_message_complete(self):
        self.fields = []
        try:
            self.target = b"/" + parse_request_path(self.target.decode("latin-1")).path.encode()
        except RequestError:  # the harness's health check
            pass
        self.started.append(monotonic())
        super().on_message_complete()

    def send_next(self):
        if not self.busy and self.upstream is not None and self.waiting:
            self.sent_at = monotonic()
        super().send_next()

    def answer(self, status, body):
        upstream = self.upstream
        block = response_block(upstream.headers, "upstream")
        self.transport.write(
            b"HTTP/1.1 %d \\r\\n%sContent-Length: %d\\r\\n\\r\\n%s"
            % (status, block, len(body), body))
        WINDOW.record(OUTCOME_OK, upstream.ttfb)
        DURATIONS.observe(monotonic() - self.started.popleft())
        COUNTS["attempts"] += 1
        COUNTS["requests"] += 1
        self.busy = False
        self.send_next()

async def main(port, client):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(client, "127.0.0.1", port, backlog=4096)
    gc.collect()
    gc.freeze()
    gc.set_threshold(10000, 10, 10)
    await server.serve_forever()

if sys.argv[3] == "checked":
    from time import monotonic
    from multidict import CIMultiDict, CIMultiDictProxy
    from sidecar.errors import RequestError
    from sidecar.goproxy import parse_request_path
    from sidecar.proxy.headers import response_block
    from sidecar.stats.plain import PlainBuckets
    from sidecar.stats.window import OUTCOME_OK, UpstreamWindow
    WINDOW = UpstreamWindow(120, 5)
    DURATIONS = PlainBuckets((0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
    COUNTS = collections.Counter()
    uvloop.run(main(int(sys.argv[1]), CheckedClient))
else:
    uvloop.run(main(int(sys.argv[1]), Client))
"""


def start_contender(procs: Procs, work: Path, name: str, upstream: Server) -> Server:
    if name == "bare":
        return start_script(procs, work, name, BARE_PROXY, upstream)
    if name == "floor":
        return start_script(procs, work, name, FLOOR_RELAY, upstream, "floor")
    if name == "floor-checked":
        return start_script(procs, work, name, FLOOR_RELAY, upstream, "checked")
    if name == "nginx":
        return start_nginx_proxy(procs, work, "nginx", upstream, cache=False, core=PROXY_CORE)
    return start_sidecar(procs, work, name, upstream, cache=False, core=PROXY_CORE)


# ---------------------------------------------------------------- measuring


def measure(
    server: Server, upstream: Server, script: Path, args: argparse.Namespace
) -> dict[str, Any]:
    meter = UsageMeter(server.proc.tree, upstream.proc.tree)
    with meter:
        result = run_wrk(
            server.url,
            args.connections,
            args.duration,
            script,
            LOAD_CORE,
            unique_prefix=UNIQUE_PREFIX,
            timeout_s=10,
        )
    usage = meter.usage
    return {
        "rps": result.rps,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "errors": result.errors,
        "requests": result.requests,
        "proxy_us_per_req": 1e6 * usage.server_cpu_s / max(1, result.requests),
        "upstream_us_per_req": 1e6 * usage.upstream_cpu_s / max(1, result.requests),
        "cores_busy_pct": usage.cores_busy_pct,
        "peak_rss_mib": usage.peak_rss_kib / 1024,
    }


def summarize(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    base = statistics.median(r["rps"] for r in runs["bare"]) if runs.get("bare") else None
    ref = statistics.median(r["rps"] for r in runs["nginx"]) if runs.get("nginx") else None
    for name, recs in runs.items():
        rps = [r["rps"] for r in recs]
        med = statistics.median(rps)
        rows.append(
            {
                "contender": name,
                "rps": med,
                "rps_min": min(rps),
                "rps_max": max(rps),
                "p50_ms": statistics.median(r["p50_ms"] for r in recs),
                "p99_ms": statistics.median(r["p99_ms"] for r in recs),
                "proxy_us_per_req": statistics.median(r["proxy_us_per_req"] for r in recs),
                "core0_pct": statistics.median(r["cores_busy_pct"][0] for r in recs),
                "core1_pct": statistics.median(r["cores_busy_pct"][1] for r in recs),
                "errors": sum(r["errors"] for r in recs),
                "vs_bare": med / base if base else None,
                "vs_nginx": med / ref if ref else None,
            }
        )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'contender':<16} {'req/s':>8} {'(min-max)':>15} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'CPU us/req':>10} {'core0%':>6} {'core1%':>6} {'errors':>6} {'vs nginx':>8} "
        f"{'vs bare':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        to_nginx = f"{r['vs_nginx']:.2f}x" if r["vs_nginx"] else "-"
        to_bare = f"{r['vs_bare']:.2f}x" if r["vs_bare"] else "-"
        print(
            f"{r['contender']:<16} {r['rps']:>8.0f} {r['rps_min']:>7.0f}-{r['rps_max']:<7.0f} "
            f"{r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} {r['proxy_us_per_req']:>10.1f} "
            f"{r['core0_pct']:>6.0f} {r['core1_pct']:>6.0f} {r['errors']:>6} {to_nginx:>8} "
            f"{to_bare:>7}"
        )


# ---------------------------------------------------------------- profiling


def profile(server: Server, upstream: Server, script: Path, args: argparse.Namespace) -> None:
    py_spy = shutil.which("py-spy")
    if not py_spy:
        raise BenchError("py-spy not found: pip install py-spy")
    pid = str(server.proc.pid)
    seconds = str(max(3, round(args.duration)))
    raw = Path(args.profile_out).with_suffix(".txt")
    for fmt, out in (("flamegraph", args.profile_out), ("raw", str(raw))):
        spy = subprocess.Popen(
            [
                "taskset",
                "-c",
                str(LOAD_CORE),
                py_spy,
                "record",
                "--pid",
                pid,
                "--rate",
                "250",
                "--duration",
                seconds,
                "--format",
                fmt,
                "-o",
                out,
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        run_wrk(
            server.url,
            args.connections,
            int(seconds) + 1,
            script,
            LOAD_CORE,
            unique_prefix=UNIQUE_PREFIX,
        )
        _, err = spy.communicate(timeout=60)
        if spy.returncode != 0:
            raise BenchError(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
    print(f"\nprofile of {server.name}: {args.profile_out} (flame graph), {raw} (raw)")
    print_top(raw, args.top)


def print_top(raw: Path, top: int) -> None:
    """Top functions by self and inclusive samples from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [_short(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for frame in set(frames):
            incl[frame] += n
    if not total:
        print("no samples")
        return
    print(f"{total} samples (idle included)")
    for title, counter in (("self", own), ("inclusive", incl)):
        print(f"\ntop {top} by {title} time:")
        for frame, n in counter.most_common(top):
            print(f"  {100.0 * n / total:5.1f}%  {frame}")


def _short(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py)``: lines vary per sample."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({'/'.join(Path(where).parts[-2:])})" if where else name


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    p.add_argument("--warmup", type=int, default=2, help="seconds of wrk per contender first")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--upstream-core", type=int, choices=(0, 1), default=PROXY_CORE)
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--profile", choices=CONTENDERS, help="py-spy this contender afterwards")
    p.add_argument("--profile-out", default="/tmp/profile.svg")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json", help="write the runs and the summary here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n for n in args.contenders.split(",") if n]
    if (os.cpu_count() or 1) < 2:
        raise BenchError("needs 2 cores")
    work = Path(tempfile.mkdtemp(prefix="proxy-micro-"))
    procs = Procs(work)
    try:
        with stopping(procs):
            tree = work / "tree"
            tree.mkdir()
            port = free_port()
            prefix = work / "upstream"
            nginx = start_nginx(
                procs,
                "upstream",
                prefix,
                upstream_conf(prefix, port, tree),
                port,
                args.upstream_core,
            )
            upstream = Server("upstream", f"http://127.0.0.1:{port}", nginx)
            script = write_script(work, unique=True)
            servers = {name: start_contender(procs, work, name, upstream) for name in names}
            for server in servers.values():
                run_wrk(
                    server.url,
                    args.connections,
                    args.warmup,
                    script,
                    LOAD_CORE,
                    unique_prefix=UNIQUE_PREFIX,
                )
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
            for rep in range(args.reps):
                for name in names:
                    rec = measure(servers[name], upstream, script, args)
                    runs[name].append(rec)
                    print(
                        f"rep {rep + 1} {name:<16} {rec['rps']:8.0f} req/s "
                        f"p99 {rec['p99_ms']:.2f} ms cpu {rec['proxy_us_per_req']:.1f} us/req "
                        f"cores {rec['cores_busy_pct']}",
                        flush=True,
                    )
            rows = summarize(runs)
            print(
                f"\nmedians of {args.reps} x {args.duration}s, wrk -t1 -c{args.connections} "
                f"on core {LOAD_CORE}, proxies on core {PROXY_CORE}, "
                f"upstream nginx on core {args.upstream_core} (shared machine: noisy)\n"
            )
            print_table(rows)
            if args.json:
                Path(args.json).write_text(json.dumps({"runs": runs, "summary": rows}, indent=1))
            if args.profile:
                profile(servers[args.profile], upstream, script, args)
    finally:
        procs.stop_all()
        with contextlib.suppress(OSError):
            shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
