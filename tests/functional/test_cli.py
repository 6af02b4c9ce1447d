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
import pytest

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


def _stats(requests: int, error_rate: float, p99_ms: float, wait_ms: float | None) -> dict:
    """One traffic class's stats; ``wait_ms`` None: no pool figures (checksum traffic)."""
    pool = (
        {}
        if wait_ms is None
        else {
            "saturation": 1.0,
            "queue_wait_ms": {"p50": wait_ms / 2, "p99": wait_ms},
            "overflows": 2,
        }
    )
    series = [
        {
            "age_s": age,
            "requests": requests // 12,
            "error_rate": error_rate,
            "p99_ms": p99_ms,
            **pool,
        }
        for age in range(0, 120, 10)
    ]
    return {
        "window_s": 120,
        "requests": requests,
        "errors": round(requests * error_rate),
        "not_found": 0,
        "timeouts": 0,
        "error_rate": error_rate,
        "not_found_rate": 0,
        "masked_failures": 0,
        "ttfb_ms": {"p50": 1, "p90": 2, "p99": p99_ms},
        "series": series,
    }


def test_eval_prints_the_decision_for_one_input(tmp_path: Path) -> None:
    doc = {
        "now": 0,
        "cache": {"enabled": False, "entries": 0, "bytes": 0},
        "upstreams": {
            "athens": {
                "role": "primary",
                "state": "closed",
                "state_age_s": 1,
                **_stats(120, 0.3, 1500, 900),
                "pool": {
                    "limit": 64,
                    "in_use": 64,
                    "waiting": 30,
                    "overflows": 24,
                    "queue_wait_ms": {"p50": 450, "p99": 900},
                    "saturation": 1.47,
                },
                "sumdb": {"state": "closed", "state_age_s": 1, **_stats(48, 1.0, 3, None)},
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
    assert decision["reason"].startswith("queueing: wait p99 900ms > 250ms")
    assert "also error rate" in decision["reason"]
    assert decision["sumdb"] == {
        "action": "cache",
        "alert": False,
        "reason": "error rate 100.0% > 5.0% over 48 requests, for 20s",
    }


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


def check_thresholds(tmp_path: Path, old: str, new: str) -> subprocess.CompletedProcess[str]:
    import shutil

    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    thresholds = policies / "thresholds.yaml"
    text = thresholds.read_text()
    assert old in text
    thresholds.write_text(text.replace(old, new))
    cfg = write_config(
        tmp_path, "http://127.0.0.1:3000", 3001, f'policy: {{paths: ["{policies}"]}}\n'
    )
    return subprocess.run(
        sidecar_cmd("check", "--config", str(cfg)), capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "error_rate: 0.05",
            "error_rat: 0.05",
            "sidecar.config.thresholds.error_rat: unknown key (did you mean 'error_rate'?)",
        ),
        (
            "min_requests: 20",
            "min_requests: many",
            "sidecar.config.thresholds.min_requests: expected an integer >= 1, got 'many'",
        ),
        (
            "error_rate: 0.05",
            "error_rate: 5",
            "sidecar.config.thresholds.error_rate: expected a number in [0, 1], got 5",
        ),
    ],
)
def test_check_refuses_bad_policy_data_naming_the_key(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    out = check_thresholds(tmp_path, old, new)
    assert out.returncode == 2
    thresholds = tmp_path / "policies" / "thresholds.yaml"
    assert out.stderr == f"goproxy-sidecar: {thresholds}: {message}\n"


def test_check_warns_of_a_removed_policy_key(tmp_path: Path) -> None:
    out = check_thresholds(
        tmp_path, "min_requests: 20", "pool_saturation: 0.9\n      min_requests: 20"
    )
    assert out.returncode == 0, out.stderr
    assert "sidecar.config.thresholds.pool_saturation: removed key, ignored" in out.stderr


# ---------------------------------------------------------------- errors: one line, an exit code


def error_lines(stderr: str) -> list[str]:
    """stderr without the JSON log lines `run` writes before it fails."""
    return [line for line in stderr.splitlines() if not line.startswith("{")]


def test_a_taken_port_is_one_line_naming_the_address_and_exit_3(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = write_config(tmp_path, "http://127.0.0.1:9", port)
        for loop in ("uvloop", "asyncio"):
            out = subprocess.run(
                sidecar_cmd("run", "--config", str(cfg), "--loop", loop),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert out.returncode == 3, out.stderr
            assert error_lines(out.stderr) == [
                f"goproxy-sidecar: listen 127.0.0.1:{port}: address already in use"
            ], out.stderr


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {
        "missing": tmp_path / "missing",
        "dir": tmp_path / "adir",
        "binary": tmp_path / "binary",
        "notjson": tmp_path / "not.json",
        "list": tmp_path / "list.json",
        "gosum": tmp_path / "go.sum",
        "file": tmp_path / "afile",
    }
    files["dir"].mkdir()
    files["binary"].write_bytes(b"\xff\xfe\x00garbage")
    files["notjson"].write_text("{'upstreams': {}}")
    files["list"].write_text("[1, 2]")
    files["gosum"].write_text("example.com/a v1.0.0/go.mod h1:x=\n")
    files["file"].write_text("a regular file, where a directory should be\n")
    return files


def _cfg(tmp_path: Path, name: str, cache: str) -> Path:
    path = tmp_path / name
    path.write_text(
        'listen: "127.0.0.1:3001"\nupstreams:\n  - {name: athens, url: "http://127.0.0.1:9"}\n'
        f"cache: {cache}\n"
    )
    return path


# (arguments with {name} for the files above, exit code, the one line's expected start)
CLI_ERRORS = [
    (["check", "--config", "{missing}"], 2, "invalid config: {missing}: cannot read: No such"),
    (["check", "--config", "{dir}"], 2, "invalid config: {dir}: cannot read: Is a directory"),
    (["check", "--config", "{binary}"], 2, "invalid config: {binary}: not UTF-8 text"),
    (["check", "--route", "bad path"], 2, "--route 'bad path': not a module path"),
    (["eval", "--input", "{missing}"], 2, "{missing}: No such file or directory"),
    (["eval", "--input", "{dir}"], 2, "{dir}: Is a directory"),
    (["eval", "--input", "{binary}"], 2, "{binary}: not UTF-8 text (byte 0)"),
    (["eval", "--input", "{notjson}"], 2, "{notjson}:1: not JSON"),
    (["eval", "--input", "{list}"], 2, "{list}: expected an object with an 'upstreams' object"),
    (["eval"], 2, "eval: the following arguments are required: --input"),
    (["warm", "{missing}"], 2, "warm: {missing}: No such file or directory"),
    (["warm", "{dir}"], 2, "warm: {dir}: Is a directory"),
    (["warm", "{binary}"], 2, "warm: {binary}: not UTF-8 text"),
    (["warm", "--jobs", "0", "{gosum}"], 2, "warm: argument --jobs: expected a whole number"),
    (["warm", "--jobs", "-2", "{gosum}"], 2, "warm: argument --jobs: expected a whole number"),
    (["warm", "--jobs", "many", "{gosum}"], 2, "warm: argument --jobs: expected a whole"),
    (["warm", "--config", "{off}", "{gosum}"], 2, "invalid config: cache.enabled: warm needs"),
    (["warm", "--config", "{unusable}", "{gosum}"], 4, "cache directory {file}/cache: Not a"),
    (["cache", "purge", "Bad/x"], 2, "purge 'Bad/x': not found: malformed module path"),
    (["cache", "purge", "example.com/x@"], 2, "purge: empty version in 'example.com/x@'"),
    (["cache", "purge", "example.com/x@v1"], 2, "purge 'example.com/x@v1': not found:"),
    (["run", "--log-level", "loud"], 2, "run: argument --log-level: invalid choice: 'loud'"),
    (["serve"], 2, "argument command: invalid choice: 'serve'"),
    ([], 2, "the following arguments are required: command"),
]


@pytest.mark.parametrize(("args", "code", "start"), CLI_ERRORS, ids=lambda v: str(v)[:40])
def test_every_cli_error_is_one_line_and_an_exit_code(
    tmp_path: Path, args: list[str], code: int, start: str
) -> None:
    names = {key: str(path) for key, path in _bad_files(tmp_path).items()}
    names["off"] = str(_cfg(tmp_path, "off.yaml", f'{{dir: "{tmp_path}/c", enabled: false}}'))
    names["unusable"] = str(_cfg(tmp_path, "unusable.yaml", f'{{dir: "{names["file"]}/cache"}}'))
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    out = subprocess.run(
        sidecar_cmd(*(a.format(**names) for a in args)),
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == code, out.stderr
    [line] = out.stderr.splitlines()
    assert line.startswith("goproxy-sidecar"), line
    assert start.format(**names) in line, line
    assert not (tmp_path / "xdg").exists()  # a refusal touched no cache


def test_several_config_problems_are_one_line_each(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "bad.yaml", "{max_bytes: lots}\nrouting: {private: ['[', 'b/[']}")
    out = subprocess.run(
        sidecar_cmd("check", "--config", str(cfg)),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "GOPRIVATE": "ok.example,c/["},
    )
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "goproxy-sidecar: invalid config, 4 problems:",
        "  cache.max_bytes: expected a size like '10GiB' or '512MiB', got 'lots'",
        "  routing.private[0]: bad pattern '[': unterminated character class",
        "  routing.private[1]: bad pattern 'b/[': unterminated character class",
        "  GOPRIVATE[1]: bad pattern 'c/[': unterminated character class",
    ]


# ---------------------------------------------------------------- --version, --help


def test_version_is_the_installed_distributions() -> None:
    from importlib import metadata

    out = subprocess.run(sidecar_cmd("--version"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"goproxy-sidecar {metadata.version('goproxy-sidecar')}\n"


def test_run_help_describes_the_embedded_default_and_the_log_levels() -> None:
    from sidecar.config import DEFAULT_BACKUP_URL, DEFAULT_LISTEN, DEFAULT_PRIMARY_URL

    out = subprocess.run(sidecar_cmd("run", "--help"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # argparse wraps lines
    assert "Without --config, the embedded default config" in text
    for default in (DEFAULT_LISTEN, DEFAULT_PRIMARY_URL, DEFAULT_BACKUP_URL):
        assert default in text, default
    assert "JSON log on stderr: debug, info, warning, error (default info)" in text
