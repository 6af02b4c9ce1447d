"""Running wrk pinned to the load-generator core and reading its results.

The Lua script is generated per run: ``done()`` prints one JSON line with the
counters and latency percentiles (wrk's own text output rounds them), and in
"unique" mode ``request()`` builds a new valid module path per request, so no
contender can answer from a cache. Without ``request()`` wrk pre-builds the
request once, which is what the fixed-URL cases want.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.procs import BenchError, pinned

MARK = "BENCHJSON "

_DONE = r"""
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"bytes":%d,"duration_us":%d,"connect_errors":%d,' ..
    '"read_errors":%d,"write_errors":%d,"status_errors":%d,"timeouts":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.bytes, summary.duration, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max, latency.mean))
end
"""

_UNIQUE = r"""
local prefix = "/"
local counter = 0
local tid = 0
local nthreads = 0
function setup(thread)
  thread:set("tid", nthreads)
  nthreads = nthreads + 1
end
function init(args)
  prefix = args[1]
end
function request()
  counter = counter + 1
  return wrk.format("GET", prefix .. "t" .. tid .. "m" .. counter .. "/@v/v1.0.0.info")
end
"""

# Cycles through N fixed paths (args: the path with "%d" where the index goes, N);
# the threads start at different offsets so they do not ask in lockstep.
_CYCLE = r"""
local pattern = "/%d"
local n = 1
local counter = 0
local tid = 0
local nthreads = 0
function setup(thread)
  thread:set("tid", nthreads)
  nthreads = nthreads + 1
end
function init(args)
  pattern = args[1]
  n = tonumber(args[2])
  counter = tid * 7919
end
function request()
  counter = counter + 1
  return wrk.format("GET", string.format(pattern, counter % n))
end
"""


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    bytes: int
    duration_s: float
    errors: int  # socket errors + non-2xx/3xx answers
    status_errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    client_cpu_s: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def mbps(self) -> float:
        return self.bytes / self.duration_s / 1e6 if self.duration_s else 0.0


def wrk_binary() -> str:
    path = shutil.which("wrk")
    if not path:
        raise BenchError("wrk not found: run scripts/debian-deps.sh")
    return path


def write_script(work: Path, unique: bool) -> Path:
    path = work / ("wrk-unique.lua" if unique else "wrk-fixed.lua")
    path.write_text((_UNIQUE if unique else "") + _DONE)
    return path


def write_cycle_script(work: Path) -> Path:
    """The script for many fixed URLs: run with ``script_args=[pattern, count]``."""
    path = work / "wrk-cycle.lua"
    path.write_text(_CYCLE + _DONE)
    return path


def run_wrk(
    url: str,
    connections: int,
    duration_s: float,
    script: Path,
    core: int,
    unique_prefix: str | None = None,
    threads: int = 1,
    timeout_s: float = 10.0,
    script_args: tuple[str, ...] = (),
) -> WrkResult:
    """One wrk run; ``unique_prefix`` (a path) turns on unique module paths;
    ``script_args`` are handed to the script's ``init`` otherwise.

    wrk takes whole seconds only: durations are rounded (at least 1 s).
    """
    argv = [
        wrk_binary(),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        f"--timeout={max(1, round(timeout_s))}s",
        "-s",
        str(script),
        url,
    ]
    if unique_prefix is not None:
        argv += ["--", unique_prefix]
    elif script_args:
        argv += ["--", *script_args]
    before = _children_cpu()
    proc = subprocess.Popen(
        pinned(core, argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=duration_s + timeout_s + 30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        raise BenchError(f"wrk did not finish: {' '.join(argv)}") from None
    except BaseException:  # Ctrl-C, SIGTERM: wrk is in its own session, stop it too
        os.killpg(proc.pid, 9)
        proc.wait()
        raise
    # communicate() reaped it: the children's rusage grew by wrk's CPU alone.
    result = _parse(
        out.decode(errors="replace"), err.decode(errors="replace"), argv, proc.returncode
    )
    return dataclasses.replace(result, client_cpu_s=round(_children_cpu() - before, 3))


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _parse(out: str, err: str, argv: list[str], rc: int) -> WrkResult:
    line = next((ln for ln in out.splitlines() if ln.startswith(MARK)), None)
    if rc != 0 or line is None:
        raise BenchError(f"wrk failed (exit {rc}): {' '.join(argv)}\n{out}\n{err}")
    d = json.loads(line[len(MARK) :])
    sock = d["connect_errors"] + d["read_errors"] + d["write_errors"] + d["timeouts"]
    return WrkResult(
        requests=d["requests"],
        bytes=d["bytes"],
        duration_s=d["duration_us"] / 1e6,
        errors=sock + d["status_errors"],
        status_errors=d["status_errors"],
        p50_ms=d["p50_us"] / 1000,
        p90_ms=d["p90_us"] / 1000,
        p99_ms=d["p99_us"] / 1000,
        p999_ms=d["p999_us"] / 1000,
        max_ms=d["max_us"] / 1000,
        client_cpu_s=0.0,
    )
