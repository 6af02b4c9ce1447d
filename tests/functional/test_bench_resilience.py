"""The resilience benchmark's own parts (bench/faults.py, bench/drive.py,
bench/contenders.py) against real loopback servers: each fault mode does what
the benchmark's table claims, the load client applies the go command's
``GOPROXY=a|b`` rule, nginx's failover config is valid and fails over, and
the sidecar's trips are read from /metrics and /breakers as documented."""

from __future__ import annotations

import asyncio
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from bench.checksums import MIN_RECORDS, database, held_modules
from bench.contenders import Nginx, Upstreams, breaker_views, prometheus_samples
from bench.drive import DATABASE_TILES, SUMDB, GoClient, parse_mix, request_for
from bench.faults import OVERLOAD_CAPACITY, Content, Upstream, launch
from bench.procs import Procs, free_port
from bench.tree import mod_body, unique_info_prefix
from sidecar.sumdb.dirhash import hash_gomod, hash_zip
from tests.sumdb.gosumdb import GoSumdb, sumdb_server_binary  # noqa: F401
from tests.tools import require_tool

PREFIX = unique_info_prefix("test")
INFO = f"{PREFIX}m1/@v/v1.0.0.info"
LIST = f"{PREFIX}m1/@v/list"
LOOKUP = f"{SUMDB}/lookup/{PREFIX[1:]}m1@v1.0.0"
TIMEOUT = aiohttp.ClientTimeout(total=10)

StartUpstream = Callable[..., Awaitable[tuple[Upstream, str]]]


@pytest.fixture
def checksums(sumdb_server_binary: Path, tmp_path: Path) -> Iterator[GoSumdb]:  # noqa: F811
    """bench/checksums.py's database, holding the ``.mod`` modules of ``mod:1,info:1``."""
    held = held_modules("mod:1,info:1", "test", requests=8)
    with database(sumdb_server_binary, tmp_path / "sumdb", held, None) as db:
        yield db


@pytest.fixture
async def upstream(tmp_path: Path, checksums: GoSumdb) -> AsyncIterator[StartUpstream]:
    """``await upstream(mode, athens=...)``: a fault upstream in this event loop, its
    ``sumdb/`` paths passed on to ``checksums``."""
    started: list[Upstream] = []

    async def start(mode: str = "healthy", athens: bool = True) -> tuple[Upstream, str]:
        up = Upstream(free_port(), athens, Content(tmp_path, checksums.url), mode)
        await up.start()
        started.append(up)
        return up, f"http://127.0.0.1:{up.port}"

    yield start
    for up in started:
        await up.set_mode("healthy")  # answers what a hung one held
        if up.listener is not None:
            up.listener.close()
        for conn in list(up.conns):
            conn.close()


async def fetch(url: str, method: str = "GET") -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as s,
        s.request(method, url) as resp,
    ):
        return resp.status, await resp.read()


async def test_healthy_answers_made_up_modules_and_sumdb(upstream: StartUpstream) -> None:
    _, url = await upstream()
    status, body = await fetch(url + INFO)
    assert (status, body[:12]) == (200, b'{"Version":"')
    assert (await fetch(url + LIST)) == (200, b"v1.0.0\n")
    assert (await fetch(url + "/example.com/elsewhere/@v/list"))[0] == 404


async def test_sumdb_paths_reach_a_database_that_vouches_for_made_up_modules(
    upstream: StartUpstream, checksums: GoSumdb
) -> None:
    _, url = await upstream()
    # Held from the start: m0 (request 0 of mod:1,info:1 is a .mod); m1 is added
    # on its first lookup, as sum.golang.org adds a new module.
    assert held_modules("mod:1,info:1", "test", 4) == [f"{PREFIX[1:]}m0", f"{PREFIX[1:]}m2"]
    for n in (0, 1):
        module = f"{PREFIX[1:]}m{n}"
        status, body = await fetch(f"{url}{SUMDB}/lookup/{module}@v1.0.0")
        gomod_line = f"{module} v1.0.0/go.mod {hash_gomod(mod_body(module))}\n"
        assert status == 200 and gomod_line.encode() in body
        assert "\n\n\u2014 sum.golang.org ".encode() in body  # a signed tree head
    assert checksums.verifier_key.startswith("sum.golang.org+")
    status, tile = await fetch(f"{url}{SUMDB}/tile/8/0/000.p/2")  # the first two records
    assert (status, len(tile)) == (200, 2 * 32)
    assert (await fetch(f"{url}{SUMDB}/lookup/example.com/elsewhere@v1.0.0"))[0] == 404


