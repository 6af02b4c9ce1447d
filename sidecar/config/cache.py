"""``cache``: where fetched modules are kept on disk, and how many bytes of them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace

from sidecar.config_kinds import Boolean, Check, Duration, Rate, Size, Text, section, setting

DEFAULT_CACHE_MAX_BYTES = 10 * 1024**3
DEFAULT_MUTABLE_TTL_S = 60.0
DEFAULT_CACHE_SCRUB_RATE = 8 * 1024**2  # bytes/s: ~1 % of a core hashing, a trickle of disk reads
CACHE_DIR_NAME = "goproxy-sidecar"


@section
class CacheConfig:
    # Relative to the working directory: a config file often sits in a read-only ConfigMap.
    dir: str = setting(Text(), absent="")
    max_bytes: int = setting(Size(), default=DEFAULT_CACHE_MAX_BYTES)
    mutable_ttl: float = setting(Duration(positive=False), default=DEFAULT_MUTABLE_TTL_S)
    enabled: bool = setting(Boolean(), default=True)
    # bytes/s the background scrub may read; 0: off
    scrub_rate: int = setting(Rate(), default=DEFAULT_CACHE_SCRUB_RATE)

    def finish(self, check: Check) -> CacheConfig:
        directory = self.dir or default_cache_dir(check.env)
        return replace(self, dir=os.path.abspath(os.path.expanduser(directory)))


def default_cache_dir(env: Mapping[str, str]) -> str:
    """``$XDG_CACHE_HOME/goproxy-sidecar``, else ``~/.cache/goproxy-sidecar``."""
    xdg = env.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec says to ignore a relative value
        return os.path.join(xdg, CACHE_DIR_NAME)
    home = env.get("HOME") or os.path.expanduser("~")
    return os.path.join(home, ".cache", CACHE_DIR_NAME)
