"""Child processes of the harness: start pinned, find by pid, always stop.

Every server runs in its own process group (``start_new_session``) under
``taskset``, so stopping it means one ``killpg`` that also reaches nginx
workers. ``Procs`` is a registry that stops whatever is still running when
the harness exits, however it exits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
STOP_GRACE_S = 5.0


class BenchError(Exception):
    """A setup step of the harness failed; the message says which."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(core: int | None, argv: Sequence[str]) -> list[str]:
    """``argv`` under ``taskset -c core`` (unchanged when core is None)."""
    return list(argv) if core is None else ["taskset", "-c", str(core), *argv]


def pin_pid_tree(pid: int, core: int) -> None:
    """Move every thread of ``pid`` and of its descendants to ``core``."""
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), {core})


@dataclass
class Proc:
    """One started server: its process group, log file and pinning."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    core: int | None
    argv: list[str]
    env_note: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tree(self) -> list[int]:
        return [self.pid, *descendants(self.pid)]

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.popen.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, STOP_GRACE_S)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)
            try:
                self.popen.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


class Procs:
    """Registry of started servers; ``stop_all`` is called from a ``finally``."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._procs: list[Proc] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        core: int | None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        env_note: dict[str, str] | None = None,
    ) -> Proc:
        log_path = self.log_dir / f"{name}.log"
        full = pinned(core, argv)
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                full,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        proc = Proc(name, popen, log_path, core, full, dict(env_note or {}))
        self._procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> None:
        while self._procs:
            self._procs.pop().stop()


def wait_http(proc: Proc, url: str, timeout_s: float = 30.0) -> None:
    """Wait until ``url`` answers 200, or raise with the server's log tail."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(
                f"{proc.name} exited with {proc.popen.returncode} during start-up; "
                f"log {proc.log_path}:\n{proc.log_tail()}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.05)
    raise BenchError(
        f"{proc.name} not ready at {url} after {timeout_s}s ({last}); "
        f"log {proc.log_path}:\n{proc.log_tail()}"
    )


# ---------------------------------------------------------------- /proc readers


def descendants(pid: int) -> list[int]:
    """All descendants of ``pid`` (nginx workers, helper processes)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        kids = _children(p)
        out.extend(kids)
        todo.extend(kids)
    return out


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.extend(int(x) for x in f.read().split())
    except OSError:
        pass
    return kids


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of ``pids`` in seconds (threads included)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def status_kib(pid: int, key: str) -> int:
    """A ``kB`` line of /proc/<pid>/status (VmRSS, VmHWM), 0 if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib(pids: Sequence[int]) -> int:
    return sum(status_kib(pid, "VmRSS") for pid in pids)


@contextlib.contextmanager
def stopping(procs: Procs) -> Iterator[Procs]:
    """Stop every server on exit, also on SIGTERM/SIGHUP (turned into SystemExit)."""

    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, _exit) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield procs
    finally:
        procs.stop_all()
        for s, handler in previous.items():
            signal.signal(s, handler)
