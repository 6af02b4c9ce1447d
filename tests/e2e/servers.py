"""The real servers of the e2e suite, all on loopback:

- nginx serving the corpus' ``cache/download`` tree as a static GOPROXY
  (a missing file is a 404), with an access log the tests count requests in;
- toxiproxy-server between the sidecar and the primary, driven through its
  HTTP API (proxies, toxics);
- the sidecar itself, ``python -m sidecar run --config <yaml>``;
- Prometheus scraping the sidecar and loading deploy/prometheus/alerts.yml;
- ``opa run --server`` on the test policy folder.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from tests.e2e.processes import Proc, Procs, free_port, wait_http
from tests.polling import until

REPO = Path(__file__).resolve().parents[2]
START_DEADLINE_S = 20.0


# ---------------------------------------------------------------- nginx


@dataclass
class StaticGoproxy:
    """nginx serving a GOPROXY tree; ``requests()`` reads its access log."""

    name: str
    url: str
    port: int
    proc: Proc
    access_log: Path

    def requests(self) -> list[tuple[str, int]]:
        """(path, status) of every request served so far, oldest first."""
        out = []
        if self.access_log.exists():
            for line in self.access_log.read_text().splitlines():
                _method, path, status = line.split(" ")[:3]
                out.append((path, int(status)))
        return out

    def count(self, suffix: str, status: int | None = 200) -> int:
        return sum(
            1
            for path, st in self.requests()
            if path.endswith(suffix) and (status is None or st == status)
        )


def nginx_conf(prefix: Path, port: int, tree: Path, access_log: Path) -> str:
    # As root the workers would drop to "nobody", who cannot read ~/.cache.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    types {{ application/json info; text/plain mod; application/zip zip; }}
    default_type text/plain;
    log_format e2e '$request_method $uri $status $body_bytes_sent';
    access_log {access_log} e2e;
    sendfile on;
    keepalive_timeout 60s;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy_temp;
    fastcgi_temp_path {prefix}/fastcgi_temp;
    uwsgi_temp_path {prefix}/uwsgi_temp;
    scgi_temp_path {prefix}/scgi_temp;
    server {{
        listen 127.0.0.1:{port};
        root {tree};
        # Files only: a directory or anything missing is "not here".
        location / {{ try_files $uri =404; }}
    }}
}}
"""


async def start_nginx(procs: Procs, nginx: Path, name: str, tree: Path) -> StaticGoproxy:
    prefix = procs.logs / name
    prefix.mkdir()
    port = free_port()
    access_log = prefix / "access.log"
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(prefix, port, tree, access_log))
    proc = procs.start(name, [nginx, "-p", prefix, "-c", conf])
    url = f"http://127.0.0.1:{port}"
    # Any GOPROXY answer proves it serves; the sidecar's probe path is a 404 here.
    await wait_http(f"{url}/sumdb/sum.golang.org/supported", START_DEADLINE_S, proc, ok=(404,))
    # The readiness poll is not traffic. nginx logs a request after its answer
    # is sent, so the poll's line may land after the client has read the 404:
    # wait for it, then truncate (the log is opened O_APPEND, nothing is lost).
    await until("nginx to log the readiness poll", lambda: bool(access_log.read_bytes()))
    access_log.write_text("")
    return StaticGoproxy(name, url, port, proc, access_log)


# ---------------------------------------------------------------- toxiproxy


class Toxiproxy:
    """Client of toxiproxy-server's HTTP API (v2.5)."""

    def __init__(self, api: str, proc: Proc) -> None:
        self.api = api
        self.proc = proc

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        timeout = aiohttp.ClientTimeout(total=5)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.request(method, f"{self.api}{path}", json=body) as r,
        ):
            text = await r.text()
            if r.status >= 300:
                raise AssertionError(f"toxiproxy {method} {path} -> {r.status}: {text}")
            return await r.json(content_type=None) if text.strip() else None

    async def create_proxy(self, name: str, upstream: str) -> str:
        """A proxy from a fresh loopback port to ``upstream`` (host:port); returns its URL."""
        port = free_port()
        await self._call(
            "POST",
            "/proxies",
            {"name": name, "listen": f"127.0.0.1:{port}", "upstream": upstream, "enabled": True},
        )
        return f"http://127.0.0.1:{port}"

    async def add_toxic(
        self,
        proxy: str,
        kind: str,
        name: str | None = None,
        stream: str = "downstream",
        **attributes: Any,
    ) -> str:
        """Add a toxic (latency, timeout, reset_peer, bandwidth, ...); returns its name."""
        name = name or f"{kind}_{stream}"
        await self._call(
            "POST",
            f"/proxies/{proxy}/toxics",
            {
                "name": name,
                "type": kind,
                "stream": stream,
                "toxicity": 1.0,
                "attributes": attributes,
            },
        )
        return name

    async def remove_toxic(self, proxy: str, name: str) -> None:
        await self._call("DELETE", f"/proxies/{proxy}/toxics/{name}")

    async def set_enabled(self, proxy: str, enabled: bool) -> None:
        """Disabled: the listener closes and every open connection is cut."""
        await self._call("POST", f"/proxies/{proxy}", {"enabled": enabled})


