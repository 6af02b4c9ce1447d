"""Breakers end to end: real loopback upstreams turn slow, fail or queue,
the real default policy decides, and the request path acts on the plan.

The windows and breakers run on a fake clock (``build_sidecar(clock=...)``):
a test moves it from one stats slice to the next and past a cool-down, so
"held over two slices" and "after the cool-down" do not depend on how fast
this machine is. TTFB is still real time, measured by the upstream client.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from sidecar.app import Sidecar
from sidecar.config import (
    CacheConfig,
    PolicyConfig,
    PolicyEngineKind,
    PolicyMode,
    PoolConfig,
    StatsConfig,
    UpstreamConfig,
)
from sidecar.goproxy import parse_request_path
from tests.conftest import FAST_TIMEOUTS, make_config
from tests.control_support import (
    FAST_THRESHOLDS,
    FakeClock,
    Sidecars,
    Start,
    scaled_policies,
    thresholds_yaml,
)
from tests.upstream import FakeGoproxy, Reply

INFO = "example.com/mod/@v/v1.0.0.info"
LOOKUP = "sumdb/sum.golang.org/lookup/example.com/mod@v1.0.0"
TILE = "sumdb/sum.golang.org/tile/8/0/000"
SLICE_S = 0.5
COOLDOWN_S = 30.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    """The shipped policy with thresholds scaled down to test time."""
    return scaled_policies(tmp_path / "policies", FAST_THRESHOLDS)


@pytest.fixture
async def breaker_sidecar(
    tmp_path: Path, policy_dir: Path, clock: FakeClock
) -> AsyncIterator[Start]:
    sidecars = Sidecars()

    async def start(
        urls: list[str], mode: PolicyMode = PolicyMode.ENFORCE, run_control: bool = False, **kw: Any
    ) -> tuple[TestClient[Any, Any], Sidecar]:
        policy = PolicyConfig(
            paths=(str(policy_dir),), interval=0.1, mode=mode, **kw.pop("policy", {})
        )
        stats = StatsConfig(window=4 * SLICE_S, slice=SLICE_S)
        config = make_config(urls, tmp_path, policy=policy, stats=stats, **kw)
        return await sidecars.start(config, clock, run_control)

    yield start
    await sidecars.close()


def pooled(url: str, connections: int, pending: int) -> tuple[UpstreamConfig]:
    """up0 alone at ``url``: ``connections`` connections, ``pending`` requests
    queued (waiting up to 5 s) behind them."""
    pool = PoolConfig(max_connections=connections, max_pending=pending, max_wait=5.0)
    return (UpstreamConfig("up0", url, pool=pool, timeouts=FAST_TIMEOUTS),)


async def burst(client: TestClient[Any, Any], n: int, path: str = INFO) -> list[int]:
    responses = await asyncio.gather(*(client.get("/" + path) for _ in range(n)))
    statuses = [r.status for r in responses]
    for r in responses:
        r.release()
    return statuses


async def sustained(
    client: TestClient[Any, Any], clock: FakeClock, n: int, path: str = INFO
) -> list[int]:
    """``n`` requests in each of two consecutive stats slices: what a rule needs."""
    first = await burst(client, n, path)
    clock.advance(SLICE_S)
    return first + await burst(client, n, path)


async def breakers(client: TestClient[Any, Any]) -> dict[str, Any]:
    view: dict[str, Any] = await (await client.get("/breakers")).json()
    return view


async def test_errors_trip_cache_and_spare_the_primary(fake_upstreams, breaker_sidecar, clock):
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    a.default = Reply(status=500)
    b.set(INFO, b"{}")
    client, sc = await breaker_sidecar([url_a, url_b])
    assert await sustained(client, clock, 5) == [200] * 10  # fall-through keeps clients whole
    await sc.control.step()
    view = await breakers(client)
    assert view["up0"]["state"] == "open" and view["up0"]["action"] == "cache"
    assert view["up0"]["reason"] == (
        "error rate 100.0% > 5.0% over 10 requests, for 1s; also 10 failures in a row (>= 5)"
    )
    assert view["up0"]["stats"]["errors"] == 10
    assert view["up0"]["sumdb"]["state"] == "closed"  # no checksum traffic was judged
    seen = len(a.received)
    assert await burst(client, 5) == [200] * 5
    assert len(a.received) == seen  # open: the primary is spared
    assert sc.windows["up0"].snapshot().requests == 0  # fresh window after the trip
    text = await (await client.get("/metrics")).text()
    assert (
        'goproxy_sidecar_breaker_transitions_total{class="module",from_state="closed",'
        'reason="cache",to_state="open",upstream="up0"} 1.0'
    ) in text
    assert 'goproxy_sidecar_breaker_state{class="module",state="open",upstream="up0"} 1.0' in text
    assert 'goproxy_sidecar_breaker_state{class="sumdb",state="closed",upstream="up0"} 1.0' in text


async def test_errors_in_a_single_slice_do_not_trip(
    fake_upstreams, breaker_sidecar, policy_dir, clock
):
    # The rate rule alone: a run of failures and the last answers trip at once, by
    # design (their own tests); 30 answers never fill the last 32.
    (policy_dir / "thresholds.yaml").write_text(
        thresholds_yaml({**FAST_THRESHOLDS, "consecutive_failures": 1000, "recent_answers": 32})
    )
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    a.default = Reply(status=500)
    b.set(INFO, b"{}")
    client, sc = await breaker_sidecar([url_a, url_b])
    assert await burst(client, 30) == [200] * 30
    for _ in range(5):  # many ticks, one slice of evidence
        await sc.control.step()
    view = await breakers(client)
    assert view["up0"]["state"] == "closed", view["up0"]
    assert view["up0"]["stats"]["error_rate"] == 1.0
    clock.advance(SLICE_S)
    await sc.control.step()  # the next slice began, still without a failure in it
    assert sc.breakers["up0"].state.value == "closed"
    assert await burst(client, 5) == [200] * 5  # failures in a second slice: now it holds
    await sc.control.step()
    assert sc.breakers["up0"].state.value == "open"


async def test_slow_primary_is_rerouted_after_the_span(fake_upstreams, breaker_sidecar, clock):
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    a.set(INFO, Reply(body=b"{}", delay=0.15))
    b.set(INFO, b"{}")
    client, sc = await breaker_sidecar([url_a, url_b])
    await burst(client, 3)
    await sc.control.step()
    assert sc.breakers["up0"].state.value == "closed"  # slow, but not for long enough yet
    clock.advance(SLICE_S)
    await burst(client, 3)
    await sc.control.step()
    assert sc.breakers["up0"].state.value == "open"
    assert sc.breakers["up0"].action.value == "reroute"
    assert "ttfb p99" in sc.breakers["up0"].reason
    resp = await client.get("/" + INFO)
    assert resp.headers["X-Sidecar-Upstream"] == "up1"


def capacity_limited(service_s: float) -> tuple[Callable[..., Awaitable[web.StreamResponse]], Any]:
    """A GOPROXY upstream that serves one request at a time, each taking ``service_s``:
    it cannot keep up, and it gets slower the more it is sent."""
    gate = asyncio.Semaphore(1)
    served: list[str] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        async with gate:
            await asyncio.sleep(service_s)
            served.append(request.raw_path)
            return web.Response(body=b"{}", content_type="application/json")

    return handle, served


async def test_sustained_queueing_in_front_of_a_slow_upstream_sheds_load(
    aiohttp_server, breaker_sidecar, clock
):
    handle, served = capacity_limited(0.06)
    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    url = str(server.make_url("")).rstrip("/")
    client, sc = await breaker_sidecar([url], upstreams=pooled(url, 4, 4))
    # 10 at once: 4 connections (each answer waits behind the others upstream),
    # 4 queued, 2 overflow. Twice, one slice apart: sustained.
    first = await burst(client, 10)
    await sc.control.step()
    assert sc.breakers["up0"].state.value == "closed"  # one slice is one burst
    clock.advance(SLICE_S)
    second = await burst(client, 10)
    assert first.count(503) >= 1 and second.count(503) >= 1  # overflow: nothing else to take it
    await sc.control.step()
    view = (await breakers(client))["up0"]
    assert view["action"] == "reject" and view["alert"] is True, view
    assert view["reason"].startswith("queueing: wait p99 "), view["reason"]
    before = len(served)
    resp = await client.get("/" + INFO)
    assert resp.status == 503 and resp.headers["Retry-After"]
    assert "shedding load" in await resp.text()
    assert len(served) == before  # did not go to the upstream
    text = await (await client.get("/metrics")).text()
    assert 'goproxy_sidecar_breaker_alert{class="module",upstream="up0"} 1.0' in text
    assert 'goproxy_sidecar_rejected_requests_total{reason="policy",upstream="up0"} 1.0' in text


async def test_queueing_in_front_of_a_fast_upstream_is_not_sick(
    fake_upstreams, breaker_sidecar, clock
):
    [(a, url_a)] = await fake_upstreams(1)
    a.set(INFO, Reply(body=b"{}", delay=0.02))
    client, sc = await breaker_sidecar([url_a], upstreams=pooled(url_a, 1, 2))
    for _ in range(4):  # every slice: queueing (up to 40 ms) and overflows, answers in 20 ms
        statuses = await burst(client, 8)
        assert statuses.count(200) >= 3 and statuses.count(503) >= 1, statuses
        await sc.control.step()
        clock.advance(SLICE_S)
    pool = (await breakers(client))["up0"]["stats"]["pool"]
    assert pool["overflows"] >= 4 and pool["queue_wait_ms"]["p99"] > 0
    assert sc.breakers["up0"].state.value == "closed", sc.breakers["up0"].reason
    assert sc.breakers["up0"].reason.startswith("ok: "), sc.breakers["up0"].reason


async def test_reject_status_is_configurable(aiohttp_server, breaker_sidecar, clock):
    handle, _ = capacity_limited(0.06)
    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    url = str(server.make_url("")).rstrip("/")
    client, sc = await breaker_sidecar(
        [url], upstreams=pooled(url, 4, 4), policy={"reject_status": 404}
    )
    await sustained(client, clock, 10)
    await sc.control.step()
    assert sc.breakers["up0"].action.value == "reject"
    assert (await client.get("/" + INFO)).status == 404


async def test_recovery_through_half_open_with_client_probes(
    fake_upstreams, breaker_sidecar, clock
):
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    a.default = Reply(status=500)
    b.set(INFO, b"{}")
    client, sc = await breaker_sidecar([url_a, url_b])
    await sustained(client, clock, 5)
    await sc.control.step()
    assert sc.breakers["up0"].state.value == "open"
    a.set(INFO, b'{"healed":true}')
    clock.advance(COOLDOWN_S)
    await sc.control.step()
    assert sc.breakers["up0"].state.value == "half-open"
    for _ in range(2):
        resp = await client.get("/" + INFO)
        assert resp.headers["X-Sidecar-Upstream"] == "up0"
    assert sc.breakers["up0"].state.value == "closed"
    assert sc.plan.by_name("up0").state.value == "closed"  # the plan followed at once


async def test_bad_probe_reopens(fake_upstreams, breaker_sidecar, clock):
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    a.default = Reply(status=500)
    b.set(INFO, b"{}")
    client, sc = await breaker_sidecar([url_a, url_b])
    await sustained(client, clock, 5)
    await sc.control.step()
    clock.advance(COOLDOWN_S)
    await sc.control.step()
    assert sc.breakers["up0"].state.value == "half-open"
    assert (await client.get("/" + INFO)).status == 200  # probe failed, fell through
    assert sc.breakers["up0"].state.value == "open"


async def test_idle_half_open_breakers_probe_by_themselves(fake_upstreams, breaker_sidecar, clock):
    (a, url_a), (_b, url_b) = await fake_upstreams(2)
    a.default = Reply(status=500)
    client, sc = await breaker_sidecar([url_a, url_b])
    for round_ in range(2):
        clock.advance(SLICE_S * round_)  # two consecutive slices
        await burst(client, 5)
        await burst(client, 5, LOOKUP)
    await sc.control.step()
    assert sc.breakers["up0"].state.value == sc.sumdb_breakers["up0"].state.value == "open"
    a.default = Reply(status=404)  # healed; answers the probe paths with "not here"
    clock.advance(COOLDOWN_S)
    for _ in range(40):
        await sc.control.step()
        if sc.breakers["up0"].state.value == sc.sumdb_breakers["up0"].state.value == "closed":
            break
        clock.advance(0.2)  # past one interval: the next self-probe is due
        await asyncio.sleep(0.02)
    assert sc.breakers["up0"].state.value == "closed"
    assert sc.sumdb_breakers["up0"].state.value == "closed"
    probes = a.received[20:]
    # Each class probed on its own path; no client path was replayed.
    assert "goproxy-sidecar.invalid/self-probe/@v/list" in probes
    assert "sumdb/sum.golang.org/supported" in probes
    assert not any(p.startswith("example.com") or p == LOOKUP for p in probes)


async def test_shadow_mode_reports_without_acting(fake_upstreams, breaker_sidecar, clock):
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    a.default = Reply(status=500)
    b.set(INFO, b"{}")
    client, sc = await breaker_sidecar([url_a, url_b], mode=PolicyMode.SHADOW)
    await sustained(client, clock, 5)
    await sc.control.step()
    view = (await breakers(client))["up0"]
    assert view["state"] == "closed" and view["action"] == "allow"
    assert view["would_action"] == "cache"
    assert view["reason"].startswith("shadow mode, would cache: "), view
    assert view["reason"].endswith(view["would_reason"]), view
    assert view["sumdb"]["would_action"] == "allow"
    assert view["sumdb"]["reason"] == view["sumdb"]["would_reason"] != "", view
    seen = len(a.received)
    await burst(client, 3)
    assert len(a.received) == seen + 3  # still sent to the primary


async def test_trip_happens_within_an_interval_with_the_loop_running(
    fake_upstreams, breaker_sidecar, clock
):
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    a.default = Reply(status=500)
    b.set(INFO, b"{}")
    client, sc = await breaker_sidecar([url_a, url_b], run_control=True)
    await sustained(client, clock, 5)
    for _ in range(200):  # 0.1 s interval: a handful of ticks; 2 s at most
        if sc.breakers["up0"].state.value == "open":
            break
        await asyncio.sleep(0.01)
    assert sc.breakers["up0"].state.value == "open"


async def test_broken_policy_is_refused_and_the_last_good_stays(
    fake_upstreams, breaker_sidecar, policy_dir, clock
):
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    a.default = Reply(status=500)
    b.set(INFO, b"{}")
    client, sc = await breaker_sidecar([url_a, url_b])
    rego = policy_dir / "sidecar" / "breaker.rego"
    rego.write_text(rego.read_text() + "\nthis is not rego {\n")
    assert await sc.policy.reload_now() is False
    await sustained(client, clock, 5)
    await sc.control.step()
    assert sc.breakers["up0"].action.value == "cache"  # the old policy still decides
    assert (
        sc.metrics.registry.get_sample_value(
            "goproxy_sidecar_policy_reloads_total", {"result": "failed"}
        )
        == 1
    )


async def test_failing_engine_never_fails_requests(fake_upstreams, breaker_sidecar, aiohttp_server):
    async def garbage(request: web.Request) -> web.Response:
        return web.json_response({"result": "not a decision object"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", garbage)
    opa = await aiohttp_server(app, host="127.0.0.1")
    [(a, url_a)] = await fake_upstreams(1)
    a.set(INFO, b"{}")
    client, sc = await breaker_sidecar(
        [url_a],
        policy={"engine": PolicyEngineKind.OPA, "opa_url": str(opa.make_url("")).rstrip("/")},
    )
    sc.control.stale_after = 0.0
    await sc.control.step()
    assert (await client.get("/" + INFO)).status == 200
    reg = sc.metrics.registry
    assert (
        reg.get_sample_value(
            "goproxy_sidecar_policy_failures_total", {"engine": "opa", "reason": "PolicyEvalError"}
        )
        or 0
    ) >= 1
    assert reg.get_sample_value("goproxy_sidecar_policy_decisions_stale") == 1
    assert sc.breakers["up0"].state.value == "closed"


# --- judged per kind ---------------------------------------------------------------


class NoHead(FakeGoproxy):
    """Athens: every HEAD on a GOPROXY path is answered 405."""

    def __init__(self) -> None:
        super().__init__()
        self.methods: list[str] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.methods.append(request.method)
        if request.method == "HEAD":
            return web.Response(status=405, headers={"Allow": "GET"})
        return await super().handle(request)


async def no_head_upstream(aiohttp_server: Any) -> tuple[NoHead, str]:
    fake = NoHead()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    return fake, str(server.make_url("")).rstrip("/")


async def test_head_against_an_upstream_that_refuses_head(
    aiohttp_server, fake_upstreams, breaker_sidecar, clock
):
    athens, url_a = await no_head_upstream(aiohttp_server)
    athens.set(
        INFO, Reply(body=b'{"Version":"v1.0.0"}', headers={"Content-Type": "application/json"})
    )
    [(backup, url_b)] = await fake_upstreams(1)
    backup.set(INFO, b'{"Version":"v1.0.0","from":"backup"}')
    client, sc = await breaker_sidecar([url_a, url_b])
    for _ in range(2):  # 24 HEADs (curl -I) over two slices: would have tripped before
        for _ in range(12):
            resp = await client.head("/" + INFO)
            assert resp.status == 200
            assert resp.headers["X-Sidecar-Upstream"] == "up0"
            assert resp.headers["Content-Length"] == str(len(b'{"Version":"v1.0.0"}'))
            assert resp.headers["Content-Type"] == "application/json"
            assert await resp.read() == b""
        clock.advance(SLICE_S)
        await sc.control.step()
    assert set(athens.methods) == {"GET"}  # the HEADs were asked upstream as GETs
    assert backup.received == []  # module traffic stayed on the primary
    view = (await breakers(client))["up0"]
    assert view["state"] == "closed", view
    assert (view["stats"]["errors"], view["stats"]["masked_failures"]) == (0, 0)
    resp = await client.get("/" + INFO)
    assert resp.headers["X-Sidecar-Upstream"] == "up0"
    assert await resp.read() == b'{"Version":"v1.0.0"}'


async def test_head_fills_the_cache_with_an_artifact(
    aiohttp_server, breaker_sidecar, tmp_path, clock
):
    athens, url_a = await no_head_upstream(aiohttp_server)
    zip_path = "example.com/mod/@v/v1.0.0.zip"
    body = bytes(range(256)) * 2048  # 512 KiB: streamed, not read whole
    athens.set(zip_path, Reply(body=body, headers={"Content-Type": "application/zip"}))
    client, sc = await breaker_sidecar([url_a], cache=CacheConfig(dir=str(tmp_path / "cache")))
    resp = await client.head("/" + zip_path)
    assert resp.status == 200 and resp.headers["Content-Length"] == str(len(body))
    assert await resp.read() == b""
    resp.release()
    for _ in range(500):  # the body goes on into the cache after the answer
        if sc.cache is not None and sc.cache.lookup(parse_request_path("/" + zip_path), False):
            break
        await asyncio.sleep(0.01)
    resp = await client.get("/" + zip_path)
    assert resp.headers["X-Sidecar-Upstream"] == "cache"
    assert await resp.read() == body
    assert athens.methods == ["GET"]  # one GET upstream for the HEAD and the GET together


async def test_sumdb_failures_reroute_checksum_traffic_only(fake_upstreams, breaker_sidecar, clock):
    (athens, url_a), (backup, url_b) = await fake_upstreams(2)
    # An Athens that proxies sumdb/ to a checksum database it cannot reach.
    athens.default = Reply(status=502, body=b"http: proxy error: dial tcp: no such host")
    athens.set(INFO, b'{"Version":"v1.0.0"}')
    backup.set(LOOKUP, b"lookup answer")
    backup.set(TILE, b"tile")
    backup.set(INFO, b'{"from":"backup"}')
    client, sc = await breaker_sidecar([url_a, url_b])
    for round_ in range(2):
        clock.advance(SLICE_S * round_)  # two consecutive slices
        for path in (LOOKUP, TILE):
            assert await burst(client, 4, path) == [200] * 4  # fell through to the backup
        assert await burst(client, 4) == [200] * 4
    await sc.control.step()
    view = (await breakers(client))["up0"]
    assert view["state"] == "closed" and view["stats"]["errors"] == 0, view
    assert view["sumdb"]["state"] == "open" and view["sumdb"]["action"] == "cache"
    assert view["sumdb"]["reason"].startswith("error rate 100.0% > 5.0% over 16 requests")
    seen = len(athens.received)
    resp = await client.get("/" + LOOKUP)
    assert resp.headers["X-Sidecar-Upstream"] == "up1"  # checksum traffic goes around
    resp = await client.get("/" + INFO)
    assert resp.headers["X-Sidecar-Upstream"] == "up0"  # module traffic stays
    assert athens.received[seen:] == [INFO]
    text = await (await client.get("/metrics")).text()
    assert 'goproxy_sidecar_breaker_state{class="sumdb",state="open",upstream="up0"} 1.0' in text
    assert 'goproxy_sidecar_breaker_state{class="module",state="closed",upstream="up0"} 1.0' in text
    assert 'goproxy_sidecar_upstream_error_rate{class="module",upstream="up0"}' in text


async def test_sumdb_masked_failures_are_the_checksum_windows_only(
    fake_upstreams, breaker_sidecar, clock
):
    """A lookup's masked 404 counts in the checksum window (its run reroutes that
    traffic), never in the module window nor in the metric: no 404 by design is
    a fault to alert on."""
    (_athens, url_a), (backup, url_b) = await fake_upstreams(2)
    # Athens with SumDBs = []: 404 to every sumdb/ path, the backup answers them.
    for path in (LOOKUP, TILE, "sumdb/sum.golang.org/supported"):
        backup.set(path, b"ok")
    missing = "example.com/gone/@v/v1.0.0.info"  # Athens' own fetch failed: masked
    backup.set(missing, b"{}")
    client, sc = await breaker_sidecar([url_a, url_b])
    for path in (LOOKUP, TILE, "sumdb/sum.golang.org/supported", missing):
        assert (await client.get("/" + path)).headers["X-Sidecar-Upstream"] == "up1"
    await sc.control.step()
    view = (await breakers(client))["up0"]
    assert view["stats"]["masked_failures"] == 1  # the module request only
    assert view["sumdb"]["stats"]["masked_failures"] == 3
    assert view["sumdb"]["stats"]["not_found"] == 3
    text = await (await client.get("/metrics")).text()
    assert 'goproxy_sidecar_masked_failures_total{upstream="up0"} 1.0' in text
