"""The embedded engine's worker thread runs below the event loop's CPU priority
(issue 14: on one core, an evaluation at the same priority took half of it
from the requests in flight for its whole length). Real engine, real policy,
the kernel's own view of the thread (/proc)."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from sidecar.policy.embedded import WORKER_NICE, EmbeddedEngine
from tests.control_support import POLICIES
from tests.functional.test_policy_engines import DECISION, upstream
from tests.tools import missing


def nice_of(tid: int) -> int:
    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])  # field 19: nice


async def test_the_policy_worker_runs_below_the_loop_and_still_decides() -> None:
    if sys.platform != "linux":
        missing("thread priorities are set on Linux only (and read from /proc)")
    engine = EmbeddedEngine([str(POLICIES)], DECISION)
    await engine.load()
    try:
        decisions = await engine.evaluate({"now": 0, "upstreams": {"athens": upstream()}})
        assert decisions["athens"].action.value == "allow"
        workers = [t for t in threading.enumerate() if t.name.startswith("policy-embedded")]
        assert len(workers) == 1 and workers[0].native_id is not None
        loop_nice = nice_of(threading.get_native_id())
        assert nice_of(workers[0].native_id) == min(19, loop_nice + WORKER_NICE)
        assert os.getpriority(os.PRIO_PROCESS, 0) == loop_nice  # the process keeps its own
    finally:
        await engine.close()
