"""``goproxy-sidecar run`` raises its soft limit on open descriptors to the
hard one (sidecar.runtime.raise_fd_limit), as Go servers do: started under a
low soft limit, the running process has the hard one."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
from pathlib import Path

from tests.functional.test_cli import free_port, sidecar_cmd, write_config
from tests.upstream import wait_healthy

LOW = 256


def lowered() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (LOW, hard))


def open_files_limits(pid: int) -> tuple[int, int]:
    """(soft, hard) 'Max open files' of a running process, from /proc."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no 'Max open files' line")


async def test_run_raises_the_soft_descriptor_limit_to_the_hard_one(tmp_path: Path) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard > LOW  # else there is nothing to raise on this machine
    port = free_port()
    cfg = write_config(tmp_path, "http://127.0.0.1:9", port)
    proc = await asyncio.create_subprocess_exec(
        *sidecar_cmd("run", "--config", str(cfg), "--log-level", "debug"),
        stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ),
        preexec_fn=lowered,
    )
    try:
        assert await wait_healthy(port, 15)
        assert open_files_limits(proc.pid) == (hard, hard)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    events = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    [raised] = [e for e in events if e["event"] == "runtime: open descriptor limit"]
    assert (raised["before"], raised["after"]) == (LOW, hard)
