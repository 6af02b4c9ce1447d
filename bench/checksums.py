"""The checksum database of bench/resilience.py: a real, signed one that vouches for
the made-up modules the load asks for, as sum.golang.org vouches for real ones.

It is the Go database of tests/sumdb/server (golang.org/x/mod/sumdb, the code
behind sum.golang.org), built with the go command at the pinned versions of
its go.mod. Its name is ``sum.golang.org`` and its key is made per trial: the
sidecar is given that key (``verify.key``) and finds the database, as in
production, through its upstreams' ``sumdb/sum.golang.org/`` paths, which the
fault upstreams pass on to it (bench/faults.py ``--sumdb``), as Athens does.

Before a load trial the database already holds every module the load will ask
a ``.mod`` or a lookup for (the real ones are in the real database long before
anyone builds them); one it does not hold yet is added on its first lookup, as
sum.golang.org adds a new module. For builds it holds every version of the e2e
corpus' GOPROXY tree from the start, for the same reason: read on their first
lookup instead, each lookup hashed a zip and grew the tree, so every ``.mod`` of
a build waited for a new tree head and its tiles, which a build against
sum.golang.org does not.
"""

from __future__ import annotations

import contextlib
import math
import subprocess
from collections.abc import Iterator
from pathlib import Path

from bench.drive import DATABASE_TILES, parse_mix, request_for
from bench.tree import UNIQUE_PREFIX, VERSION, mod_body
from tests.sumdb.gosumdb import SERVER_SRC, GoSumdb, go_env, start_sumdb

NAME = "sum.golang.org"  # the load's and the go command's sumdb/<name>/ paths
# Load requests per second of a scenario whose modules the database holds from the
# start: ~6x the fastest closed-loop load of these mixes seen here (~1,700/s with
# 8 clients). Past them each lookup adds a module and grows the tree, and every
# .mod through the sidecar waits for a tile fetch too (a fixed 50,000 did that to
# the heal phase of --quick flapping, from its ~50,000th request on: .mod p99
# 31 ms instead of 15); bench/trial.py notes a load that went past them. The load
# is not stopped there: a contender answering fast would lose the rest of its run.
HELD_PER_SECOND = 10_000
# The tree holds at least this many records (synthetic ones before the modules):
# the load's tile requests ask for the first DATABASE_TILES full tiles.
MIN_RECORDS = DATABASE_TILES << 8
BUILD_TIMEOUT_S = 600.0
HELD_KINDS = frozenset({"mod", "lookup"})  # the load's requests that name a module in the tree


def build_database(work: Path) -> Path:
    """``go build`` tests/sumdb/server into ``work`` (pinned x/mod; the go build
    cache makes a second build quick)."""
    out = work / "sumdb-testserver"
    subprocess.run(
        ["go", "build", "-trimpath", "-o", str(out), "."],
        cwd=SERVER_SRC,
        env=go_env(),
        check=True,
        timeout=BUILD_TIMEOUT_S,
    )
    return out


def held_requests(seconds: float) -> int:
    """Load requests whose modules the database holds, for a load of ``seconds``."""
    return math.ceil(seconds * HELD_PER_SECOND)


def held_modules(mix: str, nonce: str, requests: int) -> list[str]:
    """Modules of the first ``requests`` load requests that a ``.mod`` or a lookup names."""
    pattern = parse_mix(mix)
    prefix = f"{UNIQUE_PREFIX}r{nonce}"
    kinds = {i for i, kind in enumerate(pattern) if kind in HELD_KINDS}
    return [
        request_for("info", prefix, n)[1].split("/@v/")[0][1:]
        for n in range(requests)
        if n % len(pattern) in kinds
    ]


@contextlib.contextmanager
def database(
    binary: Path,
    work: Path,
    modules: list[str],
    origin: Path | None,
    hold_origin: bool = False,
    filler: int = 0,
) -> Iterator[GoSumdb]:
    """Run the database until the block ends: ``filler`` synthetic records, then
    ``modules`` (made up) in its tree, more made-up ones on demand, the rest from
    ``origin`` (a GOPROXY tree): all of its versions from the start with
    ``hold_origin``, else on their first lookup."""
    work.mkdir(parents=True, exist_ok=True)
    listing = work / "modules.txt"
    listing.write_text("".join(f"{m} {VERSION}\n" for m in modules))
    gomod = work / "go.mod.template"
    gomod.write_bytes(mod_body("{module}"))
    args = ["-gomod", str(gomod), "-madeup", UNIQUE_PREFIX[1:]]
    args += ["-origin", str(origin)] if origin is not None else []
    args += ["-hold-origin"] if hold_origin else []
    with start_sumdb(binary, listing, filler=filler, name=NAME, args=args) as db:
        yield db
