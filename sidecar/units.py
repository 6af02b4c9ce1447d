"""Durations and sizes as people write them in config files.

Durations follow Go's ``time.ParseDuration``: a sequence of decimal numbers,
each with a unit, such as ``800ms``, ``1.5s``, ``1h30m`` or ``250us``. Units:
``ns``, ``us`` (or ``µs``), ``ms``, ``s``, ``m``, ``h``. A bare number (an
int or float, or a string such as ``"5"``) means seconds.

Sizes are a decimal number with an optional unit, case-insensitive, with or
without a space: ``B``; decimal ``KB MB GB TB PB`` (powers of 1000, also
written ``k M G T P`` as in Kubernetes); binary ``KiB MiB GiB TiB PiB``
(powers of 1024, also written ``Ki Mi Gi Ti Pi``). A bare integer means bytes.
A fraction is allowed with a unit (``1.5GB``) and rounded down to whole bytes.

Negative, empty, non-finite or unreadable values raise ``ValueError``.
"""

from __future__ import annotations

import math
import re

__all__ = ["format_duration", "format_size", "parse_duration", "parse_size"]

# unit -> (multiplier, divisor): exact integers, so "800ms" is 800 / 1000.
_DURATION_UNITS: dict[str, tuple[int, int]] = {
    "ns": (1, 10**9),
    "us": (1, 10**6),
    "µs": (1, 10**6),  # U+00B5 micro sign
    "μs": (1, 10**6),  # U+03BC Greek mu
    "ms": (1, 10**3),
    "s": (1, 1),
    "m": (60, 1),
    "h": (3600, 1),
}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_BARE_NUMBER = re.compile(_NUMBER)
_DURATION_PART = re.compile(rf"({_NUMBER})([^\d.]+)")
_DURATION = re.compile(rf"(?:{_NUMBER}[^\d.]+)+")

_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    **{f"{p}": 1000**i for i, p in enumerate("kmgtp", start=1)},
    **{f"{p}b": 1000**i for i, p in enumerate("kmgtp", start=1)},
    **{f"{p}i": 1024**i for i, p in enumerate("kmgtp", start=1)},
    **{f"{p}ib": 1024**i for i, p in enumerate("kmgtp", start=1)},
}
_SIZE = re.compile(r"(\d+)(?:\.(\d+))?\s*([A-Za-z]*)")
_BINARY_NAMES = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def parse_duration(value: str | float) -> float:
    """Return ``value`` in seconds; see the module docstring for the syntax."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        return _non_negative_seconds(float(value), value)
    if not isinstance(value, str):
        raise ValueError(f"not a duration: {value!r}")
    text = value.strip().removeprefix("+")
    if not text:
        raise ValueError("empty duration")
    if text.startswith("-"):
        raise ValueError(f"negative duration: {value!r}")
    if _BARE_NUMBER.fullmatch(text):
        return float(text)
    if not _DURATION.fullmatch(text):
        raise ValueError(f"not a duration: {value!r} (write it like '800ms', '2m' or '1h30m')")
    return sum(_duration_part(num, unit, value) for num, unit in _DURATION_PART.findall(text))


def _duration_part(number: str, unit: str, whole: str) -> float:
    if unit not in _DURATION_UNITS:
        units = ", ".join(u for u in _DURATION_UNITS if u.isascii())
        raise ValueError(f"unknown unit {unit!r} in duration {whole!r} (use {units})")
    multiplier, divisor = _DURATION_UNITS[unit]
    return float(number) * multiplier / divisor


def _non_negative_seconds(seconds: float, original: object) -> float:
    if not math.isfinite(seconds):
        raise ValueError(f"not a finite duration: {original!r}")
    if seconds < 0:
        raise ValueError(f"negative duration: {original!r}")
    return seconds


def parse_size(value: str | float) -> int:
    """Return ``value`` in bytes; see the module docstring for the syntax.

    An int (or an integral float, as YAML may give) is a number of bytes.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"negative size: {value!r}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"not a size: {value!r}")
    text = value.strip()
    if text.startswith("-"):
        raise ValueError(f"negative size: {value!r}")
    match = _SIZE.fullmatch(text)
    if not match or match.group(3).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {value!r} (write it like '512MiB', '10GiB' or '1.5GB')")
    whole, fraction, unit = match.group(1), match.group(2) or "", match.group(3)
    multiplier = _SIZE_UNITS[unit.lower()]
    divisor: int = 10 ** len(fraction)
    size, remainder = divmod(int(whole + fraction) * multiplier, divisor)
    if remainder and multiplier == 1:
        raise ValueError(f"not a whole number of bytes: {value!r}")
    return size


def format_duration(seconds: float) -> str:
    """Render seconds the way :func:`parse_duration` reads them: ``1h30m``, ``800ms``."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds == 0:
        return "0s"
    if seconds < 1e-6:
        return f"{_trim(seconds * 1e9)}ns"
    if seconds < 1e-3:
        return f"{_trim(seconds * 1e6)}us"
    if seconds < 1:
        return f"{_trim(seconds * 1e3)}ms"
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else ""]
    parts.append(f"{_trim(millis / 1000)}s" if millis else "")
    return "".join(parts)


def format_size(size: int) -> str:
    """Render bytes with the largest binary unit that keeps the number >= 1: ``10GiB``."""
    if size < 0:
        return "-" + format_size(-size)
    exponent = 0
    while exponent + 1 < len(_BINARY_NAMES) and size >= 1024 ** (exponent + 1):
        exponent += 1
    if exponent == 0:
        return f"{size}B"
    return f"{_trim(size / 1024**exponent, 2)}{_BINARY_NAMES[exponent]}"


def _trim(number: float, places: int = 3) -> str:
    return f"{number:.{places}f}".rstrip("0").rstrip(".")
