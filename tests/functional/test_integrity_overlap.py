"""A checked body's checksum lookup runs while the upstream is asked (issue 14:
a .mod miss used to wait for its upstream, then for the lookup, and made most
of the slowest 1 % of requests), and a lookup that fails leaves no garbage
that only the cyclic GC can free (its pauses are waited out by every request
in flight). Real parts: the Go checksum database of tests/sumdb, loopback
upstreams, the sidecar on loopback.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from sidecar.config import VerifyConfig
from tests.functional.test_integrity import (  # noqa: F401 - fixtures are used by name
    SMALL,
    Upstream,
    artifact,
    database,
    serve,
)
from tests.garbage import cyclic_garbage
from tests.sumdb.gosumdb import GoSumdb, sumdb_server_binary  # noqa: F401

HOLD_S = 20.0  # bound on how long the .mod is held waiting for the lookup
FAILED_LOOKUPS = 40


@dataclass
class HoldingUpstream(Upstream):
    """Holds its .mod answers until the sidecar asked it for the lookup (or
    HOLD_S passed), and notes which came first."""

    lookup_asked: asyncio.Event = field(default_factory=asyncio.Event)
    lookup_before_mod: list[bool] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path.lstrip("/")
        if path.startswith(f"sumdb/{self.db.name}/lookup/"):
            self.lookup_asked.set()
        elif path.endswith(".mod"):
            try:
                async with asyncio.timeout(HOLD_S):
                    await self.lookup_asked.wait()
            except TimeoutError:
                pass
            self.lookup_before_mod.append(self.lookup_asked.is_set())
        return await super().handle(request)


async def test_the_lookup_of_a_mod_miss_runs_while_the_upstream_is_asked(
    database: tuple[GoSumdb, Path],  # noqa: F811
    serve: Callable[[Upstream], Any],  # noqa: F811
    sidecar_client: Any,
) -> None:
    db, proxy = database
    upstream = HoldingUpstream(proxy, db)
    client, _ = await sidecar_client(
        [await serve(upstream)], verify=VerifyConfig(key=db.verifier_key)
    )
    path = artifact(*SMALL, "mod")
    resp = await client.get("/" + path)
    assert resp.status == 200
    assert await resp.read() == (proxy / path).read_bytes()
    # Sequential (upstream, then lookup) would have held the .mod for HOLD_S
    # and found no lookup asked meanwhile.
    assert upstream.lookup_before_mod == [True]
    assert any(p.startswith(f"sumdb/{db.name}/lookup/") for p in upstream.asked)


@dataclass
class ForgingUpstream(Upstream):
    """Serves the genuine .mod files, and lookups whose signed note is garbage."""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path.lstrip("/")
        if path.startswith(f"sumdb/{self.db.name}/lookup/"):
            self.asked.append(path)
            note = f"go.sum database tree\n1000\nAAAA\n\n— {self.db.name} Az3grn\n"
            return web.Response(text=f"1\n{path}\n\n{note}")
        return await super().handle(request)


LOOKUP_LEFTOVERS = (BaseException, types.FrameType, types.TracebackType, asyncio.Future)


async def test_failed_lookups_leave_no_cyclic_garbage(
    database: tuple[GoSumdb, Path],  # noqa: F811
    serve: Callable[[Upstream], Any],  # noqa: F811
    sidecar_client: Any,
) -> None:
    db, proxy = database
    upstream = ForgingUpstream(proxy, db)
    client, _ = await sidecar_client(
        [await serve(upstream)], verify=VerifyConfig(key=db.verifier_key)
    )
    path = "/" + artifact(*SMALL, "mod")
    assert (await client.get(path)).status == 200  # warm: imports, pools, first-use caches
    with cyclic_garbage(LOOKUP_LEFTOVERS) as left:
        for _ in range(FAILED_LOOKUPS):
            resp = await client.get(path)
            assert resp.status == 200  # verify.mode report (the default): served anyway
            await resp.read()
    lookups = sum(p.startswith(f"sumdb/{db.name}/lookup/") for p in upstream.asked)
    assert lookups >= FAILED_LOOKUPS  # each request's lookup failed: nothing memoised
    # Each failed lookup used to leave its exception, nine frames, their
    # tracebacks and the lookup's tasks in one cycle (about 40 objects).
    assert len(left) < FAILED_LOOKUPS, [type(o).__name__ for o in left]
