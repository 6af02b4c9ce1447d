"""Hedged requests (issue 14): a GOPROXY GET whose upstream has sent no headers
within the hedge delay goes to the next upstream its route allows; the first
good answer wins and the other attempt is cancelled. Real loopback upstreams:
aiohttp fakes with scripted delays, and a raw-socket upstream that holds each
request until told to answer and sees its client close the connection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from sidecar.breaker.state import Action, Decision, State
from sidecar.config import (
    CacheConfig,
    HedgeConfig,
    PolicyConfig,
    RoutingConfig,
    TimeoutsConfig,
    UpstreamConfig,
)
from sidecar.config_loader import load_config
from sidecar.control import build_input
from sidecar.errors import ConfigErrors
from sidecar.proxy.hedge import RISE
from tests.polling import until
from tests.upstream import Reply

INFO = "example.com/mod/@v/v1.0.0.info"
ZIP = "example.com/mod/@v/v1.0.0.zip"
PRIVATE_INFO = "corp.example/tool/@v/v1.0.0.info"
BODY = b'{"Version":"v1.0.0"}'
# Far beyond anything a test waits for: a slow upstream here is never a timeout.
PATIENT = TimeoutsConfig(connect=2.0, first_byte=20.0, idle=20.0)
QUICK_HEDGE = HedgeConfig(delay=0.05)
ANSWER_DEADLINE_S = 10.0  # a client waiting for the sidecar (never a timed assertion)


class Holding:
    """A GOPROXY upstream on a raw socket: it reads each request and answers 200
    only once ``release`` is set. It notes the requests whose client closed the
    connection while they waited (the sidecar cancelling an attempt)."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.closed: list[str] = []
        self.release = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()

    def connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._serve(reader, writer))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode().lstrip("/")
                self.received.append(path)
                if await self._client_left(reader):
                    self.closed.append(path)
                    return
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(BODY)}\r\n\r\n".encode()
                    + BODY
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    async def _client_left(self, reader: asyncio.StreamReader) -> bool:
        """Wait for ``release`` or the end of the connection, whichever is first."""
        eof = asyncio.ensure_future(reader.read(1))
        released = asyncio.ensure_future(self.release.wait())
        done, _ = await asyncio.wait({eof, released}, return_when=asyncio.FIRST_COMPLETED)
        for task in (eof, released):
            task.cancel()
        # A cancelled read is still waiting on the reader until its task runs
        # once more: the next readuntil() would find it there.
        await asyncio.gather(eof, released, return_exceptions=True)
        return eof in done and not eof.cancelled() and eof.result() == b""


Start = Callable[..., Awaitable[Any]]


@pytest.fixture
async def holding() -> AsyncIterator[Callable[[], Awaitable[tuple[Holding, str]]]]:
    servers: list[tuple[asyncio.Server, Holding]] = []

    async def start() -> tuple[Holding, str]:
        up = Holding()
        server = await asyncio.start_server(up.connected, "127.0.0.1", 0)
        servers.append((server, up))
        return up, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server, up in servers:
        server.close()
        for task in list(up.tasks):
            task.cancel()
        await asyncio.gather(*up.tasks, return_exceptions=True)
        await server.wait_closed()


def upstream(
    name: str, url: str, hedge: HedgeConfig = QUICK_HEDGE, private_ok: bool = False
) -> UpstreamConfig:
    return UpstreamConfig(name, url, timeouts=PATIENT, hedge=hedge, private_ok=private_ok)


async def get(client: Any, path: str) -> tuple[int, str, bytes]:
    async with asyncio.timeout(ANSWER_DEADLINE_S):
        resp = await client.get("/" + path)
        return resp.status, resp.headers.get("X-Sidecar-Upstream", ""), await resp.read()


def hedges(sc: Any, upstream: str) -> dict[str, float]:
    """goproxy_sidecar_hedges_total of ``upstream``, by result."""
    out: dict[str, float] = {}
    for metric in sc.metrics.hedges.collect():
        for s in metric.samples:
            if s.name.endswith("_total") and s.labels["upstream"] == upstream:
                out[s.labels["result"]] = s.value
    return out


def failures(sc: Any, upstream: str) -> float:
    return sum(
        s.value
        for metric in sc.metrics.upstream_failures.collect()
        for s in metric.samples
        if s.name.endswith("_total") and s.labels["upstream"] == upstream
    )


