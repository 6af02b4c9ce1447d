"""The servers of a run: upstream nginx, nginx reference proxies, the sidecar.

Every nginx runs in the foreground (``daemon off``) with ``master_process on;
worker_processes 1`` from its own prefix directory (``-p DIR -c CONF``) with
pid, logs and temp files inside it, listening on 127.0.0.1 only.
"""

from __future__ import annotations

import functools
import importlib.machinery
import json
import os
import runpy
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import BenchError, Proc, Procs, free_port, wait_http
from bench.tree import UNIQUE_PREFIX, ZIPS, info_body

REPO = Path(__file__).resolve().parent.parent
HEALTH_PATH = "/bench-health"

# The sidecar tunes glibc's malloc itself (sidecar.heap); a MALLOC_* or
# GLIBC_TUNABLES in the caller's shell would override it, so they are removed:
# the sidecar measured is the one a user starts.
CALLER_TUNING = ("MALLOC_", "GLIBC_TUNABLES")
# PERF-NOTES' best nginx proxy buffers (46 k vs 43 k req/s small, 1.7 vs 0.64 GB/s 50 MiB).
PROXY_BUFFERS = "proxy_buffer_size 64k;\n        proxy_buffers 8 64k;"
# Every server keeps a connection for the whole run (nginx's default is 1000 requests).
KEEPALIVE = "keepalive_requests 100000000;\n    keepalive_timeout 600s;"


@dataclass
class Server:
    """A running contender (or the upstream): where to send load, what to measure."""

    name: str
    url: str
    proc: Proc
    hit_header: str = ""  # a response header that tells a cache hit from a miss
    hit_value: str = ""
    notes: dict[str, str] = field(default_factory=dict)


def nginx_binary() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else "")
    if not path:
        raise BenchError("nginx not found: run scripts/debian-deps.sh")
    return path


def nginx_main(prefix: Path, http_body: str) -> str:
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must read the 0700 temp dir
    return f"""{user}daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    {KEEPALIVE}
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy_temp;
    fastcgi_temp_path {prefix}/fastcgi_temp;
    uwsgi_temp_path {prefix}/uwsgi_temp;
    scgi_temp_path {prefix}/scgi_temp;
{http_body}
}}
"""


def upstream_conf(prefix: Path, port: int, tree: Path) -> str:
    info = info_body().decode().strip().replace("'", "")
    zips = "\n".join(
        f"""        location ~ ^/{z.module.replace(".", "[.]")}/@v/v[^/]+[.]zip$ {{
            try_files {z.path()} =404;
        }}"""
        for z in ZIPS
    )
    body = f"""    open_file_cache max=10000 inactive=600s;
    open_file_cache_valid 600s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {tree};
        location = {HEALTH_PATH} {{ return 200 'ok\\n'; }}
        # Unique small paths: answered from config, no file per request.
        location ^~ {UNIQUE_PREFIX} {{
            location ~ [.]info$ {{
                default_type application/json;
                return 200 '{info}\\n';
            }}
            return 404;
        }}
        # Any version of a zip module is the same file (fresh, uncached versions).
{zips}
        location ~ [.]info$ {{ default_type application/json; }}
        location ~ [.]mod$ {{ default_type "text/plain; charset=utf-8"; }}
        location ~ /list$ {{ default_type "text/plain; charset=utf-8"; }}
    }}"""
    return nginx_main(prefix, body)


def proxy_conf(prefix: Path, port: int, upstream_port: int, cache: bool) -> str:
    cache_http = ""
    cache_loc = ""
    if cache:
        cache_http = (
            f"    proxy_cache_path {prefix}/cache levels=1:2 keys_zone=gp:64m max_size=20g "
            "inactive=1h use_temp_path=off;\n"
        )
        cache_loc = """
            proxy_cache gp;
            proxy_cache_key $uri;
            proxy_cache_valid 200 1h;
            proxy_cache_lock on;
            add_header X-Cache-Status $upstream_cache_status always;"""
    body = f"""{cache_http}    upstream origin {{
        server 127.0.0.1:{upstream_port};
        keepalive 256;
        keepalive_requests 100000000;
        keepalive_timeout 600s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = {HEALTH_PATH} {{ return 200 'ok\\n'; }}
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        {PROXY_BUFFERS}{cache_loc}
        }}
    }}"""
    return nginx_main(prefix, body)


