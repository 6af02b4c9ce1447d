"""HTML building blocks of the status page: escaping, lists, times, safe URLs."""

from __future__ import annotations

import time
from collections.abc import Iterable
from html import escape
from typing import Final
from urllib.parse import urlsplit

NO_DATA: Final = "-"  # nothing measured yet: no evaluation has seen it


def e(value: object) -> str:
    """Escaped for text and attribute values alike."""
    return escape(str(value), quote=True)


def safe_url(url: str) -> str:
    """``url`` without userinfo, query or fragment: nothing secret can show."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def codes(values: Iterable[object]) -> str:
    return " ".join(f"<code>{e(v)}</code>" for v in values)


def dl(items: list[tuple[str, str]], escaped: bool = False) -> str:
    body = "".join(f"<dt>{e(k)}</dt><dd>{v if escaped else e(v)}</dd>" for k, v in items)
    return f"<dl>{body}</dl>"


def clock(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def age(seconds: float) -> str:
    s = int(max(0.0, seconds))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"
