"""asyncio load clients for what wrk cannot do; run as a pinned child process.

    python3 -m bench.loadclient rate --base URL --prefix PATH --rate 1000 --duration 10
    python3 -m bench.loadclient parallel --url URL --count 200 --size BYTES

``rate``: a fixed-rate (open-loop) client, wrk2-style: request ``i`` is due at
``t0 + i / rate`` whether or not earlier ones have finished, and its latency is
counted from that due time, so a stall is not hidden by the client waiting
(coordinated omission). Each request asks for a new unique ``.info`` path.
``parallel``: ``count`` concurrent downloads of one URL, each read to the end
and checked against ``size``. Both print one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import aiohttp

READ_CHUNK = 256 * 1024
WARMUP_S = 0.5


def percentile(sorted_ms: list[float], q: float) -> float:
    if not sorted_ms:
        return 0.0
    i = min(len(sorted_ms) - 1, max(0, round(q / 100 * (len(sorted_ms) - 1))))
    return round(sorted_ms[i], 3)


def summary(latencies_ms: list[float]) -> dict[str, float]:
    s = sorted(latencies_ms)
    return {
        f"p{k}_ms": percentile(s, q) for k, q in (("50", 50), ("90", 90), ("99", 99), ("999", 99.9))
    } | {"max_ms": round(s[-1], 3) if s else 0.0}


async def _get(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url) as resp:
        await resp.read()
        return resp.status


async def rate_mode(
    base: str, prefix: str, rate: float, duration: float, connections: int
) -> dict[str, object]:
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=10)
    latency: list[float] = []
    service: list[float] = []
    errors = 0

    async def one(url: str, due: float, record: bool) -> None:
        nonlocal errors
        sent = time.perf_counter()
        try:
            status = await _get(session, url)
        except (aiohttp.ClientError, TimeoutError):
            status = 0
        done = time.perf_counter()
        if not record:
            return
        if status != 200:
            errors += 1
        latency.append((done - due) * 1000)
        service.append((done - sent) * 1000)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks: list[asyncio.Task[None]] = []
        warm = int(rate * WARMUP_S)
        total = warm + int(rate * duration)
        t0 = time.perf_counter() + 0.01
        i = 0
        while i < total:
            now = time.perf_counter()
            # Start every request that is due; sleep until the next one.
            while i < total and t0 + i / rate <= now:
                url = f"{base}{prefix}t0m{i}/@v/v1.0.0.info"
                tasks.append(asyncio.create_task(one(url, t0 + i / rate, i >= warm)))
                i += 1
            if i < total:
                await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - (t0 + warm / rate)
    return {
        "requests": len(latency),
        "errors": errors,
        "elapsed_s": round(elapsed, 3),
        "achieved_rps": round(len(latency) / elapsed, 1),
        "rate": rate,
        "latency": summary(latency),
        "service": summary(service),
    }


async def parallel_mode(url: str, count: int, size: int, timeout_s: float) -> dict[str, object]:
    connector = aiohttp.TCPConnector(limit=count)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    short = 0
    failed = 0
    total_bytes = 0

    async def one() -> None:
        nonlocal short, failed, total_bytes
        got = 0
        try:
            async with session.get(url) as resp:
                if resp.status != 200:
                    failed += 1
                    return
                while chunk := await resp.content.read(READ_CHUNK):
                    got += len(chunk)
        except (aiohttp.ClientError, TimeoutError):
            failed += 1
        total_bytes += got
        if got != size:
            short += 1

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(count)))
        elapsed = time.perf_counter() - start
    return {
        "count": count,
        "failed": failed,
        "short": short,
        "bytes": total_bytes,
        "elapsed_s": round(elapsed, 3),
        "mbps": round(total_bytes / elapsed / 1e6, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(prog="loadclient")
    sub = p.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("rate")
    r.add_argument("--base", required=True)
    r.add_argument("--prefix", required=True)
    r.add_argument("--rate", type=float, default=1000)
    r.add_argument("--duration", type=float, default=10)
    r.add_argument("--connections", type=int, default=64)
    q = sub.add_parser("parallel")
    q.add_argument("--url", required=True)
    q.add_argument("--count", type=int, default=200)
    q.add_argument("--size", type=int, required=True)
    q.add_argument("--timeout", type=float, default=300)
    args = p.parse_args()
    if args.mode == "rate":
        coro = rate_mode(args.base, args.prefix, args.rate, args.duration, args.connections)
    else:
        coro = parallel_mode(args.url, args.count, args.size, args.timeout)
    try:
        import uvloop
    except ImportError:
        out = asyncio.run(coro)
    else:
        out = uvloop.run(coro)
    json.dump(out, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
