"""The go command as the tests run it: hermetic, loopback only.

Every run gets ``GOPROXY`` = the sidecar and nothing after it (no ``direct``),
``GOSUMDB=off`` with the committed go.sum verifying every byte, a fresh
``GOMODCACHE``, ``GOTOOLCHAIN=local``, no GOPRIVATE/GONOPROXY/GONOSUMDB, no
go env file. ``GOCACHE`` is shared (the corpus' warm build cache): builds use
``-trimpath`` so its entries do not depend on where the modules were unpacked.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from tests.tools import missing

CORPUS_SRC = Path(__file__).resolve().parent / "corpus"
CORPUS_FILES = ("go.mod", "go.sum", "main.go")
GO_DEADLINE_S = 90.0


def corpus_dir() -> Path:
    configured = os.environ.get("SIDECAR_CORPUS_DIR")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "goproxy-sidecar" / "corpus"


def corpus_stamp() -> str:
    """What scripts/corpus.sh writes: sha256 over the `sha256sum` lines of the sources."""
    lines = "".join(
        f"{hashlib.sha256((CORPUS_SRC / name).read_bytes()).hexdigest()}  {name}\n"
        for name in CORPUS_FILES
    )
    return hashlib.sha256(lines.encode()).hexdigest()


def require_corpus() -> Path:
    """The corpus folder; skip (fail under CI=true) when scripts/corpus.sh has not run."""
    root = corpus_dir()
    stamp = root / "stamp"
    problem = ""
    if not (root / "modcache" / "cache" / "download").is_dir() or not stamp.is_file():
        problem = f"no e2e corpus in {root}"
    elif stamp.read_text().strip() != corpus_stamp():
        problem = f"the e2e corpus in {root} is older than tests/e2e/corpus"
    if not problem:
        return root
    missing(f"{problem}: run scripts/corpus.sh")


@dataclass
class GoResult:
    argv: list[str]
    returncode: int
    output: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def __str__(self) -> str:
        return (
            f"`{' '.join(self.argv)}` exited {self.returncode} after {self.seconds:.1f}s:\n"
            f"{self.output[-3000:]}"
        )


async def cancel_all(tasks: list[asyncio.Task[GoResult]]) -> None:
    """Cancel go commands still running (their process groups are killed)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class GoWorkspace:
    """A copy of the corpus program plus the environment to build it through ``proxy``."""

    def __init__(self, go: Path, root: Path, proxy: str, gocache: Path) -> None:
        self.go = go
        self.root = root
        self.src = root / "src"
        self.proxy = proxy
        self.gocache = gocache
        self._runs = 0
        shutil.copytree(CORPUS_SRC, self.src)

    def env(self, modcache: Path) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.root),
            "GOENV": "off",
            "GOPATH": str(self.root / "gopath"),
            "GOPROXY": self.proxy,
            "GOSUMDB": "off",
            "GOFLAGS": "-mod=mod -modcacherw",  # rw: pytest can delete the tmp folders
            "GOMODCACHE": str(modcache),
            "GOCACHE": str(self.gocache),
            "GOTOOLCHAIN": "local",
            "GOTELEMETRY": "off",
            "CGO_ENABLED": "0",
        }
        for var in ("TMPDIR", "LANG"):
            if var in os.environ:
                env[var] = os.environ[var]
        return env

    def fresh_modcache(self) -> Path:
        self._runs += 1
        path = self.root / f"modcache-{self._runs}"
        path.mkdir()
        return path

    async def go_cmd(
        self, *args: str, modcache: Path | None = None, deadline_s: float = GO_DEADLINE_S
    ) -> GoResult:
        """Run ``go args...`` in the corpus copy with a fresh GOMODCACHE (unless given)."""
        modcache = modcache or self.fresh_modcache()
        argv = [str(self.go), *args]
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=self.src,
            env=self.env(modcache),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), deadline_s)
        except (TimeoutError, asyncio.CancelledError):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise
        return GoResult(
            argv[1:], proc.returncode or 0, out.decode(errors="replace"), time.monotonic() - started
        )

    async def build(self) -> GoResult:
        """`go build` of the corpus program, then run it: both must work."""
        result = await self.go_cmd("build", "-trimpath", "-o", str(self.root / "corpus"), ".")
        if result.ok:
            run = await asyncio.create_subprocess_exec(
                str(self.root / "corpus"),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await asyncio.wait_for(run.communicate(), 30)
            result.output += out.decode(errors="replace")
            if run.returncode != 0 or "Hello From The Corpus" not in result.output:
                result.returncode = run.returncode or 1
        return result

    async def download(self, deadline_s: float = GO_DEADLINE_S) -> GoResult:
        """`go mod download`: every module the program's packages need."""
        return await self.go_cmd("mod", "download", deadline_s=deadline_s)
