"""Instructions per request of a sidecar under callgrind: a deterministic
figure for one code change against another (the VM's CPU time per request
swings 30-80 % between runs; an instruction count does not).

    python3 bench/instructions.py --case hit [--source /tmp/perf-old] [--requests 2000]

The sidecar (``python -m sidecar run`` from ``--source``, default this
checkout) runs under ``valgrind --tool=callgrind --instr-atstart=no``; the
harness (an asyncio upstream answering every ``.info``, and a client of
``--connections`` keep-alive connections) runs outside it. After a warm-up
(every URL once, then as many requests again) instrumentation is switched on
for ``--requests`` requests and off again; the process's whole count over
that window (every thread: the write-behind is part of a miss) divided by the
requests is the figure (each thread's share is printed too). The policy
runs once an hour, so no evaluation lands in the window. Cases: ``hit``
(``--urls`` static ``.info`` cycled, cache on), ``miss`` (a unique
``.info`` per request, cache on), ``miss-nocache`` (the same with
``cache.enabled: false``), ``hit-auth`` (``hit`` through the front door:
``client_auth`` on, an htpasswd user, an access rule on a private glob,
``Authorization: Basic`` on every request, its bcrypt done in the warm-up;
issue 17's question, without the VM's noise). Kernel time is not counted
(callgrind sees user space only): a change in syscalls shows in strace, not
here.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import bcrypt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.procs import cpu_seconds, free_port, pinned
from bench.servers import build_compiled
from bench.tree import UNIQUE_PREFIX, info_body, static_info_path

REPO = Path(__file__).resolve().parent.parent
START_S = 600.0  # imports under callgrind are slow even uninstrumented
INFO = info_body()
CLIENT_CORE, SIDECAR_CORE = 0, 1


async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Any ``.info`` is a 200 with a ~100 byte body; anything else a 404."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b" ", 2)[1]
            if target.endswith(b".info"):
                status, body = b"200 OK", INFO
            else:
                status, body = b"404 Not Found", b"not found\n"
            writer.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


USER, PASSWORD = "bench", "bench-Pa55word"
AUTHORIZATION = "Authorization: Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


async def fetch_all(port: int, paths: list[str], connections: int, extra: str = "") -> None:
    """Ask for every path once, over ``connections`` keep-alive connections
    (``extra``: more header lines); every answer must be a 200."""
    queue = iter(paths)

    async def one_connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for path in queue:
                writer.write(
                    f"GET {path} HTTP/1.1\r\nHost: bench\r\nUser-Agent: Go-http-client/1.1\r\n"
                    f"Accept-Encoding: gzip\r\n{extra}\r\n".encode()
                )
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    raise SystemExit(f"{path}: {head.splitlines()[0]!r}")
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                if length is None:
                    raise SystemExit(f"{path}: no Content-Length")
                await reader.readexactly(int(length.group(1)))
        finally:
            writer.close()

    await asyncio.gather(*(one_connection() for _ in range(connections)))


def config(port: int, upstream_port: int, cache_dir: Path, cache: bool, auth: Path | None) -> str:
    cache_yaml = f'{{dir: "{cache_dir}"}}' if cache else f'{{dir: "{cache_dir}", enabled: false}}'
    text = f"""listen: "127.0.0.1:{port}"
upstreams:
  - name: origin
    url: "http://127.0.0.1:{upstream_port}"
    pool: {{max_connections: 256}}
cache: {cache_yaml}
# regopy's allocator (snmalloc) cannot start under valgrind: the OPA engine,
# pointed at a port nobody listens on, runs once an hour and fails (allow).
policy: {{engine: opa, opa_url: "http://127.0.0.1:{free_port()}", interval: 1h}}
"""
    if auth is not None:  # as bench/auth_cost.py's: a rule the bench's modules do not match
        text += f"""routing: {{private: ["corp.example"]}}
client_auth:
  enabled: true
  htpasswd: "{auth}"
  trusted_networks: ["10.0.0.0/8"]
  groups: [{{name: platform, members: [{USER}]}}]
  access: [{{modules: ["corp.example/platform"], allow: ["@platform"]}}]
