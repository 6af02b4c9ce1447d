"""Resilience benchmark: the go command's own failover, nginx and the sidecar in front
of the same loopback upstreams, from healthy bursts to hung primaries (issues 13, 14).

    python3 bench/resilience.py [--quick] [--scenarios a,b] [--contenders go,nginx,sidecar]

Prints a table and writes bench/results/resilience.json (after every trial,
so an interrupted run keeps what it measured). bench/README.md explains the
scenarios and the columns; bench/scenarios.py lists them.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.checksums import build_database  # noqa: E402
from bench.contenders import CONTENDERS  # noqa: E402
from bench.procs import BenchError, Procs, stopping  # noqa: E402
from bench.scenarios import BY_NAME, SCENARIOS, Scenario  # noqa: E402
from bench.servers import build_compiled, nginx_binary  # noqa: E402
from bench.trial import Options, Row, run_trial  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "resilience.json"
LOAD_CORE, PROXY_CORE = 0, 1
CAP_S = 30.0
BUILD_DEADLINE_S, QUICK_BUILD_DEADLINE_S = 180.0, 90.0
GROUPS = {"issue13": 13, "issue14": 14}


def pick_scenarios(text: str) -> list[Scenario]:
    """Names, or ``issue13`` / ``issue14`` for all of an issue; empty: all."""
    if not text:
        return list(SCENARIOS)
    out: list[Scenario] = []
    for name in filter(None, (n.strip() for n in text.split(","))):
        if name in GROUPS:
            out += [s for s in SCENARIOS if s.issue == GROUPS[name]]
        elif name in BY_NAME:
            out.append(BY_NAME[name])
        else:
            known = ", ".join([*GROUPS, *BY_NAME])
            raise BenchError(f"unknown scenario {name!r}; known: {known}")
    return out


def pick_contenders(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()] or list(CONTENDERS)
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise BenchError(f"unknown contender {unknown[0]!r}; known: {', '.join(CONTENDERS)}")
    return names


def find_corpus() -> Path | None:
    """The e2e corpus (scripts/corpus.sh), if it is there."""
    configured = os.environ.get("SIDECAR_CORPUS_DIR")
    root = Path(configured) if configured else Path.home() / ".cache/goproxy-sidecar/corpus"
    return root if (root / "modcache" / "cache" / "download").is_dir() else None


# ---------------------------------------------------------------- the table

COLUMNS = (
    ("scenario", 16),
    ("contender", 9),
    ("requests", 8),
    ("failed", 7),
    ("after heal", 10),
    ("failures / build", 26),
    ("p50 ms", 8),
    ("p99 ms", 8),
    ("trips", 5),
    ("1st trip s", 10),
    ("closed s", 8),
    ("backup %", 8),
    ("wall s", 7),
    ("unvouched", 9),
    ("tripped", 0),
)


def _num(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) or abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}f}"


def _failures(row: Row) -> str:
    if row.build:
        return row.build
    top = sorted(row.outcomes.items(), key=lambda kv: -kv[1])[:3]
    return " ".join(f"{k.replace('http ', '')}:{v}" for k, v in top) or "-"


def _cells(row: Row) -> list[str]:
    closed = _num(row.closed_again_s)
    faulted = row.scenario in BY_NAME and BY_NAME[row.scenario].faulted
    if faulted and row.trips and row.closed_again_s is None:
        closed = "open" if row.sees_closing else "n/a"
    return [
        row.scenario,
        row.contender,
        _num(row.requests),
        _num(row.failed),
        _num(row.failed_after_heal),
        _failures(row),
        _num(row.p50_ms),
        _num(row.p99_ms),
        "n/a" if row.trips is None else str(row.trips),
        _num(row.first_trip_s),
        closed,
        _num(None if row.backup_share is None else row.backup_share * 100),
        _num(row.wall_s),
        "n/a" if row.unvouched is None else str(row.unvouched),
        row.trip_detail if row.trips else "",
    ]


def table(rows: list[Row]) -> str:
    lines = ["  ".join(name.ljust(width) for name, width in COLUMNS)]
    lines.append("-" * len(lines[0]))
    for row in rows:
        cells = _cells(row)
        line = "  ".join(c.ljust(w) for c, (_, w) in zip(cells, COLUMNS, strict=True))
        lines.append(line.rstrip())
    return "\n".join(lines)


LEGEND = f"""\
requests, failed, p50/p99: over the requests that started during the fault
  (the whole run where there is none); failed included in p50/p99. failed: the
  answer was not 200 as the client saw it (the backup could serve every one):
  "503:n" a status, "conn" refused/reset/cut, "timeout" the harness' {CAP_S:g} s
  cap per request. after heal: failures among requests started after the heal.
go: no process; the load client applies cmd/go's GOPROXY=primary|backup rule
  (any error after '|' tries the next entry; sumdb paths go to the first entry
  whose sumdb/<db>/supported answers) and cuts each request at the cap: the real
  go command has no timeout and would wait for ever. Builds run the real go.
trips: sidecar: breaker transitions to open (/metrics); nginx: 'upstream server
  temporarily disabled' lines in its error log; n/a: no breaker. tripped: which
  breaker (sidecar: its labels, e.g. primary/sumdb) or server (nginx), how often.
1st trip s: from the fault (from the start where there is none; for nginx an
  upper bound: its log has whole seconds). closed s: from the heal until every
  breaker was closed again ("open": not within the run; n/a: nginx does not say
  when it takes a server back). backup %: requests the backup upstream got per
  client request (builds: per upstream request). wall s: build wall time.
