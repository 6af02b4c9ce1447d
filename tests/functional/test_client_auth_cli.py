"""`goproxy-sidecar check` with client_auth, and a real `run` with it, as
subprocesses: the files validated, `--auth USER --route MODULE`, one-line
errors with no traceback, a weak htpasswd refused, SIGHUP reloading."""

from __future__ import annotations

import asyncio
import base64
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp

from tests.functional.test_cli import free_port, start_sidecar
from tests.tools import require_tool
from tests.upstream import wait_healthy


def htpasswd(path: Path, flag: str, user: str, password: str) -> None:
    create = "c" if not path.exists() else ""
    tool = require_tool("htpasswd")
    subprocess.run([str(tool), f"-{create}b{flag}", str(path), user, password], check=True)


def write(tmp_path: Path, port: int = 0) -> Path:
    users = tmp_path / "htpasswd"
    if not users.exists():
        htpasswd(users, "B", "alice", "alice-pw")
        htpasswd(users, "B", "bob", "bob-pw")
        htpasswd(tmp_path / "admin.htpasswd", "B", "ops", "ops-pw")
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(
        f"""
listen: "127.0.0.1:{port or free_port()}"
upstreams:
  - name: athens
    url: "http://127.0.0.1:9"
    private_ok: true
cache: {{dir: "{tmp_path / "cache"}"}}
routing:
  private: ["corp.example"]
client_auth:
  enabled: true
  htpasswd: "{users}"
  admin: {{htpasswd: "{tmp_path / "admin.htpasswd"}"}}
  trusted_networks: ["10.0.0.0/8"]
  groups:
    - {{name: platform, members: [alice]}}
  access:
    - {{modules: ["corp.example/platform"], allow: ["@platform"]}}
    - {{modules: ["corp.example/shared"], allow: ["*"]}}
  endpoints: {{breakers: admin}}
"""
    )
    return cfg


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "check", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_validates_the_files_and_explains_a_users_access(tmp_path: Path) -> None:
    cfg = write(tmp_path)
    result = check("--config", str(cfg))
    assert result.returncode == 0, result.stderr
    assert (
        "client_auth ok: 2 client(s), 1 admin(s), 1 trusted network(s), 2 access rule(s); "
        "endpoints: metrics authenticated, healthz open, readyz open, status authenticated, "
        "breakers admin, routes authenticated"
    ) in result.stdout
    routes = ["--route", "corp.example/platform/api", "--route", "corp.example/shared/util"]
    routes += ["--route", "corp.example/other", "--route", "golang.org/x/mod"]
    bob = check("--config", str(cfg), "--auth", "bob", *routes)
    assert bob.returncode == 0, bob.stderr
    lines = [line for line in bob.stdout.splitlines() if line.startswith("auth ")]
    assert lines == [
        "auth bob: may not fetch corp.example/platform/api "
        "(denied by client_auth.access[0] (corp.example/platform))",
        "auth bob: may fetch corp.example/shared/util "
        "(allowed by client_auth.access[1] (corp.example/shared))",
        "auth bob: may not fetch corp.example/other "
        "(denied: a private module no client_auth.access rule covers)",
        "auth bob: may fetch golang.org/x/mod "
        "(allowed: no client_auth.access rule covers it (any identity))",
    ]
    alice = check("--config", str(cfg), "--auth", "alice", "--route", "corp.example/platform/api")
    assert "auth alice: may fetch corp.example/platform/api" in alice.stdout
    nets = check("--config", str(cfg), "--auth", "@networks", "--route", "corp.example/shared/x")
    assert "auth @networks: may fetch corp.example/shared/x" in nets.stdout


def test_check_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    cfg = write(tmp_path)
    cases = [
        (["--auth", "mallory", "--route", "a.example/x"], "--auth 'mallory': no such user"),
        (["--auth", "bob"], "--auth needs at least one --route MODULE"),
    ]
    for args, message in cases:
        result = check("--config", str(cfg), *args)
        assert result.returncode == 2
        assert result.stderr.startswith(f"goproxy-sidecar: {message}"), result.stderr
        assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    htpasswd(tmp_path / "htpasswd", "m", "carol", "carol-Secret-pw")
    weak = check("--config", str(cfg))
    assert weak.returncode == 2
    assert weak.stderr == (
        f"goproxy-sidecar: {tmp_path / 'htpasswd'}:3: user 'carol' has an MD5 ($apr1$) hash: "
        "only bcrypt is accepted: recreate it with `htpasswd -B`\n"
    )
    assert "carol-Secret-pw" not in weak.stderr


async def test_run_authenticates_and_reloads_on_sighup(tmp_path: Path) -> None:
    port = free_port()
    cfg = write(tmp_path, port)
    proc = await start_sidecar(["run", "--config", str(cfg)], port)
    try:
        assert await wait_healthy(port, 20)
        url = f"http://127.0.0.1:{port}/metrics"

        def basic(user: str, password: str) -> dict[str, str]:
            value = base64.b64encode(f"{user}:{password}".encode()).decode()
            return {"Authorization": f"Basic {value}"}

        async with aiohttp.ClientSession() as session:
            async with session.get(url) as resp:
                assert resp.status == 401
            async with session.get(url, headers=basic("carol", "carol-pw")) as resp:
                assert resp.status == 401
            htpasswd(tmp_path / "htpasswd", "B", "carol", "carol-pw")
            proc.send_signal(signal.SIGHUP)
            for _ in range(100):  # bounded: the reload runs in a thread
                async with session.get(url, headers=basic("carol", "carol-pw")) as resp:
                    if resp.status == 200:
                        break
                await asyncio.sleep(0.1)
            assert resp.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)
