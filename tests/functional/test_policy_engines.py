"""Both engines on the same inputs: the embedded engine and a real `opa run --server`.

Every case of the table goes through both; the decisions must be identical
(action, reason and alert) and carry the expected action. Then the OPA
engine's failure modes (server down, slow, garbage) against loopback servers.
"""

from __future__ import annotations

import asyncio
import copy
import socket
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from sidecar.breaker.state import Decision
from sidecar.errors import PolicyEvalError, PolicyLoadError
from sidecar.policy import SMOKE_INPUT, EmbeddedEngine
from sidecar.policy.opa_server import OpaServerEngine
from tests.tools import require_tool

POLICIES = Path(__file__).resolve().parents[2] / "policies"
DECISION = "sidecar/breaker/decisions"

pytestmark = pytest.mark.tool


# --- the table ----------------------------------------------------------------


def slices(
    p99s: list[float],
    requests: int = 50,
    error_rate: float = 0.0,
    wait_ms: float = 0.0,
    overflows: int = 0,
    masked: int = 0,
) -> list[dict[str, Any]]:
    """One 10 s slice per p99, newest first."""
    return [
        {
            "age_s": i * 10,
            "requests": requests,
            "error_rate": error_rate,
            "p99_ms": p99,
            "saturation": 0.3,
            "queue_wait_ms": {"p50": wait_ms / 2, "p99": wait_ms},
            "overflows": overflows,
            "masked_failures": masked,
        }
        for i, p99 in enumerate(p99s)
    ]


def checksum_slices(p99s: list[float], requests: int, error_rate: float = 0.0) -> list[Any]:
    """Slices of checksum traffic: no pool figures (those are the module stats')."""
    return [
        {k: v for k, v in s.items() if k in ("age_s", "requests", "error_rate", "p99_ms")}
        for s in slices(p99s, requests, error_rate)
    ]


def waiting(count: int, silent_ms: float, asked: int, oldest_ms: float = 0.0) -> dict[str, Any]:
    """The ``inflight`` object: ``count`` waiting, silent for ``silent_ms`` with ``asked`` asked."""
    return {
        "count": count,
        "oldest_ms": max(oldest_ms, silent_ms),
        "silent_ms": silent_ms,
        "unanswered": asked,
    }


def stats(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "state": "closed",
        "state_age_s": 300.0,
        "window_s": 120,
        "requests": 812,
        "errors": 3,
        "not_found": 40,
        "timeouts": 1,
        "error_rate": 0.0037,
        "not_found_rate": 0.049,
        "masked_failures": 0,
        "ttfb_ms": {"p50": 12.1, "p90": 40.3, "p99": 790.0},
        "consecutive_failures": 0,
        "consecutive_masked": 0,
        "inflight": waiting(2, 12.0, 1),
        "series": slices([700.0] * 12),
    }
    doc.update(overrides)
    return doc


def upstream(**overrides: Any) -> dict[str, Any]:
    doc = stats(
        role="primary",
        pool={
            "limit": 64,
            "in_use": 20,
            "waiting": 0,
            "overflows": 0,
            "queue_wait_ms": {"p50": 0.0, "p99": 2.0},
            "saturation": 0.31,
        },
        sumdb=stats(requests=145, series=checksum_slices([12.0] * 12, 12)),
    )
    doc.update(overrides)
    return doc


QUEUEING = {
    "limit": 64,
    "in_use": 64,
    "waiting": 3,
    "overflows": 12,
    "queue_wait_ms": {"p50": 300.0, "p99": 900.0},
    "saturation": 1.05,
}
BUSY_FAST = slices([40.0] * 12, wait_ms=900.0, overflows=6)  # a burst against a fast upstream
SLOW_QUEUE = slices([1500.0] * 2, wait_ms=900.0, overflows=6) + slices([100.0] * 10)[2:]
FAILING = slices([100.0] * 12, error_rate=0.0821)
EMPTY_NOW = slices([0.0], requests=0)
EMPTY_OLDER = (
    slices([912.0] * 5)
    + [dict(slices([0.0], requests=0)[0], age_s=50)]
    + [dict(s, age_s=s["age_s"] + 60) for s in slices([912.0] * 6)]
)

