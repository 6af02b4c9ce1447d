"""Upstream GOPROXY servers: pools, timeouts, credentials, failure classes.

client.Upstream    accounting, status classes, encodings, redirects
sender             one request on a pooled (or one-shot) connection
response           the answer handed out at headers; its body
pool               bounded keep-alive connections per upstream, deadlines
connect            DNS, Happy Eyeballs, CONNECT tunnels, TLS
http1              one HTTP/1.1 connection: strict framing, limits, flow control
route              origins, and how a connection reaches one (proxy or not)
addresses          address classes; where a redirect may lead
auth               basic auth, netrc, HTTP(S)_PROXY / NO_PROXY
admission          the per-upstream gate on connections
"""

from sidecar.upstreams.client import Upstream
from sidecar.upstreams.response import UpstreamResponse

__all__ = ["Upstream", "UpstreamResponse"]
