"""What a run costs: per-core busy time from /proc/stat, a server's CPU and peak RSS.

The machine is shared, so per-core busy time includes other people's work;
the server's own CPU seconds per request (from /proc/<pid>/stat) do not, and
are the steadier figure on a noisy machine.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench.procs import cpu_seconds, rss_kib

RSS_POLL_S = 0.05


def core_times() -> list[tuple[int, int]]:
    """(busy, total) jiffies per core from /proc/stat."""
    out: list[tuple[int, int]] = []
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            if not line[3].isdigit():
                break
            v = [int(x) for x in line.split()[1:]]
            idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
            total = sum(v[:8])  # guest time is already inside user
            out.append((total - idle, total))
    return out


def busy_percent(before: list[tuple[int, int]], after: list[tuple[int, int]]) -> list[float]:
    out = []
    for (b0, t0), (b1, t1) in zip(before, after, strict=False):
        dt = t1 - t0
        out.append(round(100.0 * (b1 - b0) / dt, 1) if dt > 0 else 0.0)
    return out


class RssPoller:
    """Polls the summed VmRSS of a process tree in a thread; keeps the maximum."""

    def __init__(self, pids: Callable[[], Sequence[int]]) -> None:
        self._pids = pids
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.peak_kib = 0

    def __enter__(self) -> RssPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            self.peak_kib = max(self.peak_kib, rss_kib(self._pids()))
            if self._stop.wait(RSS_POLL_S):
                self.peak_kib = max(self.peak_kib, rss_kib(self._pids()))
                return


@dataclass
class Usage:
    """Resources used between ``start`` and ``stop`` of one measured run."""

    cores_busy_pct: list[float]
    server_cpu_s: float
    upstream_cpu_s: float
    peak_rss_kib: int


class UsageMeter:
    """Samples per-core CPU, the server's and the upstream's CPU, the server's RSS."""

    def __init__(
        self,
        server_pids: Callable[[], Sequence[int]],
        upstream_pids: Callable[[], Sequence[int]] | None,
    ) -> None:
        self._server_pids = server_pids
        self._upstream_pids = upstream_pids or (lambda: [])
        self._poller = RssPoller(server_pids)

    def __enter__(self) -> UsageMeter:
        self._cores = core_times()
        self._server = cpu_seconds(self._server_pids())
        self._upstream = cpu_seconds(self._upstream_pids())
        self._poller.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._poller.__exit__()
        self.usage = Usage(
            cores_busy_pct=busy_percent(self._cores, core_times()),
            server_cpu_s=round(cpu_seconds(self._server_pids()) - self._server, 3),
            upstream_cpu_s=round(cpu_seconds(self._upstream_pids()) - self._upstream, 3),
            peak_rss_kib=self._poller.peak_kib,
        )