async def start_toxiproxy(procs: Procs, binary: Path) -> Toxiproxy:
    port = free_port()
    proc = procs.start("toxiproxy", [binary, "-host", "127.0.0.1", "-port", str(port)])
    api = f"http://127.0.0.1:{port}"
    await wait_http(f"{api}/version", START_DEADLINE_S, proc)
    return Toxiproxy(api, proc)


# ---------------------------------------------------------------- the sidecar


@dataclass(frozen=True)
class SidecarOptions:
    """What a scenario changes in the sidecar's config."""

    engine: str = "embedded"
    opa_url: str = "http://127.0.0.1:8181"
    primary_pool: int = 64
    primary_first_byte: str = "2s"
    interval: str = "200ms"
    window: str = "2s"
    slice: str = "500ms"


def sidecar_yaml(
    port: int, primary_url: str, backup_url: str, cache_dir: Path, policies: Path, o: SidecarOptions
) -> str:
    return f"""\
listen: "127.0.0.1:{port}"
upstreams:
  - name: primary
    url: "{primary_url}"
    pool: {{max_connections: {o.primary_pool}}}
    timeouts: {{connect: 1s, first_byte: {o.primary_first_byte}, idle: 5s}}
  - name: backup
    url: "{backup_url}"
    timeouts: {{connect: 1s, first_byte: 5s, idle: 5s}}
cache:
  dir: "{cache_dir}"
  mutable_ttl: 60s
policy:
  engine: {o.engine}
  paths: ["{policies}"]
  opa_url: "{o.opa_url}"
  interval: {o.interval}
stats:
  window: {o.window}
  slice: {o.slice}
# No checksum database here: the corpus is checked by its committed go.sum
# (GOSUMDB=off) and nginx answers 404 to sumdb/ paths, so every lookup would
# end in "cannot vouch". These tests are about routing and breakers.
verify: {{mode: off}}
shutdown_grace: 1s
"""


async def start_sidecar(procs: Procs, config: Path, port: int) -> Proc:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for var in ("GOPRIVATE", "GONOPROXY"):  # they would add routing.private globs
        env.pop(var, None)
    proc = procs.start(
        "sidecar", [sys.executable, "-m", "sidecar", "run", "--config", config], env=env, cwd=REPO
    )
    await wait_http(f"http://127.0.0.1:{port}/readyz", START_DEADLINE_S, proc)
    return proc


# ---------------------------------------------------------------- Prometheus


def prometheus_yaml(target: str, rule_file: Path) -> str:
    return f"""\
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - "{rule_file}"
scrape_configs:
  - job_name: goproxy-sidecar
    scrape_interval: 1s
    scrape_timeout: 1s
    static_configs:
      - targets: ["{target}"]
"""


async def start_prometheus(procs: Procs, binary: Path, target: str, rule_file: Path) -> str:
    prefix = procs.logs / "prometheus"
    prefix.mkdir()
    conf = prefix / "prometheus.yml"
    conf.write_text(prometheus_yaml(target, rule_file))
    port = free_port()
    proc = procs.start(
        "prometheus",
        [
            binary,
            f"--config.file={conf}",
            f"--storage.tsdb.path={prefix / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
    )
    url = f"http://127.0.0.1:{port}"
    await wait_http(f"{url}/-/ready", START_DEADLINE_S, proc)
    return url


# ---------------------------------------------------------------- OPA


async def start_opa(procs: Procs, binary: Path, policies: Path) -> str:
    port = free_port()
    proc = procs.start(
        "opa",
        [
            binary,
            "run",
            "--server",
            "--addr",
            f"127.0.0.1:{port}",
            "--skip-version-check",
            "--log-level",
            "error",
            policies,
        ],
    )
    url = f"http://127.0.0.1:{port}"
    await wait_http(f"{url}/health", START_DEADLINE_S, proc)
    return url
