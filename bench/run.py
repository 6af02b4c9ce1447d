"""Benchmark the sidecar against nginx and the bare upstream, on loopback.

    python3 bench/run.py [--quick] [--cases small-hit,zip1m-hit ...]

Needs nginx and wrk (``scripts/debian-deps.sh`` installs them) and 2 cores:
the proxy under test runs on core 1, the load generator on core 0 (see
bench/README.md). Prints a table and writes bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import report  # noqa: E402
from bench.cases import CASE_NAMES, CASES, FULL, PARALLEL, QUICK, RATE, Case, Timing  # noqa: E402
from bench.procs import (  # noqa: E402
    BenchError,
    Procs,
    pin_pid_tree,
    pinned,
    status_kib,
    stopping,
)
from bench.sampler import UsageMeter  # noqa: E402
from bench.servers import (  # noqa: E402
    Server,
    Toxiproxy,
    nginx_binary,
    start_nginx_proxy,
    start_sidecar,
    start_upstream,
)
from bench.tree import STATIC_INFO_PATTERN, build_tree, unique_info_prefix  # noqa: E402
from bench.wrk import run_wrk, write_cycle_script, write_script, wrk_binary  # noqa: E402

LOADGEN_CORE = 0
PROXY_CORE = 1
# Where the upstream nginx runs while a proxy is measured: with the load
# generator, or on the proxy's own core (as Athens may share the pod's CPU).
# Each case runs in every layout; the report keeps the worse ratio.
LAYOUTS = {"load": LOADGEN_CORE, "proxy": PROXY_CORE}
DEFAULT_OUT = REPO / "bench" / "results" / "latest.json"
Record = dict[str, Any]


class Bench:
    """One harness run: the upstream, the contenders of the current case, the records."""

    def __init__(self, procs: Procs, work: Path, timing: Timing, upstream_core: int) -> None:
        self.procs = procs
        self.work = work
        self.timing = timing
        self.upstream_core = upstream_core
        self.records: list[Record] = []
        self.problems: list[str] = []
        self.checks: dict[str, dict[str, str]] = {}
        self.contenders: dict[str, dict[str, Any]] = {}  # how each was started, for the JSON
        self._seq = 0
        self._token = os.urandom(3).hex()
        self.upstream: Server | None = None
        self.toxiproxy: Toxiproxy | None = None
        self.delayed: dict[float, Server] = {}
        self.scripts = {u: write_script(work, u) for u in (False, True)}
        self.cycle_script = write_cycle_script(work)
        self.layout = next(k for k, v in LAYOUTS.items() if v == upstream_core)
        self.direct_done: set[str] = set()

    def set_layout(self, layout: str) -> None:
        """Move the upstream (and toxiproxy) to the layout's core."""
        self.layout = layout
        self.upstream_core = LAYOUTS[layout]
        for server in (self.upstream, self.toxiproxy):
            if server is not None:
                pin_pid_tree(server.proc.pid, self.upstream_core)

    def nonce(self) -> str:
        self._seq += 1
        return f"{self._token}n{self._seq}"

    # ------------------------------------------------------------ servers

    def start_upstream(self) -> None:
        build_tree(self.work / "tree")
        self.upstream = start_upstream(
            self.procs, self.work, self.work / "tree", self.upstream_core
        )

    def upstream_of(self, case: Case) -> Server:
        """The upstream nginx, behind toxiproxy when the case adds a round-trip time."""
        assert self.upstream is not None
        if not case.rtt_ms:
            return self.upstream
        if case.rtt_ms not in self.delayed:
            if self.toxiproxy is None:
                self.toxiproxy = Toxiproxy(self.procs, self.upstream_core)
            self.delayed[case.rtt_ms] = self.toxiproxy.delayed(self.upstream, case.rtt_ms)
        return self.delayed[case.rtt_ms]

    def start(self, name: str, upstream: Server) -> Server:
        self._seq += 1
        label = f"{name}-{self._seq}"
        if name == "direct":
            return Server("direct", upstream.url, upstream.proc)
        if name in ("nginx", "nginx-cache"):
            s = start_nginx_proxy(
                self.procs, self.work, label, upstream, name == "nginx-cache", PROXY_CORE
            )
        elif name in ("sidecar", "sidecar-nocache"):
            s = start_sidecar(
                self.procs,
                self.work,
                label,
                upstream,
                name != "sidecar-nocache",
                PROXY_CORE,
            )
        else:
            raise BenchError(f"unknown contender {name}")
        s.name = name
        self.contenders[name] = {"argv": s.proc.argv, "core": s.proc.core, **s.notes}
        return s

    def stop(self, server: Server, case: Case | None = None) -> None:
        if server.name == "direct":
            return
        self.procs.stop(server.proc)
        if case is not None and server.name.startswith("sidecar"):
            for finding in log_findings(server.proc.log_path):
                self.problems.append(f"{case.name}/{server.name}: log: {finding}")

    @contextlib.contextmanager
    def placed(self, server: Server) -> Iterator[None]:
        """For "direct" the upstream is the server under test: move it to the proxy core."""
        if server.name != "direct":
            yield
            return
        assert self.upstream is not None
        pin_pid_tree(self.upstream.proc.pid, PROXY_CORE)
        try:
            yield
        finally:
            pin_pid_tree(self.upstream.proc.pid, self.upstream_core)

    # ------------------------------------------------------------ checks

    def probe(self, case: Case, server: Server) -> str:
        """One request (two, then a third for hit cases): status, size, hit header."""
        path = case.path or f"{unique_info_prefix(self.nonce())}t9m1/@v/v1.0.0.info"
        if case.kind == PARALLEL and not case.hit:  # the measured version must stay uncached
            path = path.replace("/v1.0.0.", f"/v0.0.{self._seq}.")
        url = server.url + path
        status, size, headers = fetch(url)
        if status != 200 or size != case.size:
            raise BenchError(
                f"{server.name}: GET {url} -> {status}, {size} bytes (expected 200, {case.size})"
            )
        if not case.hit or not server.hit_header:
            return "ok"
        got = ""
        for _ in range(10):  # a fill may commit a moment after the body was sent
            _, _, headers = fetch(url)
            got = headers.get(server.hit_header, "")
            if got == server.hit_value:
                return "hit verified"
            time.sleep(0.2)
        return f"NOT A HIT ({server.hit_header}: {got or 'absent'})"

    def prepare(self, case: Case, server: Server) -> bool:
        """Probe, then warm up connections; False (and a problem recorded) if it fails."""
        try:
            check = self.probe(case, server)
            self.checks.setdefault(case.name, {})[server.name] = check
            if check.startswith("NOT"):
                self.problems.append(
                    f"{case.name}/{server.name}: {check}; measured anyway "
                    "(the figures are for misses)"
                )
            if case.kind not in (RATE, PARALLEL) and self.timing.warmup_s > 0:
                with self.placed(server):
                    self.wrk(case, server, self.timing.warmup_s)
        except BenchError as exc:
            self.fail(case, server, f"not measured: {exc}")
            return False
        return True

    def fail(self, case: Case, server: Server, message: str) -> None:
        tail = server.proc.log_tail(15) if server.name != "direct" else ""
        self.problems.append(
            f"{case.name}/{server.name}: {message}"
            + (f"\n    log tail:\n{indent(tail)}" if tail else "")
        )
        print(f"  ! {case.name}/{server.name}: {message.splitlines()[0][:200]}", flush=True)

    # ------------------------------------------------------------ measuring

    def wrk(self, case: Case, server: Server, duration_s: float) -> Any:
        prefix = unique_info_prefix(self.nonce()) if case.unique else None
        if case.urls:
            return run_wrk(
                server.url,
                case.connections,
                duration_s,
                self.cycle_script,
                LOADGEN_CORE,
                timeout_s=case.timeout_s,
                script_args=(STATIC_INFO_PATTERN, str(case.urls)),
            )
        return run_wrk(
            server.url + case.path if case.path else server.url,
            case.connections,
            duration_s,
            self.scripts[case.unique],
            LOADGEN_CORE,
            prefix,
            timeout_s=case.timeout_s,
        )

    def meter(self, server: Server) -> UsageMeter:
        assert self.upstream is not None
        up = self.upstream.proc
        upstream_pids = None if server.name == "direct" else up.tree
        return UsageMeter(server.proc.tree, upstream_pids)

    def measure(self, case: Case, server: Server, rep: int) -> Record:
        rec: Record = {
            "case": case.name,
            "layout": self.layout,
            "loadavg_1m": round(os.getloadavg()[0], 2),  # the machine is shared
            "contender": server.name,
            "rep": rep,
            "check": self.checks.get(case.name, {}).get(server.name, ""),
        }
        with self.placed(server), self.meter(server) as m:
            if case.kind == RATE:
                rec |= self.rate(case, server)
            elif case.kind == PARALLEL:
                rec |= self.parallel(case, server)
            else:
                r = self.wrk(case, server, max(self.timing.duration_s, case.min_duration_s))
                rec |= {
                    "rps": r.rps,
                    "mbps": r.mbps,
                    "requests": r.requests,
                    "bytes": r.bytes,
                    "duration_s": r.duration_s,
                    "errors": r.errors,
                    "status_errors": r.status_errors,
                    "p50_ms": r.p50_ms,
                    "p90_ms": r.p90_ms,
                    "p99_ms": r.p99_ms,
                    "p999_ms": r.p999_ms,
                    "max_ms": r.max_ms,
                    "client_cpu_s": r.client_cpu_s,
                }
        u = m.usage
        rec |= {
            "cores_busy_pct": u.cores_busy_pct,
            "server_cpu_s": u.server_cpu_s,
            "upstream_cpu_s": u.upstream_cpu_s,
            "peak_rss_mb": round(u.peak_rss_kib / 1024, 1),
        }
        if rec.get("requests"):
            rec["server_cpu_us_per_req"] = round(u.server_cpu_s / rec["requests"] * 1e6, 1)
        if server.name.startswith("sidecar"):
            rec["vmhwm_mb"] = round(status_kib(server.proc.pid, "VmHWM") / 1024, 1)
        return rec

    def client(self, *args: str, timeout_s: float) -> Record:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        argv = pinned(LOADGEN_CORE, [sys.executable, "-m", "bench.loadclient", *args])
        try:
            out = subprocess.run(
                argv, capture_output=True, env=env, cwd=REPO, check=False, timeout=timeout_s
            )
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"load client timed out after {timeout_s}s: {args}") from exc
        if out.returncode != 0:
            raise BenchError(f"load client failed: {out.stderr.decode()[-1500:]}")
        result: Record = json.loads(out.stdout)
        return result

    def rate(self, case: Case, server: Server) -> Record:
        d = self.timing.rate_duration_s
        r = self.client(
            "rate",
            "--base",
            server.url,
            "--prefix",
            unique_info_prefix(self.nonce()),
            "--rate",
            str(case.rate),
            "--duration",
            str(d),
            timeout_s=d + 60,
        )
        lat, svc = r["latency"], r["service"]
        return {
            "rps": r["achieved_rps"],
            "requests": r["requests"],
            "errors": r["errors"],
            "mbps": r["achieved_rps"] * case.size / 1e6,
            "p50_ms": lat["p50_ms"],
            "p90_ms": lat["p90_ms"],
            "p99_ms": lat["p99_ms"],
            "p999_ms": lat["p999_ms"],
            "max_ms": lat["max_ms"],
            "service_p50_ms": svc["p50_ms"],
            "service_p99_ms": svc["p99_ms"],
            "target_rps": case.rate,
        }

    def parallel(self, case: Case, server: Server) -> Record:
        rss_idle = status_kib(server.proc.pid, "VmRSS")
        r = self.client(
            "parallel",
            "--url",
            server.url + case.path,
            "--count",
            str(case.count),
            "--size",
            str(case.size),
            "--timeout",
            "300",
            timeout_s=400,
        )
        return {
            "mbps": r["mbps"],
            "requests": r["count"],
            "bytes": r["bytes"],
            "duration_s": r["elapsed_s"],
            "errors": r["failed"] + r["short"],
            "rps": r["count"] / r["elapsed_s"] if r["elapsed_s"] else 0.0,
            "idle_rss_mb": round(rss_idle / 1024, 1),
        }

    # ------------------------------------------------------------ a case

    def run_case(self, case: Case) -> None:
        load = "/".join(f"{x:.1f}" for x in os.getloadavg())
        print(
            f"== {case.name} [upstream with the {self.layout}; load average {load}]: {case.what}",
            flush=True,
        )
        servers: dict[str, Server] = {}
        # "direct" has one layout (the upstream alone on the proxy core): measured once.
        names = [n for n in case.contenders if n != "direct" or case.name not in self.direct_done]
        self.direct_done.add(case.name)
        try:
            if not case.fresh_per_rep:
                for name in names:
                    s = self.try_start(case, name)
                    if s is not None and self.prepare(case, s):
                        servers[name] = s
                    elif s is not None:
                        self.stop(s, case)
            for rep in range(self.timing.reps):
                for name in names:  # A B A B: alternate contenders
                    self.run_one(case, name, rep, servers)
        finally:
            for s in servers.values():
                self.stop(s, case)

    def run_one(self, case: Case, name: str, rep: int, servers: dict[str, Server]) -> None:
        if case.fresh_per_rep:
            s = self.try_start(case, name)
            if s is None or not self.prepare(case, s):
                if s is not None:
                    self.stop(s, case)
                return
        elif name in servers:
            s = servers[name]
        else:
            return
        try:
            rec = self.measure(case, s, rep)
            self.records.append(rec)
            print("  " + report.run_line(rec), flush=True)
        except BenchError as exc:
            self.fail(case, s, f"rep {rep}: {exc}")
        if s.name != "direct" and not s.proc.alive():
            self.fail(case, s, f"exited with {s.proc.popen.returncode} during rep {rep}")
            servers.pop(name, None)
        if case.fresh_per_rep:
            self.stop(s, case)

    def try_start(self, case: Case, name: str) -> Server | None:
        try:
            return self.start(name, self.upstream_of(case))
        except BenchError as exc:
            first = str(exc)
            self.problems.append(f"{case.name}/{name}: failed to start: {first}")
            print(
                f"  ! {case.name}/{name}: failed to start: {first.splitlines()[0][:200]}",
                flush=True,
            )
            return None


