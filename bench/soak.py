"""Soak: does the sidecar's memory keep growing under a long, mixed load?

    python3 bench/soak.py [--minutes 10] [--sample-s 10] [--warmup-s 60] [--out FILE] [--keep]

One sidecar (cache on, a small ``cache.max_bytes``) in front of the static
upstream nginx, both on 127.0.0.1, driven for ``--minutes`` by wrk in bounded
runs that cycle through a mix: cache hits on one small ``.info``, unique small
misses (every request a module never asked before, so the cache fills, then
evicts least recently used entries for the rest of the soak) and 1 MiB zip hits.
A background thread samples every ``--sample-s`` seconds the sidecar's VmRSS,
open fds and threads and its cache gauges from ``/metrics``.

Why: a per-request leak (a task, a buffer, an index entry never freed) is too
small to see in a 10 s benchmark run but shows as a steady RSS slope over
minutes. The first ``--warmup-s`` seconds are left out of the slope: the
allocator's arenas, the connection pools and the cache index grow to their
working size there (so keep it at least one round of the mix, 30 s). With the
cache at its bound the index stops growing, so what the slope still shows
afterwards is the sidecar, not the cache filling. The figures are printed, not
judged: RSS moves by a few MB with what is in flight at the sample (a zip's
buffers, glibc trimming or not), and the reader decides what slope is a leak.

Pinning as in run.py: the sidecar on core 1, wrk, the upstream and this
harness on core 0. Prints a table and a verdict line and writes
bench/results/soak.json (see bench/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.procs import BenchError, Proc, Procs, rss_kib, stopping  # noqa: E402
from bench.run import (  # noqa: E402
    LOADGEN_CORE,
    PROXY_CORE,
    check_machine,
    fetch,
    log_findings,
    tool_versions,
)
from bench.servers import Server, start_sidecar, start_upstream  # noqa: E402
from bench.tree import (  # noqa: E402
    ZIP1M,
    build_tree,
    info_body,
    static_info_path,
    unique_info_prefix,
)
from bench.wrk import WrkResult, run_wrk, write_script  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "soak.json"
# Small on purpose: an .info answer is 100 bytes, so a 64 MiB bound would take
# ~670 k cached misses (more than a 10-minute soak caches) and the index
# would grow all along, which looks like a leak but is the cache filling. 4 MiB
# holds the zip plus ~30 k .info entries: full after a round or two of the mix
# (misses the disk writer cannot keep up with are served uncached, so the fill
# rate depends on the disk), then every cached miss evicts (and the zip and the
# hit .info now and then too, which exercises eviction of large entries).
CACHE_MAX = "4MiB"
CONNECTIONS = 32  # moderate: the soak looks for leaks, not for the highest rate
LEG_S = 10  # one wrk run; short so each leg of the mix recurs many times
MAX_WRK_S = 30  # the bound on any one wrk run
assert LEG_S <= MAX_WRK_S
METRICS = {
    "goproxy_sidecar_cache_entries": "cache_entries",
    "goproxy_sidecar_cache_bytes": "cache_bytes",
    "goproxy_sidecar_cache_evictions_total": "evictions",
    "goproxy_sidecar_cache_write_skips_total": "write_skips",
}
TABLE_ROWS = 13  # the printed timeline is thinned to about this many rows


@dataclass(frozen=True, slots=True)
class Leg:
    """One part of the mix: a fixed path, or unique ``.info`` paths when ``path`` is ""."""

    name: str
    what: str
    path: str
    size: int  # expected body bytes, checked once before the soak


MIX: tuple[Leg, ...] = (
    Leg("small-hit", "one static .info, a cache hit", static_info_path(0), len(info_body())),
    Leg("small-miss", "a new module's .info per request: fill, then evict", "", len(info_body())),
    Leg("zip1m-hit", "the 1 MiB zip, a cache hit (refilled if evicted)", ZIP1M.path(), ZIP1M.size),
)


@dataclass(frozen=True, slots=True)
class Sample:
    t_s: float  # since the load started
    leg: str  # what wrk was running at the time ("" before and after the load)
    rss_mb: float  # summed VmRSS of the sidecar's process tree
    fds: int | None
    threads: int | None
    cache_entries: int | None
    cache_bytes: int | None
    evictions: int | None
    write_skips: int | None  # small misses served uncached: the disk writer was behind


@dataclass
class LegTotals:
    runs: int = 0
    seconds: float = 0.0
    requests: int = 0
    errors: int = 0  # socket errors + non-2xx/3xx answers (wrk)
    status_errors: int = 0
    bytes: int = 0


@dataclass
class Soak:
    """What one soak measured so far; a Ctrl-C still reports this."""

    samples: list[Sample] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    legs: dict[str, LegTotals] = field(default_factory=lambda: {g.name: LegTotals() for g in MIX})
    problems: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- sampling


def count_dir(path: str) -> int | None:
    try:
        return len(os.listdir(path))
    except OSError:
        return None


def scrape(base_url: str) -> dict[str, int]:
    """The cache gauges of ``/metrics``; {} when the sidecar does not answer in time."""
    try:
        with urllib.request.urlopen(base_url + "/metrics", timeout=2) as resp:
            text = resp.read().decode(errors="replace")
    except OSError:
        return {}
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in METRICS:
            with contextlib.suppress(ValueError):
                out[METRICS[name]] = int(float(value))
    return out


class Sampler:
    """Samples the sidecar every ``every_s`` seconds in a thread, once more on exit.

    Sample times are fixed from the start (``t0 + k * every_s``), so a slow
    ``/metrics`` answer delays one sample instead of shifting all later ones.
    """

    def __init__(self, proc: Proc, url: str, every_s: float, into: list[Sample]) -> None:
        self._proc = proc
        self._url = url
        self._every_s = every_s
        self._into = into
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._t0 = 0.0
        self.leg = ""  # set by the load loop; a str assignment is atomic

    def __enter__(self) -> Sampler:
        self._t0 = time.monotonic()
        self._take()  # the idle sidecar, before the first wrk run
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.leg = ""
        self._take()  # RSS at the end: after the last wrk run

    def _loop(self) -> None:
        k = 1
        while not self._stop.wait(max(0.0, self._t0 + k * self._every_s - time.monotonic())):
            self._take()
            k += 1

    def _take(self) -> None:
        pid = self._proc.pid
        t_s = round(time.monotonic() - self._t0, 1)
        rss = rss_kib(self._proc.tree())
        fds = count_dir(f"/proc/{pid}/fd")
        threads = count_dir(f"/proc/{pid}/task")
        gauges = scrape(self._url)
        self._into.append(
            Sample(
                t_s=t_s,
                leg=self.leg,
                rss_mb=round(rss / 1024, 1),
                fds=fds,
                threads=threads,
                cache_entries=gauges.get("cache_entries"),
                cache_bytes=gauges.get("cache_bytes"),
                evictions=gauges.get("evictions"),
                write_skips=gauges.get("write_skips"),
            )
        )


# ---------------------------------------------------------------- load


def plan(total_s: int, leg_s: int, mix: Sequence[Leg] = MIX) -> list[tuple[Leg, int]]:
    """The wrk runs of the soak: the mix in turn, ``leg_s`` each, ``total_s`` in all."""
    runs: list[tuple[Leg, int]] = []
    left = total_s
    while left > 0:
        seconds = min(leg_s, left)
        runs.append((mix[len(runs) % len(mix)], seconds))
        left -= seconds
    return runs


def probe(sidecar: Server) -> None:
    """Each fixed path once (status, size): fills the cache so the hit legs hit."""
    for leg in MIX:
        if not leg.path:
            continue
        status, size, _ = fetch(sidecar.url + leg.path)
        if status != 200 or size != leg.size:
            raise BenchError(
                f"GET {sidecar.url + leg.path} -> {status}, {size} bytes (expected 200, {leg.size})"
            )


def drive(
    soak: Soak, sidecar: Server, sampler: Sampler, work: Path, runs: Sequence[tuple[Leg, int]]
) -> None:
    """Run ``runs`` one after the other, adding wrk's counters to ``soak``."""
    scripts = {unique: write_script(work, unique) for unique in (False, True)}
    token = os.urandom(3).hex()  # unique paths never repeat across soaks either
    for i, (leg, seconds) in enumerate(runs):
        sampler.leg = leg.name  # labels the samples taken during this run
        prefix = None if leg.path else unique_info_prefix(f"{token}n{i}")
        try:
            r = run_wrk(
                sidecar.url + leg.path if leg.path else sidecar.url,
                CONNECTIONS,
                seconds,
                scripts[not leg.path],
                LOADGEN_CORE,
                prefix,
            )
        except BenchError as exc:
            soak.problems.append(f"run {i} ({leg.name}): {str(exc).splitlines()[0][:300]}")
        else:
            account(soak, leg, r)
        if not sidecar.proc.alive():
            soak.problems.append(
                f"sidecar exited with {sidecar.proc.popen.returncode} during run {i} "
                f"({leg.name}); log tail:\n{sidecar.proc.log_tail(15)}"
            )
            return


