"""glibc's malloc tuned by the process itself, so the process a user starts is
the one that was benchmarked (no ``MALLOC_*`` environment to remember).

Why each value (PERF-NOTES, bench/run.py on this machine kind):
- top pad 16 MiB, trim threshold 64 MiB, mmap threshold 4 MiB: with glibc's
  defaults, every freed ~256 KiB body buffer makes it shrink and regrow the
  heap (~1,400 ``brk()``/s and ~200 k page faults/s while zips stream): zip
  throughput roughly halves. The trim threshold alone made it worse: all three.
- at most 2 arenas: worker threads (cache reads and writes) each get an arena
  by default, and each arena keeps its own freed buffers.
Measured back to back (``bench/run.py --quick --cases zip50m-hit
rss-200x50m``, the same values as ``MALLOC_*`` variables or none, load
average 2.8): a 50 MiB cache hit cost 48 ms of CPU tuned, 69 ms untuned
(0.71x against 0.63x nginx ``proxy_cache``); peak RSS of 200 concurrent
cold-cache 50 MiB downloads 89 MB tuned, 114 MB untuned (cache off: 108
and 106 MB, no difference).

A value the operator set in the environment (``MALLOC_TOP_PAD_`` and
friends, or ``GLIBC_TUNABLES=glibc.malloc.*``) is left as they set it.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

log = logging.getLogger("sidecar.heap")

MIB: Final = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Setting:
    param: int  # mallopt's M_* constant (glibc's malloc.h)
    value: int
    env: str  # the environment variable glibc reads for it
    tunable: str  # its name in GLIBC_TUNABLES


SETTINGS: Final = (
    Setting(-2, 16 * MIB, "MALLOC_TOP_PAD_", "glibc.malloc.top_pad"),
    Setting(-1, 64 * MIB, "MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold"),
    Setting(-3, 4 * MIB, "MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold"),
    Setting(-8, 2, "MALLOC_ARENA_MAX", "glibc.malloc.arena_max"),
)


def glibc() -> ctypes.CDLL | None:
    """This process's C library if it is glibc (musl and others have no mallopt)."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (glibc's own symbol: the test)
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def operator_set(setting: Setting, environ: Mapping[str, str]) -> bool:
    if setting.env in environ:
        return True
    tunables = environ.get("GLIBC_TUNABLES", "")
    return any(item.split("=", 1)[0] == setting.tunable for item in tunables.split(":"))


def tune_malloc(environ: Mapping[str, str] = os.environ) -> dict[str, int]:
    """Apply ``SETTINGS`` through mallopt; returns what was applied, by env name."""
    libc = glibc()
    if libc is None:
        log.debug("heap: not glibc, malloc left as it is")
        return {}
    applied: dict[str, int] = {}
    for s in SETTINGS:
        if operator_set(s, environ):
            continue
        if libc.mallopt(ctypes.c_int(s.param), ctypes.c_int(s.value)) == 1:
            applied[s.env] = s.value
        else:
            log.warning("heap: mallopt refused a setting", extra={"setting": s.env})
    log.debug("heap: malloc tuned", extra={"applied": applied})
    return applied
