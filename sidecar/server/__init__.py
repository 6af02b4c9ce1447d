"""The HTTP/1.1 server in front of the proxy handler and the endpoints."""

from sidecar.server.exchange import Exchange
from sidecar.server.listener import Server

__all__ = ["Exchange", "Server"]
