"""The shipped policies pass OPA's own checks: `opa check --strict`, `opa fmt`, `opa test`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.tools import require_tool

POLICIES = Path(__file__).resolve().parents[2] / "policies"

pytestmark = pytest.mark.tool


def opa(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(require_tool("opa")), *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_opa_check_strict() -> None:
    result = opa("check", "--strict", str(POLICIES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_opa_fmt_has_nothing_to_change() -> None:
    result = opa("fmt", "--list", "--fail", str(POLICIES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "", f"not opa-fmt formatted: {result.stdout}"


def test_opa_test() -> None:
    result = opa("test", "--format", "pretty", "-v", str(POLICIES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout
    assert "test_table: PASS" in result.stdout


def test_opa_sees_the_thresholds_file_as_data() -> None:
    result = opa("eval", "--format", "raw", "--data", str(POLICIES), "data.sidecar.config")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        '{"breaker":{"cooldown_s":30,"probes":5},"thresholds":{"consecutive_failures":5,'
        '"consecutive_masked":10,"error_rate":0.05,"masked_failure_rate":0.5,"min_masked_failures":10,'
        '"min_requests":20,"min_span_s":10,"queue_for_s":20,"queue_wait_p99_ms":250,'
        '"recent_answers":10,"recent_failure_rate":0.5,"stall_hedged_ms":1000,"stall_hedges":3,"stall_ms":3000,"stall_requests":2,'
        '"ttfb_p99_for_s":120,"ttfb_p99_ms":800}}'
    )