def start_nginx(
    procs: Procs, name: str, prefix: Path, conf: str, port: int, core: int | None
) -> Proc:
    prefix.mkdir(parents=True, exist_ok=True)
    conf_path = prefix / "nginx.conf"
    conf_path.write_text(conf)
    argv = [
        nginx_binary(),
        "-p",
        f"{prefix}/",
        "-c",
        str(conf_path),
        "-e",
        str(prefix / "startup-error.log"),
    ]
    proc = procs.start(name, argv, core)
    wait_http(proc, f"http://127.0.0.1:{port}{HEALTH_PATH}")
    return proc


def start_upstream(procs: Procs, work: Path, tree: Path, core: int) -> Server:
    port = free_port()
    prefix = work / "upstream"
    proc = start_nginx(procs, "upstream", prefix, upstream_conf(prefix, port, tree), port, core)
    return Server("upstream", f"http://127.0.0.1:{port}", proc)


def toxiproxy_binary() -> str:
    """toxiproxy-server from scripts/tools.sh's folder, else PATH."""
    folder = os.environ.get("SIDECAR_TOOLS_DIR") or str(
        Path.home() / ".cache" / "goproxy-sidecar" / "bin"
    )
    candidate = Path(folder) / "toxiproxy-server"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("toxiproxy-server")
    if not found:
        raise BenchError("toxiproxy-server not found: run scripts/tools.sh toxiproxy-server")
    return found


