"""The real go command through the authenticating sidecar (issue 17).

The go command sends ``.netrc``/``GOAUTH`` credentials over HTTPS only
(cmd/go/internal/web: ``if url.Scheme == "https"``), so the sidecar serves
HTTPS itself (``tls``), with a self-signed certificate the go command trusts
through ``SSL_CERT_FILE``.
Credentials live in a ``.netrc`` named by ``NETRC``, with ``GOAUTH=netrc``;
the htpasswd file is made by `htpasswd -B`. The upstream is a loopback
GOPROXY serving three modules (one public, two private) and records every
request: refused builds must reach nothing.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sidecar.auth.tokens import token_line
from sidecar.config import (
    AccessRule,
    CacheConfig,
    ClientAuthConfig,
    GroupConfig,
    RoutingConfig,
    TlsConfig,
    UpstreamConfig,
)
from tests.certs import self_signed
from tests.conftest import FAST_TIMEOUTS
from tests.sumdb.gosumdb import go_env
from tests.tools import require_tool
from tests.upstream import FakeGoproxy

PASSWORDS = {"alice": "alice-Go-Pa55", "bob": "bob-Go-Pa55"}
TOKEN = "ci-token-0f1e2d3c4b5a69788796a5b4c3d2e1f0"
VERSION = "v1.0.0"
# module -> the package's Go source (one package at the module root)
MODULES = {
    "example.com/pub": 'package pub\n\nconst Name = "pub"\n',
    "corp.example/platform/api": 'package api\n\nconst Name = "api"\n',
    "corp.example/shared/util": 'package util\n\nconst Name = "util"\n',
}
APP_GO = """package main

import (
\t"fmt"

\t"corp.example/platform/api"
\t"corp.example/shared/util"
\t"example.com/pub"
)

