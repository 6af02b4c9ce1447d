"""Sick is caught fast (issue 14), end to end with real loopback upstreams:
a hung primary, a dead one at low volume, timeouts as latency, a primary that
masks its failures as 404s, and the reason of a closed breaker.

The windows and breakers run on a fake clock where the test must control time
(how long a request has waited, which slice it falls in), and on the real
clock where the whole loop runs by itself; then the tests wait for state
transitions, never for a duration.

Where requests must stay waiting on the hung primary, their module is pinned
to it by a routing rule (``pin=True``): nothing may hedge or reroute them
elsewhere, so the test sees the primary's own silence; other modules (OTHER)
may use the backup.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from sidecar.app import Sidecar, SidecarService, build_sidecar
from sidecar.config import (
    PolicyConfig,
    RouteRule,
    RoutingConfig,
    StatsConfig,
    TimeoutsConfig,
    UpstreamConfig,
)
from tests.conftest import make_config
from tests.control_support import FAST_THRESHOLDS, FakeClock, Sidecars, Start, scaled_policies
from tests.serving import SidecarTestServer
from tests.upstream import Reply

INFO = "example.com/mod/@v/v1.0.0.info"
OTHER = "example.com/other/@v/v1.0.0.info"
LOOKUP = "sumdb/sum.golang.org/lookup/example.com/mod@v1.0.0"
SLICE_S = 0.5


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


@pytest.fixture
async def start_sidecar(tmp_path: Path) -> AsyncIterator[Start]:
    sidecars = Sidecars()

    async def start(
        urls: list[str],
        clock: Callable[[], float] = time.monotonic,
        thresholds: dict[str, float] | None = None,
        first_byte: float = 5.0,
        interval: float = 0.1,
        run_control: bool = False,
        pin: bool = False,
    ) -> tuple[TestClient[Any, Any], Sidecar]:
        policies = scaled_policies(
            tmp_path / f"policies{len(sidecars)}", {**FAST_THRESHOLDS, **(thresholds or {})}
        )
        timeouts = TimeoutsConfig(connect=1.0, first_byte=first_byte, idle=5.0)
        ups = tuple(
            UpstreamConfig(name=f"up{i}", url=url, timeouts=timeouts) for i, url in enumerate(urls)
        )
        config = make_config(
            urls,
            tmp_path,
            upstreams=ups,
            policy=PolicyConfig(paths=(str(policies),), interval=interval),
            stats=StatsConfig(window=4 * SLICE_S, slice=SLICE_S),
            routing=RoutingConfig(
                rules=(RouteRule(match="example.com/mod", upstreams=("up0",)),) if pin else ()
            ),
        )
        return await sidecars.start(config, clock, run_control)

    yield start
    await sidecars.close()


@pytest.fixture
async def hung_upstream() -> AsyncIterator[tuple[str, list[int]]]:
    """Accepts connections and never answers (Athens under SIGSTOP: the kernel
    still accepts). Returns its URL and the count of connections it accepted."""
    accepted = [0]
    release = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted[0] += 1
        writers.append(writer)
        await release.wait()

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", accepted
    release.set()
    for writer in writers:
        writer.close()
    server.close()
    with contextlib.suppress(Exception):
        await server.wait_closed()


async def get_all(client: TestClient[Any, Any], n: int, path: str = INFO) -> list[int]:
    async def one() -> int:
        async with client.get("/" + path) as resp:
            await resp.read()
            return resp.status

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def until(predicate: Callable[[], bool], what: str, limit_s: float = 20.0) -> None:
    """Poll ``predicate`` (bounded): the tests wait for events, not for durations."""
    for _ in range(int(limit_s / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"gave up waiting for {what}")


async def breakers(client: TestClient[Any, Any]) -> dict[str, Any]:
    async with client.get("/breakers") as resp:
        view: dict[str, Any] = await resp.json()
    return view


# --- hung ----------------------------------------------------------------------


async def test_hung_primary_trips_on_silence_before_any_timeout(
    hung_upstream, fake_upstreams, start_sidecar, clock
):
    """Requests wait on a primary that never answers; nothing has ended (the
    first-byte timeout is 5 s away) when the silence passes stall_ms."""
    url_a, accepted = hung_upstream
    [(b, url_b)] = await fake_upstreams(1)
    b.set(OTHER, b"{}")
    client, sc = await start_sidecar([url_a, url_b], clock=clock, pin=True)
    waiting = asyncio.ensure_future(get_all(client, 3))
    waits = sc.windows["up0"].inflight
    await until(lambda: waits.count == 3, "three requests waiting on the primary")
    await sc.control.step()
    assert sc.breakers["up0"].state.value == "closed"
    clock.advance(3.1)  # stall_ms (3000) of silence, with 3 requests asked
    await sc.control.step()
    view = await breakers(client)
    up0 = view["up0"]
    assert (up0["state"], up0["action"]) == ("open", "reroute"), up0
    assert up0["reason"].startswith(
        "stalled: no answer for 3100ms (> 3000ms), 3 requests asked, 3 waiting"
    )
    assert "; also ttfb p99 " in up0["reason"]  # the waits made the slices slow too
    assert up0["stats"]["requests"] == 0  # nothing ended: the silence alone tripped it
    assert up0["stats"]["inflight"]["count"] == 3
    assert up0["sumdb"]["state"] == "closed"
    # New requests go straight to the backup; the primary is not asked again.
    seen = accepted[0]
    assert await get_all(client, 2, OTHER) == [200, 200]
    assert accepted[0] == seen
    assert b.received.count(OTHER) == 2
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting


async def test_hung_primary_trips_with_the_loop_running(
    hung_upstream, fake_upstreams, start_sidecar
):
    """The real clock and the real control loop: at two requests in flight, a
    silence of stall_ms trips within a few ticks, long before first_byte."""
    url_a, _ = hung_upstream
    [(b, url_b)] = await fake_upstreams(1)
    b.set(OTHER, b"{}")
    client, sc = await start_sidecar(
        [url_a, url_b],
        thresholds={"stall_ms": 300},
        first_byte=30.0,  # far beyond anything this test waits for
        run_control=True,
        pin=True,
    )
    waiting = asyncio.ensure_future(get_all(client, 2))
    await until(lambda: sc.breakers["up0"].state.value == "open", "the primary's breaker to open")
    assert sc.breakers["up0"].action.value == "reroute"
    assert sc.breakers["up0"].reason.startswith("stalled: no answer for ")
    assert not waiting.done()  # tripped while the requests still waited
    assert sc.windows["up0"].snapshot().timeouts == 0
    assert await get_all(client, 2, OTHER) == [200, 200]  # the next ones go to the backup
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting


async def test_hung_primary_trips_with_the_embedded_default_policy(
    hung_upstream, fake_upstreams, tmp_path
):
    """Nothing tuned: the shipped policy and thresholds, policy.interval 1 s,
    stats 2 min / 10 s, timeouts.first_byte 15 s. At two requests in flight
    the breaker opens on the silence (stall_ms 3000), before any request
    could time out."""
    url_a, _ = hung_upstream
    [(b, url_b)] = await fake_upstreams(1)
    b.set(OTHER, b"{}")
    config = make_config(
        [url_a, url_b],
        tmp_path,
        upstreams=(UpstreamConfig(name="up0", url=url_a), UpstreamConfig(name="up1", url=url_b)),
        routing=RoutingConfig(rules=(RouteRule(match="example.com/mod", upstreams=("up0",)),)),
    )
    assert config.policy.paths == () and config.upstreams[0].timeouts.first_byte == 15.0
    client = TestClient(SidecarTestServer(SidecarService(build_sidecar(config), True)))
    await client.start_server()
    try:
        sc = client.server.service.sidecar
        waiting = asyncio.ensure_future(get_all(client, 2))
        await until(lambda: sc.breakers["up0"].state.value == "open", "the breaker to open")
        assert sc.breakers["up0"].reason.startswith("stalled: no answer for ")
        assert not waiting.done() and sc.windows["up0"].snapshot().timeouts == 0
        assert await get_all(client, 1, OTHER) == [200]
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
    finally:
        await client.close()


async def test_hung_primary_trips_while_its_requests_are_hedged(
    hung_upstream, fake_upstreams, start_sidecar
):
    """Hedging gives up on each request to the hung primary after its delay
    (200 ms at first, then at once: it lost a race of this silence), so no
    request waits long there; the silence goes on across them, and the
    breaker opens on it."""
    url_a, accepted = hung_upstream
    [(b, url_b)] = await fake_upstreams(1)
    b.set(INFO, b"{}")
    client, sc = await start_sidecar(
        [url_a, url_b],
        thresholds={"stall_ms": 600, "ttfb_p99_ms": 60000},
        first_byte=30.0,
        run_control=True,
    )
    statuses: list[int] = []
    for _ in range(2000):  # a go command: the next requests as the last ones are answered
        statuses += await get_all(client, 2)
        if sc.breakers["up0"].state.value == "open":
            break
    assert sc.breakers["up0"].state.value == "open", sc.breakers["up0"].reason
    assert sc.breakers["up0"].reason.startswith("stalled: no answer for ")
    assert set(statuses) == {200}  # every one answered by the backup meanwhile
    assert accepted[0] >= 2
    assert sc.windows["up0"].snapshot().timeouts == 0


async def test_hedges_answered_during_the_silence_trip_it_after_stall_hedged_ms(
    hung_upstream, fake_upstreams, start_sidecar, clock
):
    """Each request hedged away from the hung primary and answered by the
    backup is evidence: stall_hedges (3) of them make stall_hedged_ms (1 s)
    of silence enough, where stall_ms (3 s) would be needed without them.
    One request pinned to the primary keeps the silence running on the test
    clock; the others are hedged after the real 200 ms floor."""
    url_a, _ = hung_upstream
    [(b, url_b)] = await fake_upstreams(1)
    b.set(OTHER, b"{}")
    client, sc = await start_sidecar(
        [url_a, url_b], clock=clock, thresholds={"ttfb_p99_ms": 60000}, pin=True
    )
    pinned = asyncio.ensure_future(get_all(client, 1))
    waits = sc.windows["up0"].inflight
    await until(lambda: waits.count == 1, "the pinned request waiting on the primary")
    for _ in range(2):
        assert await get_all(client, 1, OTHER) == [200]  # hedged, the backup's answer
    assert waits.snapshot().overtaken == 2
    clock.advance(1.1)
    await sc.control.step()
    assert sc.breakers["up0"].state.value == "closed", sc.breakers["up0"].reason
    assert await get_all(client, 1, OTHER) == [200]
    assert waits.snapshot().overtaken == 3
    await sc.control.step()
    view = (await breakers(client))["up0"]
    assert (view["state"], view["action"]) == ("open", "reroute"), view
    assert view["reason"].startswith(
        "stalled: no answer for 1100ms (> 1000ms), 4 requests asked, 1 waiting, "
        "3 answered by the next upstream"
    )
    assert view["stats"]["inflight"]["overtaken"] == 3
    assert b.received.count(OTHER) == 3
    pinned.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await pinned


async def test_hedges_won_on_cold_modules_while_others_are_answered_are_no_stall(
    fake_upstreams, start_sidecar, clock
):
    """Busy is not sick: an Athens fetching cold modules (seconds each) loses
    their races to the backup, but it answers what it has, and any answer
    ends the silence and its count of hedges won."""
    [(a, url_a), (b, url_b)] = await fake_upstreams(2)
    cold = [f"example.com/cold{i}/@v/v1.0.0.info" for i in range(4)]
    for path in cold:
        a.set(path, Reply(body=b"{}", delay=2.0))
        b.set(path, b"{}")
    a.set(OTHER, b"{}")
    client, sc = await start_sidecar([url_a, url_b], clock=clock, thresholds={"ttfb_p99_ms": 60000})
    waits = sc.windows["up0"].inflight
    for path in cold[:3]:
        assert await get_all(client, 1, path) == [200]  # the backup's, after the delay
    assert waits.snapshot().overtaken == 3
    assert await get_all(client, 1, OTHER) == [200]  # the primary answers what it has
    assert waits.snapshot().overtaken == 0
    pending = asyncio.ensure_future(get_all(client, 1, cold[3]))
    await until(lambda: waits.count == 1, "a cold request waiting on the primary")
    clock.advance(1.1)
    await sc.control.step()
    assert sc.breakers["up0"].state.value == "closed", sc.breakers["up0"].reason
    assert await pending == [200]
    assert [b.received.count(path) for path in cold] == [1, 1, 1, 1]


async def test_a_slow_answer_among_fast_ones_is_no_stall(fake_upstreams, start_sidecar, clock):
    slow = "example.com/slow/@v/v1.0.0.info"
    [(a, url_a)] = await fake_upstreams(1)
    a.set(INFO, b"{}")
    a.set(slow, Reply(body=b"{}", delay=1.0))
    client, sc = await start_sidecar(
        [url_a], clock=clock, thresholds={"stall_requests": 1, "ttfb_p99_ms": 60000}
    )
    pending = asyncio.ensure_future(get_all(client, 1, slow))
    waits = sc.windows["up0"].inflight
    await until(lambda: waits.count == 1, "the slow request waiting")
    clock.advance(2.0)
    assert await get_all(client, 3) == [200] * 3  # the upstream still answers others
    clock.advance(2.0)  # the slow one has waited 4 s, but the upstream spoke 2 s ago
    await sc.control.step()
    assert sc.breakers["up0"].state.value == "closed", sc.breakers["up0"].reason
    assert await pending == [200]


async def test_hung_checksum_endpoint_trips_the_checksum_breaker_only(
    hung_upstream, fake_upstreams, start_sidecar, clock
):
    """A sumdb/ request that hangs is judged apart: the module breaker stays closed."""
    url_a, _ = hung_upstream
    [(_b, url_b)] = await fake_upstreams(1)
    client, sc = await start_sidecar([url_a, url_b], clock=clock, pin=True)
    waiting = asyncio.ensure_future(get_all(client, 2, LOOKUP))
    waits = sc.sumdb_windows["up0"].inflight
    await until(lambda: waits.count == 2, "two checksum requests waiting")
    assert sc.windows["up0"].inflight.count == 0
    clock.advance(3.5)
    await sc.control.step()
    assert sc.sumdb_breakers["up0"].state.value == "open"
    assert sc.breakers["up0"].state.value == "closed"
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting


# --- consecutive failures ------------------------------------------------------


async def test_a_dead_primary_trips_on_failures_in_a_row_at_low_volume(
    fake_upstreams, start_sidecar, clock
):
    """One request at a time, all in one slice, fewer than min_requests
    (5): no rate rule can judge; five failures in a row do."""
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    a.default = Reply(status=502)
    b.set(INFO, b"{}")
    client, sc = await start_sidecar([url_a, url_b], clock=clock, thresholds={"min_requests": 20})
    for i in range(4):
        assert await get_all(client, 1) == [200]  # each one falls through to the backup
        await sc.control.step()
        assert sc.breakers["up0"].state.value == "closed"
        assert sc.control.last_input["upstreams"]["up0"]["consecutive_failures"] == i + 1
    assert await get_all(client, 1) == [200]
    await sc.control.step()
    up0 = (await breakers(client))["up0"]
    assert (up0["state"], up0["action"]) == ("open", "cache")
    assert up0["reason"] == "5 failures in a row (>= 5)"
    assert up0["stats"]["requests"] == 5
    seen = len(a.received)
    assert await get_all(client, 2) == [200, 200]
    assert len(a.received) == seen  # open: the dead primary is not asked


async def test_a_404_breaks_the_run(fake_upstreams, start_sidecar, clock):
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    a.default = Reply(status=500)
    a.set("example.com/gone/@v/list", Reply(status=404, body=b"gone"))
    b.set(INFO, b"{}")
    client, sc = await start_sidecar([url_a, url_b], clock=clock)
    for path in [INFO] * 4 + ["example.com/gone/@v/list"] + [INFO] * 4:
        await get_all(client, 1, path)
    await sc.control.step()
    assert sc.breakers["up0"].state.value == "closed"
    assert sc.control.last_input["upstreams"]["up0"]["consecutive_failures"] == 4


async def test_a_primary_failing_every_other_request_trips_on_its_last_answers(
    fake_upstreams, start_sidecar, clock
):
    """500 and 200 in turn: never two failures in a row, fewer requests than
    min_requests, all in one slice: neither a run nor a rate can judge it. Half
    of its last ten answers failed: that does (the sidecar counts them in order)."""
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    paths = [f"example.com/m{i}/@v/v1.0.0.info" for i in range(12)]
    for i, path in enumerate(paths):
        a.set(path, Reply(status=500) if i % 2 == 0 else b"{}")
        b.set(path, b"{}")
    client, sc = await start_sidecar([url_a, url_b], clock=clock, thresholds={"min_requests": 20})
    for path in paths[:9]:
        assert await get_all(client, 1, path) == [200]
        await sc.control.step()
    up0 = sc.control.last_input["upstreams"]["up0"]
    assert up0["last_answers"] == [1, 0, 1, 0, 1, 0, 1, 0, 1]  # newest first
    assert (up0["consecutive_failures"], sc.breakers["up0"].state.value) == (1, "closed")
    assert await get_all(client, 1, paths[9]) == [200]
    await sc.control.step()
    view = (await breakers(client))["up0"]
    assert (view["state"], view["action"]) == ("open", "cache")
    assert view["reason"] == "5 of the last 10 answers failed (>= 50.0%)"
    seen = len(a.received)
    assert await get_all(client, 1, paths[10]) == [200]
    assert len(a.received) == seen  # open: the primary is not asked


# --- timeouts are latency --------------------------------------------------------


async def test_a_timeout_enters_latency_at_no_less_than_its_timeout(
    hung_upstream, fake_upstreams, start_sidecar, clock
):
    url_a, _ = hung_upstream
    [(_b, url_b)] = await fake_upstreams(1)
    client, sc = await start_sidecar([url_a, url_b], clock=clock, first_byte=0.5, pin=True)
    request = asyncio.ensure_future(get_all(client, 1))
    waits = sc.windows["up0"].inflight
    await until(lambda: waits.count == 1, "the request waiting on the primary")
    clock.advance(0.5)  # the windows' clock follows the first-byte timeout
    assert await request == [504]  # timed out, and only the primary may serve it
    snap = sc.windows["up0"].snapshot()
    assert (snap.requests, snap.errors, snap.timeouts) == (1, 1, 1)
    assert snap.ttfb_p99_ms == pytest.approx(500.0, rel=0.02)
    assert snap.series[0].p99_ms == pytest.approx(500.0, rel=0.02)
    assert snap.consecutive_failures == 1


# --- masked failures ---------------------------------------------------------------


async def test_a_masking_primary_is_rerouted_with_its_reason(fake_upstreams, start_sidecar, clock):
    """Athens whose own upstream is dead: 404 for everything the backup has.
    The rate over the span, with the run of masked failures out of reach."""
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    a.default = Reply(status=404, body=b"")
    b.set(INFO, b"{}")
    client, sc = await start_sidecar(
        [url_a, url_b], clock=clock, thresholds={"consecutive_masked": 1000}
    )
    assert await get_all(client, 6) == [200] * 6
    await sc.control.step()
    assert sc.breakers["up0"].state.value == "closed"  # one slice is one burst
    clock.advance(SLICE_S)
    assert await get_all(client, 6) == [200] * 6
    await sc.control.step()
    up0 = (await breakers(client))["up0"]
    assert (up0["state"], up0["action"], up0["alert"]) == ("open", "reroute", False)
    assert up0["reason"] == (
        "masked failures: 100.0% of 12 requests were 404s a later upstream served (> 50.0%), for 1s"
    )
    seen = len(a.received)
    assert await get_all(client, 3) == [200] * 3
    assert len(a.received) == seen  # no more round trips to the masking primary


async def test_plain_404s_are_not_masked(fake_upstreams, start_sidecar, clock):
    """The go command probes path prefixes that nobody has: 404 from both."""
    (_a, url_a), (_b, url_b) = await fake_upstreams(2)
    client, sc = await start_sidecar([url_a, url_b], clock=clock)
    assert await get_all(client, 6) == [404] * 6
    clock.advance(SLICE_S)
    assert await get_all(client, 6) == [404] * 6
    await sc.control.step()
    assert sc.breakers["up0"].state.value == "closed", sc.breakers["up0"].reason
    seen = sc.control.last_input["upstreams"]["up0"]
    assert (seen["not_found"], seen["masked_failures"], seen["consecutive_masked"]) == (12, 0, 0)


async def test_a_masking_primary_trips_on_masked_failures_in_a_row_at_low_traffic(
    fake_upstreams, start_sidecar, clock
):
    """Two requests in flight at a time, all in one slice: no rule over a span
    can judge (one slice is one burst); ten masked failures in a row do."""
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    a.default = Reply(status=404, body=b"")  # Athens whose own upstream is dead
    b.set(INFO, b"{}")
    b.set(OTHER, b"{}")
    client, sc = await start_sidecar([url_a, url_b], clock=clock, thresholds={"min_requests": 20})
    for i in range(4):
        assert await get_all(client, 2, INFO if i % 2 else OTHER) == [200, 200]
        await sc.control.step()
        assert sc.breakers["up0"].state.value == "closed", sc.breakers["up0"].reason
        seen = sc.control.last_input["upstreams"]["up0"]
        assert seen["consecutive_masked"] == 2 * (i + 1)
    assert sc.breakers["up0"].reason.endswith(", 8 masked failures in a row")
    assert await get_all(client, 2) == [200, 200]
    await sc.control.step()
    up0 = (await breakers(client))["up0"]
    assert (up0["state"], up0["action"], up0["alert"]) == ("open", "reroute", False)
    assert up0["reason"] == "10 masked failures in a row (>= 10): 404s a later upstream served"
    assert up0["stats"]["requests"] == 10
    seen_by_primary = len(a.received)
    assert await get_all(client, 2) == [200, 200]
    assert len(a.received) == seen_by_primary  # no more round trips to the masking primary


async def test_a_primary_masking_checksum_lookups_has_only_them_rerouted(
    fake_upstreams, start_sidecar, clock
):
    """An Athens without sumdb/ (SumDBs = []) answers 404 to every lookup the
    backup serves: ten in a row reroute the checksum traffic around it, while
    its modules are still asked of it."""
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    a.default = Reply(status=404, body=b"")
    a.set(INFO, b"{}")
    lookups = [f"sumdb/sum.golang.org/lookup/example.com/m{i}@v1.0.0" for i in range(14)]
    for path in lookups:
        b.set(path, b"a record\n")
    client, sc = await start_sidecar([url_a, url_b], clock=clock, thresholds={"min_requests": 20})
    for path in lookups[:10]:
        assert await get_all(client, 1, path) == [200]
    await sc.control.step()
    assert sc.sumdb_breakers["up0"].state.value == "open"
    assert sc.sumdb_breakers["up0"].reason == (
        "10 masked failures in a row (>= 10): 404s a later upstream served"
    )
    assert sc.breakers["up0"].state.value == "closed"
    seen_by_primary = len(a.received)
    for path in lookups[10:]:
        assert await get_all(client, 1, path) == [200]
    assert len(a.received) == seen_by_primary  # no more lookups to the primary
    assert await get_all(client, 1) == [200]
    assert len(a.received) == seen_by_primary + 1  # its modules still are


async def test_modules_nobody_has_never_trip_a_serving_primary(
    fake_upstreams, start_sidecar, clock
):
    """``go get nonexistent/module`` through a healthy Athens, many times over,
    between modules it serves and a few only the backup has: plain 404s
    neither extend the run nor end it, and every answer it serves ends it."""
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    a.set(INFO, b"{}")  # the primary serves INFO, has not OTHER, and nobody has NOWHERE
    b.set(OTHER, b"{}")
    client, sc = await start_sidecar([url_a, url_b], clock=clock)
    nowhere = "example.com/nonexistent/@v/list"
    for _ in range(3):
        assert await get_all(client, 2, nowhere) == [404, 404]
        assert await get_all(client, 2, OTHER) == [200, 200]  # masked: the backup had it
        assert await get_all(client, 8, nowhere) == [404] * 8
        assert await get_all(client, 2, OTHER) == [200, 200]
        await sc.control.step()
        seen = sc.control.last_input["upstreams"]["up0"]
        assert seen["consecutive_masked"] == 4
        assert await get_all(client, 1, INFO) == [200]  # served by the primary: the run ends
        await sc.control.step()
        assert sc.control.last_input["upstreams"]["up0"]["consecutive_masked"] == 0
    assert sc.breakers["up0"].state.value == "closed", sc.breakers["up0"].reason
    seen = sc.control.last_input["upstreams"]["up0"]
    assert (seen["not_found"], seen["masked_failures"]) == (42, 12)


# --- reasons -----------------------------------------------------------------------


async def test_a_closed_breaker_shows_the_policy_reason(fake_upstreams, start_sidecar, clock):
    [(a, url_a)] = await fake_upstreams(1)
    a.set(INFO, b"{}")
    client, sc = await start_sidecar([url_a], clock=clock)
    assert await get_all(client, 2) == [200, 200]
    await sc.control.step()
    up0 = (await breakers(client))["up0"]
    assert up0["state"] == "closed"
    assert up0["reason"].startswith("ok: ttfb p99 "), up0
    assert up0["reason"].endswith(
        "over 2 requests (< 5: no verdict on rates), queue wait p99 0ms, 0 overflows"
    )
    assert (
        up0["sumdb"]["reason"]
        == "ok: ttfb p99 0ms, error rate 0.0% over 0 requests (< 5: no verdict on rates)"
    )
    # One age of the breaker's state, live, beside the statistics the policy saw.
    assert "state_age_s" in up0 and "state_age_s" not in up0["stats"]
    assert "state" not in up0["stats"] and "state_age_s" not in up0["sumdb"]["stats"]
    assert up0["stats"]["inflight"] == {
        "count": 0,
        "oldest_ms": 0.0,
        "silent_ms": 0.0,
        "unanswered": 0,
        "overtaken": 0,
    }