async def test_a_silent_primary_is_hedged_and_its_attempt_cancelled(
    holding: Start, fake_upstreams: Start, sidecar_client: Start
) -> None:
    primary, url_a = await holding()
    [(backup, url_b)] = await fake_upstreams(1)
    backup.set(INFO, BODY)
    client, sc = await sidecar_client(
        [url_a, url_b], upstreams=(upstream("up0", url_a), upstream("up1", url_b))
    )
    assert await get(client, INFO) == (200, "up1", BODY)
    assert primary.received == [INFO] and backup.received == [INFO]
    # The losing attempt's connection is closed: the primary sees its client leave.
    await until("the primary to see its connection closed", lambda: primary.closed == [INFO])
    # A cancelled attempt is no failure of the primary, and not a request of its window.
    window = sc.windows["up0"].snapshot()
    assert (window.requests, window.errors, window.timeouts) == (0, 0, 0)
    assert (window.hedges, window.hedges_won) == (1, 1)
    assert failures(sc, "up0") == 0
    assert hedges(sc, "up0") == {"won": 1, "lost": 0, "budget_exhausted": 0}
    assert sc.upstreams["up0"].active == 0 and sc.upstreams["up0"].in_use == 0
    assert sc.windows["up1"].snapshot().requests == 1  # the winner's answer is recorded


async def test_once_a_silent_primary_lost_a_race_its_next_requests_are_hedged_at_once(
    holding: Start, fake_upstreams: Start, sidecar_client: Start
) -> None:
    """A hung primary costs one hedge delay per silence, not one per request:
    after its first request was answered by the hedge, the next is hedged
    without waiting for the delay (here an hour, so only "at once" answers)."""
    primary, url_a = await holding()
    [(backup, url_b)] = await fake_upstreams(1)
    other = "example.com/other/@v/v1.0.0.info"
    backup.set(INFO, BODY)
    backup.set(other, BODY)
    client, sc = await sidecar_client(
        [url_a, url_b],
        upstreams=(
            upstream("up0", url_a, HedgeConfig(delay=0.05, budget=1.0, burst=1)),
            upstream("up1", url_b),
        ),
    )
    assert await get(client, INFO) == (200, "up1", BODY)  # after the 50 ms delay
    assert sc.windows["up0"].inflight.overtaken == 1
    sc.hedging.lane(sc.breakers["up0"]).delay = 3600.0
    assert await get(client, other) == (200, "up1", BODY)  # within ANSWER_DEADLINE_S
    assert primary.received[0] == INFO
    assert sc.windows["up0"].inflight.overtaken == 2
    assert hedges(sc, "up0") == {"won": 2, "lost": 0, "budget_exhausted": 0}
    # Without a token: the budget (burst 1 here) is left for the next silence.
    assert sc.hedging.lane(sc.breakers["up0"]).tokens >= 1.0


async def test_a_fast_primary_is_never_hedged(fake_upstreams: Start, sidecar_client: Start) -> None:
    (primary, url_a), (backup, url_b) = await fake_upstreams(2)
    primary.default = Reply(body=BODY)
    client, sc = await sidecar_client(
        [url_a, url_b],
        upstreams=(upstream("up0", url_a, HedgeConfig()), upstream("up1", url_b)),
    )
    for i in range(20):
        assert await get(client, f"example.com/m{i}/@v/v1.0.0.info") == (200, "up0", BODY)
    assert backup.received == []
    assert sc.windows["up0"].snapshot().hedges == 0
    assert sum(hedges(sc, "up0").values()) == 0


async def test_the_hedge_loses_to_a_primary_that_answers_first(
    fake_upstreams: Start, holding: Start, sidecar_client: Start
) -> None:
    [(primary, url_a)] = await fake_upstreams(1)
    backup, url_b = await holding()
    primary.set(INFO, Reply(body=BODY, delay=0.5))  # ten times the hedge delay
    client, sc = await sidecar_client(
        [url_a, url_b], upstreams=(upstream("up0", url_a), upstream("up1", url_b))
    )
    assert await get(client, INFO) == (200, "up0", BODY)
    assert backup.received == [INFO]  # the hedge was sent ...
    await until("the hedge's connection to close", lambda: backup.closed == [INFO])
    assert sc.windows["up1"].snapshot().requests == 0  # ... and cancelled: no verdict
    assert failures(sc, "up1") == 0
    assert hedges(sc, "up0") == {"won": 0, "lost": 1, "budget_exhausted": 0}
    window = sc.windows["up0"].snapshot()
    assert (window.requests, window.errors, window.hedges, window.hedges_won) == (1, 0, 1, 0)