def test_database_holds_every_version_of_the_origin_from_the_start(
    sumdb_server_binary: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Builds: the corpus' versions are in the tree before the first lookup, as a real
    build's modules are in sum.golang.org (a .mod alone, a .mod and its zip, an
    escaped path); a GOPROXY tree's other files are not versions."""
    origin = tmp_path / "origin"
    upper = origin / "example.com/!upper/@v"
    zipped = origin / "example.com/zipped/@v"
    for folder in (upper, zipped):
        folder.mkdir(parents=True)
    (upper / "v1.0.0.mod").write_text("module example.com/Upper\n")
    (zipped / "v1.2.0.mod").write_text("module example.com/zipped\n")
    (zipped / "list").write_text("v1.2.0\n")
    with zipfile.ZipFile(zipped / "v1.2.0.zip", "w") as archive:
        archive.writestr("example.com/zipped@v1.2.0/go.mod", "module example.com/zipped\n")
    with database(sumdb_server_binary, tmp_path / "lazy", [], origin) as lazy:
        assert (lazy.size, lazy.modules) == (0, {})
    with database(sumdb_server_binary, tmp_path / "held", [], origin, hold_origin=True) as db:
        assert db.size == 2
        assert sorted(db.modules) == ["example.com/Upper@v1.0.0", "example.com/zipped@v1.2.0"]
        held = db.modules["example.com/zipped@v1.2.0"]
        assert held.gomod == hash_gomod(b"module example.com/zipped\n")
        assert held.zip == hash_zip(zipped / "v1.2.0.zip")
        assert db.modules["example.com/Upper@v1.0.0"].zip == ""


async def test_athens_answers_head_405_and_backup_200(upstream: StartUpstream) -> None:
    _, athens = await upstream(athens=True)
    _, backup = await upstream(athens=False)
    assert (await fetch(athens + INFO, "HEAD"))[0] == 405
    assert (await fetch(backup + INFO, "HEAD"))[0] == 200


@pytest.mark.parametrize(
    ("mode", "module_status", "sumdb_status"),
    [("sumdb502", 200, 502), ("error100", 500, 500), ("masking", 404, 404)],
)
async def test_modes_answer_as_documented(
    upstream: StartUpstream, mode: str, module_status: int, sumdb_status: int
) -> None:
    _, url = await upstream(mode)
    assert (await fetch(url + INFO))[0] == module_status
    assert (await fetch(url + LOOKUP))[0] == sumdb_status


async def test_error50_fails_every_second_request(upstream: StartUpstream) -> None:
    _, url = await upstream("error50")
    statuses = [(await fetch(url + INFO))[0] for _ in range(6)]
    assert sorted(statuses) == [200] * 3 + [500] * 3


async def test_reset_and_flapping_down_cut_the_client(upstream: StartUpstream) -> None:
    up, url = await upstream("reset")
    with pytest.raises(aiohttp.ClientError):
        await fetch(url + INFO)
    await up.set_mode("flapping")  # starts with 10 s down: the listener is closed
    with pytest.raises(aiohttp.ClientConnectorError):
        await fetch(url + INFO)
    await up.set_mode("healthy")
    assert (await fetch(url + INFO))[0] == 200


async def test_hung_holds_requests_until_it_heals(upstream: StartUpstream) -> None:
    up, url = await upstream("hung")
    pending = asyncio.ensure_future(fetch(url + INFO))
    done, _ = await asyncio.wait([pending], timeout=0.5)
    assert not done and up.counts["held"] == 1
    await up.set_mode("healthy")
    assert (await asyncio.wait_for(pending, 5))[0] == 200


async def test_overloaded_serves_capacity_at_once_and_queues_the_rest(
    upstream: StartUpstream,
) -> None:
    up, url = await upstream("overloaded")
    results = await asyncio.gather(*(fetch(url + f"{PREFIX}m{i}/@v/list") for i in range(24)))
    assert [status for status, _ in results] == [200] * 24
    assert up.counts["max_queued"] == 24 - OVERLOAD_CAPACITY


