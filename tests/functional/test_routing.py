"""Routing rules and private modules against real loopback upstreams that
record every path they receive: no private path may ever reach a public one."""

from __future__ import annotations

import asyncio
import re
import tempfile
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.app import SidecarService, build_sidecar
from sidecar.breaker.state import Action, Decision
from sidecar.config import CacheConfig, RouteRule, RoutingConfig, UpstreamConfig
from sidecar.goproxy import escape_path
from tests.conftest import FAST_TIMEOUTS, make_config
from tests.serving import SidecarTestServer
from tests.upstream import FakeGoproxy, Reply, make_app

PRIVATE = ("*.corp.example", "github.com/acme/*")


def routing_config(urls: list[str], tmp: Path, rules=(), cache=False):
    ups = (
        UpstreamConfig("athens", urls[0], timeouts=FAST_TIMEOUTS, private_ok=True),
        UpstreamConfig("public", urls[1], timeouts=FAST_TIMEOUTS),
    )
    return make_config(
        urls,
        tmp,
        upstreams=ups,
        routing=RoutingConfig(private=PRIVATE, rules=tuple(rules)),
        cache=CacheConfig(dir=str(tmp / "cache"), enabled=cache),
    )


def leaked(fake: FakeGoproxy) -> list[str]:
    return [p for p in fake.received if "corp.example" in p or "/acme/" in p or "!acme" in p]


# --- the property --------------------------------------------------------------

# Path elements the go command accepts anywhere (no "vN" major-version look-alikes).
elements = st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True).filter(
    lambda e: not re.fullmatch(r"v[0-9]+", e)
)
private_modules = st.one_of(
    st.builds(lambda a, b: f"{a}.corp.example/{b}", elements, elements),
    st.builds(lambda a, b: f"github.com/acme/{a}/{b}", elements, elements),
    st.builds(lambda a: f"git.corp.example/{a}/v2", elements),
)
public_modules = st.builds(lambda a, b: f"github.com/{a}x/{b}", elements, elements)
kinds = st.sampled_from(
    ["@v/list", "@v/v1.0.0.info", "@v/v1.0.0.mod", "@v/v1.0.0.zip", "@latest", "@v/master.info"]
)
actions = st.sampled_from(["allow", "reroute", "cache", "reject", "half-open"])
failures = st.sampled_from(["ok", "404", "500", "reset", "slow"])
REPLIES = {
    "ok": Reply(body=b"{}"),
    "404": Reply(status=404),
    "500": Reply(status=500),
    "reset": Reply(reset=True),
    "slow": Reply(delay=1.5, body=b"{}"),
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    private=st.lists(st.tuples(private_modules, kinds), min_size=1, max_size=4),
    public=st.lists(st.tuples(public_modules, kinds), max_size=2),
    action=actions,
    failure=failures,
    cache=st.booleans(),
)
def test_no_private_path_ever_reaches_a_public_upstream(private, public, action, failure, cache):
    asyncio.run(_scenario(private, public, action, failure, cache))


async def _scenario(private, public, action, failure, cache) -> None:
    athens, public_up = FakeGoproxy(), FakeGoproxy()
    athens.default = REPLIES[failure]
    public_up.default = Reply(body=b"{}")  # would answer anything: a leak would "work"
    servers = [TestServer(make_app(f), host="127.0.0.1") for f in (athens, public_up)]
    for s in servers:
        await s.start_server()
    # A fill finishing its last write as the app stops may race rmtree: not what this tests.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        urls = [str(s.make_url("")).rstrip("/") for s in servers]
        sc = build_sidecar(routing_config(urls, Path(tmp), cache=cache))
        _force(sc, action)
        client = TestClient(SidecarTestServer(SidecarService(sc, run_control=False)))
        await client.start_server()
        try:
            for module, kind in [*private, *public]:
                resp = await client.get(f"/{escape_path(module)}/{kind}")
                await resp.read()
                if module in {m for m, _ in private}:
                    assert resp.headers.get("X-Sidecar-Upstream") != "public"
            # and a self-probe while we are at it
            if sc.control is not None:
                await sc.control.step()
        finally:
            await client.close()
            for s in servers:
                await s.close()
    assert leaked(public_up) == []
    assert {p.split("/@")[0] for p in public_up.received} <= {escape_path(m) for m, _ in public} | {
        "sumdb/sum.golang.org/supported"
    }


def _force(sc, action: str) -> None:
    breaker = sc.breakers["athens"]
    if action == "allow":
        return
    trip = Action.REROUTE if action == "half-open" else Action(action)
    breaker.apply(Decision(trip, "forced by test"), 0.0 if action == "half-open" else 60.0, 2)
    breaker.tick()
    sc.swap_plan()


# --- the scenarios by hand -----------------------------------------------------

INFO = "/git.corp.example/payments/ledger/@v/v1.0.0.info"