# name -> (upstreams, {upstream: (action, alert)}); a sumdb verdict is keyed "<name>.sumdb"
CASES: dict[str, tuple[dict[str, Any], dict[str, tuple[str, bool]]]] = {
    "healthy": ({"athens": upstream()}, {"athens": ("allow", False)}),
    "slow for 2 minutes": (
        {"athens": upstream(series=slices([912.4] * 12))},
        {"athens": ("reroute", False)},
    ),
    # rego-cpp 1.5.2 orders 1000 before 912 in min(): the policy does without it
    "slow, p99s of different magnitudes": (
        {"athens": upstream(series=slices([1000.0, 912.4] * 6))},
        {"athens": ("reroute", False)},
    ),
    "slow for less than 2 minutes": (
        {"athens": upstream(series=slices([912.0] * 11 + [790.0]))},
        {"athens": ("allow", False)},
    ),
    "slow but too few slices": (
        {"athens": upstream(series=slices([2000.0] * 6))},
        {"athens": ("allow", False)},
    ),
    "slow, current slice still empty": (
        {"athens": upstream(series=EMPTY_NOW + slices([950.0] * 12)[1:])},
        {"athens": ("reroute", False)},
    ),
    "slow, an older slice without requests": (
        {"athens": upstream(series=EMPTY_OLDER)},
        {"athens": ("allow", False)},
    ),
    "p99 at the threshold": (
        {"athens": upstream(series=slices([800.0] * 12))},
        {"athens": ("allow", False)},
    ),
    "errors above the threshold": (
        {"athens": upstream(error_rate=0.0821, series=FAILING)},
        {"athens": ("cache", False)},
    ),
    "errors in the newest slice only": (
        {"athens": upstream(error_rate=0.0821, series=FAILING[:1] + slices([9.0] * 12)[1:])},
        {"athens": ("allow", False)},
    ),
    "errors below the threshold": (
        {"athens": upstream(error_rate=0.049, series=slices([9.0] * 12, error_rate=0.049))},
        {"athens": ("allow", False)},
    ),
    "errors above, too few requests": (
        {"athens": upstream(error_rate=0.9, requests=19, series=FAILING)},
        {"athens": ("allow", False)},
    ),
    "errors above, exactly min_requests": (
        {"athens": upstream(error_rate=0.9, requests=20, series=FAILING)},
        {"athens": ("cache", False)},
    ),
    "queueing while slow": (
        {"athens": upstream(pool=QUEUEING, series=SLOW_QUEUE)},
        {"athens": ("reject", True)},
    ),
    "queueing in front of a fast upstream": (
        {"athens": upstream(pool=QUEUEING, series=BUSY_FAST)},
        {"athens": ("allow", False)},
    ),
    "queueing, failing and slow": (
        {
            "athens": upstream(
                pool=QUEUEING,
                error_rate=0.3,
                series=slices([3000.0] * 12, error_rate=0.3, wait_ms=900.0, overflows=1),
            )
        },
        {"athens": ("reject", True)},
    ),
    "failing and slow": (
        {"athens": upstream(error_rate=0.3, series=slices([3000.0] * 12, error_rate=0.3))},
        {"athens": ("cache", False)},
    ),
    "sumdb failing, modules healthy": (
        {
            "athens": upstream(
                sumdb=stats(error_rate=1.0, series=checksum_slices([5.0] * 12, 12, 1.0))
            )
        },
        {"athens": ("allow", False), "athens.sumdb": ("cache", False)},
    ),
    "modules failing, sumdb healthy": (
        {"athens": upstream(error_rate=0.0821, series=FAILING)},
        {"athens": ("cache", False), "athens.sumdb": ("allow", False)},
    ),
    "backup upstream, slow": (
        {"athens": upstream(), "public": upstream(role="backup", series=slices([1500.0] * 12))},
        {"athens": ("allow", False), "public": ("reroute", False)},
    ),
    "counts sent as floats": (
        {
            "athens": upstream(
                requests=812.0,
                error_rate=0.2,
                series=[
                    dict(s, requests=50.0, overflows=3.0)
                    for s in slices([1500.0] * 12, error_rate=0.2, wait_ms=900.0)
                ],
            )
        },
        {"athens": ("reject", True)},
    ),
    "5 failures in a row at low volume": (
        {"athens": upstream(requests=5, errors=5, error_rate=1.0, consecutive_failures=5)},
        {"athens": ("cache", False)},
    ),
    "4 failures in a row": (
        {"athens": upstream(consecutive_failures=4)},
        {"athens": ("allow", False)},
    ),
    "hung: silent for 4 s, 3 asked": (
        {"athens": upstream(inflight=waiting(3, 4000.0, 3))},
        {"athens": ("reroute", False)},
    ),
    "a slow request while others are answered": (
        {"athens": upstream(inflight=waiting(3, 20.0, 2, oldest_ms=9000.0))},
        {"athens": ("allow", False)},
    ),
    "masking everything": (
        {
            "athens": upstream(
                masked_failures=600, requests=600, series=slices([5.0] * 12, masked=50)
            )
        },
        {"athens": ("reroute", False)},
    ),
    "10 masked failures in a row at low volume": (
        {"athens": upstream(requests=10, masked_failures=10, consecutive_masked=10)},
        {"athens": ("reroute", False)},
    ),
    "9 masked failures in a row": (
        {"athens": upstream(masked_failures=9, consecutive_masked=9)},
        {"athens": ("allow", False)},
    ),
    "every other answer failed, 10 answers": (
        {"athens": upstream(requests=10, error_rate=0.5, last_answers=[1, 0] * 5)},
        {"athens": ("cache", False)},
    ),
    "4 of the last 10 answers failed, checksum traffic every other": (
        {
            "athens": upstream(
                last_answers=[0, 0] + [1, 0] * 4 + [1] * 20,
                sumdb=stats(requests=145, last_answers=[1.0, 0.0] * 16),
            )
        },
        {"athens": ("allow", False), "athens.sumdb": ("cache", False)},
    ),
    "hung checksum endpoint, modules fine": (
        {"athens": upstream(sumdb=stats(requests=145, inflight=waiting(2, 3500.0, 4)))},
        {"athens": ("allow", False), "athens.sumdb": ("reroute", False)},
    ),
    "current slice slow from waits alone, one older slice fast": (
        {
            "athens": upstream(
                series=slices([5000.0], requests=0) + slices([912.0] * 11 + [500.0])[1:]
            )
        },
        {"athens": ("allow", False)},
    ),
    "hung, then timeouts in a row": (
        {"athens": upstream(inflight=waiting(3, 16000.0, 9), consecutive_failures=6)},
        {"athens": ("cache", False)},
    ),
    "sparse upstream document": ({"new": {"role": "primary"}}, {"new": ("allow", False)}),
    "empty upstreams": ({}, {}),
    "5 upstreams": (
        {
            "athens": upstream(pool=QUEUEING, series=SLOW_QUEUE),
            "mirror": upstream(error_rate=0.2, series=slices([50.0] * 12, error_rate=0.2)),
            "public": upstream(role="backup", series=slices([1200.0] * 12)),
            "quiet": upstream(requests=3, error_rate=1.0, series=slices([0.0] * 12, 0)),
            "fine": upstream(role="backup"),
        },
        {
            "athens": ("reject", True),
            "mirror": ("cache", False),
            "public": ("reroute", False),
            "quiet": ("allow", False),
            "fine": ("allow", False),
        },
    ),
}