def account(soak: Soak, leg: Leg, r: WrkResult) -> None:
    totals = soak.legs[leg.name]
    totals.runs += 1
    totals.seconds += r.duration_s
    totals.requests += r.requests
    totals.errors += r.errors
    totals.status_errors += r.status_errors
    totals.bytes += r.bytes
    soak.runs.append(
        {
            "leg": leg.name,
            "requests": r.requests,
            "duration_s": r.duration_s,
            "rps": round(r.rps, 1),
            "errors": r.errors,
            "status_errors": r.status_errors,
            "p50_ms": r.p50_ms,
            "p99_ms": r.p99_ms,
        }
    )


# ---------------------------------------------------------------- figures


def slope_mb_per_min(samples: Sequence[Sample]) -> float | None:
    """Least-squares slope of RSS over time, in MB per minute (None below 2 points)."""
    if len(samples) < 2:
        return None
    xs = [s.t_s / 60 for s in samples]
    ys = [s.rss_mb for s in samples]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    return round(sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx, 3)


def second_half(samples: Sequence[Sample]) -> list[Sample]:
    """The samples of the later half of ``samples``' time span. The allocators keep
    their high-water marks (glibc's heap, pymalloc's arenas), so RSS climbs in
    ever rarer steps to the largest working set the mix brings and stays there:
    a slope over the whole run is that settling, a leak still climbs here."""
    if not samples:
        return []
    middle = (samples[0].t_s + samples[-1].t_s) / 2
    return [s for s in samples if s.t_s >= middle]


