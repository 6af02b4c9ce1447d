"""Closed-loop load for bench/resilience.py: N clients, one request at a time each.

    python3 -m bench.drive --target URL [--target URL ...] --clients 64 --phases 2,8,20 \\
        --mix info:3,head:1 --nonce abc --start-at EPOCH --out FILE

Every request asks for a path no earlier request asked for (module
``<UNIQUE_PREFIX>r<nonce>m<n>``), so no contender answers from its cache and
every request reaches an upstream. ``--mix`` weighs the request kinds of
``KINDS``; request ``n`` is of kind ``pattern[n % len(pattern)]``.

One target: each request goes there and nowhere else (nginx, the sidecar).
Several targets: the go command's own ``GOPROXY=a|b``, with the rule of
cmd/go/internal/modfetch/proxy.go (``TryProxies``): after ``|`` any error,
a 404 included, moves on to the next entry; when all fail, the client sees
the first error that is not a 404/410 (else the first 404). Checksum
database paths follow cmd/go/internal/modfetch/sumdb.go: the first entry
whose ``sumdb/<db>/supported`` answers 200 serves every later lookup and
tile of that client, with no fallback (a failed choice is retried on the
next request, as the next go command would). The go command's HTTP client
has no timeout; here every request, fallbacks included, is cut at
``--cap`` seconds and counted as a ``timeout`` failure.

Clients stop starting requests at the end of the last phase (or after
``--max-requests``); requests in flight then end on their own or at the
cap. Writes one JSON document to ``--out``: the whole run, each phase (the
requests that started in it) and a per-second series of ok / failed.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import itertools
import json
import time
from pathlib import Path

import aiohttp

from bench.loadclient import summary
from bench.tree import VERSION, unique_info_prefix

SUMDB = "/sumdb/sum.golang.org"
# Full level-0 tiles the benchmark's checksum database holds from the start
# (bench/checksums.py puts thousands of modules in its tree before a trial).
DATABASE_TILES = 32
KINDS = {
    "info": "GET <module>/@v/v1.0.0.info",
    "mod": "GET <module>/@v/v1.0.0.mod",
    "list": "GET <module>/@v/list",
    "head": "HEAD <module>/@v/v1.0.0.info (curl -I)",
    "lookup": f"GET {SUMDB}/lookup/<module>@v1.0.0",
    "tile": f"GET {SUMDB}/tile/8/0/<nnn> (one of the database's first {DATABASE_TILES} full tiles)",
}
OK = "ok"
DEFAULT_CAP_S = 30.0
DEFAULT_MAX_REQUESTS = 2_000_000
SLOWEST = 200


def parse_mix(text: str) -> list[str]:
    """``info:3,head:1`` -> the repeating pattern of kinds."""
    pattern: list[str] = []
    for part in text.split(","):
        kind, _, weight = part.partition(":")
        if kind not in KINDS:
            raise ValueError(f"unknown request kind {kind!r} (known: {', '.join(KINDS)})")
        pattern += [kind] * int(weight or 1)
    return pattern


def request_for(kind: str, prefix: str, n: int) -> tuple[str, str]:
    """(method, path) of request ``n`` of ``kind``; ``prefix`` starts with '/'."""
    module = f"{prefix}m{n}"
    if kind == "lookup":
        return "GET", f"{SUMDB}/lookup/{module[1:]}@{VERSION}"
    if kind == "tile":
        # A tile that exists: tiles are immutable, so a cache answers the repeats,
        # as the go command's tiles come from caches in production.
        return "GET", f"{SUMDB}/tile/8/0/{n % DATABASE_TILES:03d}"
    method = "HEAD" if kind == "head" else "GET"
    tail = {"mod": f"@v/{VERSION}.mod", "list": "@v/list"}.get(kind, f"@v/{VERSION}.info")
    return method, f"{module}/{tail}"


class Tally:
    """Outcomes and latencies of a set of requests, and where the slowest were."""

    def __init__(self) -> None:
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.latency_ms: list[float] = []
        self.by_kind: dict[str, list[float]] = collections.defaultdict(list)
        self.marks: list[tuple[float, float, str]] = []  # (ms, started s into the run, kind)

    def add(self, outcome: str, ms: float, kind: str, at_s: float) -> None:
        self.outcomes[outcome] += 1
        self.latency_ms.append(ms)
        self.by_kind[kind].append(ms)
        self.marks.append((ms, at_s, kind))

    def document(self) -> dict[str, object]:
        total = sum(self.outcomes.values())
        tail = sorted(self.marks, reverse=True)[: min(SLOWEST, max(1, total // 100))]
        return {
            "requests": total,
            "failed": total - self.outcomes[OK],
            "outcomes": {k: v for k, v in self.outcomes.items() if k != OK},
            "latency": summary(self.latency_ms),
            "kinds": {k: summary(v) for k, v in sorted(self.by_kind.items())},
            # The slowest 1 % (at most SLOWEST): when each started and what it asked.
            "slowest": [[round(at, 3), kind, round(ms, 1)] for ms, at, kind in tail],
        }


class Recorder:
    """What the clients saw: over the whole run, per phase (by the time a request
    started) and per second (by the time it ended)."""

    def __init__(self, start_at: float, phases: list[float]) -> None:
        self.start_at = start_at
        self.ends = list(itertools.accumulate(phases))
        self.whole = Tally()
        self.phases = [Tally() for _ in phases]
        self.series: dict[int, list[int]] = collections.defaultdict(lambda: [0, 0])
        self.fallbacks = 0

    def add(self, outcome: str, kind: str, started: float, ended: float) -> None:
        ms = (ended - started) * 1000
        at = started - self.start_at
        self.whole.add(outcome, ms, kind, at)
        phase = min(bisect.bisect_right(self.ends, at), len(self.ends) - 1)
        self.phases[phase].add(outcome, ms, kind, at)
        self.series[int(ended - self.start_at)][outcome != OK] += 1

    def document(self) -> dict[str, object]:
        return {
            **self.whole.document(),
            "fallbacks": self.fallbacks,
            "phases": [t.document() for t in self.phases],
            "series": [[s, *v] for s, v in sorted(self.series.items())],
        }


async def attempt(session: aiohttp.ClientSession, method: str, url: str) -> str:
    """One HTTP exchange: ``ok``, ``http <status>`` or ``conn`` (refused, reset, cut)."""
    try:
        async with session.request(method, url) as resp:
            await resp.read()
            return OK if resp.status == 200 else f"http {resp.status}"
    except aiohttp.ClientError:
        return "conn"


def _rank(outcome: str) -> int:
    return 1 if outcome in ("http 404", "http 410") else 2


class GoClient:
    """One simulated go command behind ``GOPROXY=t1|t2|...``."""

    def __init__(self, session: aiohttp.ClientSession, targets: list[str]) -> None:
        self.session = session
        self.targets = targets
        self.sumdb_base: str | None = None

    async def get(self, method: str, path: str) -> tuple[str, bool]:
        """(outcome, answered by a later entry)."""
        if path.startswith(SUMDB + "/"):
            return await self._sumdb(method, path)
        return await self._try_proxies(method, path)

    async def _try_proxies(self, method: str, path: str) -> tuple[str, bool]:
        best = ""
        for i, target in enumerate(self.targets):
            outcome = await attempt(self.session, method, target + path)
            if outcome == OK:
                return OK, i > 0
            if not best or _rank(outcome) > _rank(best):
                best = outcome
        return best, False

    async def _sumdb(self, method: str, path: str) -> tuple[str, bool]:
        if self.sumdb_base is None:
            best = ""
            for target in self.targets:
                outcome = await attempt(self.session, "GET", f"{target}{SUMDB}/supported")
                if outcome == OK:
                    self.sumdb_base = target
                    break
                if not best or _rank(outcome) > _rank(best):
                    best = outcome
            else:
                return best, False
        outcome = await attempt(self.session, method, self.sumdb_base + path)
        return outcome, self.sumdb_base != self.targets[0]


async def drive(args: argparse.Namespace) -> dict[str, object]:
    pattern = parse_mix(args.mix)
    prefix = unique_info_prefix(args.nonce)
    rec = Recorder(args.start_at, args.phases)
    end = args.start_at + sum(args.phases)
    issued = 0
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    # No aiohttp timeout: the cap below bounds a request with its fallbacks, and
    # a proxy's own timeouts are what is measured.
    timeout = aiohttp.ClientTimeout(total=None)

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal issued
        go = GoClient(session, args.target)
        while time.time() < end and issued < args.max_requests:
            n = issued
            issued += 1
            kind = pattern[n % len(pattern)]
            method, path = request_for(kind, prefix, n)
            started = time.time()
            try:
                async with asyncio.timeout(args.cap):
                    outcome, fell_back = await go.get(method, path)
            except TimeoutError:
                outcome, fell_back = "timeout", False
            rec.fallbacks += fell_back
            rec.add(outcome, kind, started, time.time())

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.sleep(max(0.0, args.start_at - time.time()))
        await asyncio.gather(*(client(session) for _ in range(args.clients)))
    doc = rec.document()
    doc.update(
        clients=args.clients,
        mix=args.mix,
        targets=args.target,
        cap_s=args.cap,
        elapsed_s=round(time.time() - args.start_at, 3),
    )
    return doc


def main() -> int:
    p = argparse.ArgumentParser(prog="bench.drive", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", action="append", required=True, help="base URL; repeat for a|b")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument(
        "--phases",
        type=lambda text: [float(x) for x in text.split(",")],
        default=[8.0],
        help="seconds of each phase (comma separated); the load runs through all",
    )
    p.add_argument("--mix", default="info")
    p.add_argument("--nonce", required=True)
    p.add_argument("--start-at", type=float, default=0.0, help="Unix time to begin (default now)")
    p.add_argument("--cap", type=float, default=DEFAULT_CAP_S, help="seconds per request")
    p.add_argument("--max-requests", type=int, default=DEFAULT_MAX_REQUESTS)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    args.start_at = args.start_at or time.time()
    parse_mix(args.mix)  # a bad mix fails before any request
    try:
        import uvloop
    except ImportError:
        doc = asyncio.run(drive(args))
    else:
        doc = uvloop.run(drive(args))
    Path(args.out).write_text(json.dumps(doc) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