FIVE = {
    "now": 1764000000.0,
    "upstreams": CASES["5 upstreams"][0],
    "cache": {"enabled": True, "entries": 1200, "bytes": 734003200},
}


def document(upstreams: dict[str, Any]) -> dict[str, Any]:
    return {
        "now": 1764000000.0,
        "upstreams": upstreams,
        "cache": {"enabled": True, "entries": 1200, "bytes": 734003200},
    }


# --- fixtures -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_healthy(url: str, process: subprocess.Popen[bytes], deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"opa exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"opa at {url} not healthy after {deadline_s}s")


@pytest.fixture(scope="module")
def opa_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`opa run --server` on the shipped policies, on a free loopback port."""
    opa = require_tool("opa")
    port = free_port()
    log = tmp_path_factory.mktemp("opa") / "opa.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(opa),
                "run",
                "--server",
                "--addr",
                f"127.0.0.1:{port}",
                "--skip-version-check",
                "--log-level",
                "error",
                str(POLICIES),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, 30.0)
        yield url
    except RuntimeError as exc:
        pytest.fail(f"{exc}\n{log.read_text()}")
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
async def embedded() -> AsyncIterator[EmbeddedEngine]:
    engine = EmbeddedEngine([str(POLICIES)], DECISION)
    await engine.load()
    yield engine
    await engine.close()


@pytest.fixture
async def opa_engine(opa_url: str) -> AsyncIterator[OpaServerEngine]:
    engine = OpaServerEngine(opa_url, DECISION, timeout=2.0)
    assert await engine.load() is None
    yield engine
    await engine.close()


def as_table(
    decisions: dict[str, Decision], want: dict[str, tuple[str, bool]]
) -> dict[str, tuple[str, bool]]:
    """Each decision as (action, alert), and its sumdb one as "<name>.sumdb" where wanted."""
    table = {name: (d.action.value, d.alert) for name, d in decisions.items()}
    for name, d in decisions.items():
        if f"{name}.sumdb" in want:
            assert d.sumdb is not None, name
            table[f"{name}.sumdb"] = (d.sumdb.action.value, d.sumdb.alert)
    return table


# --- same decisions in both engines ----------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
async def test_both_engines_decide_the_same(
    case: str, embedded: EmbeddedEngine, opa_engine: OpaServerEngine
) -> None:
    upstreams, want = CASES[case]
    doc = document(upstreams)
    mine = await embedded.evaluate(doc)
    theirs = await opa_engine.evaluate(doc)
    assert mine == theirs  # action, reason and alert, for both traffic classes
    assert as_table(mine, want) == want
    for name, decision in mine.items():
        assert decision.reason, name
        assert decision.sumdb is None or decision.sumdb.reason, name


async def test_reasons_carry_the_figures(embedded: EmbeddedEngine) -> None:
    decisions = await embedded.evaluate(FIVE)
    assert decisions["athens"].reason == (
        "queueing: wait p99 900ms > 250ms with ttfb p99 1500ms > 800ms for 20s, 12 overflows"
    )
    assert decisions["mirror"].reason == "error rate 20.0% > 5.0% over 812 requests, for 20s"
    assert decisions["public"].reason == "ttfb p99 1200ms > 800ms for 120s"
    mixed = await embedded.evaluate(document(CASES["slow, p99s of different magnitudes"][0]))
    assert mixed["athens"].reason == "ttfb p99 912ms > 800ms for 120s"
    assert decisions["quiet"].reason == (
        "ok: ttfb p99 790ms, error rate 100.0% over 3 requests (< 20: no verdict on rates), "
        "queue wait p99 2ms, 0 overflows, 2 waiting (oldest 12ms)"
    )
    sumdb = decisions["quiet"].sumdb
    assert sumdb is not None
    assert sumdb.reason == (
        "ok: ttfb p99 790ms, error rate 0.4% over 145 requests, 2 waiting (oldest 12ms)"
    )
    hung = await embedded.evaluate(document(CASES["hung, then timeouts in a row"][0]))
    assert hung["athens"].reason == (
        "6 failures in a row (>= 5); "
        "also stalled: no answer for 16000ms (> 3000ms), 9 requests asked, 3 waiting"
    )
    masking = await embedded.evaluate(
        document(CASES["10 masked failures in a row at low volume"][0])
    )
    assert masking["athens"].reason == (
        "10 masked failures in a row (>= 10): 404s a later upstream served"
    )
    alternating = await embedded.evaluate(
        document(CASES["4 of the last 10 answers failed, checksum traffic every other"][0])
    )
    sumdb = alternating["athens"].sumdb
    assert sumdb is not None and sumdb.reason == "5 of the last 10 answers failed (>= 50.0%)"


async def test_breaker_settings_agree(
    embedded: EmbeddedEngine, opa_engine: OpaServerEngine
) -> None:
    assert embedded.breaker_settings() == opa_engine.breaker_settings() == (30.0, 5)


# --- OPA engine failure modes ------------------------------------------------------


async def test_opa_down_fails_fast() -> None:
    # A refused connection is an answer: the evaluation must not wait out its timeout.
    timeout = 30.0
    engine = OpaServerEngine(f"http://127.0.0.1:{free_port()}", DECISION, timeout=timeout)
    warning = await engine.load()
    assert warning is not None
    assert "not usable yet" in warning
    assert engine.breaker_settings() == (30.0, 5)
    started = time.perf_counter()
    with pytest.raises(PolicyEvalError, match=r"asking http://127\.0\.0\.1:"):
        await engine.evaluate(SMOKE_INPUT)
    assert time.perf_counter() - started < timeout / 2
    await engine.close()


async def fake_opa(handler: Any) -> TestServer:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


async def test_slow_opa_times_out() -> None:
    async def slow(request: web.Request) -> web.Response:
        if request.method == "POST":
            await asyncio.sleep(5)
        return web.json_response({"result": {}})

    server = await fake_opa(slow)
    engine = OpaServerEngine(str(server.make_url("")).rstrip("/"), DECISION, timeout=0.3)
    try:
        assert await engine.load() is None
        started = time.perf_counter()
        with pytest.raises(PolicyEvalError, match="timed out") as caught:
            await engine.evaluate(SMOKE_INPUT)
        elapsed = time.perf_counter() - started
        assert 0.25 < elapsed < 4, elapsed  # its timeout, not the server's 5 s
        assert isinstance(caught.value.__cause__, TimeoutError)
    finally:
        await engine.close()
        await server.close()


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"result": "all good"}, 200, "must be an object keyed by upstream"),
        ({"result": {"smoke-test": {"action": "panic"}}}, 200, "decision.action must be one of"),
        ({}, 200, "is undefined on the OPA server"),
        ("<html>oops</html>", 200, "ContentTypeError"),
        ({"code": "internal_error", "message": "boom"}, 500, "500"),
    ],
)
async def test_garbage_from_opa_is_an_eval_error(body: Any, status: int, fragment: str) -> None:
    async def handler(request: web.Request) -> web.Response:
        if request.method == "GET":
            return web.json_response({"result": {}})
        if isinstance(body, str):
            return web.Response(text=body, status=status, content_type="text/html")
        return web.json_response(body, status=status)

    server = await fake_opa(handler)
    engine = OpaServerEngine(str(server.make_url("")).rstrip("/"), DECISION, timeout=1.0)
    try:
        await engine.load()
        with pytest.raises(PolicyEvalError) as caught:
            await engine.evaluate(SMOKE_INPUT)
        assert fragment in str(caught.value)
    finally:
        await engine.close()
        await server.close()


async def test_decision_missing_on_the_opa_server(opa_url: str) -> None:
    engine = OpaServerEngine(opa_url, "sidecar/nothing/here", timeout=2.0)
    try:
        with pytest.raises(PolicyLoadError, match="not defined on the OPA server"):
            await engine.load()
    finally:
        await engine.close()


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:1", "http://127.0.0.1:8181/v1"])
async def test_bad_opa_url(url: str) -> None:
    engine = OpaServerEngine(url, DECISION)
    with pytest.raises(PolicyLoadError, match="opa_url"):
        await engine.load()
    await engine.close()


async def test_opa_engine_reads_breaker_settings_once_reachable() -> None:
    hits: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        hits.append(request.path)
        if request.path.endswith("/sidecar/config/breaker"):
            return web.json_response({"result": {"cooldown_s": 9, "probes": 2}})
        if request.method == "POST":
            upstreams = (await request.json())["input"]["upstreams"]
            return web.json_response({"result": {name: {"action": "allow"} for name in upstreams}})
        return web.json_response({"result": {}})

    server = await fake_opa(handler)
    engine = OpaServerEngine(str(server.make_url("")).rstrip("/"), DECISION, timeout=1.0)
    try:
        assert await engine.load() is None
        assert engine.breaker_settings() == (9.0, 2)
        doc = copy.deepcopy(SMOKE_INPUT)
        await engine.evaluate(doc)
        await engine.evaluate(doc)
        assert hits.count("/v1/data/sidecar/config/breaker") == 1
    finally:
        await engine.close()
        await server.close()
