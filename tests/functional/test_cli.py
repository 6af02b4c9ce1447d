"""The real command line, as a subprocess: check, run, graceful shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp

from tests.upstream import Reply, wait_healthy

ZIP = "example.com/slow/@v/v1.0.0.zip"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp_path: Path, upstream_url: str, port: int, extra: str = "") -> Path:
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(
        f'listen: "127.0.0.1:{port}"\n'
        "upstreams:\n"
        f'  - {{name: athens, url: "{upstream_url}"}}\n'
        f'cache: {{dir: "{tmp_path / "cache"}", enabled: false}}\n'
        "shutdown_grace: 5s\n" + extra
    )
    return cfg


def sidecar_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sidecar", *args]


async def start_sidecar(
    args: list[str], port: int, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        *sidecar_cmd(*args), stderr=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})}
    )
    if await wait_healthy(port, 15):
        return proc
    proc.kill()
    _, err = await proc.communicate()
    raise AssertionError(f"sidecar did not start: {err.decode()[-2000:]}")


def test_check_reports_every_bad_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        'listen: "127.0.0.1:99999"\nupstreams:\n  - {name: a, url: "not a url"}\n'
        "policy: {interval: fast, enigne: opa}\n"
    )
    out = subprocess.run(
        sidecar_cmd("check", "--config", str(cfg)), capture_output=True, text=True, timeout=30
    )
    assert out.returncode != 0
    for key in ("listen", "upstreams[0].url", "policy.interval", "policy.enigne"):
        assert key in out.stderr, (key, out.stderr)


def test_check_accepts_the_design_example(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, "http://127.0.0.1:3000", 3001)
    out = subprocess.run(
        sidecar_cmd("check", "--config", str(cfg)), capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


async def test_run_without_config_serves_the_embedded_default(tmp_path: Path) -> None:
    port = free_port()
    env = {"SIDECAR_LISTEN": f"127.0.0.1:{port}", "XDG_CACHE_HOME": str(tmp_path)}
    proc = await start_sidecar(["run"], port, env)
    try:
        async with aiohttp.ClientSession() as session:  # noqa: SIM117
            async with session.get(f"http://127.0.0.1:{port}/breakers") as r:
                names = list(await r.json())
        assert names == ["athens", "public"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0


async def test_sigterm_drains_in_flight_requests(fake_upstreams, tmp_path: Path) -> None:
    [(up, url)] = await fake_upstreams(1)
    body = os.urandom(2 * 1024 * 1024)
    up.set(ZIP, Reply(body=body, chunk_delay=0.03))  # ~1 s to send
    port = free_port()
    proc = await start_sidecar(["run", "--config", str(write_config(tmp_path, url, port))], port)
    async with aiohttp.ClientSession() as session:  # noqa: SIM117
        async with session.get(f"http://127.0.0.1:{port}/{ZIP}") as r:
            first = await r.content.read(64 * 1024)
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            with socket.socket() as s:  # no longer accepting
                assert s.connect_ex(("127.0.0.1", port)) != 0
            rest = await r.read()
    assert first + rest == body
    assert await asyncio.wait_for(proc.wait(), 15) == 0


POLICIES = Path(__file__).resolve().parents[2] / "policies"


def test_eval_prints_the_decision_for_one_input(tmp_path: Path) -> None:
    doc = {
        "now": 0,
        "cache": {"enabled": False, "entries": 0, "bytes": 0},
        "upstreams": {
            "athens": {
                "role": "primary",
                "state": "closed",
                "state_age_s": 1,
                "window_s": 120,
                "requests": 100,
                "errors": 30,
                "not_found": 0,
                "timeouts": 0,
                "error_rate": 0.3,
                "not_found_rate": 0,
                "masked_failures": 0,
                "ttfb_ms": {"p50": 1, "p90": 2, "p99": 3},
                "pool": {"limit": 64, "in_use": 1, "waiting": 0, "saturation": 0.95},
                "series": [],
            }
        },
    }
    (tmp_path / "in.json").write_text(__import__("json").dumps(doc))
    out = subprocess.run(
        sidecar_cmd("eval", "--input", str(tmp_path / "in.json")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    decision = __import__("json").loads(out.stdout)["athens"]
    assert decision["action"] == "reject" and decision["alert"] is True
    assert "also error rate" in decision["reason"]


def test_eval_refuses_a_document_that_is_not_an_input(tmp_path: Path) -> None:
    (tmp_path / "in.json").write_text('{"upstreams": [1, 2]')
    out = subprocess.run(
        sidecar_cmd("eval", "--input", str(tmp_path / "in.json")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "in.json:1" in out.stderr


def test_check_names_the_file_and_line_of_a_broken_policy(tmp_path: Path) -> None:
    import shutil

    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    rego = policies / "sidecar" / "breaker.rego"
    lines = rego.read_text().splitlines()
    lines.insert(40, "decisions[x] := {{{ broken")
    rego.write_text("\n".join(lines) + "\n")
    cfg = write_config(
        tmp_path, "http://127.0.0.1:3000", 3001, f'policy: {{paths: ["{policies}"]}}\n'
    )
    out = subprocess.run(
        sidecar_cmd("check", "--config", str(cfg)), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert "breaker.rego:41" in out.stderr, out.stderr
