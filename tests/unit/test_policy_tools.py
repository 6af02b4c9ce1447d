"""tests/tools.py: find a pinned tool, or skip (fail in CI) with the way to get it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.tools import find_tool, require_tool, tools_dir

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "tools.sh"


def test_tools_dir_default_and_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SIDECAR_TOOLS_DIR", raising=False)
    assert tools_dir() == Path.home() / ".cache" / "goproxy-sidecar" / "bin"
    monkeypatch.setenv("SIDECAR_TOOLS_DIR", str(tmp_path))
    assert tools_dir() == tmp_path


def test_tools_dir_comes_before_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tool = tmp_path / "opa"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv("SIDECAR_TOOLS_DIR", str(tmp_path))
    assert find_tool("opa") == tool
    assert require_tool("opa") == tool


def test_missing_tool_skips_with_the_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SIDECAR_TOOLS_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception) as caught:
        require_tool("opa")
    assert str(caught.value) == (
        "opa not found: run scripts/tools.sh (go install github.com/open-policy-agent/opa@v1.22.2)"
    )


@pytest.mark.parametrize("value", ["true", "True", "1"])
def test_every_ci_spelling_fails_instead_of_skipping(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str
) -> None:
    monkeypatch.setenv("SIDECAR_TOOLS_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match="opa not found"):
        require_tool("opa")


def test_missing_tool_fails_in_ci(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SIDECAR_TOOLS_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="opa not found"):
        require_tool("opa")


def test_tools_script_without_go_only_warns(tmp_path: Path) -> None:
    # A PATH holding every command of /usr/bin and /bin except go, wherever go lives.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for folder in (Path("/usr/bin"), Path("/bin")):
        for command in folder.iterdir():
            link = bin_dir / command.name
            if command.name != "go" and not link.exists():
                link.symlink_to(command)
    env = {**os.environ, "PATH": str(bin_dir), "SIDECAR_TOOLS_DIR": str(tmp_path / "tools")}
    result = subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "no Go toolchain" in result.stderr
