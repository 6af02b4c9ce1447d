"""Fixtures of the end-to-end suite (issue 5): real servers on loopback, the real
go command, the sidecar as a subprocess. See tests/e2e/stack.py for the wiring.

Needs: go, nginx, toxiproxy-server (scripts/tools.sh), the corpus
(scripts/corpus.sh); Prometheus and opa for their scenarios. A missing piece
skips the test on a developer's machine and fails it under CI=true.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.gocmd import require_corpus
from tests.e2e.processes import Procs
from tests.e2e.servers import SidecarOptions, start_prometheus
from tests.e2e.stack import Stack, Thresholds, Tools, start_stack
from tests.tools import require_tool

REPO = Path(__file__).resolve().parents[2]
ALERT_RULES = REPO / "deploy" / "prometheus" / "alerts.yml"

StartStack = Callable[..., Awaitable[Stack]]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "e2e: end-to-end scenario: real go command, nginx, toxiproxy, sidecar "
        "subprocess (and Prometheus / opa); needs scripts/tools.sh and scripts/corpus.sh",
    )


@pytest.fixture(scope="session")
def corpus() -> Path:
    return require_corpus()


@pytest.fixture(scope="session")
def tools() -> Tools:
    return Tools(
        go=require_tool("go"),
        nginx=require_tool("nginx"),
        toxiproxy=require_tool("toxiproxy-server"),
    )


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    """Every process a test starts; all of them are ended (as groups) at teardown."""
    logs = tmp_path / "logs"
    logs.mkdir()
    started = Procs(logs)
    try:
        yield started
    finally:
        started.stop_all()


@pytest.fixture
async def stack(tmp_path: Path, tools: Tools, corpus: Path) -> AsyncIterator[StartStack]:
    """``await stack(thresholds=..., **sidecar options)`` starts one scenario's world;
    a test may start several. Their processes are all ended at teardown."""
    started: list[Procs] = []

    async def start(thresholds: Thresholds | None = None, **options: object) -> Stack:
        root = tmp_path / f"stack{len(started) + 1}"
        (root / "logs").mkdir(parents=True)
        procs = Procs(root / "logs")
        started.append(procs)
        opts = SidecarOptions(**options)  # type: ignore[arg-type]
        used = tools
        if opts.engine == "opa":
            used = Tools(tools.go, tools.nginx, tools.toxiproxy, require_tool("opa"))
        return await start_stack(procs, root, used, corpus, opts, thresholds or Thresholds())

    try:
        yield start
    finally:
        for procs in reversed(started):
            procs.stop_all()


@pytest.fixture
def alert_rules() -> Path:
    """deploy/prometheus/alerts.yml, as the deploy/ owners ship it."""
    if not ALERT_RULES.is_file():
        pytest.fail(f"{ALERT_RULES.relative_to(REPO)} is missing", pytrace=False)
    return ALERT_RULES


@pytest.fixture
def prometheus(procs: Procs) -> Callable[[str, Path], Awaitable[str]]:
    """``await prometheus(target, rule_file)``: a real Prometheus scraping every 1 s."""
    binary = require_tool("prometheus")

    async def start(target: str, rule_file: Path) -> str:
        return await start_prometheus(procs, binary, target, rule_file)

    return start
