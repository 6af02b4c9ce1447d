"""Process-level tuning and the event loop for ``run``.

Measured on this machine kind (see PERF-NOTES): uvloop +8-15 % on small
requests; freezing start-up objects out of the GC and a larger gen-0
threshold +10-13 % and half the p99.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import resource

from sidecar.app import serve
from sidecar.config import Config
from sidecar.heap import tune_malloc
from sidecar.logs import setup_logging

# Gen 0 every 10,000 net allocations (the docstring). Gen 1 every 2 gen-0 passes,
# not CPython's 10: its pass walks what survived since the last one, mostly the
# cache index's new entries, so under a steady miss rate five times smaller
# passes replace one long one; gen 2 every 50 gen-1 passes keeps full passes as
# rare as before (100 gen-0 passes). bench/resilience.py --quick --scenarios
# reset, 4 runs each, gc.callbacks probe: the longest gen-1 pass 46-91 ms ->
# 21-23 ms, the slowest request of the heal phase 53-102 ms -> 30-48 ms; GC
# time per run and p99 unchanged (within the runs' noise).
GC_THRESHOLD = (10_000, 2, 50)

log = logging.getLogger("sidecar.runtime")


def raise_fd_limit() -> tuple[int, int]:
    """The soft limit on open descriptors raised to the hard one, as Go's
    runtime does for every Go server: every client and upstream connection
    holds one, a body relayed by splice(2) three more while it lasts, and
    systemd's default soft limit is 1,024 (its hard one 524,288). Returns
    the (before, after) soft limits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft >= hard:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, hard


def run_forever(config: Config, log_level: str = "info", loop: str = "auto") -> int:
    """Serve until SIGTERM. ``loop``: ``uvloop``, ``asyncio``, or ``auto`` (uvloop if
    importable; faster on small requests). Cache hits go out by sendfile(2) either way."""
    setup_logging(log_level)
    tune_malloc()  # before the worker threads: the arena limit applies to new ones
    before, after = raise_fd_limit()
    log.debug("runtime: open descriptor limit", extra={"before": before, "after": after})
    runner = asyncio.run
    if loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if loop == "uvloop":
                raise
        else:
            runner = uvloop.run
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)
    runner(serve(config))
    return 0
