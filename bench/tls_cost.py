"""What serving HTTPS itself (``tls``) costs a cache hit, against plain HTTP.

    python3 bench/tls_cost.py [--rounds 3] [--duration 5] [--connections 16]

Two sidecars, each its own process on core 1, each with a cache warmed with
a small ``.info`` (answered from memory) and a 1 MiB ``.zip`` (a file: sent
with sendfile(2) on plain HTTP, copied through the TLS transport and
encrypted over HTTPS): ``plain`` without ``tls``, ``tls`` with a self-signed
P-256 certificate. Load: ``wrk -t1 -c<connections>`` on core 0, keep-alive
(the handshakes are amortised, as for the go command's connections), both
contenders loaded at the same time so other work on the machine weighs on
both alike. For each round: each sidecar's CPU time (utime + stime from
/proc) over the requests its wrk completed.

Printed: per case, the medians and minimums of CPU per hit, the tls/plain
ratios, and the load average.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.hitpair import running, start_wrk, wrk_done  # noqa: E402 - after the path is set

CASES = {
    "small hit": "example.com/bench/tls/@v/v1.0.0.info",
    "1 MiB zip hit": "example.com/bench/tls/@v/v1.0.0.zip",
}
CONTENDERS = ("plain", "tls")


def serve(mode: str, port: int, upstream: str, work: Path) -> None:
    """The child: one sidecar until killed."""
    import asyncio

    import uvloop

    from sidecar.app import SidecarService, build_sidecar
    from sidecar.config import (
        CacheConfig,
        Config,
        TlsConfig,
        UpstreamConfig,
        VerifyConfig,
        VerifyMode,
    )

    tls = TlsConfig(str(work / "cert.pem"), str(work / "key.pem")) if mode == "tls" else TlsConfig()
    cfg = Config(
        listen=f"127.0.0.1:{port}",
        upstreams=(UpstreamConfig(name="up", url=upstream),),
        cache=CacheConfig(dir=str(work / f"cache-{mode}")),
        verify=VerifyConfig(mode=VerifyMode.OFF),
        tls=tls,
    )

    async def run() -> None:
        service = SidecarService(build_sidecar(cfg))
        await service.start("127.0.0.1", port)
        await asyncio.Event().wait()

    uvloop.run(run())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--serve", nargs=4, metavar=("MODE", "PORT", "UPSTREAM", "WORK"))
    args = p.parse_args(argv)
    if args.serve:
        mode, port, upstream, work = args.serve
        serve(mode, int(port), upstream, Path(work))
        return 0
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: run scripts/debian-deps.sh")
    with tempfile.TemporaryDirectory(prefix="tls-cost-") as tmp:
        return run(Path(tmp), args)


def run(work: Path, args: argparse.Namespace) -> int:
    from tests.functional.test_upstream_client_tls import self_signed

    self_signed(work)
    tree = work / "tree"
    for path in CASES.values():
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
    (tree / CASES["small hit"]).write_text('{"Version":"v1.0.0","Time":"2025-01-01T00:00:00Z"}')
    (tree / CASES["1 MiB zip hit"]).write_bytes(os.urandom(1024 * 1024))
    with running(__file__, CONTENDERS, tree, work) as pair:
        bases = {
            m: f"{'https' if m == 'tls' else 'http'}://127.0.0.1:{pair.ports[m]}/"
            for m in CONTENDERS
        }
        for case, path in CASES.items():
            for mode in CONTENDERS:  # warm: the cache entry
                wrk_done(start_wrk(bases[mode] + path, 1, 1))
            per_request: dict[str, list[float]] = {m: [] for m in CONTENDERS}
            for round_ in range(args.rounds):
                before = {m: pair.cpu(m) for m in CONTENDERS}
                loads = {
                    m: start_wrk(bases[m] + path, args.duration, args.connections)
                    for m in CONTENDERS
                }
                done = {m: wrk_done(loads[m]) for m in CONTENDERS}
                for mode in CONTENDERS:
                    used = pair.cpu(mode) - before[mode]
                    per_request[mode].append(used / done[mode] * 1e6)
                    print(
                        f"{case} round {round_ + 1} {mode:5}: {done[mode]:7d} requests, "
                        f"{used:6.2f} s CPU, {used / done[mode] * 1e6:8.2f} µs/request"
                    )
            plain, tls = per_request["plain"], per_request["tls"]
            med_p, med_t = statistics.median(plain), statistics.median(tls)
            print(
                f"{case}: median plain {med_p:.2f} / tls {med_t:.2f} µs per hit = "
                f"{med_t / med_p:.2f}x; minimum {min(plain):.2f} / {min(tls):.2f} = "
                f"{min(tls) / min(plain):.2f}x"
            )
    print(f"load average: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
