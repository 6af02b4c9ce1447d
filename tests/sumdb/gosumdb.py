"""The real Go checksum database of tests/sumdb/server, built and run for tests.

``sumdb_server_binary`` (session fixture) builds it once per test session with
the go command (pinned golang.org/x/mod from tests/sumdb/server/go.mod); the
go build cache makes later sessions' builds quick. ``GoSumdb.start`` runs one
database over a list of module versions and reads what it printed: its
verifier key, URL, tree size and every module's record id and hashes.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import select
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.tools import require_tool

SERVER_SRC = Path(__file__).resolve().parent / "server"
BUILD_TIMEOUT_S = 300.0
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


def go_env(**extra: str) -> dict[str, str]:
    """The environment for the go command: the local toolchain, no user go env file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GO")}
    env.update(
        GOTOOLCHAIN="local", GOENV="off", GOFLAGS="-mod=readonly -buildvcs=false", CGO_ENABLED="0"
    )
    for name in ("GOPROXY", "GOCACHE", "GOMODCACHE", "GOPATH"):
        if name in os.environ:
            env[name] = os.environ[name]
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def sumdb_server_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    go = require_tool("go")
    out = tmp_path_factory.mktemp("sumdb-server") / "sumdb-testserver"
    result = subprocess.run(
        [str(go), "build", "-trimpath", "-o", str(out), "."],
        cwd=SERVER_SRC,
        env=go_env(),
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"building tests/sumdb/server failed:\n{result.stderr[-3000:]}", pytrace=False)
    return out


def signer_key(name: str) -> tuple[str, str]:
    """(signer key, verifier key) for ``name`` in note's documented format."""
    private = Ed25519PrivateKey.generate()
    seed = private.private_bytes_raw()
    public = b"\x01" + private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    key_hash = hashlib.sha256(name.encode() + b"\n" + public).digest()[:4].hex()
    private_b64 = base64.b64encode(b"\x01" + seed).decode()
    skey = f"PRIVATE+KEY+{name}+{key_hash}+{private_b64}"
    return skey, f"{name}+{key_hash}+{base64.b64encode(public).decode()}"


@dataclass
class Record:
    id: int
    zip: str
    gomod: str


@dataclass
class GoSumdb:
    verifier_key: str
    url: str
    name: str
    size: int
    modules: dict[str, Record] = field(default_factory=dict)


@contextlib.contextmanager
def start_sumdb(
    binary: Path,
    modules_file: Path,
    *,
    filler: int = 0,
    proxy_dir: Path | None = None,
    key: str = "",
    name: str = "sumdb.test.localhost",
    args: Sequence[str] = (),
) -> Iterator[GoSumdb]:
    """Run one database on loopback until the block ends; ``args``: more flags."""
    argv = [str(binary), "-modules", str(modules_file), "-filler", str(filler), "-name", name]
    argv += args
    if proxy_dir is not None:
        argv += ["-proxydir", str(proxy_dir)]
    if key:
        argv += ["-key", key]
    process = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        vkey = _read_line(process, deadline).strip()
        report: dict[str, Any] = json.loads(_read_line(process, deadline))
        modules = {k: Record(**v) for k, v in report["modules"].items()}
        yield GoSumdb(vkey, report["url"], report["name"], report["size"], modules)
    finally:
        _stop(process)


def _read_line(process: subprocess.Popen[bytes], deadline: float) -> str:
    assert process.stdout is not None
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([process.stdout], [], [], max(remaining, 0))
        if not ready:
            raise TimeoutError("the checksum database printed nothing in time")
        piece = os.read(process.stdout.fileno(), 1)
        if not piece:
            err = process.stderr.read().decode() if process.stderr else ""
            raise RuntimeError(f"the checksum database exited: {err[-2000:]}")
        line += piece
    return line.decode()


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.stdin is not None:
        process.stdin.close()  # the server exits when its stdin closes
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(STOP_TIMEOUT_S)
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()
