"""Breakers end to end: real loopback upstreams turn slow, fail or saturate,
the real default policy decides, and the request path acts on the plan."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest

from sidecar.config import PolicyConfig, PolicyEngineKind, PolicyMode, PoolConfig, StatsConfig
from tests.conftest import FAST_TIMEOUTS
from tests.upstream import Reply

INFO = "example.com/mod/@v/v1.0.0.info"
POLICIES = Path(__file__).resolve().parents[2] / "policies"

THRESHOLDS = """\
sidecar:
  config:
    thresholds: {{ttfb_p99_ms: 100, ttfb_p99_for_s: 1, error_rate: 0.05,
                 pool_saturation: 0.9, min_requests: 5}}
    breaker: {{cooldown_s: {cooldown}, probes: 2}}
"""


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    """The shipped policy with thresholds scaled down to test time."""
    target = tmp_path / "policies"
    shutil.copytree(POLICIES, target)
    (target / "thresholds.yaml").write_text(THRESHOLDS.format(cooldown=0.3))
    return target


@pytest.fixture
def breaker_sidecar(sidecar_client, policy_dir):
    async def start(urls, mode=PolicyMode.ENFORCE, run_control=False, **kw):
        policy = PolicyConfig(
            paths=(str(policy_dir),), interval=0.1, mode=mode, **kw.pop("policy", {})
        )
        return await sidecar_client(
            urls,
            run_control=run_control,
            policy=policy,
            stats=StatsConfig(window=2.0, slice=0.5),
            **kw,
        )

    return start


async def burst(client, n: int, path: str = INFO) -> list[int]:
    responses = await asyncio.gather(*(client.get("/" + path) for _ in range(n)))
    statuses = [r.status for r in responses]
    for r in responses:
        r.release()
    return statuses


async def test_errors_trip_cache_and_spare_the_primary(fake_upstreams, breaker_sidecar):
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    a.default = Reply(status=500)
    b.set(INFO, b"{}")
    client, sc = await breaker_sidecar([url_a, url_b])
    assert await burst(client, 10) == [200] * 10  # fall-through keeps clients whole
    await sc.control.step()
    view = await (await client.get("/breakers")).json()
    assert view["up0"]["state"] == "open" and view["up0"]["action"] == "cache"
    assert "error rate" in view["up0"]["reason"]
    assert view["up0"]["stats"]["errors"] == 10
    seen = len(a.received)
    assert await burst(client, 5) == [200] * 5
    assert len(a.received) == seen  # open: the primary is spared
    assert sc.windows["up0"].snapshot().requests == 0  # fresh window after the trip
    text = await (await client.get("/metrics")).text()
    assert (
        'goproxy_sidecar_breaker_transitions_total{from_state="closed",reason="cache",'
        'to_state="open",upstream="up0"} 1.0'
    ) in text
    assert 'goproxy_sidecar_breaker_state{state="open",upstream="up0"} 1.0' in text


async def test_slow_primary_is_rerouted_after_the_span(fake_upstreams, breaker_sidecar):
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    a.set(INFO, Reply(body=b"{}", delay=0.15))
    b.set(INFO, b"{}")
    client, sc = await breaker_sidecar([url_a, url_b])
    await burst(client, 3)
    await sc.control.step()
    assert sc.breakers["up0"].state.value == "closed"  # slow, but not for long enough yet
    deadline = time.monotonic() + 1.6
    while time.monotonic() < deadline:
        await burst(client, 3)
    await sc.control.step()
    assert sc.breakers["up0"].state.value == "open"
    assert sc.breakers["up0"].action.value == "reroute"
    assert "ttfb p99" in sc.breakers["up0"].reason
    resp = await client.get("/" + INFO)
    assert resp.headers["X-Sidecar-Upstream"] == "up1"


async def test_saturation_rejects_fast_with_retry_after(fake_upstreams, breaker_sidecar):
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    a.set(INFO, Reply(body=b"{}", delay=0.3))
    b.set(INFO, b"{}")
    from sidecar.config import UpstreamConfig

    ups = (
        UpstreamConfig("up0", url_a, pool=PoolConfig(max_connections=2), timeouts=FAST_TIMEOUTS),
        UpstreamConfig("up1", url_b, timeouts=FAST_TIMEOUTS),
    )
    client, sc = await breaker_sidecar([url_a, url_b], upstreams=ups)
    await burst(client, 8)
    await sc.control.step()
    view = (await (await client.get("/breakers")).json())["up0"]
    assert view["action"] == "reject" and view["alert"] is True
    started = time.perf_counter()
    resp = await client.get("/" + INFO)
    assert resp.status == 503
    assert resp.headers["Retry-After"]
    assert "shedding load" in await resp.text()
    assert time.perf_counter() - started < 0.3  # did not wait for the slow upstream
    text = await (await client.get("/metrics")).text()
    assert 'goproxy_sidecar_breaker_alert{upstream="up0"} 1.0' in text
    assert 'goproxy_sidecar_rejected_requests_total{reason="policy",upstream="up0"} 1.0' in text


async def test_reject_status_is_configurable(fake_upstreams, breaker_sidecar):
    [(a, url_a)] = await fake_upstreams(1)
    a.set(INFO, Reply(body=b"{}", delay=0.3))
    from sidecar.config import UpstreamConfig

    ups = (
        UpstreamConfig("up0", url_a, pool=PoolConfig(max_connections=1), timeouts=FAST_TIMEOUTS),
    )
    client, sc = await breaker_sidecar([url_a], upstreams=ups, policy={"reject_status": 404})
    await burst(client, 4)
    await sc.control.step()
    assert (await client.get("/" + INFO)).status == 404


async def test_recovery_through_half_open_with_client_probes(fake_upstreams, breaker_sidecar):
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    a.default = Reply(status=500)
    b.set(INFO, b"{}")
    client, sc = await breaker_sidecar([url_a, url_b])
    await burst(client, 10)
    await sc.control.step()
    assert sc.breakers["up0"].state.value == "open"
    a.set(INFO, b'{"healed":true}')
    await asyncio.sleep(0.35)
    await sc.control.step()
    assert sc.breakers["up0"].state.value == "half-open"
    for _ in range(2):
        resp = await client.get("/" + INFO)
        assert resp.headers["X-Sidecar-Upstream"] == "up0"
    assert sc.breakers["up0"].state.value == "closed"
    assert sc.plan.by_name("up0").state.value == "closed"  # the plan followed at once


async def test_bad_probe_reopens(fake_upstreams, breaker_sidecar):
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    a.default = Reply(status=500)
    b.set(INFO, b"{}")
    client, sc = await breaker_sidecar([url_a, url_b])
    await burst(client, 10)
    await sc.control.step()
    await asyncio.sleep(0.35)
    await sc.control.step()
    assert sc.breakers["up0"].state.value == "half-open"
    assert (await client.get("/" + INFO)).status == 200  # probe failed, fell through
    assert sc.breakers["up0"].state.value == "open"


async def test_idle_half_open_breaker_probes_by_itself(fake_upstreams, breaker_sidecar):
    (a, url_a), (_b, url_b) = await fake_upstreams(2)
    a.default = Reply(status=500)
    client, sc = await breaker_sidecar([url_a, url_b])
    await burst(client, 10)
    await sc.control.step()
    a.default = Reply(status=404)  # healed; answers the probe path with "not here"
    await asyncio.sleep(0.35)
    for _ in range(20):
        await sc.control.step()
        if sc.breakers["up0"].state.value == "closed":
            break
        await asyncio.sleep(0.12)
    assert sc.breakers["up0"].state.value == "closed"
    assert "sumdb/sum.golang.org/supported" in a.received
    assert not any(p.startswith("example.com") for p in a.received[10:])


async def test_shadow_mode_reports_without_acting(fake_upstreams, breaker_sidecar):
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    a.default = Reply(status=500)
    b.set(INFO, b"{}")
    client, sc = await breaker_sidecar([url_a, url_b], mode=PolicyMode.SHADOW)
    await burst(client, 10)
    await sc.control.step()
    view = (await (await client.get("/breakers")).json())["up0"]
    assert view["state"] == "closed" and view["action"] == "allow"
    assert view["would_action"] == "cache"
    seen = len(a.received)
    await burst(client, 3)
    assert len(a.received) == seen + 3  # still sent to the primary


async def test_trip_happens_within_an_interval_with_the_loop_running(
    fake_upstreams, breaker_sidecar
):
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    a.default = Reply(status=500)
    b.set(INFO, b"{}")
    client, sc = await breaker_sidecar([url_a, url_b], run_control=True)
    await burst(client, 10)
    condition_at = time.monotonic()
    while sc.breakers["up0"].state.value != "open":
        assert time.monotonic() - condition_at < 2.0
        await asyncio.sleep(0.01)
    # One interval (0.1 s) plus one evaluation; generous for a shared machine.
    assert time.monotonic() - condition_at < 1.0


async def test_broken_policy_is_refused_and_the_last_good_stays(
    fake_upstreams, breaker_sidecar, policy_dir
):
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    a.default = Reply(status=500)
    b.set(INFO, b"{}")
    client, sc = await breaker_sidecar([url_a, url_b])
    rego = policy_dir / "sidecar" / "breaker.rego"
    rego.write_text(rego.read_text() + "\nthis is not rego {\n")
    assert await sc.policy.reload_now() is False
    await burst(client, 10)
    await sc.control.step()
    assert sc.breakers["up0"].action.value == "cache"  # the old policy still decides
    assert (
        sc.metrics.registry.get_sample_value(
            "goproxy_sidecar_policy_reloads_total", {"result": "failed"}
        )
        == 1
    )


async def test_failing_engine_never_fails_requests(fake_upstreams, breaker_sidecar, aiohttp_server):
    from aiohttp import web

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