unvouched: sidecar: .mod/.zip bodies it could not check against the checksum
  database (bench/checksums.py: a real, signed one behind the upstreams'
  sumdb/ paths that holds every module asked for; verify_unavailable in /metrics)."""


# ---------------------------------------------------------------- running


def export_sidecar(rev: str, target: Path) -> Path:
    """``git archive rev sidecar policies`` unpacked into ``target`` (a PYTHONPATH
    entry; sidecar/policies links to ../policies), with the files of its build;
    the first trial compiles it (bench.servers.build_compiled)."""
    target.mkdir(parents=True)
    # What setup.py needs to compile it as an install would, where rev has it.
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-tree", "--name-only", rev],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    build = [name for name in ("setup.py", "pyproject.toml", "README.md") if name in listed]
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", rev, "sidecar", "policies", *build],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        raise BenchError(f"git archive {rev}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


def versions(go: str | None, sidecar_source: Path) -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except OSError as exc:
            return f"unavailable: {exc}"
        return ((p.stdout or p.stderr).strip().splitlines() or [""])[0]

    return {
        "nginx": first_line([nginx_binary(), "-v"]),
        "go": first_line([go, "version"]) if go else "absent",
        "checkout": first_line(["git", "-C", str(REPO), "describe", "--always", "--dirty"]),
        "sidecar_from": str(sidecar_source),
        "sidecar_build": build_compiled(sidecar_source),
        "python": sys.version.split()[0],
        "kernel": platform.release(),
    }


def run_all(
    scenarios: list[Scenario],
    contenders: list[str],
    opts: Options,
    work: Path,
    out: Path,
    rows: list[Row],
    rev: str,
    keep: bool,
) -> None:
    """Every scenario with every contender; ``rows`` grows as trials end."""
    meta = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv[1:],
        "sidecar_rev": rev,
        "quick": opts.quick,
        "options": {k: str(v) for k, v in dataclasses.asdict(opts).items()},
        "versions": versions(opts.go, opts.sidecar_source),
        "scenarios": {s.name: {"issue": s.issue, "what": s.what} for s in scenarios},
    }
    for scenario in scenarios:
        if scenario.build and (opts.corpus is None or opts.go is None):
            print(f"resilience: {scenario.name}: skipped (needs go and scripts/corpus.sh)")
            continue
        for name in contenders:
            trial_dir = work / f"{scenario.name}-{name}"
            (trial_dir / "logs").mkdir(parents=True)
            print(f"resilience: {scenario.name} / {name} ...", flush=True)
            with stopping(Procs(trial_dir / "logs")) as procs:
                try:
                    row = asyncio.run(run_trial(scenario, name, opts, trial_dir, procs))
                except BenchError as exc:
                    row = Row(scenario.name, name, notes=f"harness error: {exc}")
                    print(f"resilience: {scenario.name} / {name}: {exc}", file=sys.stderr)
            rows.append(row)
            if not keep:  # caches of tens of thousands of files: free them as we go
                shutil.rmtree(trial_dir, ignore_errors=True)
            print("  " + table([row]).splitlines()[-1], flush=True)
            doc = {"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}
            out.write_text(json.dumps(doc, indent=1) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short phases (3 s bursts)")
    p.add_argument("--scenarios", default="", help="comma separated; issue13, issue14")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--cap", type=float, default=CAP_S, help="seconds per client request")
    p.add_argument("--build-deadline", type=float, default=0.0, help="seconds per go build")
    p.add_argument(
        "--sidecar-rev",
        default="",
        help="run the sidecar of this git revision (git archive) instead of the checkout",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for s in SCENARIOS:
            print(f"{s.name:16} issue {s.issue}  {s.what}")
        return 0
    try:
        scenarios = pick_scenarios(args.scenarios)
        contenders = pick_contenders(args.contenders)
        nginx_binary()
        if shutil.which("go") is None:
            raise BenchError("go not found: it builds the checksum database (bench/checksums.py)")
    except BenchError as exc:
        print(f"resilience: {exc}", file=sys.stderr)
        return 2
    deadline = args.build_deadline or (QUICK_BUILD_DEADLINE_S if args.quick else BUILD_DEADLINE_S)
    work = Path(tempfile.mkdtemp(prefix="goproxy-resilience-"))
    os.chmod(work, 0o755)  # nginx workers (root -> nobody) read their prefix
    opts = Options(
        quick=args.quick,
        cap_s=args.cap,
        build_deadline_s=deadline,
        load_core=LOAD_CORE,
        proxy_core=PROXY_CORE,
        corpus=find_corpus(),
        go=shutil.which("go"),
        sidecar_source=REPO,
        sumdb_binary=build_database(work),
    )
    os.sched_setaffinity(0, {LOAD_CORE})  # the harness stays off the contender's core
    if args.sidecar_rev:
        try:
            source = export_sidecar(args.sidecar_rev, work / "sidecar-src")
        except BenchError as exc:
            print(f"resilience: {exc}", file=sys.stderr)
            return 2
        opts = dataclasses.replace(opts, sidecar_source=source)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    try:
        rev = args.sidecar_rev or "checkout"
        run_all(scenarios, contenders, opts, work, args.out, rows, rev, args.keep)
    except KeyboardInterrupt:
        print("resilience: interrupted; the JSON has what was measured", file=sys.stderr)
    finally:
        if args.keep:
            print(f"resilience: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(rows))
    print()
    print(LEGEND)
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
