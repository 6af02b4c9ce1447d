"""Which modules ``pip install`` compiles with mypyc, and which of them this
process runs compiled.

The per-request path is compiled: the front that takes each request, the
listener and its HTTP/1.1 exchange, the GOPROXY path check, routing, the
handler and its delivery, the upstream client and pool, statistics,
breakers, the cache store and checksum verification. Measured with
``bench/instructions.py`` (instructions per request, these modules compiled
against none, 15ee066 against ba1e445): small hit 67.3 k → 31.2 k, miss
without the cache 216 k → 121 k, with it 317 k → 206 k. The rest
(configuration, CLI, status pages, policy engines, the control loop) runs
once a second or less and stays interpreted, which keeps the build to about
2 minutes. ``logs`` is on the path and stays interpreted: it assigns
``logging.Formatter.converter``, which mypyc cannot compile.

Compiled, a dataclass or named tuple keeps the ``__init__`` (``__new__``)
its library generates, which runs interpreted: a class made per request
here has a constructor of its own (``Attempts``, ``Entry``, ``Pending``,
``GoproxyRequest``, ``Record``; 5-6 k instructions each before, 0.3 k after).

This file is read by ``setup.py`` before the package is importable, so it
imports nothing outside the standard library.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import json
from pathlib import Path
from typing import Final

COMPILED: Final = (
    "sidecar/front.py",
    "sidecar/goproxy.py",
    "sidecar/routing.py",
    "sidecar/server/connection.py",
    "sidecar/server/exchange.py",
    "sidecar/server/listener.py",
    "sidecar/server/requests.py",
    "sidecar/server/sending.py",
    "sidecar/server/tls.py",
    "sidecar/proxy/delivery.py",
    "sidecar/proxy/failures.py",
    "sidecar/proxy/handler.py",
    "sidecar/proxy/headers.py",
    "sidecar/proxy/hedge.py",
    "sidecar/proxy/hits.py",
    "sidecar/proxy/integrity.py",
    "sidecar/proxy/internal.py",
    "sidecar/proxy/lograte.py",
    "sidecar/proxy/racing.py",
    "sidecar/proxy/ranges.py",
    "sidecar/proxy/recorder.py",
    "sidecar/proxy/stream.py",
    "sidecar/upstreams/addresses.py",
    "sidecar/upstreams/admission.py",
    "sidecar/upstreams/auth.py",
    "sidecar/upstreams/client.py",
    "sidecar/upstreams/connect.py",
    "sidecar/upstreams/http1.py",
    "sidecar/upstreams/pool.py",
    "sidecar/upstreams/response.py",
    "sidecar/upstreams/route.py",
    "sidecar/upstreams/sender.py",
    "sidecar/stats/histogram.py",
    "sidecar/stats/inflight.py",
    "sidecar/stats/plain.py",
    "sidecar/stats/window.py",
    "sidecar/breaker/machine.py",
    "sidecar/breaker/plan.py",
    "sidecar/breaker/state.py",
    "sidecar/cache/base.py",
    "sidecar/cache/fill.py",
    "sidecar/cache/flight.py",
    "sidecar/cache/index.py",
    "sidecar/cache/layout.py",
    "sidecar/cache/pack.py",
    "sidecar/cache/store.py",
    "sidecar/cache/writeback.py",
    "sidecar/sumdb/dirhash.py",
    "sidecar/sumdb/gosumdb.py",
    "sidecar/sumdb/lookup.py",
    "sidecar/sumdb/note.py",
    "sidecar/sumdb/tile.py",
    "sidecar/sumdb/tlog.py",
    "sidecar/sumdb/zipstream.py",
    "sidecar/auth/access.py",
    "sidecar/auth/credcache.py",
    "sidecar/auth/credentials.py",
    "sidecar/auth/gate.py",
    "sidecar/auth/networks.py",
    "sidecar/auth/throttle.py",
    "sidecar/auth/tokens.py",
)
# Written beside the package by an in-place build (not in git, not in a wheel).
STAMP: Final = "sidecar/compiled.sha256.json"


def module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def running_compiled() -> tuple[int, int]:
    """(compiled, listed): how many of ``COMPILED`` this process imports from an
    extension module (an install without a C compiler runs them all from
    source)."""
    compiled = 0
    for path in COMPILED:
        origin = importlib.import_module(module_name(path)).__file__ or ""
        compiled += origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    return compiled, len(COMPILED)


def source_hashes(root: Path) -> dict[str, str]:
    """sha256 of each listed source under ``root``."""
    return {path: hashlib.sha256((root / path).read_bytes()).hexdigest() for path in COMPILED}


def write_stamp(root: Path) -> None:
    """Note what an in-place build (``pip install -e .``) compiled: the sources'
    hashes, for ``stale``."""
    (root / STAMP).write_text(json.dumps(source_hashes(root), indent=0, sort_keys=True) + "\n")


def stale(root: Path) -> list[str]:
    """Sources in the checkout ``root`` that differ from what its in-place build
    compiled: Python imports an extension before its source, so the edit would
    not run. Hashes, not times: a rebuild that finds nothing to compile leaves
    the extensions older than sources touched by a checkout."""
    try:
        built = json.loads((root / STAMP).read_text())
    except FileNotFoundError:
        return []  # no in-place build: the sources run
    now = source_hashes(root)
    return [path for path in COMPILED if built.get(path) != now[path] and _extension(root, path)]


def _extension(root: Path, path: str) -> bool:
    source = root / path
    return any(source.with_suffix(s).exists() for s in importlib.machinery.EXTENSION_SUFFIXES)
