"""What client authentication costs a cache hit (issue 17: at most 1.10x CPU).

    python3 bench/auth_cost.py [--rounds 5] [--duration 5] [--connections 16]

Two sidecars, each its own process on core 1, the same cache warmed with one
small ``.info`` (a hit answered from memory, the cheapest request there is,
so the check's share is the largest it can be):

- ``open``: ``client_auth`` off;
- ``auth``: ``client_auth`` on, an htpasswd file of bcrypt entries (cost 10),
  an access rule on a private glob and a trusted network that does not match,
  the credential verified once and then served from the credential cache.

Load: ``wrk -t1 -c<connections>`` on core 0, the same URL on every request
with the headers the go command sends (User-Agent, Accept-Encoding), and
``Authorization: Basic`` on the ``auth`` runs. Both contenders are loaded at
the same time, one wrk each, so the rest of the machine's work weighs on
both alike. For each round: each sidecar's own CPU time (utime + stime from
/proc) over the requests its wrk completed.

Then the same in this process without sockets: one sidecar with
``client_auth``, ``answer_now`` called on in-memory exchanges with its front
door taken out and put back in turn. That is the check's own cost against
the least a hit costs; end to end it is diluted by the socket work.

Printed: medians and minimums of CPU per hit and the auth/open ratios, and
the load average (other work on the machine shifts both sides alike; the
minimums are the runs it disturbed least).
"""

from __future__ import annotations

import argparse
import base64
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.hitpair import running, start_wrk, wrk_done  # noqa: E402 - after the path is set

INFO_PATH = "example.com/bench/auth/@v/v1.0.0.info"
USER, PASSWORD = "bench", "bench-Pa55word"
# What the go command sends besides Host (and Authorization, from .netrc).
GO_HEADERS = ["User-Agent: Go-http-client/1.1", "Accept-Encoding: gzip"]
CONTENDERS = ("open", "auth")


def config(mode: str, port: int, upstream: str, work: Path, cache: str = "") -> Any:
    """The sidecar's Config, built as the tests build it."""
    from sidecar.config import (
        AccessRule,
        CacheConfig,
        ClientAuthConfig,
        Config,
        GroupConfig,
        RoutingConfig,
        UpstreamConfig,
        VerifyConfig,
        VerifyMode,
    )

    client_auth = ClientAuthConfig(
        enabled=mode == "auth",
        htpasswd=str(work / "htpasswd"),
        trusted_networks=("10.0.0.0/8",),
        groups=(GroupConfig("platform", (USER,)),),
        access=(AccessRule(("corp.example/platform",), ("@platform",)),),
    )
    return Config(
        listen=f"127.0.0.1:{port}",
        upstreams=(UpstreamConfig(name="up", url=upstream),),
        cache=CacheConfig(dir=str(work / f"cache-{mode}{cache}")),
        routing=RoutingConfig(private=("corp.example",)),
        verify=VerifyConfig(mode=VerifyMode.OFF),
        client_auth=client_auth,
    )


def serve(mode: str, port: int, upstream: str, work: Path) -> None:
    """The child: one sidecar until killed."""
    import asyncio

    from sidecar.app import SidecarService, build_sidecar

    cfg = config(mode, port, upstream, work)

    async def run() -> None:
        service = SidecarService(build_sidecar(cfg))
        await service.start("127.0.0.1", port)
        await asyncio.Event().wait()

    try:
        import uvloop

        uvloop.run(run())
    except ImportError:
        asyncio.run(run())


class MemoryConnection:
    """What an Exchange writes to, without a socket: the handler's own work alone."""

    def __init__(self) -> None:
        from sidecar.server.exchange import DateHeader

        self.date = DateHeader()
        self.closing = False
        self.peer = "127.0.0.1"
        self.credential: Any = None
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def check_open(self) -> None:
        return None


