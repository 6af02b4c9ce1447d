"""The verify: section and the go command's variables it reads (issue 15)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import VerifyMode, WhenUnavailable
from sidecar.config_loader import load_config
from sidecar.errors import ConfigErrors
from sidecar.sumdb.gosumdb import SUM_GOLANG_ORG_KEY

BASE = 'listen: "127.0.0.1:3001"\nupstreams: [{name: a, url: "http://127.0.0.1:1"}]\n'
KEY = "sumdb.test.localhost+3ade216d+AebEkg+YjF1Rjyo005JnD534X5wa/rOMrsa/cddakwGO"


def load(tmp_path: Path, extra: str, env: dict[str, str] | None = None) -> object:
    path = tmp_path / "sidecar.yaml"
    path.write_text(BASE + extra)
    return load_config(str(path), env={} if env is None else env)


@pytest.mark.parametrize("text", ["verify: {mode: off}", 'verify: {mode: "off"}'])
def test_mode_off_quoted_or_not(tmp_path: Path, text: str) -> None:
    """YAML 1.1 reads an unquoted off as false; the loader takes it as written."""
    assert load(tmp_path, text).verify.mode is VerifyMode.OFF  # type: ignore[attr-defined]


def test_defaults_and_the_go_commands_variables(tmp_path: Path) -> None:
    verify = load(tmp_path, "").verify  # type: ignore[attr-defined]
    assert (verify.mode, verify.key, verify.url, verify.skip) == (
        VerifyMode.ENFORCE,
        SUM_GOLANG_ORG_KEY,
        None,
        (),
    )
    assert verify.unavailable is WhenUnavailable.SERVE
    env = {"GOSUMDB": f"{KEY} http://127.0.0.1:9", "GONOSUMDB": "corp.example, x.test/*"}
    verify = load(tmp_path, "verify: {skip: [corp.example]}", env).verify  # type: ignore[attr-defined]
    assert (verify.key, verify.url, verify.name) == (KEY, "http://127.0.0.1:9", KEY.split("+")[0])
    assert verify.skip == ("corp.example", "x.test/*")
    off = load(tmp_path, "", {"GOSUMDB": "off"}).verify  # type: ignore[attr-defined]
    assert off.mode is VerifyMode.OFF


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("verify: {mode: sometimes}", "verify.mode"),
        ("verify: {key: not-a-key}", "verify.key"),
        ("verify: {key: off}", "verify.key"),
        ("verify: {unavailable: maybe}", "verify.unavailable"),
        ('verify: {skip: ["[bad"]}', "verify.skip[0]"),
        ('verify: {url: "ftp://x"}', "verify.url"),
    ],
)
def test_bad_values_name_their_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigErrors) as info:
        load(tmp_path, text)
    assert key in {error.key for error in info.value.errors}, info.value
