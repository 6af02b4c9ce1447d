"""Where a request goes (``Origin``) and how a connection gets there (``Route``).

A route is straight to the origin, or through an outbound HTTP proxy
(``HTTP_PROXY`` / ``HTTPS_PROXY``, see ``auth.outbound_proxy_for``):

- an http origin through a proxy is *forwarded*: the connection goes to the
  proxy and every request names its absolute URL (``GET http://host/path``)
  with ``Proxy-Authorization``;
- an https origin through a proxy is *tunnelled*: the connection goes to the
  proxy, one ``CONNECT host:443`` turns it into a byte pipe, and TLS to the
  origin (SNI and verification for the origin's name) runs inside it. The
  proxy sees neither the requests nor the credentials sent to the origin.

Either way the connection carries requests to one origin and is pooled like
a direct one.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlsplit

DEFAULT_PORTS: Final = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class Origin:
    """scheme://host:port (credentials never kept here)."""

    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: str) -> Origin:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {scheme}://{parts.hostname or ''}")
        return cls(scheme, parts.hostname, parts.port or DEFAULT_PORTS[scheme])

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def literal(self) -> int:
        """The address family if ``host`` is an IP literal, else 0."""
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            return 0
        return socket.AF_INET6 if ip.version == 6 else socket.AF_INET

    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    def authority(self) -> str:
        """host:port with the port always present (a CONNECT target)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def url_prefix(self) -> str:
        """scheme://host[:port], the start of an absolute-form request target."""
        return f"{self.scheme}://{self.host_header()}"


@dataclass(frozen=True, slots=True)
class Route:
    """How connections to ``origin`` are made: straight, or through ``proxy``."""

    origin: Origin
    proxy: Origin | None = None
    proxy_authorization: str | None = field(default=None, repr=False)

    @property
    def hop(self) -> Origin:
        """Where the TCP connection goes."""
        return self.proxy if self.proxy is not None else self.origin

    @property
    def forward(self) -> bool:
        """Requests go to the proxy in absolute form."""
        return self.proxy is not None and not self.origin.tls

    @property
    def tunnel(self) -> bool:
        """The connection is a CONNECT tunnel through the proxy."""
        return self.proxy is not None and self.origin.tls