async def test_the_database_serves_every_tile_the_load_asks_for(
    sumdb_server_binary: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A short load holds few modules: synthetic records fill the tree up to the
    full tiles that ``tile`` requests ask for (bench/trial.py)."""
    held = held_modules("info:2,lookup:1,tile:1", "test", requests=40)
    filler = MIN_RECORDS - len(held)
    with database(sumdb_server_binary, tmp_path / "db", held, None, filler=filler) as db:
        assert (len(held), db.size) == (10, MIN_RECORDS)
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            for n in range(DATABASE_TILES):
                async with s.get(db.url + request_for("tile", PREFIX, n)[1]) as resp:
                    assert (resp.status, len(await resp.read())) == (200, 256 * 32)


# ---------------------------------------------------------------- the go rule


async def test_go_rule_falls_through_on_any_error(upstream: StartUpstream) -> None:
    _, failing = await upstream("error100")
    _, masking = await upstream("masking")
    _, backup = await upstream(athens=False)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        assert await GoClient(s, [failing, backup]).get("GET", INFO) == ("ok", True)
        assert await GoClient(s, [masking, backup]).get("GET", INFO) == ("ok", True)
        # All fail: the first error that is not a 404 wins (TryProxies' ranks).
        assert await GoClient(s, [masking, failing]).get("GET", INFO) == ("http 500", False)
        assert await GoClient(s, [masking, masking]).get("GET", INFO) == ("http 404", False)


async def test_go_rule_picks_one_checksum_database_proxy(upstream: StartUpstream) -> None:
    primary, athens = await upstream("sumdb502")
    _, backup = await upstream(athens=False)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        go = GoClient(s, [athens, backup])
        assert await go.get("GET", LOOKUP) == ("ok", True)
        assert go.sumdb_base == backup
        asked = primary.counts["requests"]
        assert await go.get("GET", LOOKUP) == ("ok", True)
        assert primary.counts["requests"] == asked  # no second `supported` probe


def test_mix_and_paths() -> None:
    assert parse_mix("info:3,head:1") == ["info", "info", "info", "head"]
    with pytest.raises(ValueError, match="unknown request kind"):
        parse_mix("zip:1")
    assert request_for("head", PREFIX, 7) == ("HEAD", f"{PREFIX}m7/@v/v1.0.0.info")
    method, tile = request_for("tile", PREFIX, 1_234_567)
    assert (method, tile) == ("GET", f"{SUMDB}/tile/8/0/007")


# ---------------------------------------------------------------- contenders


def test_breakers_and_metrics_are_read_as_documented() -> None:
    doc = {
        "primary": {"state": "open", "reason": "r", "stats": {"state": "closed"}},
        "backup": {"state": "closed", "kinds": {"sumdb": {"state": "half-open"}}},
    }
    assert [(n, v["state"]) for n, v in breaker_views(doc)] == [
        ("primary", "open"),
        ("backup", "closed"),
        ("backup/kinds/sumdb", "half-open"),
    ]
    text = (
        "# HELP x\n"
        'goproxy_sidecar_breaker_transitions_total{upstream="a",from_state="closed",'
        'to_state="open",reason="error rate \\"x\\""} 2.0\n'
    )
    [(name, labels, value)] = prometheus_samples(text)
    assert name == "goproxy_sidecar_breaker_transitions_total"
    assert (labels["upstream"], labels["to_state"], value) == ("a", "open", 2.0)


async def test_nginx_contender_fails_over_to_the_backup(
    upstream: StartUpstream, tmp_path: Path
) -> None:
    require_tool("nginx")
    _, primary = await upstream("error100")
    _, backup = await upstream(athens=False)
    (tmp_path / "logs").mkdir()
    procs = Procs(tmp_path / "logs")
    try:
        nginx = await asyncio.to_thread(Nginx, procs, tmp_path, Upstreams(primary, backup), 8, None)
        statuses = [(await fetch(nginx.url + f"{PREFIX}m{i}/@v/list"))[0] for i in range(6)]
        assert statuses == [200] * 6
        verdict = nginx.verdict(None)
        assert verdict.trips == 1  # max_fails=3: the primary is taken out once
        assert verdict.detail == "primary 1"
    finally:
        procs.stop_all()


def test_launch_runs_a_fault_upstream_process(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    procs = Procs(tmp_path / "logs")
    try:
        up = launch(procs, "primary", True, None, "masking", None)
        assert up.stats()["mode"] == "masking"
        up.set_mode("healthy")
        assert up.stats()["mode"] == "healthy"
    finally:
        procs.stop_all()
