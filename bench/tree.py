"""The GOPROXY tree the upstream serves, and the request paths of every case.

Files on disk: 1,000 static modules with ``.info`` (~100 B), ``.mod``
(~200 B) and ``@v/list``, plus two modules whose ``v1.0.0.zip`` is 1 MiB and
50 MiB of random bytes. Unique small paths are *not* files: the upstream
nginx answers every ``.info`` under ``UNIQUE_PREFIX`` from its config, so a
unique-URL test never measures the upstream's file opens (PERF-NOTES).
Any version of a zip module maps to the same file, so a case can ask for a
fresh (never cached) version and still get the real bytes.

Every path is a valid GOPROXY request: module path whose first element has a
dot, lower-case (nothing to case-encode), canonical semver.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

MIB = 1024 * 1024
DOMAIN = "example.com"
STATIC_MODULES = 1000  # small-hit cycles over all of them
UNIQUE_PREFIX = f"/{DOMAIN}/bench/u/"
VERSION = "v1.0.0"
TIME = "2024-01-01T00:00:00Z"
HASH = "0123456789abcdef0123456789abcdef01234567"


@dataclass(frozen=True, slots=True)
class ZipModule:
    name: str  # "zip1m"
    size: int

    @property
    def module(self) -> str:
        return f"{DOMAIN}/bench/{self.name}"

    def path(self, version: str = VERSION) -> str:
        return f"/{self.module}/@v/{version}.zip"


ZIP1M = ZipModule("zip1m", 1 * MIB)
ZIP50M = ZipModule("zip50m", 50 * MIB)
ZIPS = (ZIP1M, ZIP50M)


def info_body(version: str = VERSION) -> bytes:
    """A ~100 byte ``.info`` like proxy.golang.org's (Version, Time, Origin)."""
    doc = {"Version": version, "Time": TIME, "Origin": {"VCS": "git", "Hash": HASH[:16]}}
    return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


def mod_body(module: str) -> bytes:
    """A ~200 byte ``go.mod``."""
    return (
        f"module {module}\n\ngo 1.22\n\nrequire (\n"
        "\tgolang.org/x/mod v0.17.0\n\tgolang.org/x/sync v0.7.0\n"
        "\tgolang.org/x/text v0.15.0\n)\n"
    ).encode()


def static_module(i: int) -> str:
    return f"{DOMAIN}/bench/static/m{i}"


def static_info_path(i: int = 0) -> str:
    return f"/{static_module(i)}/@v/{VERSION}.info"


STATIC_INFO_PATTERN = static_info_path(0).replace("/m0/", "/m%d/")  # for wrk's string.format


def unique_info_prefix(nonce: str) -> str:
    """Prefix of unique ``.info`` paths of one run; the wrk script appends ``m<n>/@v/...``."""
    return f"{UNIQUE_PREFIX}r{nonce}"


def build_tree(root: Path) -> dict[str, int]:
    """Write the tree under ``root``; return {path: size} of what a case asks for."""
    sizes: dict[str, int] = {}
    for i in range(STATIC_MODULES):
        base = root / static_module(i) / "@v"
        base.mkdir(parents=True, exist_ok=True)
        info = info_body()
        (base / f"{VERSION}.info").write_bytes(info)
        (base / f"{VERSION}.mod").write_bytes(mod_body(static_module(i)))
        (base / "list").write_bytes(f"{VERSION}\n".encode())
        sizes[static_info_path(i)] = len(info)
    for z in ZIPS:
        base = root / z.module / "@v"
        base.mkdir(parents=True, exist_ok=True)
        (base / f"{VERSION}.info").write_bytes(info_body())
        (base / f"{VERSION}.mod").write_bytes(mod_body(z.module))
        _random_file(base / f"{VERSION}.zip", z.size)
        sizes[z.path()] = z.size
    sizes[UNIQUE_PREFIX] = len(info_body())
    return sizes


def _random_file(path: Path, size: int) -> None:
    chunk = 4 * MIB
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n
