"""Sidecars under wrk for a CPU-per-hit comparison (bench/tls_cost.py: two
side by side; bench/auth_cost.py: one, switched between modes): a ``python
-m http.server`` upstream and wrk on the load core, each sidecar a child
process of the calling script (``--serve MODE PORT UPSTREAM WORK``) on the
proxy core, and each one's CPU time read from /proc."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import cpu_seconds, free_port, pinned

LOAD_CORE, SIDECAR_CORE = 0, 1
START_S = 30.0


def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"a process exited early ({proc.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port} after {START_S:.0f} s")


def start_wrk(
    url: str, seconds: float, connections: int, headers: Sequence[str] = ()
) -> subprocess.Popen[str]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s"]
    for header in headers:
        argv += ["-H", header]
    return subprocess.Popen(
        pinned(LOAD_CORE, [*argv, url]),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def wrk_done(proc: subprocess.Popen[str]) -> int:
    """Requests wrk completed (non-2xx fail the run)."""
    out, _ = proc.communicate()
    if proc.returncode != 0 or "Non-2xx" in out:
        raise SystemExit(f"wrk saw failures:\n{out}")
    match = re.search(r"(\d+) requests in", out)
    if match is None:
        raise SystemExit(f"cannot read wrk's output:\n{out}")
    return int(match.group(1))


@dataclass
class Pair:
    """The running contenders: each one's port and pid, and the upstream's URL."""

    upstream: str
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)

    def cpu(self, mode: str) -> float:
        return cpu_seconds([self.pids[mode]])


@contextlib.contextmanager
def running(script: str, modes: Sequence[str], tree: Path, work: Path) -> Iterator[Pair]:
    """The upstream serving ``tree`` and one sidecar per mode, stopped on exit."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        up_port = free_port()
        upstream = subprocess.Popen(
            pinned(
                LOAD_CORE, [sys.executable, "-m", "http.server", str(up_port), "-b", "127.0.0.1"]
            ),
            cwd=tree,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(upstream)
        wait_port(up_port, upstream)
        pair = Pair(f"http://127.0.0.1:{up_port}")
        for mode in modes:
            port = pair.ports[mode] = free_port()
            argv = [sys.executable, script, "--serve", mode, str(port), pair.upstream, str(work)]
            child = subprocess.Popen(pinned(SIDECAR_CORE, argv), stderr=subprocess.DEVNULL)
            procs.append(child)
            pair.pids[mode] = child.pid
            wait_port(port, child)
        yield pair
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
