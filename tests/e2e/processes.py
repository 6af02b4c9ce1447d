"""Child processes of the e2e suite: each in its own process group, logged to a
file, and killed as a group (SIGTERM, then SIGKILL) when its fixture ends.

Every wait here has a deadline; a helper that gives up says what it waited
for and shows the tail of the process's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import aiohttp

T = TypeVar("T")

TERM_GRACE_S = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Proc:
    """A started child: ``name`` for messages, ``log`` holds its stdout and stderr."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log = log
        with log.open("ab") as out:
            self.popen = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )  # its own process group: nginx workers die with it
        self.pgid = self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the whole group at once: a crash, not a shutdown."""
        self._signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(TERM_GRACE_S)

    def stop(self, grace_s: float = TERM_GRACE_S) -> None:
        """SIGTERM the group; SIGKILL it when the grace runs out."""
        if self.alive:
            self._signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace_s)
        self._signal(signal.SIGKILL)  # stragglers of the group, if any
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(grace_s)

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, sig)


class Procs:
    """Every process one fixture started; ``stop_all`` ends them in reverse order."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[Proc] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Proc:
        proc = Proc(name, argv, self.logs / f"{name}.log", env, cwd)
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            proc.stop()


async def wait_until(
    what: str,
    check: Callable[[], Awaitable[T | None]],
    deadline_s: float,
    every_s: float = 0.05,
    proc: Proc | None = None,
) -> T:
    """Poll ``check`` until it returns something other than None (or False)."""
    deadline = time.monotonic() + deadline_s
    last_error: Exception | None = None
    while True:
        if proc is not None and not proc.alive:
            raise AssertionError(
                f"{proc.name} exited ({proc.popen.returncode}) while waiting "
                f"for {what}:\n{proc.tail()}"
            )
        try:
            result = await check()
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            result, last_error = None, exc
        if result is not None and result is not False:
            return result
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            tail = f"\n{proc.name} log:\n{proc.tail()}" if proc is not None else ""
            raise AssertionError(f"gave up after {deadline_s}s waiting for {what}{detail}{tail}")
        await asyncio.sleep(every_s)


async def wait_http(
    url: str, deadline_s: float, proc: Proc | None = None, ok: Sequence[int] = (200,)
) -> None:
    """Until GET ``url`` answers one of the ``ok`` statuses."""
    timeout = aiohttp.ClientTimeout(total=2)

    async def check() -> bool:
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as r:
            return r.status in ok

    await wait_until(f"{url} to answer", check, deadline_s, proc=proc)
