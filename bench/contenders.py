"""The three contenders of bench/resilience.py, in front of the same two upstreams.

- ``go``: no server. The load client applies the go command's own
  ``GOPROXY=primary|backup`` rule (bench/drive.py); builds run the real go
  command with that ``GOPROXY``.
- ``nginx``: Debian nginx with ``upstream { server primary max_fails=…;
  server backup backup; }``, ``proxy_next_upstream``, ``proxy_cache`` and
  ``proxy_cache_use_stale``; the choices are explained in the config comments
  (``nginx_conf``).
- ``sidecar``: ``python -m sidecar run`` with a config naming the two
  upstreams and nothing else tuned (the embedded default policy); a pool
  limit only where the scenario sets one.

Each reports its breaker trips through what a user can see: the sidecar's
``/metrics`` and ``/breakers``, nginx's error log. Nothing here depends on
the sidecar's internals.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import re
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import Proc, Procs, free_port
from bench.servers import HEALTH_PATH, launch_sidecar, nginx_main, start_nginx

CONTENDERS = ("go", "nginx", "sidecar")
DEFAULT_POOL = 64  # the sidecar's default pool.max_connections; nginx gets the same max_conns
WATCH_INTERVAL_S = 0.25
NGINX_TRIP = "upstream server temporarily disabled"


@dataclass(frozen=True, slots=True)
class Upstreams:
    primary: str  # base URLs
    backup: str


@dataclass
class Verdict:
    """What a contender's own breaker did; None where it has none (or did not)."""

    trips: int | None = None
    detail: str = ""  # trips per upstream / breaker, or why there is no figure
    first_trip_at: float | None = None  # Unix time
    closed_at: float | None = None  # Unix time every breaker was closed again, after the heal
    shed: int | None = None  # answers the contender itself refused (sidecar rejections)
    reasons: list[str] = field(default_factory=list)  # first reason of each trip, in order
    sees_closing: bool = False  # whether closed_at can be known at all
    unvouched: int | None = None  # sidecar: bodies the checksum database could not vouch for


class Contender:
    """One contender: where the load goes and what its breakers did."""

    name = ""

    def targets(self) -> list[str]:
        """Base URLs the client uses; several means the go command's ``a|b`` rule."""
        raise NotImplementedError

    def goproxy(self) -> str:
        return "|".join(self.targets())

    async def watch(self) -> None:
        """Observe the contender until cancelled (for timings of trips)."""
        await asyncio.Event().wait()

    def verdict(self, healed_at: float | None) -> Verdict:
        return Verdict(detail="no breaker")

    def notes(self) -> str:
        return ""


class GoFailover(Contender):
    name = "go"

    def __init__(self, upstreams: Upstreams) -> None:
        self.upstreams = upstreams

    def targets(self) -> list[str]:
        return [self.upstreams.primary, self.upstreams.backup]

    def notes(self) -> str:
        return "GOPROXY=primary|backup"


# ---------------------------------------------------------------- nginx


def nginx_conf(prefix: Path, port: int, upstreams: Upstreams, pool: int) -> str:
    primary = upstreams.primary.removeprefix("http://")
    backup = upstreams.backup.removeprefix("http://")
    body = f"""    proxy_cache_path {prefix}/cache levels=1:2 keys_zone=gp:64m max_size=4g
                     inactive=1h use_temp_path=off;
    upstream goproxy {{
        zone goproxy 64k;
        # 3 failures within 10 s take the primary out for 10 s (nginx's default,
        # max_fails=1, would drop it on one bad answer; 3 is the usual choice).
        # max_conns: the same pool limit the sidecar gets; nginx has no queue,
        # so past it a request goes to the backup, or fails when that is full too.
        server {primary} max_fails=3 fail_timeout=10s max_conns={pool};
        server {backup} backup max_conns={pool};
        keepalive {pool};
        keepalive_timeout 60s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = {HEALTH_PATH} {{ return 200 'ok\\n'; }}
        location / {{
            proxy_pass http://goproxy;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # Athens on the same pod connects at once: 2 s is a dead process.
            proxy_connect_timeout 2s;
            # A cache miss in Athens runs `go mod download` itself (seconds); 15 s,
            # the sidecar's first_byte default, is what an operator would allow.
            proxy_read_timeout 15s;
            proxy_send_timeout 15s;
            # Athens answers 404 when its own fetch failed: try the backup then too.
            proxy_next_upstream error timeout http_500 http_502 http_503 http_504 http_404;
            proxy_next_upstream_tries 2;
            proxy_next_upstream_timeout 30s;
            proxy_cache gp;
            proxy_cache_key $uri;
            proxy_cache_valid 200 1h;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 15s;
            proxy_cache_use_stale error timeout updating http_500 http_502 http_503 http_504;
            {"proxy_buffer_size 64k; proxy_buffers 8 64k;"}
            # list and @latest change: kept 60 s (the sidecar's mutable_ttl).
            location ~ /@(v/list|latest)$ {{
                proxy_pass http://goproxy;
                proxy_cache_valid 200 60s;
            }}
        }}
    }}"""
    return nginx_main(prefix, body)


