"""Which upstream response headers reach the client.

An allow-list rather than a hop-by-hop deny-list: a GOPROXY answer needs
only these, and nothing an upstream sets (cookies, auth challenges, proxy
headers) can leak through by accident.

Content-Encoding is not among them because no answer that carries one
(other than identity) gets this far: the upstream client asks for identity
and refuses anything else (``sidecar.upstreams.client``), so the bytes
served and cached are always the artifact itself.
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