def summarize(soak: Soak, warmup_s: float) -> dict[str, Any]:
    samples = soak.samples
    after = [s for s in samples if s.t_s >= warmup_s]
    later = second_half(after)
    first, warm, last = (
        (samples[0], after[0] if after else None, samples[-1]) if samples else (None, None, None)
    )
    growth = round(last.rss_mb - warm.rss_mb, 1) if last and warm else None
    return {
        "rss_first_mb": first.rss_mb if first else None,
        "warmup_sample_t_s": warm.t_s if warm else None,
        "rss_after_warmup_mb": warm.rss_mb if warm else None,
        "rss_max_mb": max(s.rss_mb for s in samples) if samples else None,
        "rss_end_mb": last.rss_mb if last else None,
        "growth_mb": growth,
        "slope_mb_per_min": slope_mb_per_min(after),
        "slope_samples": len(after),
        "slope_minutes": round((after[-1].t_s - after[0].t_s) / 60, 2) if after else 0.0,
        "late_slope_mb_per_min": slope_mb_per_min(later),
        "late_growth_mb": round(later[-1].rss_mb - later[0].rss_mb, 1) if later else None,
        "late_from_t_s": later[0].t_s if later else None,
        "fds_first": first.fds if first else None,
        "fds_after_warmup": warm.fds if warm else None,
        "fds_last": last.fds if last else None,
        "threads_first": first.threads if first else None,
        "threads_after_warmup": warm.threads if warm else None,
        "threads_last": last.threads if last else None,
        "requests": sum(t.requests for t in soak.legs.values()),
        "errors": sum(t.errors for t in soak.legs.values()),
        "status_errors": sum(t.status_errors for t in soak.legs.values()),
        "cache_entries_last": last.cache_entries if last else None,
        "cache_bytes_last": last.cache_bytes if last else None,
        "evictions_last": last.evictions if last else None,
        "write_skips_last": last.write_skips if last else None,
    }


