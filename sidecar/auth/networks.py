"""Trusted client networks: addresses that need no credential.

The answer for an address is memoised (bounded, cleared when full like the
router's): a build's requests come from a handful of addresses, and walking
the networks costs more than the dictionary.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Final

from sidecar.errors import ConfigError

MEMO_LIMIT: Final = 4096
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedNetworks:
    def __init__(self, cidrs: Sequence[str], key: str = "client_auth.trusted_networks") -> None:
        self.networks = tuple(parse_network(c, f"{key}[{i}]") for i, c in enumerate(cidrs))
        self._memo: dict[str, Network | None] = {}

    def __bool__(self) -> bool:
        return bool(self.networks)

    def of(self, address: str) -> Network | None:
        """The trusted network ``address`` is in, if any."""
        if not self.networks:
            return None
        try:
            return self._memo[address]
        except KeyError:
            pass
        if len(self._memo) >= MEMO_LIMIT:
            self._memo.clear()  # bounded: many addresses cannot grow it
        found = self._memo[address] = self._find(address)
        return found

    def _find(self, address: str) -> Network | None:
        try:
            ip = ipaddress.ip_address(address.partition("%")[0])
        except ValueError:
            return None  # not an IP (a Unix socket): never trusted
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # a dual-stack socket reports IPv4 clients so
        return next((n for n in self.networks if ip in n), None)


def parse_network(cidr: str, key: str) -> Network:
    try:
        return ipaddress.ip_network(cidr, strict=True)
    except ValueError as exc:
        raise ConfigError(key, f"not a network in CIDR form: {cidr!r} ({exc})") from exc