class Nginx(Contender):
    name = "nginx"

    def __init__(
        self, procs: Procs, work: Path, upstreams: Upstreams, pool: int | None, core: int | None
    ) -> None:
        self.pool = pool or DEFAULT_POOL
        self.names = {upstreams.primary: "primary", upstreams.backup: "backup"}
        port = free_port()
        self.prefix = work / "nginx"
        conf = nginx_conf(self.prefix, port, upstreams, self.pool)
        self.proc = start_nginx(procs, "nginx", self.prefix, conf, port, core)
        self.url = f"http://127.0.0.1:{port}"

    def targets(self) -> list[str]:
        return [self.url]

    def verdict(self, healed_at: float | None) -> Verdict:
        try:
            log = (self.prefix / "error.log").read_text(errors="replace").splitlines()
        except OSError:
            log = []
        tripped = [line for line in log if NGINX_TRIP in line]
        per_server = collections.Counter(self._server(line) for line in tripped)
        dead = sum("no live upstreams" in line for line in log)
        detail = ", ".join(f"{name} {n}" for name, n in sorted(per_server.items()))
        return Verdict(
            trips=len(tripped),
            detail=detail + (f"; {dead}x no live upstreams" if dead else ""),
            # error.log has whole seconds: the end of that second is the bound.
            first_trip_at=_nginx_time(tripped[0]) + 1.0 if tripped else None,
        )

    def _server(self, line: str) -> str:
        """Which upstream a log line names (``upstream: "http://host:port/..."``)."""
        m = re.search(r'upstream: "(http://[^/"]+)', line)
        return self.names.get(m.group(1), m.group(1)) if m else "?"

    def notes(self) -> str:
        return f"max_conns {self.pool}, max_fails=3 fail_timeout=10s"


def _nginx_time(line: str) -> float:
    """An error.log line's time (local time, whole seconds) as Unix time."""
    return time.mktime(time.strptime(line[:19], "%Y/%m/%d %H:%M:%S"))


# ---------------------------------------------------------------- the sidecar


def sidecar_conf(
    port: int, upstreams: Upstreams, cache_dir: Path, pool: int | None, sumdb_key: str
) -> str:
    pool_line = f"\n    pool: {{max_connections: {pool}}}" if pool else ""
    # verify.key: the benchmark's own sum.golang.org (bench/checksums.py), found as
    # the real one is, through the upstreams' sumdb/ paths.
    return f"""listen: "127.0.0.1:{port}"
upstreams:
  - name: primary
    url: "{upstreams.primary}"{pool_line}
  - name: backup
    url: "{upstreams.backup}"{pool_line}
cache:
  dir: "{cache_dir}"
verify:
  key: "{sumdb_key}"
"""


