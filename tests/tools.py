"""Locate the external tools some tests need (built by scripts/tools.sh).

``require_tool("opa")`` returns the binary from the tools folder
(``$SIDECAR_TOOLS_DIR``, default ``~/.cache/goproxy-sidecar/bin``) or PATH.
When it is missing the test is skipped on a developer's machine and fails in
CI (``CI=true``), where a skipped test would hide a broken set-up.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest

# name -> the `go install` that scripts/tools.sh runs for it (for the message)
PINS = {
    "opa": "github.com/open-policy-agent/opa@v1.22.2",
    "toxiproxy-server": "github.com/Shopify/toxiproxy/v2/cmd/server@v2.5.0",
    "athens": "github.com/gomods/athens/cmd/proxy (not pinned yet)",
}

# name -> how to get a tool that scripts/tools.sh does not build (for the message)
ELSEWHERE = {
    "promtool": "run scripts/debian-deps.sh (Debian package prometheus)",
    "prometheus": "run scripts/debian-deps.sh (Debian package prometheus)",
    "nginx": "run scripts/debian-deps.sh (Debian package nginx-light)",
    "wrk": "run scripts/debian-deps.sh (Debian package wrk)",
    "chromium": "run scripts/debian-deps.sh (Debian package chromium)",
    "htpasswd": "run scripts/debian-deps.sh (Debian package apache2-utils)",
    "go": "install Go 1.26 (https://go.dev/doc/install)",
    "kustomize": "run scripts/tools.sh (go install sigs.k8s.io/kustomize/kustomize/v5@v5.5.0)",
}


def tools_dir() -> Path:
    configured = os.environ.get("SIDECAR_TOOLS_DIR")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "goproxy-sidecar" / "bin"


def find_tool(name: str) -> Path | None:
    candidate = tools_dir() / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which(name)
    return Path(found) if found else None


def require_tool(name: str) -> Path:
    """The tool's path; skip the test (fail it in CI) when it is not installed."""
    path = find_tool(name)
    if path is not None:
        return path
    how = PINS.get(name)
    message = f"{name} not found: run scripts/tools.sh"
    if how:
        message += f" (go install {how})"
    if name in ELSEWHERE:
        message = f"{name} not found: {ELSEWHERE[name]}"
    missing(message)


def in_ci() -> bool:
    """CI runs (``.ci/run`` sets ``CI=true``; runners set true, True or 1)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing(message: str) -> NoReturn:
    """A prerequisite is missing: skip on a developer's machine, fail in CI,
    where a skipped test would hide a broken set-up."""
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)
