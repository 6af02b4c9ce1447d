"""What several sections of the configuration are declared with."""

from __future__ import annotations

import os

from sidecar.config_kinds import Check, Duration, Text, glob_problem

POSITIVE = Duration(positive=True)
PATH = Text("a file path")


def env_globs(check: Check, var: str) -> list[str]:
    """The patterns of a GOPRIVATE-style variable, each bad one named ``VAR[i]``."""
    # Indexed like the go command splits it, empty entries included, so
    # GOPRIVATE[2] is the third comma-separated item as the user wrote it.
    globs = [item.strip() for item in check.env.get(var, "").split(",")]
    for i, glob in enumerate(globs):
        problem = glob_problem(glob) if glob else None
        if problem:
            check.fail_at(f"{var}[{i}]", problem)
    return [glob for glob in globs if glob]


def beside(check: Check, path: str | None) -> str | None:
    """A credential file is relative to the config file's directory: it usually
    lives beside it, in the same Secret (no config file: the working directory)."""
    if not path:
        return path
    return os.path.normpath(os.path.join(check.base_dir, os.path.expanduser(path)))
