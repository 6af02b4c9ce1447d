from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from sidecar.app import Sidecar, SidecarService, build_sidecar
from sidecar.compiled import stale
from sidecar.config import (
    CacheConfig,
    Config,
    HedgeConfig,
    PolicyConfig,
    StatsConfig,
    TimeoutsConfig,
    UpstreamConfig,
    VerifyConfig,
    VerifyMode,
)
from tests.serving import SidecarTestServer
from tests.upstream import FakeGoproxy, make_app


def pytest_configure(config: pytest.Config) -> None:
    """Python imports an in-place extension before its source: a test run after
    an edit would test the old build (scripts/test rebuilds it)."""
    edited = stale(Path(__file__).resolve().parent.parent)
    if edited:
        raise pytest.UsageError(
            f"{', '.join(edited)}: edited after its mypyc build; rebuild with "
            "`pip install -e .` (scripts/test does) or `python3 setup.py build_ext --inplace`"
        )


FAST_TIMEOUTS = TimeoutsConfig(connect=1.0, first_byte=1.0, idle=1.0)
HEDGED = HedgeConfig()  # the default: on


@pytest.fixture
async def fake_upstreams() -> AsyncIterator[
    Callable[[int], Awaitable[list[tuple[FakeGoproxy, str]]]]
]:
    """Start N scriptable upstreams on loopback; returns (fake, base url) pairs."""
    servers: list[TestServer] = []

    async def start(n: int) -> list[tuple[FakeGoproxy, str]]:
        out = []
        for _ in range(n):
            fake = FakeGoproxy()
            server = TestServer(make_app(fake), host="127.0.0.1")
            await server.start_server()
            servers.append(server)
            out.append((fake, str(server.make_url("")).rstrip("/")))
        return out

    yield start
    for server in servers:
        await server.close()


def make_config(
    urls: list[str], tmp_path: Path, hedge: HedgeConfig = HEDGED, **overrides: Any
) -> Config:
    """``hedge`` applies to every upstream (a test that must see a slow upstream's
    own failure turns hedging off)."""
    upstreams = tuple(
        UpstreamConfig(name=f"up{i}", url=url, timeouts=FAST_TIMEOUTS, hedge=hedge)
        for i, url in enumerate(urls)
    )
    config = Config(
        listen="127.0.0.1:0",
        upstreams=upstreams,
        cache=CacheConfig(dir=str(tmp_path / "cache"), enabled=False),
        policy=PolicyConfig(),
        stats=StatsConfig(window=120.0, slice=10.0),
        # Off unless a test is about it: the fake upstreams serve no checksum database.
        verify=VerifyConfig(mode=VerifyMode.OFF),
    )
    return dataclasses.replace(config, **overrides)


@pytest.fixture
async def sidecar_client(
    tmp_path: Path,
) -> AsyncIterator[Callable[..., Awaitable[tuple[TestClient[Any, Any], Sidecar]]]]:
    """Build a real sidecar app for the given upstream URLs and serve it on loopback."""
    clients: list[TestClient[Any, Any]] = []

    async def start(
        urls: list[str], run_control: bool = True, **overrides: Any
    ) -> tuple[TestClient[Any, Any], Sidecar]:
        sidecar = build_sidecar(make_config(urls, tmp_path, **overrides))
        client = TestClient(SidecarTestServer(SidecarService(sidecar, run_control)))
        await client.start_server()
        clients.append(client)
        return client, sidecar

    yield start
    for client in clients:
        await client.close()
