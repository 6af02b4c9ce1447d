"""The configuration is declared once (sidecar/config.py): validation, defaults,
overrides and the README's key tables all follow from that declaration."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import MISSING
from pathlib import Path

import pytest
import yaml

from sidecar.config import CacheConfig, Config
from sidecar.config_kinds import (
    Boolean,
    Check,
    Duration,
    Integer,
    Items,
    Section,
    Setting,
    Text,
    declared,
    section,
    setting,
)
from sidecar.config_loader import build
from sidecar.errors import ConfigErrors

README = Path(__file__).resolve().parents[2] / "README.md"


# ---------------------------------------------------------------- a section declared once


@section
class Gate:
    realm: str = setting(Text(), default="goproxy")
    retries: int = setting(Integer(1, 9), default=3)
    pause: float = setting(Duration(positive=True), default=0.5)


@section
class Door:
    name: str = setting(Text())
    open: bool = setting(Boolean(), default=False)

    def finish(self, check: Check) -> Door:
        if self.open and self.name == "vault":
            check.fail("the vault is never open", "open")
        return self


@section
class Root:
    cache: CacheConfig = setting(Section(CacheConfig))
    gate: Gate = setting(Section(Gate), default=Gate())
    doors: tuple[Door, ...] = setting(Items(Door, unique="name"), default=())


def errors(document: dict[str, object], env: dict[str, str] | None = None) -> dict[str, str]:
    with pytest.raises(ConfigErrors) as info:
        build(Root, document, "/", {"HOME": "/h", **(env or {})})
    return {error.key: error.message for error in info.value.errors}


def test_a_new_section_is_validated_from_its_declaration_alone() -> None:
    document = {
        "gate": {"retries": 12, "pause": "soon", "realm": 5, "retires": 2},
        "doors": [{"name": "a"}, {"name": "a", "open": "yes"}, {"name": "vault", "open": True}],
    }
    assert errors(document) == {
        "gate.retires": "unknown key (did you mean 'retries'?)",
        "gate.realm": "expected a non-empty string, got 5",
        "gate.retries": "expected an integer from 1 to 9, got 12",
        "gate.pause": "expected a duration like '800ms' or '2m', got 'soon'",
        "doors[1].open": "expected true or false, got 'yes'",
        "doors[1].name": "duplicate name 'a' (also doors[0])",
        "doors[2].open": "the vault is never open",
    }
    assert errors({"gate": [], "doors": [{}], "colour": 1}) == {
        "colour": "unknown key",
        "gate": "expected a mapping, got a list",
        "doors[0].name": "required",
    }


def test_its_defaults_come_from_the_same_declaration() -> None:
    root = build(Root, {}, "/", {"HOME": "/h"})
    assert root.gate == Gate() == Gate(realm="goproxy", retries=3, pause=0.5)
    assert root.doors == ()
    assert root.cache == CacheConfig(dir="/h/.cache/goproxy-sidecar")  # a real section's finish
    partial = build(Root, {"gate": {"retries": 5}}, "/", {"HOME": "/h"})
    assert partial.gate == Gate(retries=5)


def test_its_keys_take_environment_overrides_naming_the_variable() -> None:
    env = {"HOME": "/h", "SIDECAR_GATE_PAUSE": "2s", "SIDECAR_DOORS_0_OPEN": "true"}
    root = build(Root, {"doors": [{"name": "a"}]}, "/", env)
    assert (root.gate.pause, root.doors[0].open) == (2.0, True)
    assert errors({}, {"SIDECAR_GATE_RETRIES": "10"}) == {
        "gate.retries": "expected an integer from 1 to 9, got 10 (set by SIDECAR_GATE_RETRIES)"
    }
    assert errors({}, {"SIDECAR_GATE_PAWS": "1s"}) == {
        "SIDECAR_GATE_PAWS": "no such configuration key (did you mean SIDECAR_GATE_PAUSE?)"
    }


# ---------------------------------------------------------------- the README's tables


def keys(cls: type[object], prefix: str = "") -> Iterator[tuple[str, Setting]]:
    """Every declared key: ``upstreams[].pool.max_connections``; sections and lists too."""
    for name, s in declared(cls):
        yield prefix + name, s
        if isinstance(s.kind, Section):
            yield from keys(s.kind.cls, f"{prefix}{name}.")
        elif isinstance(s.kind, Items):
            yield from keys(s.kind.cls, f"{prefix}{name}[].")


def readme_rows() -> dict[str, str]:
    """{full key: default cell} of the tables under 'Configuration reference' / 'Keys'."""
    text = README.read_text(encoding="utf-8")
    block = text.split("\n### Keys\n", 1)[1].split("\n### ", 1)[0]
    rows: dict[str, str] = {}
    prefix = ""
    for line in block.splitlines():
        heading = re.fullmatch(r"(?:Each entry of )?`([\w.]+)`:", line)
        if line == "Top level:" or heading:
            prefix = (
                "" if heading is None else heading.group(1) + ("[]." if "Each" in line else ".")
            )
        elif line.startswith("| `"):
            cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip("|"))]
            rows[prefix + cells[0].strip("`")] = cells[2]
    return rows


def test_every_declared_key_is_in_the_readme_and_no_other() -> None:
    declared_keys = dict(keys(Config))
    leaves = {k for k, s in declared_keys.items() if not isinstance(s.kind, Section | Items)}
    documented = set(readme_rows())
    assert leaves - documented == set(), "declared but missing from the README's tables"
    assert documented - set(declared_keys) == set(), "in the README but not declared"


# Defaults computed at load time: the README says where they come from.
_FROM_THE_ENVIRONMENT = {"cache.dir", "verify.key"}


def test_the_readme_defaults_are_the_declared_ones() -> None:
    declared_keys = dict(keys(Config))
    checked = 0
    for key, cell in readme_rows().items():
        s = declared_keys[key]
        token = re.match(r"`([^`]*)`", cell)
        structural = isinstance(s.kind, Section | Items)
        if token is None or key in _FROM_THE_ENVIRONMENT or s.fallback is MISSING or structural:
            continue  # *required*, "none: ...", "every upstream", sections
        raw = token.group(1)
        value = yaml.safe_load(raw) if s.kind.env == "scalar" or raw == "[]" else raw
        assert s.kind.convert(value) == s.fallback, key
        checked += 1
    assert checked >= 30