async def test_a_404_while_the_hedge_is_in_flight_lets_the_hedge_answer(
    fake_upstreams: Start, sidecar_client: Start
) -> None:
    (primary, url_a), (backup, url_b) = await fake_upstreams(2)
    primary.set(INFO, Reply(status=404, body=b"not found", delay=0.3))
    backup.set(INFO, Reply(body=BODY, delay=0.6))  # answers after the primary's 404
    client, sc = await sidecar_client(
        [url_a, url_b], upstreams=(upstream("up0", url_a), upstream("up1", url_b))
    )
    assert await get(client, INFO) == (200, "up1", BODY)
    assert primary.received == [INFO] and backup.received == [INFO]  # the walk asked once
    window = sc.windows["up0"].snapshot()
    assert (window.not_found, window.masked_failures, window.errors) == (1, 1, 0)
    assert hedges(sc, "up0")["won"] == 1


async def test_404_from_both_is_the_answer_and_the_hedge_is_not_asked_again(
    fake_upstreams: Start, sidecar_client: Start
) -> None:
    (primary, url_a), (backup, url_b) = await fake_upstreams(2)
    primary.set(INFO, Reply(status=404, body=b"not found", delay=0.3))
    backup.set(INFO, Reply(status=410, body=b"gone: withdrawn", delay=0.1))
    client, sc = await sidecar_client(
        [url_a, url_b], upstreams=(upstream("up0", url_a), upstream("up1", url_b))
    )
    status, source, body = await get(client, INFO)
    assert (status, source) == (410, "") and b"withdrawn" in body
    assert primary.received == [INFO] and backup.received == [INFO]
    assert sc.windows["up0"].snapshot().masked_failures == 0
    assert hedges(sc, "up0")["lost"] == 1


async def test_the_budget_bounds_a_burst_of_slow_requests(
    fake_upstreams: Start, sidecar_client: Start
) -> None:
    (primary, url_a), (backup, url_b) = await fake_upstreams(2)
    primary.default = Reply(body=BODY, delay=1.0)
    backup.default = Reply(body=BODY)
    budget = HedgeConfig(delay=0.05, budget=0.1, burst=2)
    client, sc = await sidecar_client(
        [url_a, url_b], upstreams=(upstream("up0", url_a, budget), upstream("up1", url_b))
    )
    n = 40
    paths = [f"example.com/m{i}/@v/v1.0.0.info" for i in range(n)]
    results = await asyncio.gather(*(get(client, p) for p in paths))
    assert all(status == 200 and body == BODY for status, _, body in results)
    counts = hedges(sc, "up0")
    sent = counts["won"] + counts["lost"]
    assert 1 <= sent <= 0.1 * n + 2  # the share of requests, plus the burst
    assert sent + counts["budget_exhausted"] == n  # every slow request wanted one
    assert len(backup.received) == sent
    assert sum(1 for _, source, _ in results if source == "up1") == counts["won"]


async def test_a_private_module_is_never_hedged_to_a_public_upstream(
    holding: Start, fake_upstreams: Start, sidecar_client: Start, tmp_path: Path
) -> None:
    _private, url_a = await holding()
    (public, url_b), (corp, url_c) = await fake_upstreams(2)
    public.default = corp.default = Reply(body=BODY)
    client, sc = await sidecar_client(
        [url_a, url_b, url_c],
        upstreams=(
            upstream("up0", url_a, private_ok=True),
            upstream("up1", url_b),
            upstream("up2", url_c, private_ok=True),
        ),
        routing=RoutingConfig(private=("corp.example",)),
    )
    # The next upstream is public: a private module's hedge skips it.
    assert await get(client, PRIVATE_INFO) == (200, "up2", BODY)
    assert public.received == [] and corp.received == [PRIVATE_INFO]
    # A public module's hedge goes to the next upstream, as the walk would.
    assert await get(client, INFO) == (200, "up1", BODY)
    assert public.received == [INFO]
    assert hedges(sc, "up0")["won"] == 2


