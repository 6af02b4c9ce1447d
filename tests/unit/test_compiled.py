"""The per-request modules run compiled (mypyc, setup.py), as ``pip install .``
gives them to a user: the suite tests that build, not the sources beside it."""

from __future__ import annotations

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