class Toxiproxy:
    """toxiproxy-server (v2.5) on loopback: upstreams with an added round-trip time."""

    def __init__(self, procs: Procs, core: int) -> None:
        port = free_port()
        self.api = f"http://127.0.0.1:{port}"
        argv = [toxiproxy_binary(), "-host", "127.0.0.1", "-port", str(port)]
        self.proc = procs.start("toxiproxy", argv, core)
        wait_http(self.proc, f"{self.api}/version")

    def _post(self, path: str, body: dict[str, object]) -> None:
        req = urllib.request.Request(
            self.api + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()

    def delayed(self, upstream: Server, rtt_ms: float) -> Server:
        """A proxy to ``upstream`` whose answers arrive ``rtt_ms`` late: one latency
        toxic on the downstream stream (each answer's first bytes are held that
        long; requests are not), so a request/answer round trip gains ``rtt_ms``."""
        port = free_port()
        name = f"rtt{rtt_ms:g}ms-{port}"
        target = upstream.url.removeprefix("http://")
        self._post(
            "/proxies",
            {"name": name, "listen": f"127.0.0.1:{port}", "upstream": target, "enabled": True},
        )
        self._post(
            f"/proxies/{name}/toxics",
            {
                "name": "rtt",
                "type": "latency",
                "stream": "downstream",
                "toxicity": 1.0,
                "attributes": {"latency": int(rtt_ms), "jitter": 0},
            },
        )
        url = f"http://127.0.0.1:{port}"
        wait_http(self.proc, url + HEALTH_PATH)
        return Server(f"upstream+{rtt_ms:g}ms", url, self.proc, notes={"rtt_ms": f"{rtt_ms:g}"})


def start_nginx_proxy(
    procs: Procs, work: Path, name: str, upstream: Server, cache: bool, core: int
) -> Server:
    port = free_port()
    prefix = work / name
    upstream_port = int(upstream.url.rsplit(":", 1)[1])
    proc = start_nginx(
        procs, name, prefix, proxy_conf(prefix, port, upstream_port, cache), port, core
    )
    notes = {"buffers": "proxy_buffer_size 64k; proxy_buffers 8 64k", "keepalive": "256"}
    if cache:
        notes["cache"] = "proxy_cache, key $uri, lock on"
        return Server(name, f"http://127.0.0.1:{port}", proc, "X-Cache-Status", "HIT", notes)
    return Server(name, f"http://127.0.0.1:{port}", proc, notes=notes)


def sidecar_conf(
    port: int, upstream: Server, cache_dir: Path, cache: bool, max_bytes: str = "20GiB"
) -> str:
    cache_yaml = (
        f'{{dir: "{cache_dir}", max_bytes: {max_bytes}}}'
        if cache
        else f'{{dir: "{cache_dir}", enabled: false}}'
    )
    return f"""listen: "127.0.0.1:{port}"
upstreams:
  - name: origin
    url: "{upstream.url}"
    pool: {{max_connections: 256}}
cache: {cache_yaml}
# The origin serves no checksum database (its modules are made up): verification
# would only add a failing lookup per miss. bench/verify_cost.py measures it.
verify: {{mode: off}}
"""


def sidecar_argv(config: Path) -> list[str]:
    """``python3 -m sidecar`` from this checkout (the console script may be stale or absent)."""
    return [
        sys.executable,
        "-m",
        "sidecar",
        "run",
        "--config",
        str(config),
        "--log-level",
        "warning",
        # BENCH_SIDECAR_LOOP=asyncio|uvloop compares event loops (asyncio has sendfile).
        "--loop",
        os.environ.get("BENCH_SIDECAR_LOOP", "auto"),
    ]


@functools.cache
def build_compiled(source: Path) -> str:
    """Compile ``source``'s per-request modules in place with mypyc (setup.py)
    when an extension is missing or older than its source: the benchmarked
    process is the one ``pip install .`` gives a user. Once per source and
    bench run (every trial asks). Returns what runs: ``compiled N/N``, or
    ``interpreted`` for a revision from before the build existed."""
    listing = source / "sidecar" / "compiled.py"
    if not listing.exists():
        return "interpreted"
    compiled = runpy.run_path(str(listing))
    names = compiled["COMPILED"]

    # Its own check, not the listing's: ``source`` may be an older revision.
    def is_built(path: str) -> bool:
        stem = source / path.removesuffix(".py")
        return any(Path(f"{stem}{s}").exists() for s in importlib.machinery.EXTENSION_SUFFIXES)

    if compiled["stale"](source) or not all(is_built(n) for n in names):
        log = source / "build-ext.log"
        with log.open("wb") as out:
            done = subprocess.run(
                [sys.executable, "setup.py", "build_ext", "--inplace"],
                cwd=source,
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if done.returncode != 0:
            raise BenchError(f"mypyc build of {source} failed: see {log}")
    return f"compiled {sum(is_built(n) for n in names)}/{len(names)}"


def launch_sidecar(
    procs: Procs,
    home: Path,
    name: str,
    config_text: str,
    port: int,
    core: int,
    extra_env: dict[str, str] | None = None,
    source: Path = REPO,
) -> tuple[Proc, dict[str, str]]:
    """Start ``python -m sidecar run`` on ``home/sidecar.yaml`` (written from
    ``config_text``) and wait for /healthz; returns the process and the
    environment variables it was given on purpose. ``source``: the folder
    whose ``sidecar`` package runs (this checkout, or an exported revision)."""
    config = home / "sidecar.yaml"
    config.write_text(config_text)
    build_compiled(source)
    env = dict(os.environ)
    # A SIDECAR_* variable in the caller's shell would silently change the config.
    for key in [k for k in env if k.startswith(("SIDECAR_", *CALLER_TUNING))]:
        del env[key]
    env.update(extra_env or {})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), env.get("PYTHONPATH", "")]))
    used = dict(extra_env or {})
    proc = procs.start(name, sidecar_argv(config), core, env=env, cwd=str(home), env_note=used)
    wait_http(proc, f"http://127.0.0.1:{port}/healthz", timeout_s=60)
    return proc, used


def start_sidecar(
    procs: Procs,
    work: Path,
    name: str,
    upstream: Server,
    cache: bool,
    core: int,
    max_bytes: str = "20GiB",
    extra_env: dict[str, str] | None = None,
) -> Server:
    port = free_port()
    home = work / name
    home.mkdir(parents=True, exist_ok=True)
    conf = sidecar_conf(port, upstream, home / "cache", cache, max_bytes)
    proc, used = launch_sidecar(procs, home, name, conf, port, core, extra_env)
    notes = {
        "cache": f"enabled ({max_bytes})" if cache else "disabled (cache.enabled: false)",
        "pool": "max_connections 256",
        "env": " ".join(f"{k}={v}" for k, v in used.items()) or "as a user starts it",
        "build": build_compiled(REPO),
    }
    return Server(name, f"http://127.0.0.1:{port}", proc, "X-Sidecar-Upstream", "cache", notes)