async def test_reroute_of_the_private_upstream_does_not_leak(fake_upstreams, routed):
    (a, url_a), (p, url_p) = await fake_upstreams(2)
    p.default = Reply(body=b"{}")
    client, sc = await routed([url_a, url_p])
    _force(sc, "reroute")
    resp = await client.get(INFO)
    assert resp.status == 503  # the only allowed upstream is rerouted: says so
    assert "athens: rerouted" in await resp.text()
    assert p.received == [] and a.received == []


async def test_private_module_without_private_ok_upstream_is_a_404(fake_upstreams, tmp_path):
    (a, url_a), (p, url_p) = await fake_upstreams(2)
    p.default = Reply(body=b"{}")
    ups = (
        UpstreamConfig("athens", url_a, timeouts=FAST_TIMEOUTS),
        UpstreamConfig("public", url_p, timeouts=FAST_TIMEOUTS),
    )
    cfg = make_config(
        [url_a, url_p], tmp_path, upstreams=ups, routing=RoutingConfig(private=PRIVATE)
    )
    sc = build_sidecar(cfg)
    client = TestClient(SidecarTestServer(SidecarService(sc, run_control=False)))
    await client.start_server()
    try:
        resp = await client.get(INFO)
        assert resp.status == 404
        assert "no upstream with private_ok" in await resp.text()
    finally:
        await client.close()
    assert a.received == [] and p.received == []


async def test_404_fall_through_stops_at_the_private_boundary(fake_upstreams, routed):
    (a, url_a), (p, url_p) = await fake_upstreams(2)
    p.default = Reply(body=b"{}")
    client, _ = await routed([url_a, url_p])
    assert (await client.get(INFO)).status == 404  # athens said 404; public never asked
    assert a.received == [INFO.lstrip("/")] and p.received == []
    assert (await client.get("/github.com/public/x/@v/list")).status == 200  # public still works
    assert p.received == ["github.com/public/x/@v/list"]


async def test_private_sumdb_lookup_is_refused(fake_upstreams, routed):
    (a, url_a), (p, url_p) = await fake_upstreams(2)
    client, sc = await routed([url_a, url_p])
    resp = await client.get("/sumdb/sum.golang.org/lookup/git.corp.example/x@v1.0.0")
    assert resp.status == 403
    assert "GONOSUMDB" in await resp.text()
    assert a.received == [] and p.received == []
    assert (
        sc.metrics.registry.get_sample_value(
            "goproxy_sidecar_route_refusals_total", {"reason": "private_sumdb"}
        )
        == 1
    )


async def test_deny_rule_answers_403_and_no_cache_rule_bypasses_the_cache(fake_upstreams, routed):
    (a, url_a), (p, url_p) = await fake_upstreams(2)
    a.default = Reply(body=b"module x\n")
    rules = [
        RouteRule("github.com/blocked/*", deny=True),
        RouteRule("golang.org/x/*", upstreams=("public", "athens"), cache=False),
    ]
    p.default = Reply(body=b"module y\n")
    client, _ = await routed([url_a, url_p], rules=rules, cache=True)
    resp = await client.get("/github.com/blocked/thing/@v/v1.0.0.mod")
    assert resp.status == 403 and "github.com/blocked/*" in await resp.text()
    for _ in range(2):
        resp = await client.get("/golang.org/x/text/@v/v0.3.0.mod")
        assert resp.headers["X-Sidecar-Upstream"] == "athens"  # order of upstreams: kept
    assert a.received.count("golang.org/x/text/@v/v0.3.0.mod") == 2  # never cached
    assert p.received == []


async def test_routes_endpoint_shows_the_compiled_rules(fake_upstreams, routed):
    (_a, url_a), (_p, url_p) = await fake_upstreams(2)
    client, _ = await routed(
        [url_a, url_p], rules=[RouteRule("golang.org/x/*", upstreams=("public",))]
    )
    view = await (await client.get("/routes")).json()
    assert view["private"] == list(PRIVATE) and view["private_ok"] == ["athens"]
    assert view["rules"][0]["match"] == "golang.org/x/*"


async def test_warm_never_sends_a_private_module_to_a_public_upstream(fake_upstreams, tmp_path):
    from sidecar.cache.warm import parse_go_sum, warm

    (a, url_a), (p, url_p) = await fake_upstreams(2)
    p.default = Reply(body=b"x")
    config = routing_config([url_a, url_p], tmp_path, cache=True)
    plan = parse_go_sum(
        "git.corp.example/x v1.0.0 h1:abc=\ngit.corp.example/x v1.0.0/go.mod h1:d=\n"
        "github.com/pub/y v1.0.0/go.mod h1:e=\n"
    )
    await warm(config, plan.artifacts)
    assert leaked(p) == []
    assert any("corp.example" in path for path in a.received)


@pytest.fixture
async def routed(tmp_path):
    clients: list[TestClient] = []

    async def start(urls, rules=(), cache=False):
        sc = build_sidecar(routing_config(urls, tmp_path, rules, cache))
        client = TestClient(SidecarTestServer(SidecarService(sc, run_control=False)))
        await client.start_server()
        clients.append(client)
        return client, sc

    yield start
    for client in clients:
        await client.close()
