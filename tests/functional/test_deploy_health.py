"""``goproxy-sidecar health`` (the image's HEALTHCHECK) against a real
``goproxy-sidecar run`` on loopback: it asks /healthz over the scheme the
config says (HTTP, or HTTPS once ``tls`` is set), follows SIDECAR_*
overrides, and honours the /healthz rule of ``client_auth.endpoints``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from sidecar.config import default_config
from sidecar.healthcheck import probe_for
from tests.certs import self_signed
from tests.functional.test_cli import free_port, sidecar_cmd, write_config

TOKEN = "health-check-token-0123456789"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    return {**env, **extra}


def health(
    config: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        sidecar_cmd("health", "--config", str(config), *args),
        capture_output=True,
        text=True,
        timeout=60,
        env=env if env is not None else clean_env(),
    )


def accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@asynccontextmanager
async def running(
    config: Path, port: int, env: dict[str, str] | None = None
) -> AsyncIterator[None]:
    """A real `goproxy-sidecar run` until the block ends (SIGTERM, exit 0)."""
    proc = await asyncio.create_subprocess_exec(
        *sidecar_cmd("run", "--config", str(config)),
        env=env if env is not None else clean_env(),
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        for _ in range(300):  # bounded: start-up on a loaded machine
            if accepts(port) or proc.returncode is not None:
                break
            await asyncio.sleep(0.1)
        assert accepts(port), f"nothing listens on {port}"
        yield
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-2000:]


def closed_upstream() -> str:
    return f"http://127.0.0.1:{free_port()}"  # /healthz never asks it


def tls_extra(tmp_path: Path) -> str:
    folder = tmp_path / "pair"
    folder.mkdir()
    cert, key = self_signed(folder)
    return f'tls: {{certificate: "{cert}", key: "{key}"}}\n'


@pytest.mark.parametrize(
    "listen, url",
    [
        ("0.0.0.0:3001", "http://127.0.0.1:3001/healthz"),
        ("[::]:3001", "http://[::1]:3001/healthz"),
        ("[::1]:4001", "http://[::1]:4001/healthz"),
        ("127.0.0.2:4002", "http://127.0.0.2:4002/healthz"),
    ],
)
def test_a_wildcard_listen_is_probed_on_loopback(listen: str, url: str) -> None:
    assert probe_for(default_config({"SIDECAR_LISTEN": listen})).url == url


async def test_health_over_http_then_down(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, closed_upstream(), port)
    async with running(config, port):
        out = health(config)
        assert out.returncode == 0, out.stderr
        assert out.stdout == f"healthy: http://127.0.0.1:{port}/healthz: 200\n"
    out = health(config)
    assert out.returncode == 1, out.stdout
    assert out.stderr.startswith(f"goproxy-sidecar: unhealthy: http://127.0.0.1:{port}/healthz: ")
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr


async def test_health_over_https_when_tls_is_set(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, closed_upstream(), port, tls_extra(tmp_path))
    plain = tmp_path / "plain"
    plain.mkdir()
    without_tls = write_config(plain, closed_upstream(), port)  # the same port, no tls
    async with running(config, port):
        out = health(config)
        assert out.returncode == 0, out.stderr
        assert out.stdout == f"healthy: https://127.0.0.1:{port}/healthz: 200\n"
        # What the old `http://` HEALTHCHECK did: the TLS port drops plain HTTP.
        out = health(without_tls)
        assert out.returncode == 1, out.stdout
        assert "http://127.0.0.1" in out.stderr and "without an answer" in out.stderr, out.stderr


async def test_health_follows_sidecar_variables(tmp_path: Path) -> None:
    """The port and tls moved by SIDECAR_* variables, as in a container's env."""
    port = free_port()
    config = write_config(tmp_path, closed_upstream(), 3001)  # port from the file: unused
    pair = tmp_path / "pair"
    pair.mkdir()
    cert, key = self_signed(pair)
    env = clean_env(
        SIDECAR_LISTEN=f"127.0.0.1:{port}",
        SIDECAR_TLS_CERTIFICATE=str(cert),
        SIDECAR_TLS_KEY=str(key),
    )
    async with running(config, port, env):
        out = health(config, env=env)
        assert out.returncode == 0, out.stderr
        assert out.stdout == f"healthy: https://127.0.0.1:{port}/healthz: 200\n"


async def test_health_honours_a_healthz_that_needs_a_credential(tmp_path: Path) -> None:
    port = free_port()
    tokens = tmp_path / "tokens"
    tokens.write_text(f"docker sha256:{hashlib.sha256(TOKEN.encode()).hexdigest()}\n")
    auth = (
        f'client_auth: {{enabled: true, tokens_file: "{tokens}", '
        "endpoints: {healthz: authenticated}}\n"
    )
    config = write_config(tmp_path, closed_upstream(), port, tls_extra(tmp_path) + auth)
    async with running(config, port):
        out = health(config)
        assert out.returncode == 1, out.stdout
        assert f"https://127.0.0.1:{port}/healthz: 401 Unauthorized" in out.stderr, out.stderr
        assert "client_auth.endpoints.healthz is authenticated" in out.stderr, out.stderr
        assert "--token-env" in out.stderr, out.stderr

        out = health(config, "--token-env", "HEALTH_TOKEN", env=clean_env(HEALTH_TOKEN=TOKEN))
        assert out.returncode == 0, out.stderr
        assert out.stdout == f"healthy: https://127.0.0.1:{port}/healthz: 200\n"
        assert TOKEN not in out.stdout + out.stderr

        wrong = clean_env(HEALTH_TOKEN="not-the-token")
        out = health(config, "--token-env", "HEALTH_TOKEN", env=wrong)
        assert out.returncode == 1 and "check the token" in out.stderr, out.stderr
        assert "not-the-token" not in out.stderr


def test_health_with_an_unset_token_variable_is_a_usage_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, closed_upstream(), free_port())
    out = health(config, "--token-env", "NO_SUCH_VARIABLE_HERE")
    assert out.returncode == 2, out.stdout
    assert out.stderr == (
        "goproxy-sidecar: --token-env: environment variable NO_SUCH_VARIABLE_HERE is not set\n"
    )


def test_health_with_an_invalid_config_names_the_key(tmp_path: Path) -> None:
    config = write_config(tmp_path, closed_upstream(), free_port())
    out = health(config, env=clean_env(SIDECAR_TLS_CERTIFICATE=str(tmp_path / "missing.pem")))
    assert out.returncode == 2, out.stdout
    assert "tls." in out.stderr and "Traceback" not in out.stderr, out.stderr
