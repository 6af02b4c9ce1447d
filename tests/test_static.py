"""House style as tests: ruff (lint and format), mypy --strict on sidecar/, and
what the compiled modules must not do."""

from __future__ import annotations

import ast
import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_ruff_lint_is_clean() -> None:
    out = run("ruff", "check", "sidecar", "tests", "bench")
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_format_is_clean() -> None:
    out = run("ruff", "format", "--check", "sidecar", "tests", "bench")
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_strict_is_clean() -> None:
    out = run("mypy", "--strict", "sidecar")
    assert out.returncode == 0, out.stdout + out.stderr


def awaits_in_except_clauses(source: str) -> list[int]:
    """Lines of ``source`` that await (or iterate or enter asynchronously)
    inside an ``except`` clause."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Try | ast.TryStar):
            for handler in node.handlers:
                for stmt in handler.body:
                    for sub in ast.walk(stmt):
                        if isinstance(sub, ast.Await | ast.AsyncFor | ast.AsyncWith):
                            found.append(sub.lineno)
    return found


def test_the_scan_finds_an_await_in_an_except_clause() -> None:
    source = "async def f(x):\n    try:\n        pass\n    except OSError:\n        await x\n"
    assert awaits_in_except_clauses(source) == [5]


def test_compiled_code_never_awaits_in_an_except_clause() -> None:
    """Compiled, a coroutine that yields inside an except clause leaves its
    exception as the one being handled while other tasks run: every exception
    they raise chains onto it, and each raise walks the chain (1 MiB cache
    hits cost 5x the CPU; see sidecar/server/connection.py's sendfile)."""
    listing = runpy.run_path(str(ROOT / "sidecar" / "compiled.py"))["COMPILED"]
    found = [
        f"{path}:{line}"
        for path in listing
        for line in awaits_in_except_clauses((ROOT / path).read_text())
    ]
    assert found == []