"""
    return text


def wait_healthy(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the sidecar exited ({proc.returncode})")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"no /healthz after {START_S:.0f} s")


def callgrind_control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def thread_instructions(out: Path) -> list[int]:
    """The ``totals:`` line of each thread's callgrind output file (``summary:``
    reads 0 when instrumentation was switched on late), the event loop's
    thread (the first) first; threads that ran nothing in the window left out."""
    totals = []
    for path in sorted(out.parent.glob(out.name + "-*")):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("totals:") and int(line.split()[1]):
                totals.append(int(line.split()[1]))
    return totals


def paths_for(case: str, urls: int, count: int, offset: int) -> list[str]:
    if case in ("hit", "hit-auth"):
        return [static_info_path((offset + i) % urls) for i in range(count)]
    nonce = os.urandom(4).hex()
    return [f"{UNIQUE_PREFIX}r{nonce}m{offset + i}/@v/v1.0.0.info" for i in range(count)]


async def measure(args: argparse.Namespace, work: Path) -> int:
    up_port = free_port()
    server = await asyncio.start_server(upstream, "127.0.0.1", up_port)
    port = free_port()
    conf = work / "sidecar.yaml"
    auth = None
    if args.case == "hit-auth":
        auth = work / "htpasswd"
        hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10)).decode()
        auth.write_text(f"{USER}:{hashed}\n")
    extra = f"{AUTHORIZATION}\r\n" if auth is not None else ""
    conf.write_text(config(port, up_port, work / "cache", args.case != "miss-nocache", auth))
    out = work / "callgrind.out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    stub = work / "stub"
    (stub / "regopy").mkdir(parents=True)
    (stub / "regopy" / "__init__.py").write_text("")
    env["PYTHONPATH"] = os.pathsep.join([str(args.source), str(stub)])
    under = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        "--separate-threads=yes",  # one file per thread: the loop's share apart
        f"--callgrind-out-file={out}",
    ]
    print(f"sidecar from {args.source}: {build_compiled(args.source)}", flush=True)
    argv = [
        *(under if args.measure == "callgrind" else []),
        *(["taskset", "-c", str(SIDECAR_CORE)] if args.measure == "cpu" else []),
        sys.executable,
        "-m",
        "sidecar",
        "run",
        "--config",
        str(conf),
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(
        argv,
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(work / "sidecar.log", "wb"),  # noqa: SIM115
    )
    try:
        await asyncio.to_thread(wait_healthy, port, proc)
        warm = args.urls if args.case.startswith("hit") else args.requests // 4
        for offset in (0, warm):
            paths = paths_for(args.case, args.urls, warm, offset)
            await fetch_all(port, paths, args.connections, extra)
        measured = paths_for(args.case, args.urls, args.requests, 0)
        if args.measure == "callgrind":
            callgrind_control(proc.pid, "-i", "on")
            await fetch_all(port, measured, args.connections, extra)
            callgrind_control(proc.pid, "-i", "off")
        elif args.measure == "cpu":
            spy = None
            if args.py_spy:
                spy = subprocess.Popen(
                    pinned(
                        CLIENT_CORE,
                        [
                            "py-spy",
                            "record",
                            "-r",
                            "500",
                            "-f",
                            "raw",
                            *(["--native"] if args.native else []),
                            "-o",
                            str(args.py_spy),
                            "-p",
                            str(proc.pid),
                        ],
                    ),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                await asyncio.sleep(1.0)
            before = cpu_seconds([proc.pid])
            await fetch_all(port, measured, args.connections, extra)
            spent = cpu_seconds([proc.pid]) - before
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                await asyncio.to_thread(spy.wait, 60)
            return round(spent * 1e9)  # ns, as a count
        else:
            await traced(
                proc.pid, work / "strace.out", fetch_all(port, measured, args.connections, extra)
            )
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 120)
        server.close()
    if args.measure == "strace":
        return syscalls(work / "strace.out")
    threads = thread_instructions(out)
    per_thread = ", ".join(f"{t / args.requests:,.0f}" for t in threads)
    print(f"per request by thread (the event loop's first): {per_thread}")
    return sum(threads)


async def traced(pid: int, out: Path, work: Coroutine[Any, Any, None]) -> None:
    """``strace -c -f`` attached to ``pid`` (every thread) while ``work`` runs."""
    tracer = subprocess.Popen(
        ["strace", "-c", "-f", "-o", str(out), "-p", str(pid)], stderr=subprocess.DEVNULL
    )
    await asyncio.sleep(1.0)  # attached by then
    await work
    tracer.send_signal(signal.SIGINT)
    await asyncio.to_thread(tracer.wait, 30)
    print(out.read_text())


def syscalls(out: Path) -> int:
    """The ``total`` line of ``strace -c``: calls."""
    for line in out.read_text().splitlines():
        if line.rstrip().endswith("total"):
            return int(line.split()[3])
    raise SystemExit(f"no total in {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--case", choices=("hit", "hit-auth", "miss", "miss-nocache"), default="hit")
    p.add_argument("--source", type=Path, default=REPO, help="checkout whose sidecar runs")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--urls", type=int, default=1000, help="static URLs cycled (hit)")
    p.add_argument(
        "--measure",
        choices=("callgrind", "strace", "cpu"),
        default="callgrind",
        help="callgrind: instructions; strace: syscalls (attached after the warm-up); "
        "cpu: the sidecar's CPU ns (pinned to core 1, this client to core 0)",
    )
    p.add_argument("--py-spy", type=Path, help="cpu: py-spy record -r 500 -f raw into this file")
    p.add_argument("--native", action="store_true", help="--py-spy: C frames too (py-spy --native)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (callgrind output)")
    args = p.parse_args()
    if args.measure == "cpu":
        os.sched_setaffinity(0, {CLIENT_CORE})
    work = Path(tempfile.mkdtemp(prefix="instr-"))
    instructions = asyncio.run(measure(args, work))
    rev = subprocess.run(
        ["git", "-C", str(args.source), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    print(
        f"{args.case} source={args.source} rev={rev} requests={args.requests} "
        f"connections={args.connections} {args.measure}={instructions} "
        f"per_request={instructions / args.requests:,.0f}"
    )
    if args.keep:
        print(f"kept {work}")
    else:
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
