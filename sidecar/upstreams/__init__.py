"""Upstream GOPROXY servers: pools, timeouts, credentials, failure classes."""

from sidecar.upstreams.client import Upstream, UpstreamResponse

__all__ = ["Upstream", "UpstreamResponse"]
