"""A failure limiter per client address, in bounded memory.

Each address has a fixed window: its first failure opens it, each failure
counts, and at ``max_failures`` the address is refused (429, ``Retry-After``
= the rest of the window) until the window ends. Only failures that cost a
credential check count; a success does not reset the count (one valid
account must not buy an attacker unlimited guesses at the others).

The table holds at most ``capacity`` addresses, least recently failed first
out: a flood from many addresses costs a fixed amount of memory, and what it
evicts is the oldest record, not the newest. IPv6 clients are counted per
/64, the smallest block one host is usually given.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from sidecar.config import ThrottleConfig

IPV6_BLOCK: Final = 64


@dataclass(slots=True)
class _Record:
    opened: float
    failures: int


class Throttle:
    def __init__(self, cfg: ThrottleConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = cfg.max_failures
        self.window = cfg.window
        self.capacity = cfg.table_size
        self._clock = clock
        self._table: OrderedDict[str, _Record] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._table)

    def retry_after(self, address: str) -> int:
        """Seconds until ``address`` may try again; 0 if it may now."""
        key = client_key(address)
        record = self._table.get(key)
        if record is None:
            return 0
        left = record.opened + self.window - self._clock()
        if left <= 0:
            del self._table[key]
            return 0
        return math.ceil(left) if record.failures >= self.max_failures else 0

    def failed(self, address: str) -> bool:
        """Count a failure; True if it is the one that starts a refusal."""
        key = client_key(address)
        now = self._clock()
        record = self._table.pop(key, None)
        if record is None or record.opened + self.window <= now:
            record = _Record(now, 0)
        record.failures += 1
        self._table[key] = record  # to the end: the most recent
        while len(self._table) > self.capacity:
            self._table.popitem(last=False)
            self.evicted += 1
        return record.failures == self.max_failures


def client_key(address: str) -> str:
    """The address counted: itself, or its /64 for IPv6 (an IPv4-mapped one as IPv4)."""
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address.partition("%")[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, IPV6_BLOCK), strict=False))
