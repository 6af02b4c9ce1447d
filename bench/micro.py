"""Micro-benchmarks of the per-request and per-tick hot spots.

    python3 bench/micro.py [--quick] [--json FILE]

- ``UpstreamWindow.record``: once per upstream request, on the event loop.
- ``UpstreamWindow.snapshot``: once per upstream per control-loop tick.
- One policy evaluation of the shipped policy over 5 upstreams:
  regopy directly (``query`` recompiles each time; a ``build`` bundle does
  not), the sidecar's embedded engine, and a real OPA server over HTTP
  (if ``opa`` is in ``$HOME/.cache/goproxy-sidecar/bin`` or on PATH).
Parts whose code is not there yet are skipped with the reason printed.
Run pinned (``run.py`` puts it on core 1 and the OPA server on core 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

POLICY_DIR = REPO / "policies"
DECISION = "sidecar/breaker/decisions"
UPSTREAMS = 5
OPA_BIN_DIR = Path.home() / ".cache" / "goproxy-sidecar" / "bin"

Result = dict[str, Any]


def timed(fn: Callable[[], object], min_time_s: float, repeats: int = 5) -> Result:
    """Median (and min-max) seconds per call over ``repeats`` batches of ~min_time_s."""
    n = 1
    while True:  # calibrate a batch size
        t = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t
        if dt >= min_time_s / 5 or n >= 1 << 24:
            break
        n *= 4
    per = []
    batch = max(1, int(n * (min_time_s / max(dt, 1e-9))))
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(batch):
            fn()
        per.append((time.perf_counter() - t) / batch)
    return {
        "per_call_s": statistics.median(per),
        "min_s": min(per),
        "max_s": max(per),
        "calls": batch * repeats,
    }


def policy_input(n: int = UPSTREAMS) -> dict[str, Any]:
    """A realistic input: n upstreams, 12 slices per traffic class, one of them slow."""

    def stats(requests: int, p99: float, pool: bool) -> dict[str, Any]:
        figures = {"saturation": 0.3, "queue_wait_ms": {"p50": 0.0, "p99": 1.2}, "overflows": 0}
        return {
            "window_s": 120,
            "requests": requests,
            "errors": 3,
            "not_found": 40,
            "timeouts": 1,
            "error_rate": round(3 / requests, 4),
            "not_found_rate": round(40 / requests, 4),
            "masked_failures": 0,
            "ttfb_ms": {"p50": 12.1, "p90": 40.3, "p99": p99},
            "series": [
                {
                    "age_s": 10 * k,
                    "requests": requests // 12,
                    "error_rate": 0.0,
                    "p99_ms": p99,
                    **(figures if pool else {}),
                }
                for k in range(12)
            ],
        }

    ups = {}
    for i in range(n):
        p99 = 900.0 if i == 1 else 90.0
        ups[f"up{i}"] = {
            "role": "primary" if i == 0 else "backup",
            "state": "closed",
            "state_age_s": 300.0,
            **stats(812, p99, pool=True),
            "pool": {
                "limit": 64,
                "in_use": 20,
                "waiting": 0,
                "overflows": 0,
                "queue_wait_ms": {"p50": 0.0, "p99": 1.2},
                "saturation": 0.31,
            },
            "sumdb": {"state": "closed", "state_age_s": 300.0, **stats(340, p99, pool=False)},
        }
    return {
        "now": time.time(),
        "upstreams": ups,
        "cache": {"enabled": True, "entries": 1200, "bytes": 734003200},
    }


# ---------------------------------------------------------------- stats window


def bench_window(min_time_s: float) -> Result:
    from sidecar.stats.window import Outcome, UpstreamWindow

    w = UpstreamWindow(120.0, 10.0)
    ok, nf = Outcome.OK, Outcome.NOT_FOUND
    out = {
        "empty_call_overhead": timed(lambda: None, min_time_s),
        "record_ok": timed(lambda: w.record(ok, 0.0123), min_time_s),
        "record_not_found": timed(lambda: w.record(nf, 0.004), min_time_s),
        "record_no_ttfb": timed(lambda: w.record(ok), min_time_s),
    }
    # A full window: every slice holds data, as after two minutes of traffic.
    clock = [0.0]
    full = UpstreamWindow(120.0, 10.0, clock=lambda: clock[0])
    for k in range(12):
        clock[0] = k * 10.0
        for j in range(2000):
            full.record(ok, 0.001 * (1 + j % 700))
    out["snapshot_full_window"] = timed(full.snapshot, min_time_s)
    return out


# ---------------------------------------------------------------- policy


def _policy_files() -> tuple[dict[str, str], dict[str, Any]]:
    import yaml

    modules = {
        str(p.relative_to(POLICY_DIR)): p.read_text()
        for p in sorted(POLICY_DIR.rglob("*.rego"))
        if not p.name.endswith("_test.rego")
    }
    data: dict[str, Any] = {}
    for p in sorted(POLICY_DIR.glob("*.yaml")):
        data.update(yaml.safe_load(p.read_text()) or {})
    return modules, data


def bench_regopy(min_time_s: float, doc: dict[str, Any]) -> Result:
    try:
        import regopy
    except ImportError as exc:
        return {"skipped": f"regopy not importable: {exc}"}
    modules, data = _policy_files()
    query = "data." + DECISION.replace("/", ".")

    def interpreter() -> Any:
        rego = regopy.Interpreter()
        for name, text in modules.items():
            rego.add_module(name, text)
        rego.add_data(data)
        return rego

    rego = interpreter()
    out: Result = {}

    def by_query() -> object:
        rego.set_input(regopy.Input(doc))
        return rego.query(query)

    first = by_query()
    out["decisions_sample"] = str(first)[:300]
    out["query"] = timed(by_query, min_time_s, repeats=3)
    try:
        bundle = interpreter().build(f"x = {query}", [DECISION])
        runner = regopy.Interpreter()

        def by_bundle() -> object:
            runner.set_input(regopy.Input(doc))
            return runner.query_bundle(bundle)

        by_bundle()
        out["bundle"] = timed(by_bundle, min_time_s, repeats=3)
    except Exception as exc:  # a regopy build problem must not hide the rest
        out["bundle"] = {"skipped": f"build/query_bundle failed: {exc!r}"}
    return out


def bench_engine(min_time_s: float, doc: dict[str, Any], opa_url: str | None = None) -> Result:
    """One ``await engine.evaluate(doc)`` of the sidecar's own engine (``make_engine``).

    Timed through one event loop, as the control loop calls it (thread hop or
    HTTP round trip included); ``run_until_complete`` adds some µs per call.
    """
    try:
        from sidecar.config import PolicyConfig, PolicyEngineKind
        from sidecar.policy import make_engine
    except Exception as exc:
        return {"skipped": f"sidecar.policy not importable yet: {exc!r}"}
    if opa_url is None:
        config = PolicyConfig(engine=PolicyEngineKind.EMBEDDED, paths=(str(POLICY_DIR),))
    else:
        config = PolicyConfig(engine=PolicyEngineKind.OPA, opa_url=opa_url, interval=2.0)
    loop = asyncio.new_event_loop()
    try:
        engine = make_engine(config)
        warning = loop.run_until_complete(engine.load())
        if warning:
            return {"skipped": f"engine.load() warned: {warning}"}

        def evaluate() -> object:
            return loop.run_until_complete(engine.evaluate(doc))

        sample = evaluate()
        out: Result = {
            "engine": type(engine).__name__,
            "decisions_sample": str(sample)[:300],
            "evaluate": timed(evaluate, min_time_s, repeats=3),
        }
        loop.run_until_complete(engine.close())
        return out
    except Exception as exc:
        return {"skipped": f"could not drive the {config.engine.value} engine: {exc!r}"}
    finally:
        loop.close()


def find_opa() -> str | None:
    local = OPA_BIN_DIR / "opa"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("opa")


@contextlib.contextmanager
def opa_server(opa: str, core: int | None) -> Iterator[int]:
    from bench.procs import free_port, pinned

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-opa-") as tmp:
        # Only the policy and its data: the *_test.rego files are not part of a deployment.
        for name, text in _policy_files()[0].items():
            (Path(tmp) / name.replace("/", "_")).write_text(text)
        for p in POLICY_DIR.glob("*.yaml"):
            shutil.copy(p, tmp)
        argv = [
            opa,
            "run",
            "--server",
            "--addr",
            f"127.0.0.1:{port}",
            "--log-level",
            "error",
            "--disable-telemetry",
            tmp,
        ]
        proc = subprocess.Popen(
            pinned(core, argv),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            _wait_opa(port, proc)
            yield port
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 15)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()


def _wait_opa(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"opa exited {proc.returncode}: {err[-500:]}")
        with contextlib.suppress(OSError):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return
        time.sleep(0.05)
    raise RuntimeError("opa server not healthy after 20 s")


def bench_opa(min_time_s: float, doc: dict[str, Any], core: int | None) -> Result:
    opa = find_opa()
    if opa is None:
        return {"skipped": f"no opa binary in {OPA_BIN_DIR} or on PATH"}
    out: Result = {"binary": opa, "server_core": core}
    try:
        with opa_server(opa, core) as port:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            body = json.dumps({"input": doc})

            def post() -> bytes:
                conn.request(
                    "POST", f"/v1/data/{DECISION}", body, {"Content-Type": "application/json"}
                )
                return conn.getresponse().read()

            out["decisions_sample"] = post().decode()[:300]
            out["http_keepalive"] = timed(post, min_time_s, repeats=3)
            out["opa_client"] = _bench_opa_client(port, doc, min_time_s)
            out["sidecar_engine"] = bench_engine(min_time_s, doc, f"http://127.0.0.1:{port}")
    except Exception as exc:
        out["skipped"] = f"OPA server failed: {exc!r}"
    return out


def _bench_opa_client(port: int, doc: dict[str, Any], min_time_s: float) -> Result:
    """The client library the sidecar's opa engine uses (opa-python-client)."""
    try:
        from opa_client import OpaClient
    except ImportError as exc:
        return {"skipped": f"opa-python-client not importable: {exc}"}
    try:
        client = OpaClient(host="127.0.0.1", port=port)
        fn = getattr(client, "query_rule", None) or client.check_policy_rule
        package, rule = DECISION.rsplit("/", 1)

        def call() -> object:
            return fn(input_data=doc, package_path=package.replace("/", "."), rule_name=rule)

        call()
        return timed(call, min_time_s, repeats=3)
    except Exception as exc:
        return {"skipped": f"opa-python-client call failed: {exc!r}"}


