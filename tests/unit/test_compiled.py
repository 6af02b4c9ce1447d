"""The per-request modules run compiled (mypyc, setup.py), as ``pip install .``
gives them to a user: the suite tests that build, not the sources beside it."""

from __future__ import annotations

import ast
import importlib.machinery
from pathlib import Path

from sidecar.compiled import COMPILED, running_compiled, stale, write_stamp
from tests.tools import missing

REPO = Path(__file__).resolve().parent.parent.parent


def test_the_per_request_modules_run_compiled() -> None:
    compiled, listed = running_compiled()
    if compiled < listed:
        missing(f"{compiled} of {listed} modules compiled: `pip install -e .` with a C compiler")
    assert (compiled, listed) == (len(COMPILED), len(COMPILED))


def test_every_listed_module_exists_and_is_listed_once() -> None:
    assert len(set(COMPILED)) == len(COMPILED)
    for path in COMPILED:
        assert (REPO / path).is_file(), path


def test_an_edit_after_an_in_place_build_is_stale(tmp_path: Path) -> None:
    for path in COMPILED:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(f"# {path}\n")
    assert stale(tmp_path) == []  # no in-place build: the sources run
    write_stamp(tmp_path)
    first = tmp_path / COMPILED[0]
    first.with_suffix(importlib.machinery.EXTENSION_SUFFIXES[0]).write_bytes(b"")
    assert stale(tmp_path) == []
    first.write_text("# edited\n")
    (tmp_path / COMPILED[1]).write_text("# edited, but not compiled in place\n")
    assert stale(tmp_path) == [COMPILED[0]]
    write_stamp(tmp_path)  # rebuilt
    assert stale(tmp_path) == []


def _awaits(nodes: list[ast.stmt]) -> bool:
    return any(
        isinstance(x, ast.Await | ast.AsyncFor | ast.AsyncWith) for n in nodes for x in ast.walk(n)
    )


def _bare_raise_after_await(body: list[ast.stmt]) -> bool:
    """A bare ``raise`` of this handler's exception after one of its awaits (a
    nested handler re-raises its own exception, and is checked on its own)."""
    awaited = False
    for statement in body:
        raises = any(isinstance(x, ast.Raise) and x.exc is None for x in _own(statement))
        if raises and awaited:
            return True
        awaited = awaited or _awaits([statement])
    return False


def _own(node: ast.AST) -> list[ast.AST]:
    """``node`` and what it holds, nested except clauses left out."""
    out = [node]
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, ast.ExceptHandler):
            out += _own(child)
    return out


def test_no_compiled_module_reraises_after_an_await() -> None:
    """Compiled code re-raises a caught exception (a finally's, or a bare
    ``raise``) from the thread's exception state, which the tasks that run
    during an await change: a cancelled cache fill re-raised another task's
    SumdbUnavailable. Such exceptions are kept in a variable and raised by name."""
    found = []
    for path in COMPILED:
        for node in ast.walk(ast.parse((REPO / path).read_text())):
            if not isinstance(node, ast.Try):
                continue
            if node.finalbody and _awaits(node.finalbody):
                found.append(f"{path}:{node.finalbody[0].lineno}: await in a finally")
            for handler in node.handlers:
                if _bare_raise_after_await(handler.body):
                    found.append(f"{path}:{handler.lineno}: bare raise after an await")
    assert found == []