def in_process(upstream: str, work: Path, rounds: int, headers: dict[str, list[str]]) -> None:
    """One sidecar with client_auth in this process, its front door taken out
    (open) and put back (auth) in turn: the CPU of ``answer_now`` per hit with
    no sockets, so the check's share is the largest it can be."""
    import asyncio

    from sidecar.app import SidecarService, build_sidecar
    from sidecar.server.exchange import Exchange

    lines: list[tuple[bytes, bytes]] = [(b"Host", b"127.0.0.1")]  # what wrk adds
    for header in headers["auth"]:
        name, _, value = header.partition(": ")
        lines.append((name.encode(), value.encode()))
    target = f"/{INFO_PATH}"
    n = 100_000

    async def measure() -> dict[str, list[float]]:
        service = SidecarService(build_sidecar(config("auth", 0, upstream, work, "-inproc")))
        await service.start("127.0.0.1", 0)
        conn: Any = MemoryConnection()
        try:
            ex = Exchange(conn, "GET", target, lines, True, True)
            if not service.answer_now(ex):  # warm: the entry, the credential's bcrypt
                await service.handle(ex)
            door = service.door
            out: dict[str, list[float]] = {m: [] for m in CONTENDERS}
            for _ in range(rounds):
                for mode in CONTENDERS:
                    service.door = service.proxy.door = door if mode == "auth" else None
                    answer = service.answer_now
                    started = time.process_time()
                    for _ in range(n):
                        ex = Exchange(conn, "GET", target, lines, True, True)
                        if not answer(ex):  # the credential's TTL ran out: verified again
                            await service.handle(ex)
                    out[mode].append((time.process_time() - started) / n * 1e6)
                    assert ex.status == 200, ex.status
            service.door = service.proxy.door = door
            return out
        finally:
            await service.stop(0)

    report("in process (answer_now, no sockets)", asyncio.run(measure()))


def report(what: str, per_request: dict[str, list[float]]) -> None:
    """Medians, and minimums (the runs least disturbed by other work on the machine)."""
    opened, authed = per_request["open"], per_request["auth"]
    med_o, med_a = statistics.median(opened), statistics.median(authed)
    min_o, min_a = min(opened), min(authed)
    print(
        f"{what}: median open {med_o:.2f} / auth {med_a:.2f} µs per hit = {med_a / med_o:.3f}x; "
        f"minimum {min_o:.2f} / {min_a:.2f} = {min_a / min_o:.3f}x (target <= 1.10x)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--serve", nargs=4, metavar=("MODE", "PORT", "UPSTREAM", "WORK"))
    args = p.parse_args(argv)
    if args.serve:
        mode, port, upstream, work = args.serve
        serve(mode, int(port), upstream, Path(work))
        return 0
    for tool in ("wrk", "htpasswd"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: run scripts/debian-deps.sh")
    with tempfile.TemporaryDirectory(prefix="auth-cost-") as tmp:
        return run(Path(tmp), args)


def run(work: Path, args: argparse.Namespace) -> int:
    subprocess.run(
        ["htpasswd", "-cbB", "-C", "10", str(work / "htpasswd"), USER, PASSWORD],
        check=True,
        capture_output=True,
    )
    tree = work / "tree"
    (tree / INFO_PATH).parent.mkdir(parents=True)
    (tree / INFO_PATH).write_text('{"Version":"v1.0.0","Time":"2025-01-01T00:00:00Z"}')
    with running(__file__, CONTENDERS, tree, work) as pair:
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        headers = {"open": GO_HEADERS, "auth": [*GO_HEADERS, f"Authorization: Basic {token}"]}
        urls = {m: f"http://127.0.0.1:{pair.ports[m]}/{INFO_PATH}" for m in CONTENDERS}
        for mode in CONTENDERS:  # warm: the cache entry, and the credential's one bcrypt
            wrk_done(start_wrk(urls[mode], 1, 1, headers[mode]))
        per_request: dict[str, list[float]] = {m: [] for m in CONTENDERS}
        for round_ in range(args.rounds):
            # Both at once, under the same load: whatever else runs on the
            # machine then weighs on both sides alike.
            before = {m: pair.cpu(m) for m in CONTENDERS}
            loads = {
                m: start_wrk(urls[m], args.duration, args.connections, headers[m])
                for m in CONTENDERS
            }
            done = {m: wrk_done(loads[m]) for m in CONTENDERS}
            for mode in CONTENDERS:
                used = pair.cpu(mode) - before[mode]
                per_request[mode].append(used / done[mode] * 1e6)
                print(
                    f"round {round_ + 1} {mode:4}: {done[mode]:7d} requests, "
                    f"{used:6.2f} s CPU, {used / done[mode] * 1e6:6.2f} µs/request"
                )
        report("end to end (wrk, sidecar process CPU)", per_request)
        in_process(pair.upstream, work, args.rounds, headers)
    print(f"load average: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