def show(value: object, unit: str = "") -> str:
    return "n/a" if value is None else f"{value}{unit}"


def timeline_rows(samples: Sequence[Sample], warmup_s: float) -> list[int]:
    """Indices of the samples to print: about TABLE_ROWS, always the warm-up one and the last."""
    step = max(1, math.ceil(len(samples) / TABLE_ROWS))
    keep = set(range(0, len(samples), step)) | {len(samples) - 1}
    keep |= {next((i for i, s in enumerate(samples) if s.t_s >= warmup_s), 0)}
    return sorted(i for i in keep if i >= 0)


def table(soak: Soak, summary: dict[str, Any], warmup_s: float) -> str:
    lines = [
        f"{'t s':>7} {'RSS MB':>7} {'fds':>5} {'thr':>4} {'entries':>8} "
        f"{'cache MB':>8} {'evicted':>8} {'skipped':>8}  leg"
    ]
    warm_t = summary["warmup_sample_t_s"]
    for i in timeline_rows(soak.samples, warmup_s):
        s = soak.samples[i]
        mb = None if s.cache_bytes is None else round(s.cache_bytes / 1024 / 1024, 1)
        mark = "  <- after warm-up" if s.t_s == warm_t else ""
        lines.append(
            f"{s.t_s:>7} {s.rss_mb:>7} {show(s.fds):>5} {show(s.threads):>4} "
            f"{show(s.cache_entries):>8} {show(mb):>8} {show(s.evictions):>8} "
            f"{show(s.write_skips):>8}  {s.leg}{mark}"
        )
    lines.append("")
    lines.append(f"{'leg':<11} {'runs':>4} {'requests':>9} {'req/s':>8} {'errors':>6}")
    for name, t in soak.legs.items():
        rps = round(t.requests / t.seconds) if t.seconds else 0
        lines.append(f"{name:<11} {t.runs:>4} {t.requests:>9} {rps:>8} {t.errors:>6}")
    return "\n".join(lines)


