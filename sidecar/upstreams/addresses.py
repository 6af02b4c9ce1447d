"""Address classes, and which of them a redirect may lead to.

A GOPROXY upstream that answers with a redirect chooses where the sidecar
connects next. Followed blindly, ``Location: http://169.254.169.254/...``
fetches the cloud metadata service from inside the pod, and whatever it
answers is kept under a module's key. So a redirect to another origin may
only reach *public* addresses, plus the classes the upstream itself lives
in: an upstream on loopback (Athens beside the sidecar) may send it to
another loopback port, one on a private network to another private
address, but neither to link-local or any other internal class.

The check is made on addresses, not names: the target's name is resolved,
addresses of a refused class are dropped before any packet is sent, and
the address actually connected to is checked again (``getpeername``), so
a name that resolves to an internal address (DNS rebinding included) is
refused like the literal address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Final

IP = ipaddress.IPv4Address | ipaddress.IPv6Address

PUBLIC: Final = "public"
# Ranges Python's ``is_global`` calls global but a redirect must not reach.
_V4_COMPATIBLE: Final = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d
_NAT64: Final = ipaddress.ip_network("64:ff9b::/96")  # embeds the IPv4 it translates to
_CLASSES: Final = (
    ("loopback", ("127.0.0.0/8", "::1/128")),
    ("unspecified", ("0.0.0.0/8", "::/128")),
    ("link-local", ("169.254.0.0/16", "fe80::/10")),
    ("private", ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7", "fec0::/10")),
    ("shared", ("100.64.0.0/10",)),
    ("multicast", ("224.0.0.0/4", "ff00::/8")),
)
_NETWORKS: Final = tuple(
    (name, ipaddress.ip_network(net)) for name, nets in _CLASSES for net in nets
)
_LOCALHOST_NAMES: Final = ("localhost", ".localhost")


def address_class(ip: IP) -> str:
    """``public``, or the internal class of ``ip`` (loopback, private, ...)."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return address_class(embedded)
    for name, network in _NETWORKS:
        if ip in network:
            return name
    if ip.version == 6 and ip in _V4_COMPATIBLE:
        return "reserved"
    return PUBLIC if ip.is_global else "reserved"


def host_class(host: str) -> str | None:
    """The class of a host that is an IP literal or ``localhost`` (RFC 6761);
    None for any other name (its addresses decide)."""
    try:
        return address_class(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        lowered = host.lower().rstrip(".")
        if lowered == _LOCALHOST_NAMES[0] or lowered.endswith(_LOCALHOST_NAMES[1]):
            return "loopback"
        return None


class RedirectGuard:
    """Which address classes an off-origin redirect may connect to."""

    __slots__ = ("allowed",)

    def __init__(self, upstream_classes: Iterable[str]) -> None:
        self.allowed = frozenset({PUBLIC, *upstream_classes})

    def __repr__(self) -> str:
        return f"RedirectGuard({sorted(self.allowed)})"

    def refused(self, address: str) -> str | None:
        """The class of ``address`` if a redirect may not go there, else None."""
        kind = address_class(ipaddress.ip_address(address.split("%", 1)[0]))
        return None if kind in self.allowed else kind

    def refused_host(self, host: str) -> str | None:
        """Like ``refused`` for a literal or ``localhost``; None for other names."""
        kind = host_class(host)
        return None if kind is None or kind in self.allowed else kind
