"""The per-request modules run compiled (mypyc, setup.py), as ``pip install .``
gives them to a user: the suite tests that build, not the sources beside it."""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import types
from pathlib import Path

from sidecar.compiled import COMPILED, running_compiled, stale, write_stamp
from tests.tools import missing

REPO = Path(__file__).resolve().parent.parent.parent


def test_the_per_request_modules_run_compiled() -> None:
    compiled, listed = running_compiled()
    if compiled < listed:
        missing(f"{compiled} of {listed} modules compiled: `pip install -e .` with a C compiler")
    assert (compiled, listed) == (len(COMPILED), len(COMPILED))


# Made on every request (a miss makes all of them): compiled, a dataclass or
# named tuple keeps an interpreted generated __init__ (__new__), 5-6 k
# instructions each where a class's own constructor is 0.3 k.
PER_REQUEST_CLASSES = (
    "sidecar.goproxy:GoproxyRequest",
    "sidecar.proxy.failures:Attempts",
    "sidecar.cache.index:Entry",
    "sidecar.cache.layout:Record",
    "sidecar.cache.writeback:Pending",
    "sidecar.stats.plain:PlainCount",
    "sidecar.stats.plain:PlainBuckets",
)


def test_the_classes_made_per_request_have_native_constructors() -> None:
    if running_compiled()[0] < len(COMPILED):
        missing("compiled modules: `pip install -e .` with a C compiler")
    for spec in PER_REQUEST_CLASSES:
        module, name = spec.split(":")
        cls = getattr(importlib.import_module(module), name)
        made = cls.__new__ if "__new__" in vars(cls) else cls.__init__
        assert not isinstance(made, types.FunctionType), f"{spec}: interpreted constructor"


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


# What a slice bound may call: mypyc evaluates a bound twice where the sliced
# object's type is promoted (a memoryview typed as bytes), so a bound with a
# side effect runs it twice: ``view[os.write(fd, view):]`` wrote every chunk
# twice once compiled.
_PURE_IN_SLICE = frozenset({"len", "min", "max", "start", "end", "find", "rfind"})


def _called(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def test_no_slice_bound_in_a_compiled_module_has_a_side_effect() -> None:
    found = []
    for path in COMPILED:
        for node in ast.walk(ast.parse((REPO / path).read_text())):
            if not isinstance(node, ast.Slice):
                continue
            for bound in (node.lower, node.upper, node.step):
                for x in ast.walk(bound) if bound is not None else ():
                    if isinstance(x, ast.Await | ast.NamedExpr | ast.Yield) or (
                        isinstance(x, ast.Call) and _called(x) not in _PURE_IN_SLICE
                    ):
                        found.append(f"{path}:{node.lineno}: {ast.unparse(bound)}")
    assert found == []