def verdict(summary: dict[str, Any]) -> str:
    if summary["growth_mb"] is None:
        return "verdict: no sample after the warm-up; nothing to say about growth"
    return (
        f"verdict: RSS {summary['rss_after_warmup_mb']} MB after warm-up -> "
        f"{summary['rss_end_mb']} MB at the end ({summary['growth_mb']:+} MB, "
        f"max {summary['rss_max_mb']} MB), slope {show(summary['slope_mb_per_min'], ' MB/min')} "
        f"over {summary['slope_minutes']} min ({summary['slope_samples']} samples), "
        f"{show(summary['late_slope_mb_per_min'], ' MB/min')} from {summary['late_from_t_s']} s "
        f"({summary['late_growth_mb']:+} MB); "
        f"fds {show(summary['fds_after_warmup'])} -> {show(summary['fds_last'])}, "
        f"threads {show(summary['threads_after_warmup'])} -> {show(summary['threads_last'])}; "
        f"{summary['requests']} requests, {summary['errors']} errors"
    )


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="load time, warm-up included")
    p.add_argument("--sample-s", type=float, default=10.0, help="seconds between samples")
    p.add_argument(
        "--warmup-s", type=float, default=60.0, help="seconds of load left out of the slope"
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    p.add_argument(
        "--legs",
        nargs="+",
        choices=[g.name for g in MIX],
        default=[g.name for g in MIX],
        help="run only these legs of the mix (to tell which one grows)",
    )
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.sample_s <= 0 or args.warmup_s < 0:
        p.error("--minutes and --sample-s must be > 0, --warmup-s >= 0")
    if args.warmup_s >= args.minutes * 60:
        p.error("--warmup-s must be shorter than the soak (--minutes)")
    return args


def soak_run(args: argparse.Namespace, work: Path, soak: Soak, meta: dict[str, Any]) -> None:
    procs = Procs(work / "logs")
    with stopping(procs):
        build_tree(work / "tree")
        upstream = start_upstream(procs, work, work / "tree", LOADGEN_CORE)
        sidecar = start_sidecar(
            procs, work, "sidecar", upstream, True, PROXY_CORE, max_bytes=CACHE_MAX
        )
        meta["sidecar"] = {"argv": sidecar.proc.argv, "log": str(sidecar.proc.log_path)}
        meta["sidecar"] |= sidecar.notes
        probe(sidecar)
        mix = [g for g in MIX if g.name in args.legs]
        runs = plan(max(1, round(args.minutes * 60)), LEG_S, mix)
        if args.warmup_s < len(mix) * LEG_S:
            print(
                f"soak: note: --warmup-s {args.warmup_s} is shorter than one round of the mix "
                f"({len(mix) * LEG_S} s): the slope includes legs' first working set",
                flush=True,
            )
        print(
            f"soak: {len(runs)} wrk runs of <= {LEG_S} s (-c{CONNECTIONS}), mix "
            f"{', '.join(g.name for g in mix)}; cache.max_bytes {CACHE_MAX}; "
            f"sampling every {args.sample_s} s",
            flush=True,
        )
        with Sampler(sidecar.proc, sidecar.url, args.sample_s, soak.samples) as sampler:
            drive(soak, sidecar, sampler, work, runs)
        procs.stop(sidecar.proc)  # stopped before its log is read


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_machine()
    except BenchError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {LOADGEN_CORE})  # the harness and its sampler stay off core 1
    work = Path(tempfile.mkdtemp(prefix="goproxy-soak-"))
    os.chmod(work, 0o755)  # nginx workers read the tree
    (work / "logs").mkdir()
    started = time.time()
    soak = Soak()
    meta: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "argv": sys.argv[1:],
        "minutes": args.minutes,
        "sample_s": args.sample_s,
        "warmup_s": args.warmup_s,
        "wrk": {"connections": CONNECTIONS, "threads": 1, "run_s": LEG_S},
        "cache_max_bytes": CACHE_MAX,
        "mix": [asdict(g) for g in MIX if g.name in args.legs],
        "pinning": {"sidecar": PROXY_CORE, "wrk": LOADGEN_CORE, "upstream": LOADGEN_CORE},
        "sidecar_env": "as a user starts it (it tunes malloc itself: sidecar/heap.py)",
    }
    try:
        soak_run(args, work, soak, meta)
    except KeyboardInterrupt:
        print("soak: interrupted; reporting what was sampled", file=sys.stderr)
        soak.problems.append("interrupted")
    except BenchError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        soak.problems.append(str(exc))
    finally:
        log = work / "logs" / "sidecar.log"
        soak.problems += [f"sidecar log: {finding}" for finding in log_findings(log)]
        if args.keep:
            print(f"soak: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    meta["elapsed_s"] = round(time.time() - started, 1)
    meta["versions"] = tool_versions()
    meta["loadavg_at_end"] = os.getloadavg()
    summary = summarize(soak, args.warmup_s)
    print()
    print(table(soak, summary, args.warmup_s))
    if soak.problems:
        print("\nproblems:")
        for line in soak.problems:
            print(f"  - {line}")
    print()
    print(verdict(summary))
    doc = {
        "meta": meta,
        "summary": summary,
        "samples": [asdict(s) for s in soak.samples],
        "legs": {name: asdict(t) for name, t in soak.legs.items()},
        "runs": soak.runs,
        "problems": soak.problems,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
