"""Loading regopy's native library before any other C++ code.

``librego_shared.so`` (regopy, every version up to 1.5.2) carries its own
allocator (snmalloc) and exports C++ ``operator new``/``delete``. If the C++
runtime (libstdc++) is already loaded when regopy is imported, as it is once
aiohttp has imported frozenlist's C++ extension, libstdc++ keeps glibc's
``new`` while code inlined into rego-cpp frees through snmalloc: memory
allocated by one and freed by the other never returns. Measured here: ~45 KB
of RSS kept per policy evaluation, for good (``del`` and ``malloc_trim`` do
not return it). Loaded first, libstdc++ binds to rego's operators and nothing
leaks (microsoft/rego-cpp#128 describes the same mismatch).
"""

from __future__ import annotations

from pathlib import Path

MAPS = Path("/proc/self/maps")


def mapped(name: str) -> bool:
    """True if a shared object whose path contains ``name`` is mapped in this process."""
    try:
        return name in MAPS.read_text()
    except OSError:  # not Linux: nothing to check
        return False


def load_regopy_first() -> bool:
    """Import regopy now; True if it came too late (the C++ runtime was already
    loaded by something else, so evaluations will leak)."""
    late = mapped("libstdc++") and not mapped("librego_shared")
    import regopy  # noqa: F401  (the import is the point)

    return late