async def test_no_private_ok_upstream_left_means_no_hedge(
    holding: Start, fake_upstreams: Start, sidecar_client: Start
) -> None:
    private, url_a = await holding()
    [(public, url_b)] = await fake_upstreams(1)
    public.default = Reply(body=BODY)
    client, sc = await sidecar_client(
        [url_a, url_b],
        upstreams=(upstream("up0", url_a, private_ok=True), upstream("up1", url_b)),
        routing=RoutingConfig(private=("corp.example",)),
    )
    waiting = asyncio.create_task(get(client, PRIVATE_INFO))
    await until("the private request to reach up0", lambda: private.received == [PRIVATE_INFO])
    await asyncio.sleep(0.3)  # six hedge delays: a hedge, if any, would be out by now
    assert public.received == [] and not waiting.done()
    private.release.set()
    assert await waiting == (200, "up0", BODY)
    assert public.received == []
    assert sum(hedges(sc, "up0").values()) == 0


async def test_a_breaker_opening_hedges_the_requests_waiting_on_it_at_once(
    holding: Start, fake_upstreams: Start, sidecar_client: Start
) -> None:
    primary, url_a = await holding()
    [(backup, url_b)] = await fake_upstreams(1)
    backup.default = Reply(body=BODY)
    # No budget and a delay past every deadline here: only the breaker can move them.
    never = HedgeConfig(delay=15.0, budget=0.0)
    client, sc = await sidecar_client(
        [url_a, url_b],
        upstreams=(upstream("up0", url_a, never), upstream("up1", url_b)),
        run_control=False,
    )
    paths = [f"example.com/w{i}/@v/v1.0.0.info" for i in range(3)]
    waiting = [asyncio.create_task(get(client, p)) for p in paths]
    await until("three requests to wait on up0", lambda: len(primary.received) == 3)
    assert backup.received == []
    sc.breakers["up0"].apply(Decision(Action.REROUTE, "test: tripped"), 30.0, 5)
    assert sc.breakers["up0"].state is State.OPEN
    results = await asyncio.gather(*waiting)
    assert results == [(200, "up1", BODY)] * 3
    assert not primary.release.is_set()  # the primary never answered
    assert sorted(backup.received) == sorted(paths)
    await until("the primary to see 3 connections closed", lambda: len(primary.closed) == 3)
    assert hedges(sc, "up0")["won"] == 3
    assert failures(sc, "up0") == 0


async def test_single_flight_the_leader_hedges_and_every_joiner_reads_its_fill(
    holding: Start, fake_upstreams: Start, sidecar_client: Start, tmp_path: Path
) -> None:
    primary, url_a = await holding()
    [(backup, url_b)] = await fake_upstreams(1)
    zipped = bytes(range(256)) * 4096  # 1 MiB: a fill, not a small body
    backup.set(ZIP, Reply(body=zipped, chunk_delay=0.01))
    client, sc = await sidecar_client(
        [url_a, url_b],
        upstreams=(upstream("up0", url_a), upstream("up1", url_b)),
        cache=CacheConfig(dir=str(tmp_path / "cache")),
        run_control=False,
    )
    await sc.cache.wait_loaded()
    results = await asyncio.gather(*(get(client, ZIP) for _ in range(5)))
    assert results == [(200, "up1", zipped)] * 5
    assert primary.received == [ZIP] and backup.received == [ZIP]  # one walk, one hedge
    await until("the fill to be committed", lambda: sc.cache.summary()["entries"] == 1)
    assert await get(client, ZIP) == (200, "cache", zipped)
    assert hedges(sc, "up0")["won"] == 1


async def test_a_probe_that_loses_to_its_hedge_gives_no_verdict(
    holding: Start, fake_upstreams: Start, sidecar_client: Start
) -> None:
    primary, url_a = await holding()
    [(backup, url_b)] = await fake_upstreams(1)
    backup.default = Reply(body=BODY)
    client, sc = await sidecar_client(
        [url_a, url_b],
        upstreams=(upstream("up0", url_a), upstream("up1", url_b)),
        run_control=False,
    )
    breaker = sc.breakers["up0"]
    breaker.apply(Decision(Action.REROUTE, "test: tripped"), 0.0, 1)
    breaker.tick()  # cool-down 0: half-open, one probe
    assert breaker.state is State.HALF_OPEN
    sc.swap_plan()
    assert await get(client, INFO) == (200, "up1", BODY)
    assert primary.received == [INFO]  # the probe went to the primary, then was hedged
    assert breaker.state is State.HALF_OPEN  # neither closed nor re-opened
    assert breaker.as_dict()["probes"] == {"limit": 1, "in_flight": 0, "succeeded": 0}


