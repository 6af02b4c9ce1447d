"""One scenario's world: go → sidecar → toxiproxy → nginx (primary), and a
second nginx as the backup, all serving the corpus' static GOPROXY tree.

    go command ──▶ sidecar ──▶ toxiproxy "primary" ──▶ nginx primary
                          └──────────────────────────▶ nginx backup
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.account import SidecarAccount
from tests.e2e.gocmd import GoWorkspace
from tests.e2e.processes import Procs, free_port
from tests.e2e.servers import (
    SidecarOptions,
    StaticGoproxy,
    Toxiproxy,
    sidecar_yaml,
    start_nginx,
    start_opa,
    start_sidecar,
    start_toxiproxy,
)

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "policies"
PRIMARY = "primary"  # the toxiproxy proxy and the sidecar's upstream share the name


@dataclass(frozen=True)
class Thresholds:
    """policies/thresholds.yaml scaled down to test time (same keys)."""

    ttfb_p99_ms: int = 150
    ttfb_p99_for_s: float = 1
    error_rate: float = 0.2
    min_requests: int = 5
    queue_wait_p99_ms: int = 100
    queue_for_s: float = 1
    min_span_s: float = 1
    consecutive_failures: int = 5
    stall_ms: int = 3000
    stall_requests: int = 2
    masked_failure_rate: float = 0.5
    min_masked_failures: int = 10
    cooldown_s: float = 2
    probes: int = 2

    def yaml(self) -> str:
        return f"""\
sidecar:
  config:
    thresholds:
      ttfb_p99_ms: {self.ttfb_p99_ms}
      ttfb_p99_for_s: {self.ttfb_p99_for_s}
      error_rate: {self.error_rate}
      min_requests: {self.min_requests}
      queue_wait_p99_ms: {self.queue_wait_p99_ms}
      queue_for_s: {self.queue_for_s}
      min_span_s: {self.min_span_s}
      consecutive_failures: {self.consecutive_failures}
      stall_ms: {self.stall_ms}
      stall_requests: {self.stall_requests}
      masked_failure_rate: {self.masked_failure_rate}
      min_masked_failures: {self.min_masked_failures}
    breaker:
      cooldown_s: {self.cooldown_s}
      probes: {self.probes}
"""


def write_policies(target: Path, thresholds: Thresholds) -> Path:
    """The shipped policy folder with the test thresholds file."""
    shutil.copytree(POLICIES, target)
    (target / "thresholds.yaml").write_text(thresholds.yaml())
    return target


@dataclass(frozen=True)
class Tools:
    go: Path
    nginx: Path
    toxiproxy: Path
    opa: Path | None = None


@dataclass
class Stack:
    primary: StaticGoproxy
    backup: StaticGoproxy
    toxiproxy: Toxiproxy
    sidecar: SidecarAccount
    go: GoWorkspace
    policies: Path
    opa_url: str | None = None

    async def add_toxic(self, kind: str, **attributes: object) -> str:
        return await self.toxiproxy.add_toxic(PRIMARY, kind, **attributes)

    async def remove_toxic(self, name: str) -> None:
        await self.toxiproxy.remove_toxic(PRIMARY, name)


async def start_stack(
    procs: Procs,
    root: Path,
    tools: Tools,
    corpus: Path,
    options: SidecarOptions,
    thresholds: Thresholds,
) -> Stack:
    tree = corpus / "modcache" / "cache" / "download"
    policies = write_policies(root / "policies", thresholds)
    primary = await start_nginx(procs, tools.nginx, "nginx-primary", tree)
    backup = await start_nginx(procs, tools.nginx, "nginx-backup", tree)
    toxiproxy = await start_toxiproxy(procs, tools.toxiproxy)
    primary_url = await toxiproxy.create_proxy(PRIMARY, f"127.0.0.1:{primary.port}")
    opa_url = None
    if options.engine == "opa":
        assert tools.opa is not None
        opa_url = await start_opa(procs, tools.opa, policies)
        options = SidecarOptions(**{**options.__dict__, "opa_url": opa_url})
    port = free_port()
    config = root / "sidecar.yaml"
    config.write_text(
        sidecar_yaml(port, primary_url, backup.url, root / "sidecar-cache", policies, options)
    )
    proc = await start_sidecar(procs, config, port)
    url = f"http://127.0.0.1:{port}"
    workspace = GoWorkspace(tools.go, root / "go", url, corpus / "gocache")
    return Stack(
        primary, backup, toxiproxy, SidecarAccount(url, proc), workspace, policies, opa_url
    )
