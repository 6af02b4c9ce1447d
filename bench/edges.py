"""What one hostile or broken client costs the sidecar, next to nginx.

    python3 bench/edges.py [--send-timeout 10] [--rev REV] [--only header,pipeline,readers]

Three clients, each measured as deltas of the server's own CPU time
(/proc/<pid>/stat, less its idle rate) and RSS (VmRSS, polled; VmHWM):
- header: one request whose header line never ends, 128 MiB of it;
- pipeline: GETs for a cached object pipelined without reading, up to 60 MiB;
- readers: 64 clients ask for a 50 MiB body on an uncached route and read
  nothing (the sidecar's pool: 64 connections) while a probe client asks for
  the same and measures when it is served (from 1 s after the non-readers
  asked); then how soon every non-reader was dropped (reset).
The sidecar runs with a config of its own (cache on, the 50 MiB module on a
``cache: false`` routing rule, ``send_timeout`` from ``--send-timeout``);
nginx with proxy_cache, the same send_timeout and reset_timedout_connection
on (as the sidecar, it resets a client it drops). ``--rev`` measures an
older revision of the sidecar instead, one from before send_timeout and
verify (their keys are left out).
Servers on core 1, upstream and clients on core 0, loopback only; every loop
is bounded in time and bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import socket
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.procs import (  # noqa: E402
    BenchError,
    Procs,
    cpu_seconds,
    free_port,
    rss_kib,
    status_kib,
    stopping,
)
from bench.resilience import export_sidecar  # noqa: E402
from bench.sampler import RssPoller  # noqa: E402
from bench.servers import (  # noqa: E402
    HEALTH_PATH,
    Server,
    launch_sidecar,
    nginx_main,
    start_nginx,
    start_upstream,
)
from bench.tree import ZIP50M, build_tree, static_info_path  # noqa: E402
from tests.adversarial.rawhttp import push, raw_socket  # noqa: E402

MIB = 1024 * 1024
CLIENT_CORE = 0
SERVER_CORE = 1
HEADER_BYTES = 128 * MIB
PIPELINE_BYTES = 60 * MIB
READERS = 64
IDLE_SAMPLE_S = 3.0
SCENARIO_LIMIT_S = 60.0
STALL_S = 3.0  # a client whose bytes the server has not taken for this long gives up
SCENARIOS = ("header", "pipeline", "readers")


@dataclass
class Target:
    """A running server under test and its idle CPU rate (background work)."""

    name: str
    port: int
    pids: Callable[[], Sequence[int]]
    idle_cpu_per_s: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass
class Figure:
    scenario: str
    server: str
    answer: str
    client_sent: int
    cpu_ms: float
    rss_growth_mb: float
    hwm_growth_mb: float
    wall_s: float
    extra: str = ""


# ---------------------------------------------------------------- servers


def sidecar_yaml(port: int, upstream: Server, home: Path, send_timeout: float | None) -> str:
    """``send_timeout`` None: an older revision, without send_timeout or verify."""
    # Made-up modules and no checksum database: these cases measure the HTTP server.
    newer = f"send_timeout: {send_timeout:g}s\nverify: {{mode: off}}\n" if send_timeout else ""
    return f"""listen: "127.0.0.1:{port}"
upstreams:
  - name: origin
    url: "{upstream.url}"
    pool: {{max_connections: {READERS}}}