# ---------------------------------------------------------------- output


def _us(r: Any) -> str:
    if not isinstance(r, dict):
        return str(r)
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    return (
        f"{r['per_call_s'] * 1e6:10.3f} µs  (min-max {r['min_s'] * 1e6:.3f}-"
        f"{r['max_s'] * 1e6:.3f}, {r['calls']} calls)"
    )


def render(results: Result) -> str:
    lines = ["micro-benchmarks (per call, median of batches)"]
    _render_into(lines, "", results)
    return "\n".join(lines)


def _render_into(lines: list[str], prefix: str, node: Result) -> None:
    for key, value in node.items():
        if not isinstance(value, dict):
            continue
        name = f"{prefix}{key}"
        if "per_call_s" in value or "skipped" in value:
            lines.append(f"  {name:<40} {_us(value)}")
        else:
            _render_into(lines, name + ".", value)


def run_all(quick: bool, opa_core: int | None) -> Result:
    t = 0.2 if quick else 1.0
    doc = policy_input()
    results: Result = {"pinned_cpus": sorted(os.sched_getaffinity(0))}
    results["window"] = bench_window(t)
    results["regopy"] = bench_regopy(t, doc)
    results["embedded_engine"] = bench_engine(t, doc)
    results["opa_server"] = bench_opa(t, doc, opa_core)
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short batches (smoke test)")
    p.add_argument("--json", help="also write the results as JSON to this file")
    p.add_argument("--opa-core", type=int, default=None, help="pin the OPA server to this core")
    args = p.parse_args()
    results = run_all(args.quick, args.opa_core)
    print(render(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
