"""An in-memory transparency log for the unit tests, built from RFC 6962's
definitions and NOT from sidecar.sumdb.tlog, so the two check each other.

- the root is MTH (RFC 6962 2.1), computed by recursion over the leaves;
- the hash of level L, number n is the MTH of leaves [n*2^L, (n+1)*2^L);
- the stored order is the order in which a log appends hashes: leaf i, then
  the hash of every subtree that leaf i completes, lowest level first;
- a tile (H, L, N, W) is the W hashes of level L*H starting at N*2^H.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from sidecar.sumdb.tile import Tile


def leaf(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def mth(leaves: list[bytes]) -> bytes:
    """Merkle Tree Hash of leaf hashes (RFC 6962 2.1)."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return node(mth(leaves[:k]), mth(leaves[k:]))


@dataclass
class Log:
    leaves: list[bytes] = field(default_factory=list)

    @classmethod
    def of(cls, n: int) -> Log:
        return cls([leaf(b"leaf %d\n" % i) for i in range(n)])

    @property
    def size(self) -> int:
        return len(self.leaves)

    def root(self, n: int | None = None) -> bytes:
        return mth(self.leaves[: self.size if n is None else n])

    def level_hash(self, level: int, n: int) -> bytes:
        return mth(self.leaves[n << level : (n + 1) << level])

    def stored_order(self) -> list[tuple[int, int]]:
        """(level, n) of every stored hash, in the order the log appends them."""
        order = []
        for i in range(self.size):
            order.append((0, i))
            level = 1
            while (i + 1) % (1 << level) == 0:
                order.append((level, ((i + 1) >> level) - 1))
                level += 1
        return order

    def stored_hashes(self) -> list[bytes]:
        return [self.level_hash(level, n) for level, n in self.stored_order()]

    def tile_data(self, tile: Tile) -> bytes:
        level = tile.l * tile.h
        start = tile.n << tile.h
        return b"".join(self.level_hash(level, start + i) for i in range(tile.w))

    def tiles(self, h: int) -> dict[Tile, bytes]:
        """Every full tile, and the partial tile at the right edge of each level."""
        out = {}
        level = 0
        while self.size >> (level * h) > 0:
            count = self.size >> (level * h)  # complete subtrees at level*h
            for n in range(count >> h):
                tile = Tile(h, level, n, 1 << h)
                out[tile] = self.tile_data(tile)
            if count % (1 << h):
                tile = Tile(h, level, count >> h, count % (1 << h))
                out[tile] = self.tile_data(tile)
            level += 1
        return out


class StoredHashes:
    """A HashReader over a list of stored hashes (the stored order)."""

    def __init__(self, hashes: list[bytes]) -> None:
        self.hashes = hashes
        self.reads: list[list[int]] = []

    async def read_hashes(self, indexes: list[int]) -> list[bytes]:
        self.reads.append(list(indexes))
        return [self.hashes[i] for i in indexes]
