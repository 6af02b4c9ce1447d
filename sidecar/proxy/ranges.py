"""Single byte ranges on cache hits (``Range: bytes=a-b``, ``a-``, ``-n``).

The go command never asks for ranges, but download managers and resuming
clients do. Anything this does not understand (several ranges, other units,
``If-Range``, which needs validators a hit does not have) is answered whole,
as RFC 9110 allows.
"""

from __future__ import annotations

from typing import Final

UNSATISFIABLE: Final = (-1, -1)


def content_range(part: tuple[int, int], size: int) -> str:
    """The ``Content-Range`` value answering ``part`` (206, or 416 if unsatisfiable)."""
    if part == UNSATISFIABLE:
        return f"bytes */{size}"
    return f"bytes {part[0]}-{part[1]}/{size}"


def byte_range(
    header: str | None, size: int, if_range: str | None = None
) -> tuple[int, int] | None:
    """(first, last) inclusive, UNSATISFIABLE, or None for the whole body."""
    if header is None or if_range is not None:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first_s, dash, last_s = spec.strip().partition("-")
    if not dash or not (first_s or last_s):
        return None
    if not all(part.isdigit() for part in (first_s, last_s) if part):
        return None
    if not first_s:  # the last n bytes
        n = int(last_s)
        if n == 0:
            return UNSATISFIABLE
        return max(0, size - n), size - 1
    first = int(first_s)
    if last_s and int(last_s) < first:
        return None  # invalid: ignored, the whole body
    if first >= size:
        return UNSATISFIABLE
    return first, min(int(last_s), size - 1) if last_s else size - 1