def fetch(url: str) -> tuple[int, int, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            body = resp.read()
            return resp.status, len(body), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, len(exc.read()), dict(exc.headers)
    except OSError as exc:
        raise BenchError(f"GET {url}: {exc}") from exc


def log_findings(path: Path, limit: int = 5) -> list[str]:
    """Warnings, errors and tracebacks a server logged: "Nx level: event" lines."""
    counts: collections.Counter[str] = collections.Counter()
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            if line.startswith("Traceback"):
                counts["traceback (not a JSON log line)"] += 1
            continue
        if isinstance(event, dict) and event.get("level") in ("warning", "error", "critical"):
            exc = str(event.get("exc", "")).strip().splitlines()
            detail = f" [{exc[-1][:160]}]" if exc else ""
            extra = {
                k: v for k, v in event.items() if k not in ("ts", "level", "logger", "event", "exc")
            }
            counts[f"{event['level']}: {event.get('event')} {extra}{detail}"[:400]] += 1
    return [f"{n}x {what}" for what, n in counts.most_common(limit)]


def indent(text: str) -> str:
    return "\n".join("      " + line for line in text.splitlines())


def run_micro(work: Path, quick: bool) -> dict[str, Any]:
    """bench/micro.py pinned to the proxy core, an OPA server (if any) on the other."""
    print("== micro: stats window record/snapshot, one policy evaluation", flush=True)
    out = work / "micro.json"
    argv = pinned(
        PROXY_CORE,
        [
            sys.executable,
            str(REPO / "bench" / "micro.py"),
            "--json",
            str(out),
            "--opa-core",
            str(LOADGEN_CORE),
        ]
        + (["--quick"] if quick else []),
    )
    proc = subprocess.run(
        argv,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0 or not out.exists():
        return {"error": f"micro.py exited {proc.returncode}: {proc.stderr[-1500:]}"}
    result: dict[str, Any] = json.loads(out.read_text())
    return result


# ---------------------------------------------------------------- main


def tool_versions() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except OSError as exc:
            return f"unavailable: {exc}"
        return ((p.stdout or p.stderr).strip().splitlines() or [""])[0]

    versions = {
        "nginx": first_line([nginx_binary(), "-v"]),
        "wrk": first_line([wrk_binary(), "-v"]),
        "python": sys.version.split()[0],
        "kernel": platform.release(),
    }
    for mod in ("aiohttp", "uvloop"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = "absent"
    return versions


def check_machine() -> None:
    missing = [
        t
        for t in ("nginx", "wrk", "taskset")
        if shutil.which(t) is None and not (t == "nginx" and os.path.exists("/usr/sbin/nginx"))
    ]
    if missing:
        raise BenchError(f"missing {', '.join(missing)}: run scripts/debian-deps.sh")
    cpus = os.sched_getaffinity(0)
    if not {LOADGEN_CORE, PROXY_CORE} <= cpus:
        raise BenchError(
            f"needs cores {LOADGEN_CORE} and {PROXY_CORE}; this process may use {sorted(cpus)}"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="smoke test: 1 repetition, 2 s runs, 1 s warm-up"
    )
    p.add_argument(
        "--cases",
        nargs="+",
        metavar="CASE",
        help=f"cases to run (comma or space separated): {', '.join(CASE_NAMES)}",
    )
    p.add_argument("--reps", type=int, help="repetitions per case (default 3, --quick 1)")
    p.add_argument("--duration", type=float, help="seconds per measured wrk run")
    p.add_argument(
        "--layouts",
        nargs="+",
        choices=tuple(LAYOUTS),
        default=list(LAYOUTS),
        help="where the upstream runs while a proxy is measured: 'load' (core 0, with "
        "the load generator) and/or 'proxy' (core 1, with the proxy); default both, "
        "the report keeps the worse ratio",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = p.parse_args(argv)
    names = [n for item in (args.cases or []) for n in item.split(",") if n]
    unknown = [n for n in names if n not in CASE_NAMES]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASE_NAMES)}")
    args.case_names = names or list(CASE_NAMES)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = QUICK if args.quick else FULL
    timing = Timing(
        reps=args.reps or base.reps,
        duration_s=args.duration or base.duration_s,
        warmup_s=base.warmup_s,
        rate_duration_s=base.rate_duration_s,
    )
    try:
        check_machine()
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {LOADGEN_CORE})  # the harness itself stays off the proxy core
    work = Path(tempfile.mkdtemp(prefix="goproxy-bench-"))
    os.chmod(work, 0o755)
    (work / "logs").mkdir()
    started = time.time()
    loadavg_at_start = os.getloadavg()
    bench = Bench(Procs(work / "logs"), work, timing, LAYOUTS[args.layouts[0]])
    micro: dict[str, Any] | None = None
    try:
        with stopping(bench.procs):
            cases = [c for c in CASES if c.name in args.case_names]
            if cases:
                bench.start_upstream()
            for layout in args.layouts:
                bench.set_layout(layout)
                for case in cases:
                    bench.run_case(case)
            if "micro" in args.case_names:
                micro = run_micro(work, args.quick)
    except KeyboardInterrupt:
        print("bench: interrupted; reporting what was measured", file=sys.stderr)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        bench.problems.append(str(exc))
    finally:
        if args.keep:
            print(f"bench: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    meta = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "elapsed_s": round(time.time() - started, 1),
        "quick": args.quick,
        "timing": dataclasses.asdict(timing),
        "argv": sys.argv[1:],
        "versions": tool_versions(),
        "cores": os.cpu_count(),
        "pinning": {
            "proxy_under_test": PROXY_CORE,
            "load_generator": LOADGEN_CORE,
            "upstream_while_proxy_measured": {k: LAYOUTS[k] for k in args.layouts},
            "upstream_while_direct_measured": PROXY_CORE,
            "harness": LOADGEN_CORE,
        },
        "sidecar_env": "as a user starts it (it tunes malloc itself: sidecar/heap.py)",
        "loadavg_at_start": loadavg_at_start,
        "loadavg_at_end": os.getloadavg(),
        "cases": {
            c.name: {
                "what": c.what,
                "contenders": c.contenders,
                "connections": c.connections,
                "ref_nginx": c.ref_nginx,
            }
            for c in CASES
            if c.name in args.case_names
        },
    }
    summary = report.summarize(bench.records, CASES, args.layouts)
    worst = report.worst(summary, CASES)
    print()
    print(report.table(summary, meta))
    print()
    print(report.worst_table(worst))
    if micro is not None:
        print()
        print(report.micro_lines(micro))
    if bench.problems:
        print("\nproblems:")
        for line in bench.problems:
            print(f"  - {line}")
    meta["contenders"] = bench.contenders
    if bench.upstream is not None:
        meta["upstream"] = {"argv": bench.upstream.proc.argv, "url": bench.upstream.url}
    doc = {
        "meta": meta,
        "summary": summary,
        "worst": worst,
        "runs": bench.records,
        "checks": bench.checks,
        "micro": micro,
        "problems": bench.problems,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
