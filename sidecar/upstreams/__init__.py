"""Upstream GOPROXY servers: pools, timeouts, credentials, failure classes.

client.Upstream        accounting, status classes, redirects; picks a backend
base                   UpstreamResponse and the Backend interface
direct / pool / http1  the default client: HTTP/1.1 keep-alive on asyncio
fallback               aiohttp: outbound proxies, and the escape hatch
                       GOPROXY_SIDECAR_UPSTREAM_CLIENT=aiohttp
auth                   basic auth, netrc, HTTP(S)_PROXY
"""

from sidecar.upstreams.base import UpstreamResponse
from sidecar.upstreams.client import Upstream

__all__ = ["Upstream", "UpstreamResponse"]