cache: {{dir: "{home / "cache"}", max_bytes: 20GiB}}
routing:
  rules:
    - {{match: "{ZIP50M.module}", cache: false}}
{newer}"""


def nginx_body(port: int, upstream: Server, prefix: Path, send_timeout: float) -> str:
    upstream_port = upstream.url.rsplit(":", 1)[1]
    cache_path = f"{prefix}/cache levels=1:2 keys_zone=gp:64m inactive=1h use_temp_path=off"
    return f"""    proxy_cache_path {cache_path};
    upstream origin {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        send_timeout {send_timeout:g}s;
        reset_timedout_connection on;
        location = {HEALTH_PATH} {{ return 200 'ok\\n'; }}
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache gp;
            proxy_cache_key $uri;
            proxy_cache_valid 200 1h;
        }}
        location ~ /{ZIP50M.name}/ {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""


def start_targets(
    procs: Procs, work: Path, upstream: Server, send_timeout: float, rev: str | None
) -> list[Target]:
    home = work / "sidecar"
    home.mkdir()
    port = free_port()
    source = export_sidecar(rev, work / "source") if rev else REPO
    conf = sidecar_yaml(port, upstream, home, None if rev else send_timeout)
    proc, _ = launch_sidecar(procs, home, "sidecar", conf, port, SERVER_CORE, source=source)
    label = f"sidecar@{rev}" if rev else "sidecar"
    targets = [Target(label, port, proc.tree)]
    nport = free_port()
    prefix = work / "nginx"
    nconf = nginx_main(prefix, nginx_body(nport, upstream, prefix, send_timeout))
    nproc = start_nginx(procs, "nginx", prefix, nconf, nport, SERVER_CORE)
    targets.append(Target("nginx", nport, nproc.tree))
    for target in targets:
        target.idle_cpu_per_s = idle_rate(target)
    return targets


def idle_rate(target: Target) -> float:
    """CPU seconds per second the server spends with no client (its control loop...)."""
    before = cpu_seconds(target.pids())
    time.sleep(IDLE_SAMPLE_S)
    return (cpu_seconds(target.pids()) - before) / IDLE_SAMPLE_S


def get(port: int, path: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as resp:
        resp.read()
        return int(resp.status)


# ---------------------------------------------------------------- clients


async def read_all(sock: socket.socket, deadline: float) -> tuple[bytes, str]:
    """What the server sends until it closes (or ``deadline``), and how it ended."""
    loop = asyncio.get_running_loop()
    got = b""
    try:
        while True:
            data = await asyncio.wait_for(loop.sock_recv(sock, 65536), deadline - loop.time())
            if not data:
                return got, "closed"
            got = (got + data)[:4096]
    except TimeoutError:
        return got, "still open"
    except OSError as exc:
        return got, f"reset ({exc.__class__.__name__})"


async def header_client(port: int) -> tuple[str, int]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SCENARIO_LIMIT_S
    sock = await raw_socket(port)
    await loop.sock_sendall(sock, b"GET /example.com/x/@v/list HTTP/1.1\r\nHost: t\r\nX-Long: ")
    sender = asyncio.create_task(push(sock, b"a" * (256 * 1024), HEADER_BYTES, STALL_S, deadline))
    answer, end = await read_all(sock, deadline)
    sent = await sender
    sock.close()
    status = answer.split(b"\r\n", 1)[0].decode("latin-1") or "no answer"
    return f"{status}; {end}", sent


async def pipeline_client(port: int) -> tuple[str, int]:
    loop = asyncio.get_running_loop()
    req = f"GET {static_info_path(0)} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
    sock = await raw_socket(port)
    sent = await push(sock, req * (65536 // len(req)), PIPELINE_BYTES, STALL_S, loop.time() + 60)
    sock.close()
    return f"{sent // len(req)} requests sent, none read", sent


async def probe(port: int, path: str) -> tuple[int, float]:
    """One GET read to the end: status, seconds to the whole body."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    status = int(head.split()[1])
    while await asyncio.wait_for(reader.read(1 << 20), 30):
        pass
    writer.close()
    return status, loop.time() - started


def tcp_state(sock: socket.socket) -> int:
    """Linux tcp_info.tcpi_state: 1 is ESTABLISHED (the server has not closed)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


async def readers_client(port: int, settle_s: float) -> tuple[str, int]:
    """The non-readers, then probes until one is served; then how many
    non-readers the server has dropped, waiting up to ``settle_s`` for the rest."""
    loop = asyncio.get_running_loop()
    path = ZIP50M.path()
    socks = [await raw_socket(port) for _ in range(READERS)]
    for sock in socks:
        await loop.sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    await asyncio.sleep(1.0)  # their answers start and stall
    started = loop.time()
    statuses: list[int] = []
    served_after = None
    while loop.time() - started < SCENARIO_LIMIT_S:
        try:
            status, _ = await probe(port, path)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            status = 0
        statuses.append(status)
        if status == 200:
            served_after = loop.time() - started
            break
        await asyncio.sleep(0.2)
    settle_until = loop.time() + settle_s
    while True:  # the server resets a dropped one: its state leaves ESTABLISHED
        dropped = sum(tcp_state(s) != 1 for s in socks)
        if dropped == READERS or loop.time() >= settle_until:
            break
        await asyncio.sleep(0.2)
    all_dropped = loop.time() - started
    for sock in socks:
        sock.close()
    refused = collections.Counter(statuses if served_after is None else statuses[:-1])
    tried = ", ".join(f"{n} x {status}" for status, n in sorted(refused.items())) or "none"
    when = f"{served_after:.1f} s" if served_after is not None else "never"
    gone = f"all by {all_dropped:.1f} s" if dropped == READERS else f"{dropped}/{READERS}"
    return f"probe served after {when} (answers before: {tried}); non-readers dropped: {gone}", 0


# ---------------------------------------------------------------- measuring


Client = Callable[[int], Coroutine[Any, Any, tuple[str, int]]]


def measure(target: Target, scenario: str, client: Client) -> Figure:
    pids = target.pids()
    rss_before = rss_kib(pids)
    hwm_before = sum(status_kib(p, "VmHWM") for p in pids)
    cpu_before = cpu_seconds(pids)
    started = time.monotonic()
    with RssPoller(target.pids) as poller:
        answer, sent = asyncio.run(client(target.port))
        time.sleep(0.3)  # let the server finish closing
    wall = time.monotonic() - started
    cpu = cpu_seconds(target.pids()) - cpu_before - target.idle_cpu_per_s * wall
    hwm_after = sum(status_kib(p, "VmHWM") for p in target.pids())
    return Figure(
        scenario,
        target.name,
        answer,
        sent,
        round(max(cpu, 0.0) * 1000, 1),
        round((poller.peak_kib - rss_before) / 1024, 1),
        round((hwm_after - hwm_before) / 1024, 1),
        round(wall, 1),
    )


WHAT = {
    "header": "128 MiB unterminated header line",
    "pipeline": "60 MiB of unread pipelined GETs (cached)",
    "readers": f"{READERS} non-reading clients, uncached 50 MiB",
}
TARGETS = {
    "header": "< 50 ms CPU, < 1 MB RSS, a 400/431",
    "pipeline": "< 20 MB RSS growth",
    "readers": "others served within the send timeout",
}


def report(figures: list[Figure], send_timeout: float) -> str:
    lines = [
        f"{'scenario':44} {'server':16} {'client sent':>12} {'CPU ms':>8} "
        f"{'RSS +MB':>8} {'HWM +MB':>8} {'wall s':>7}  answer",
        "-" * 130,
    ]
    for f in figures:
        sent = f"{f.client_sent / MIB:.1f} MiB" if f.client_sent else "-"
        lines.append(
            f"{WHAT[f.scenario]:44} {f.server:16} {sent:>12} {f.cpu_ms:>8} "
            f"{f.rss_growth_mb:>8} {f.hwm_growth_mb:>8} {f.wall_s:>7}  {f.answer}"
        )
    lines.append("")
    lines.append(f"send_timeout {send_timeout:g}s on both servers. Targets (issue 12):")
    lines.extend(f"  {WHAT[s]}: {TARGETS[s]}" for s in SCENARIOS)
    lines.append(
        "CPU ms: the server's CPU during the scenario less its idle rate (10 ms ticks). "
        "RSS +MB: peak VmRSS (polled every 50 ms) less VmRSS before. HWM +MB: VmHWM growth."
    )
    lines.append(
        "nginx spools a proxied body to a temp file, so its non-readers hold no upstream "
        "connection; the sidecar relays, so its non-readers hold one each until dropped."
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--send-timeout", type=float, default=10.0, help="seconds (default 10)")
    p.add_argument("--rev", help="measure this git revision of the sidecar instead")
    p.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = p.parse_args(argv)
    args.scenarios = [s for s in args.only.split(",") if s]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}; choose from {SCENARIOS}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.sched_setaffinity(0, {CLIENT_CORE})
    work = Path(tempfile.mkdtemp(prefix="goproxy-edges-"))
    os.chmod(work, 0o755)
    (work / "logs").mkdir()
    procs = Procs(work / "logs")
    figures: list[Figure] = []
    try:
        with stopping(procs):
            build_tree(work / "tree")
            upstream = start_upstream(procs, work, work / "tree", CLIENT_CORE)
            targets = start_targets(procs, work, upstream, args.send_timeout, args.rev)
            for target in targets:
                for _ in range(2):  # the second is a hit held in memory
                    get(target.port, static_info_path(0))
            clients: dict[str, Client] = {
                "header": header_client,
                "pipeline": pipeline_client,
                "readers": partial(readers_client, settle_s=args.send_timeout + 5),
            }
            for scenario in args.scenarios:
                for target in targets:
                    figures.append(measure(target, scenario, clients[scenario]))
                    print(f"edges: {scenario} on {target.name} done", file=sys.stderr)
    except BenchError as exc:
        print(f"edges: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.keep:
            print(f"edges: kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(report(figures, args.send_timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
