"""One scenario against one contender: fresh upstreams, a fresh contender, the load
(or the build), the verdict. Everything started here is stopped here.

Cores: the load client and the two upstreams share ``load_core`` (0), the
contender under test (nginx, the sidecar) has ``proxy_core`` (1) to itself,
as in bench/run.py. The go contender has no process: its failover runs in
the load client.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.checksums import HELD_KINDS, MIN_RECORDS, database, held_modules, held_requests
from bench.contenders import Contender, Upstreams, Verdict, start_contender
from bench.drive import parse_mix
from bench.faults import REPO, FaultUpstream, launch
from bench.procs import BenchError, Procs
from bench.scenarios import Scenario

SETTLE_S = 1.0  # the load client starts this long after it is spawned (imports)
DRIVE_GRACE_S = 30.0
FREEZE_POLL_S = 0.01  # beyond phases + cap, before the load client is declared stuck


@dataclass(frozen=True, slots=True)
class Options:
    quick: bool
    cap_s: float  # per request, fallbacks included (the go command has no timeout)
    build_deadline_s: float
    load_core: int
    proxy_core: int
    corpus: Path | None  # the e2e corpus folder (scripts/corpus.sh); None: no builds
    go: str | None
    sidecar_source: Path  # the folder whose `sidecar` package runs
    sumdb_binary: Path  # bench/checksums.py's database, built


@dataclass
class Row:
    """One line of the table (and of resilience.json)."""

    scenario: str
    contender: str
    requests: int | None = None  # faulted scenarios: those that started during the fault
    failed: int | None = None
    outcomes: dict[str, int] = field(default_factory=dict)
    p50_ms: float | None = None
    p99_ms: float | None = None
    trips: int | None = None
    trip_detail: str = ""
    first_trip_s: float | None = None  # from the fault (the start when there is no fault)
    closed_again_s: float | None = None  # from the heal
    sees_closing: bool = False  # False: the contender does not show when it closes (nginx)
    failed_after_heal: int | None = None
    shed: int | None = None
    unvouched: int | None = None  # sidecar: .mod/.zip the checksum database did not vouch for
    backup_share: float | None = None  # requests the backup got / requests the clients made
    wall_s: float | None = None  # builds
    build: str = ""  # builds: ok, failed (exit N), timeout
    reasons: list[str] = field(default_factory=list)
    notes: str = ""
    build_output: str = ""  # the go command's last lines when the build failed
    phases: list[dict[str, Any]] = field(default_factory=list)  # the load client's, in order
    series: list[list[int]] = field(default_factory=list)
    upstream_stats: dict[str, Any] = field(default_factory=dict)


async def run_trial(scenario: Scenario, name: str, opts: Options, work: Path, procs: Procs) -> Row:
    root = opts.corpus / "modcache" / "cache" / "download" if opts.corpus else None
    nonce = os.urandom(4).hex()
    held = [] if scenario.build else held_modules(scenario.mix, nonce, held_load(scenario, opts))
    filler = 0 if scenario.build else max(0, MIN_RECORDS - len(held))
    # The database runs in this (the harness') process' affinity: the load core.
    with database(opts.sumdb_binary, work / "sumdb", held, root, scenario.build, filler) as db:
        return await _trial(scenario, name, opts, work, procs, root, nonce, db.url, db.verifier_key)


def held_load(scenario: Scenario, opts: Options) -> int:
    """Load requests whose modules the database holds from the start."""
    return held_requests(sum(p.length(opts.quick) for p in scenario.phases))


async def _trial(
    scenario: Scenario,
    name: str,
    opts: Options,
    work: Path,
    procs: Procs,
    root: Path | None,
    nonce: str,
    sumdb_url: str,
    sumdb_key: str,
) -> Row:
    first = scenario.phases[0].mode if scenario.phases else "healthy"
    primary = launch(procs, "primary", True, root, first, opts.load_core, sumdb_url)
    backup = launch(procs, "backup", False, root, "healthy", opts.load_core, sumdb_url)
    try:
        ups = Upstreams(primary.url, backup.url)
        contender = start_contender(
            name, procs, work, ups, scenario.pool, opts.proxy_core, opts.sidecar_source, sumdb_key
        )
        watcher = asyncio.create_task(contender.watch())
        try:
            if scenario.build:
                row, fault_at, healed_at = await _build(scenario, contender, primary, opts, work)
            else:
                row, fault_at, healed_at = await _load(
                    scenario, contender, primary, opts, procs, nonce
                )
        finally:
            watcher.cancel()
        primary.thaw()
        _judge(row, contender.verdict(healed_at), fault_at, healed_at)
        row.notes = "; ".join(note for note in (contender.notes(), row.notes) if note)
        row.upstream_stats = {"primary": primary.stats(), "backup": backup.stats()}
        got = {k: v.get("requests", 0) for k, v in row.upstream_stats.items()}
        made = sum(p["requests"] for p in row.phases) or got["primary"] + got["backup"]
        if made:
            row.backup_share = round(got["backup"] / made, 4)
        return row
    finally:
        primary.thaw()


def _judge(row: Row, v: Verdict, fault_at: float, healed_at: float | None) -> None:
    row.trips, row.trip_detail, row.shed, row.reasons = v.trips, v.detail, v.shed, v.reasons
    row.sees_closing = v.sees_closing
    row.unvouched = v.unvouched
    if v.first_trip_at is not None:
        row.first_trip_s = round(v.first_trip_at - fault_at, 2)
    if v.closed_at is not None and healed_at is not None:
        row.closed_again_s = round(v.closed_at - healed_at, 2)


async def _load(
    scenario: Scenario,
    contender: Contender,
    primary: FaultUpstream,
    opts: Options,
    procs: Procs,
    nonce: str,
) -> tuple[Row, float, float | None]:
    lengths = [p.length(opts.quick) for p in scenario.phases]
    start_at = time.time() + SETTLE_S
    out = procs.log_dir / "drive.json"
    argv = [sys.executable, "-m", "bench.drive"]
    for target in contender.targets():
        argv += ["--target", target]
    argv += ["--clients", str(scenario.clients), "--phases", ",".join(map(str, lengths))]
    argv += ["--mix", scenario.mix, "--nonce", nonce, "--start-at", str(start_at)]
    argv += ["--cap", str(opts.cap_s), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    drive = procs.start("drive", argv, opts.load_core, env=env, cwd=str(REPO))
    at = start_at
    for phase, length in zip(scenario.phases[1:], lengths, strict=False):
        at += length
        await asyncio.sleep(max(0.0, at - time.time()))
        primary.set_mode(phase.mode)
    deadline = start_at + sum(lengths) + opts.cap_s + DRIVE_GRACE_S
    while drive.alive():
        if time.time() > deadline:
            raise BenchError(f"the load client did not end; log {drive.log_path}")
        await asyncio.sleep(0.2)
    if drive.popen.returncode != 0 or not out.is_file():
        raise BenchError(f"the load client failed; log {drive.log_path}:\n{drive.log_tail()}")
    doc = json.loads(out.read_text())
    # A fault is judged on the requests that started during it; the heal on
    # the failures that remain after it.
    seen = doc["phases"][1] if scenario.faulted else doc
    row = Row(
        scenario.name,
        contender.name,
        requests=seen["requests"],
        failed=seen["failed"],
        outcomes=seen["outcomes"],
        p50_ms=seen["latency"]["p50_ms"],
        p99_ms=seen["latency"]["p99_ms"],
        failed_after_heal=doc["phases"][2]["failed"] if scenario.faulted else None,
        phases=doc["phases"],
        series=doc["series"],
    )
    held = held_load(scenario, opts)
    if doc["requests"] > held and HELD_KINDS & set(parse_mix(scenario.mix)):
        row.notes = f"the load went past the {held} requests whose modules the database held"
    fault_at = start_at + lengths[0] if scenario.faulted else start_at
    healed_at = fault_at + lengths[1] if scenario.faulted else None
    return row, fault_at, healed_at


async def _build(
    scenario: Scenario, contender: Contender, primary: FaultUpstream, opts: Options, work: Path
) -> tuple[Row, float, float | None]:
    if opts.corpus is None or opts.go is None:
        raise BenchError("build scenarios need go and the e2e corpus (scripts/corpus.sh)")
    # The e2e suite's hermetic go command (GOSUMDB=off: the committed go.sum
    # verifies every byte; fresh GOMODCACHE; GOPROXY = the contender).
    from tests.e2e.gocmd import GoWorkspace

    ws = GoWorkspace(Path(opts.go), work / "go", contender.goproxy(), opts.corpus / "gocache")
    row = Row(scenario.name, contender.name)
    started = time.time()
    frozen_at = [started]
    freezer = None
    if scenario.freeze_after == 0:
        primary.freeze()
    elif scenario.freeze_after is not None:
        freezer = asyncio.create_task(_freeze_after(primary, scenario.freeze_after, frozen_at))
    try:
        result = await ws.download(deadline_s=opts.build_deadline_s)
        row.build = "ok" if result.ok else f"failed (exit {result.returncode})"
        if not result.ok:
            row.build_output = result.output[-2000:]
    except TimeoutError:
        row.build = f"timeout (> {opts.build_deadline_s:g} s)"
    finally:
        if freezer is not None and not freezer.done():
            freezer.cancel()
            row.build += f"; primary never hung: < {scenario.freeze_after} requests"
        primary.thaw()
    row.wall_s = round(time.time() - started, 2)
    return row, frozen_at[0], None


async def _freeze_after(primary: FaultUpstream, requests: int, frozen_at: list[float]) -> None:
    """SIGSTOP the primary once it has been asked ``requests`` requests: mid-build
    on any machine, however fast the build."""
    while primary.stats().get("requests", 0) < requests:
        await asyncio.sleep(FREEZE_POLL_S)
    primary.freeze()
    frozen_at[0] = time.time()