async def test_hedges_are_in_the_metrics_and_the_policy_input(
    holding: Start, fake_upstreams: Start, sidecar_client: Start
) -> None:
    _primary, url_a = await holding()
    [(backup, url_b)] = await fake_upstreams(1)
    backup.set(INFO, BODY)
    client, sc = await sidecar_client(
        [url_a, url_b],
        upstreams=(upstream("up0", url_a, HedgeConfig(floor=0.1)), upstream("up1", url_b)),
        policy=PolicyConfig(interval=60.0),  # the test takes the snapshot
        run_control=False,
    )
    assert await get(client, INFO) == (200, "up1", BODY)
    text = await (await client.get("/metrics")).text()
    assert 'goproxy_sidecar_hedges_total{result="won",upstream="up0"} 1.0' in text
    assert 'goproxy_sidecar_hedge_delay_seconds{class="module",upstream="up0"} 0.1' in text
    doc = build_input(sc)["upstreams"]
    assert (doc["up0"]["hedges"], doc["up0"]["hedges_won"]) == (1, 1)
    assert doc["up0"]["series"][0]["hedges"] == 1
    assert (doc["up1"]["hedges"], doc["up0"]["sumdb"]["hedges"]) == (0, 0)


async def test_the_automatic_delay_follows_the_upstreams_own_p95(
    fake_upstreams: Start, sidecar_client: Start
) -> None:
    (primary, url_a), (_backup, url_b) = await fake_upstreams(2)
    primary.default = Reply(body=BODY, delay=0.3)
    client, sc = await sidecar_client(
        [url_a, url_b],
        upstreams=(
            upstream("up0", url_a, HedgeConfig(floor=0.01, budget=0.0)),
            upstream("up1", url_b),
        ),
        run_control=False,
    )
    lane = sc.hedging.lane(sc.breakers["up0"])
    build_input(sc)
    assert lane.delay == 0.01  # no statistics yet: the floor
    await asyncio.gather(*(get(client, f"example.com/p{i}/@v/v1.0.0.info") for i in range(20)))
    build_input(sc)  # a control tick: the delay learns from the window
    assert 0.25 <= lane.delay <= PATIENT.first_byte / 5  # a histogram bucket's midpoint
    learned = lane.delay
    # The primary turns slow: the delay follows by RISE a tick, not at once.
    primary.default = Reply(body=BODY, delay=0.9)
    await asyncio.gather(*(get(client, f"example.com/q{i}/@v/v1.0.0.info") for i in range(20)))
    build_input(sc)
    assert lane.delay == pytest.approx(learned * RISE)
    build_input(sc)
    assert lane.delay == pytest.approx(learned * RISE * RISE)


def test_hedge_keys_are_validated_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        """\
upstreams:
  - name: athens
    url: http://127.0.0.1:3000
    timeouts: {first_byte: 2s}
    hedge: {delay: 3s, floor: fast, budget: 1.5, burst: 0, enable: true}
  - name: public
    url: http://127.0.0.1:3001
    hedge: {delay: soon}
cache: {dir: cache}
"""
    )
    with pytest.raises(ConfigErrors) as caught:
        load_config(str(config), {})
    messages = {e.key: e.message for e in caught.value.errors}
    assert (
        "upstreams[0].hedge.delay" in messages
        and "first_byte" in messages["upstreams[0].hedge.delay"]
    )
    assert "duration" in messages["upstreams[0].hedge.floor"]
    assert "0 to 1" in messages["upstreams[0].hedge.budget"]
    assert ">= 1" in messages["upstreams[0].hedge.burst"]
    assert "did you mean 'enabled'" in messages["upstreams[0].hedge.enable"]
    assert "'auto'" in messages["upstreams[1].hedge.delay"]
    config.write_text(
        "upstreams: [{name: a, url: 'http://127.0.0.1:3000', hedge: {delay: auto}}]\n"
        "cache: {dir: cache}\n"
    )
    hedge = load_config(str(config), {"SIDECAR_UPSTREAMS_0_HEDGE_BUDGET": "0.25"}).upstreams[0]
    assert hedge.hedge == HedgeConfig(delay=None, budget=0.25)