func main() { fmt.Println("built with", pub.Name, api.Name, util.Name) }
"""
GO_DEADLINE_S = 180
HOSTPORT = "front.invalid:0"  # replaced by the sidecar's address in each run


def module_files(module: str, source: str) -> dict[str, bytes]:
    """The GOPROXY files of ``module@VERSION``."""
    gomod = f"module {module}\n\ngo 1.21\n".encode()
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{module}@{VERSION}/go.mod", gomod)
        z.writestr(f"{module}@{VERSION}/{module.rsplit('/', 1)[1]}.go", source)
    info = f'{{"Version":"{VERSION}","Time":"2025-01-01T00:00:00Z"}}'.encode()
    base = f"{module}/@v/{VERSION}"
    return {
        f"{module}/@v/list": f"{VERSION}\n".encode(),
        f"{base}.info": info,
        f"{base}.mod": gomod,
        f"{base}.zip": zipped.getvalue(),
    }


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"))


@dataclass
class Front:
    url: str
    upstream: FakeGoproxy


@pytest.fixture
async def front(
    fake_upstreams: Any, sidecar_client: Any, cert: tuple[Path, Path], tmp_path: Path
) -> AsyncIterator[Front]:
    tool = require_tool("htpasswd")
    require_tool("go")
    users = tmp_path / "htpasswd"
    for i, (user, password) in enumerate(PASSWORDS.items()):
        flags = "-cbB" if i == 0 else "-bB"
        subprocess.run([str(tool), flags, str(users), user, password], check=True)
    tokens = tmp_path / "tokens"
    tokens.write_text(token_line("ci", TOKEN) + "\n")
    [(fake, url)] = await fake_upstreams(1)
    for module, source in MODULES.items():
        for path, body in module_files(module, source).items():
            fake.set(path, body)
    client, _ = await sidecar_client(
        [url],
        upstreams=(UpstreamConfig("athens", url, timeouts=FAST_TIMEOUTS, private_ok=True),),
        cache=CacheConfig(dir=str(tmp_path / "cache")),
        routing=RoutingConfig(private=("corp.example",)),
        client_auth=ClientAuthConfig(
            enabled=True,
            htpasswd=str(users),
            tokens_file=str(tokens),
            groups=(GroupConfig("platform", ("alice",)),),
            access=(
                AccessRule(("corp.example/platform",), ("@platform",)),
                AccessRule(("corp.example/shared",), ("*",)),
            ),
        ),
        tls=TlsConfig(certificate=str(cert[0]), key=str(cert[1])),
    )
    yield Front(f"https://127.0.0.1:{client.server.port}", fake)


def go(
    front: Front,
    cert: tuple[Path, Path],
    work: Path,
    netrc: str | None,
    *args: str,
    goauth: str = "netrc",
) -> subprocess.CompletedProcess[str]:
    """``go args...`` in ``work`` with a fresh module cache and ``netrc`` as $NETRC."""
    netrc_file = work / "netrc"
    netrc_file.write_text((netrc or "").replace(HOSTPORT, front.url.removeprefix("https://")))
    env = go_env(
        GOPROXY=front.url,
        GOSUMDB="off",
        GONOSUMDB="",
        GOPRIVATE="",
        GONOPROXY="",
        GOAUTH=goauth,
        NETRC=str(netrc_file),
        SSL_CERT_FILE=str(cert[0]),
        GOFLAGS="-mod=mod -modcacherw",
        GOMODCACHE=str(work / "modcache"),
        GOPATH=str(work / "gopath"),
    )
    return subprocess.run(
        [str(require_tool("go")), *args],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=GO_DEADLINE_S,
        check=False,
    )


def app(tmp_path: Path, name: str) -> Path:
    work = tmp_path / name
    work.mkdir()
    requires = "".join(f"\t{m} {VERSION}\n" for m in MODULES)
    (work / "go.mod").write_text(f"module example.com/app\n\ngo 1.21\n\nrequire (\n{requires})\n")
    (work / "main.go").write_text(APP_GO)
    return work


def netrc(user: str, password: str) -> str:
    """A .netrc entry for the sidecar. Its machine is host:port: since GOAUTH (Go 1.24)
    the go command looks credentials up by URL prefix, port included."""
    return f"machine {HOSTPORT}\nlogin {user}\npassword {password}\n"


async def build(
    front: Front, cert: tuple[Path, Path], work: Path, credentials: str | None
) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        go, front, cert, work, credentials, "build", "-o", str(work / "app"), "."
    )


async def test_the_go_command_builds_with_good_netrc_credentials(
    front: Front, cert: tuple[Path, Path], tmp_path: Path
) -> None:
    work = app(tmp_path, "alice")
    result = await build(front, cert, work, netrc("alice", PASSWORDS["alice"]))
    assert result.returncode == 0, result.stderr
    run = subprocess.run([str(work / "app")], capture_output=True, text=True, check=True)
    assert run.stdout == "built with pub api util\n"
    fetched = {p for p in front.upstream.received if p.endswith(".zip")}
    assert fetched == {f"{m}/@v/{VERSION}.zip" for m in MODULES}


@pytest.mark.parametrize(
    "credentials",
    [None, netrc("alice", "not-the-password"), netrc("mallory", PASSWORDS["alice"])],
    ids=["missing", "wrong-password", "unknown-user"],
)
async def test_the_go_command_is_refused_without_good_credentials(
    front: Front, cert: tuple[Path, Path], tmp_path: Path, credentials: str | None
) -> None:
    work = app(tmp_path, "refused")
    result = await build(front, cert, work, credentials)
    assert result.returncode != 0
    assert "401 Unauthorized" in result.stderr, result.stderr
    assert "authentication required" in result.stderr
    assert front.upstream.received == []


async def test_a_user_gets_the_private_modules_allowed_and_no_other(
    front: Front, cert: tuple[Path, Path], tmp_path: Path
) -> None:
    bob = netrc("bob", PASSWORDS["bob"])
    work = app(tmp_path, "bob")
    result = await build(front, cert, work, bob)
    assert result.returncode != 0
    assert "403 Forbidden" in result.stderr, result.stderr
    assert "bob may not fetch corp.example/platform/api" in result.stderr
    assert not any(p.startswith("corp.example/platform") for p in front.upstream.received)

    alone = tmp_path / "download"
    alone.mkdir()
    for module in ("corp.example/shared/util", "example.com/pub"):
        got = await asyncio.to_thread(
            go, front, cert, alone, bob, "mod", "download", "-json", f"{module}@{VERSION}"
        )
        assert got.returncode == 0, got.stdout + got.stderr
        assert (
            alone / "modcache" / "cache" / "download" / module / "@v" / f"{VERSION}.zip"
        ).is_file()


async def test_a_bearer_token_from_a_goauth_command(
    front: Front, cert: tuple[Path, Path], tmp_path: Path
) -> None:
    """GOAUTH=<command>: the command prints the URL prefix and the header."""
    work = tmp_path / "token"
    work.mkdir()
    command = work / "goproxy-token"
    command.write_text(
        f"#!/bin/sh\nprintf '%s\\n\\nAuthorization: Bearer %s\\n\\n' '{front.url}' '{TOKEN}'\n"
    )
    command.chmod(0o755)
    target = f"corp.example/shared/util@{VERSION}"
    got = await asyncio.to_thread(
        go, front, cert, work, None, "mod", "download", "-json", target, goauth=str(command)
    )
    assert got.returncode == 0, got.stdout + got.stderr
    command.write_text(command.read_text().replace(TOKEN, "not-the-token"))
    (work / "modcache").rename(work / "modcache-1")
    refused = await asyncio.to_thread(
        go, front, cert, work, None, "mod", "download", "-json", target, goauth=str(command)
    )
    assert refused.returncode != 0 and "401 Unauthorized" in refused.stdout + refused.stderr