class Sidecar(Contender):
    name = "sidecar"

    def __init__(
        self,
        procs: Procs,
        work: Path,
        upstreams: Upstreams,
        pool: int | None,
        core: int,
        source: Path,
        sumdb_key: str,
    ) -> None:
        self.pool = pool
        port = free_port()
        home = work / "sidecar"
        home.mkdir(parents=True, exist_ok=True)
        conf = sidecar_conf(port, upstreams, home / "cache", pool, sumdb_key)
        self.proc: Proc = launch_sidecar(procs, home, "sidecar", conf, port, core, source=source)[0]
        self.url = f"http://127.0.0.1:{port}"
        # name -> [(Unix time the state began, state, reason)], from /breakers
        self.timeline: dict[str, list[tuple[float, str, str]]] = {}

    def targets(self) -> list[str]:
        return [self.url]

    async def watch(self) -> None:
        while True:
            with contextlib.suppress(OSError, ValueError):
                doc = await asyncio.to_thread(_get_json, f"{self.url}/breakers")
                now = time.time()
                for name, view in breaker_views(doc):
                    self._saw(name, now - float(view.get("state_age_s", 0.0)), view)
            await asyncio.sleep(WATCH_INTERVAL_S)

    def _saw(self, name: str, since: float, view: dict[str, Any]) -> None:
        states = self.timeline.setdefault(name, [])
        state = str(view.get("state", ""))
        if states and states[-1][1] == state and abs(states[-1][0] - since) < 0.5:
            return
        states.append((since, state, str(view.get("reason", ""))))

    def verdict(self, healed_at: float | None) -> Verdict:
        try:
            text = _get_text(f"{self.url}/metrics")
        except OSError as exc:
            return Verdict(detail=f"/metrics unreadable: {exc}")
        opened: dict[str, float] = {}
        shed = unvouched = 0.0
        for name, labels, value in prometheus_samples(text):
            if name == "goproxy_sidecar_breaker_transitions_total":
                if labels.get("to_state") == "open":
                    key = "/".join(
                        v
                        for k, v in labels.items()
                        if k not in ("from_state", "to_state", "reason")
                    )
                    opened[key] = opened.get(key, 0.0) + value
            elif name == "goproxy_sidecar_rejected_requests_total":
                shed += value
            elif name == "goproxy_sidecar_verify_unavailable_total":
                unvouched += value
        trips = int(sum(opened.values()))
        opens = sorted(
            (t, f"{name}: {reason}")
            for name, states in self.timeline.items()
            for t, state, reason in states
            if state == "open"
        )
        return Verdict(
            trips=trips,
            detail=", ".join(f"{k} {int(v)}" for k, v in sorted(opened.items()) if v),
            first_trip_at=opens[0][0] if opens else None,
            closed_at=self._closed_after(healed_at) if trips else None,
            shed=int(shed),
            unvouched=int(unvouched),
            reasons=[r for _, r in opens],
            sees_closing=True,
        )

    def _closed_after(self, healed_at: float | None) -> float | None:
        """When every breaker was closed again, at or after ``healed_at``."""
        if healed_at is None:
            return None
        latest = healed_at
        for states in self.timeline.values():
            if not states or states[-1][1] != "closed":
                return None  # still open or half-open at the end
            latest = max(latest, states[-1][0])
        return latest

    def notes(self) -> str:
        return f"pool.max_connections {self.pool or f'{DEFAULT_POOL} (default)'}"


def breaker_views(doc: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every breaker in a /breakers document: objects with a ``state``, by their key
    path (a nested split, per request kind, shows up as ``primary/sumdb``)."""
    out: list[tuple[str, dict[str, Any]]] = []
    if not isinstance(doc, dict):
        return out
    for key, value in doc.items():
        if not isinstance(value, dict) or key == "stats":
            continue
        name = f"{path}/{key}" if path else str(key)
        if value.get("state") in ("closed", "open", "half-open"):
            out.append((name, value))
        out.extend(breaker_views({k: v for k, v in value.items() if k != "stats"}, name))
    return out


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def prometheus_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None or line.startswith("#"):
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        with contextlib.suppress(ValueError):
            out.append((m.group(1), labels, float(m.group(3))))
    return out


def _get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


def _get_json(url: str) -> Any:
    return json.loads(_get_text(url))


def start_contender(
    name: str,
    procs: Procs,
    work: Path,
    upstreams: Upstreams,
    pool: int | None,
    core: int,
    sidecar_source: Path,
    sumdb_key: str,
) -> Contender:
    """Start ``name`` in front of ``upstreams``; ``sidecar_source`` holds the
    ``sidecar`` package to run (this checkout, or an exported revision);
    ``sumdb_key``: the verifier key of the checksum database behind them."""
    if name == "go":
        return GoFailover(upstreams)
    if name == "nginx":
        return Nginx(procs, work, upstreams, pool, core)
    if name == "sidecar":
        return Sidecar(procs, work, upstreams, pool, core, sidecar_source, sumdb_key)
    raise ValueError(f"unknown contender {name!r} (known: {', '.join(CONTENDERS)})")
