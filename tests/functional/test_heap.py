"""The sidecar tunes glibc's malloc itself (sidecar.heap): the process a user
starts with ``goproxy-sidecar run`` has the settings the benchmarks measured.

The effect is shown in a real Python process (arenas counted by glibc's own
``malloc_info``, the trim threshold through ``mallinfo2``), and the run
command is shown to apply it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.heap import SETTINGS, glibc, operator_set
from tests.functional.test_cli import free_port, start_sidecar, write_config
from tests.tools import missing


@pytest.fixture(autouse=True)
def _glibc() -> None:
    if glibc() is None:
        missing("malloc tuning exists for glibc only, and this C library is not glibc")


# Run in a fresh interpreter: 6 threads allocate at once (each thread's first
# malloc takes an arena of its own while there may be more), then glibc
# reports its arenas; 40 blocks of 1 MiB are freed and mallinfo2 says how much
# of the heap's top stayed (glibc's default trims it, or mmaps such blocks).
PROBE = r"""
import ctypes, json, sys, tempfile, threading
from sidecar.heap import tune_malloc
applied = tune_malloc() if sys.argv[1] == "tuned" else {}
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
barrier = threading.Barrier(6)
def work():
    barrier.wait()
    blocks = [libc.malloc(64 * 1024) for _ in range(50)]
    barrier.wait()
    for b in blocks:
        libc.free(b)
threads = [threading.Thread(target=work) for _ in range(6)]
for t in threads: t.start()
for t in threads: t.join()
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
with tempfile.NamedTemporaryFile(suffix=".xml") as f:
    fp = libc.fopen(f.name.encode(), b"w")
    libc.malloc_info(0, fp)
    libc.fclose(fp)
    arenas = open(f.name).read().count("<heap nr=")
class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
        ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
         "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Mallinfo2
big = [libc.malloc(1024 * 1024) for _ in range(40)]
for b in reversed(big):
    libc.free(b)
kept = libc.mallinfo2().keepcost
print(json.dumps({"applied": applied, "arenas": arenas, "kept_top": kept}))
"""


def probe(mode: str, env: dict[str, str] | None = None) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUN"))}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **(env or {})},
        cwd=Path(__file__).resolve().parents[2],
        check=True,
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_tuning_caps_arenas_and_keeps_the_heap_top() -> None:
    untuned, tuned = probe("untuned"), probe("tuned")
    assert tuned["applied"] == {s.env: s.value for s in SETTINGS if not operator_set(s, os.environ)}
    assert isinstance(untuned["arenas"], int) and isinstance(tuned["arenas"], int)
    assert untuned["arenas"] >= 4, untuned  # one per thread (and main) by default
    assert tuned["arenas"] <= 2, tuned
    # 40 MiB freed at the top stay (under the 64 MiB trim threshold) when tuned;
    # glibc's defaults mmap 1 MiB blocks or trim them away.
    assert isinstance(tuned["kept_top"], int) and tuned["kept_top"] >= 40 * 1024 * 1024
    assert isinstance(untuned["kept_top"], int) and untuned["kept_top"] < 8 * 1024 * 1024


def test_a_value_the_operator_set_is_left_alone() -> None:
    result = probe("tuned", {"MALLOC_ARENA_MAX": "8", "GLIBC_TUNABLES": "glibc.malloc.top_pad=0"})
    applied = result["applied"]
    assert isinstance(applied, dict)
    assert set(applied) == {"MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"}
    assert isinstance(result["arenas"], int) and result["arenas"] >= 4


def test_operator_set_reads_env_and_tunables() -> None:
    arena = next(s for s in SETTINGS if s.env == "MALLOC_ARENA_MAX")
    assert operator_set(arena, {"MALLOC_ARENA_MAX": "1"})
    tunables = "glibc.malloc.tcache_count=0:glibc.malloc.arena_max=1"
    assert operator_set(arena, {"GLIBC_TUNABLES": tunables})
    assert not operator_set(arena, {"GLIBC_TUNABLES": "glibc.malloc.arena_test=1"})
    assert not operator_set(arena, {})


async def test_the_run_command_tunes_malloc(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path, "http://127.0.0.1:9", port)
    proc = await start_sidecar(["run", "--config", str(cfg), "--log-level", "debug"], port)
    proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    events = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    [tuned] = [e for e in events if e["event"] == "heap: malloc tuned"]
    assert tuned["applied"] == {s.env: s.value for s in SETTINGS if not operator_set(s, os.environ)}
