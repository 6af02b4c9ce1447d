"""Which upstream response headers reach the client.

An allow-list rather than a hop-by-hop deny-list: a GOPROXY answer needs
only these, and nothing an upstream sets (cookies, auth challenges, proxy
headers) can leak through by accident.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from multidict import CIMultiDict

PASSED: Final = ("Content-Type", "Content-Length", "ETag", "Last-Modified", "Cache-Control")
SOURCE_HEADER: Final = "X-Sidecar-Upstream"
STALE_HEADER: Final = "X-Sidecar-Stale"


def response_headers(upstream_headers: Mapping[str, str], source: str) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name in PASSED:
        value = upstream_headers.get(name)
        if value is not None:
            out[name] = value
    out[SOURCE_HEADER] = source
    return out
