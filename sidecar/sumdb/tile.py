"""Tiles of the transparency log and reading authenticated hashes from them.

A tile of height H at level L, number N, lists W consecutive stored hashes of
tree level H·L starting at N·2^H: the leaves of a subtree of height H, from
which the levels above are recomputed. Its path is ``tile/H/L/NNN[.p/W]``,
N written in groups of three digits (``x001/x234/067``); ``.p/W`` marks a
partial tile (W < 2^H) at the right edge of the tree. Level ``data`` holds the
record texts instead of hashes. sum.golang.org serves tiles of height 8.

:class:`TileHashReader` is tlog.TileHashReader as of golang.org/x/mod v0.43.0:
it fetches the tiles that rebuild the signed tree hash and the tiles holding
the wanted hashes, checks the first against the tree head and every other
against its parent tile, and only then returns hashes. (Older x/mod releases
skipped some of those parent checks.)
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from hashlib import sha256
from typing import Final, Generic, TypeVar, cast

from sidecar.errors import SumdbVerifyError
from sidecar.sumdb.tlog import (
    HASH_SIZE,
    Tree,
    is_valid_record_text,
    split_stored_hash_index,
    stored_hash_index,
    subtree_indexes,
    subtrees_hash,
)

DEFAULT_TILE_HEIGHT: Final = 8
DATA_LEVEL: Final = -1
PATH_BASE: Final = 1000
MAX_LEVELS: Final = 64  # a tile level is < 64 (int64 record numbers)
# A read whose tiles were all authenticated before hashes on the event loop when it
# computes at most this many stored hashes from tiles (~2.7 µs each: 0.35 ms). A
# record's leaf needs none (its tile holds it) and a new tree edge a few (0.05 ms),
# and the hop to a worker thread and back cost a .mod 1.8 ms at the median and 11
# ms at p99 under load, waiting for a wake-up and the GIL (bench/resilience.py
# error100, issue 14).
INLINE_HASHES: Final = 128


@dataclass(frozen=True, slots=True)
class Tile:
    h: int  # height: 2^h hashes in a full tile
    l: int  # level of tiles; DATA_LEVEL for record data  # noqa: E741 - tlog's name
    n: int  # number within the level
    w: int  # width: hashes in this tile, 2^h when full

    @property
    def full(self) -> bool:
        return self.w == 1 << self.h

    @property
    def path(self) -> str:
        """``tile/H/L/NNN[.p/W]`` (Tile.Path)."""
        n = self.n
        digits = f"{n % PATH_BASE:03d}"
        while n >= PATH_BASE:
            n //= PATH_BASE
            digits = f"x{n % PATH_BASE:03d}/{digits}"
        level = "data" if self.l == DATA_LEVEL else str(self.l)
        partial = "" if self.full else f".p/{self.w}"
        return f"tile/{self.h}/{level}/{digits}{partial}"


def tile_for_index(h: int, index: int) -> tuple[Tile, int, int]:
    """The narrowest tile of height h holding stored hash ``index``, and the byte range
    of the tile data whose subtree hash is that stored hash."""
    level, n = split_stored_hash_index(index)
    tile_level = level // h
    level -= tile_level * h  # level within the tile
    tile_n = (n << level) >> h
    n -= (tile_n << h) >> level  # n within the tile, at that level
    tile = Tile(h, tile_level, tile_n, (n + 1) << level)
    return tile, (n << level) * HASH_SIZE, ((n + 1) << level) * HASH_SIZE


def tile_hash(data: bytes) -> bytes:
    """The subtree hash over 2^k hashes laid end to end."""
    level = [data[i : i + HASH_SIZE] for i in range(0, len(data), HASH_SIZE)]
    # Level by level rather than by recursion: this is most of a lookup's CPU.
    while len(level) > 1:
        level = [
            sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level), 2)
        ]
    return level[0]


def hash_from_tile(tile: Tile, data: bytes, index: int) -> bytes:
    """Stored hash ``index`` from ``tile``'s data (HashFromTile)."""
    if not (1 <= tile.h <= 30 and 0 <= tile.l < MAX_LEVELS and 1 <= tile.w <= 1 << tile.h):
        raise SumdbVerifyError(f"invalid tile {tile.path}")
    if len(data) < tile.w * HASH_SIZE:
        raise SumdbVerifyError(f"tile {tile.path}: {len(data)} bytes is too short")
    needed, start, end = tile_for_index(tile.h, index)
    if (tile.l, tile.n) != (needed.l, needed.n) or tile.w < needed.w:
        raise SumdbVerifyError(f"index {index} is in {needed.path}, not {tile.path}")
    return tile_hash(data[start:end])


def tile_parent(tile: Tile, k: int, n: int) -> Tile | None:
    """``tile``'s k-th parent among the tiles of a tree of n records (None: past the edge)."""
    level = tile.l + k
    number = tile.n >> (k * tile.h)
    hashes_at_level = n >> (level * tile.h)
    start = number << tile.h
    if start >= hashes_at_level:
        return None
    return Tile(tile.h, level, number, min(1 << tile.h, hashes_at_level - start))


def parse_data_tile(data: bytes, width: int) -> list[bytes]:
    """The ``width`` record texts of a data tile (records without their id line)."""
    records = []
    for _ in range(width):
        end = data.find(b"\n\n")
        if end < 0:
            raise SumdbVerifyError(f"data tile has fewer than {width} records")
        text, data = data[: end + 1], data[end + 2 :]
        if not is_valid_record_text(text):
            raise SumdbVerifyError("data tile holds a malformed record")
        records.append(text)
    if data:
        raise SumdbVerifyError(f"data tile has more than {width} records")
    return records


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Lru(Generic[K, V]):
    """A map of at most ``size`` entries, the least recently used dropped first
    (event loop only): the verifier's memos of tiles, stored hashes, checked
    tree heads and verified records."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        found = self._items.get(key)
        if found is not None:
            self._items.move_to_end(key)
        return found

    def put(self, key: K, value: V) -> None:
        self.update(((key, value),))

    def update(self, pairs: Iterable[tuple[K, V]]) -> None:
        items = self._items
        for key, value in pairs:
            items[key] = value
            items.move_to_end(key)
        while len(items) > self._size:
            items.popitem(last=False)


ReadTiles = Callable[[list[Tile]], Awaitable[list[bytes]]]
SaveTiles = Callable[[list[Tile], list[bytes]], None]


def _save_nothing(tiles: list[Tile], data: list[bytes]) -> None:
    pass


@dataclass(frozen=True, slots=True)
class _Plan:
    """The tiles one ``read_hashes`` reads, and where its answers are in them."""

    tiles: list[Tile]  # parents before children
    order: dict[Tile, int]  # order[tiles[i]] == i
    stx: list[int]  # stored hash indexes that rebuild the tree hash
    stx_order: list[int]  # the tile of each, in `tiles`
    stx_tiles: int  # tiles[:stx_tiles] hold them: checked against the tree hash
    indexes: list[int]  # the wanted stored hashes
    index_order: list[int]  # the tile of each, in `tiles`


class TileHashReader:
    """Reads stored hashes of ``tree`` from tiles, each one authenticated first.

    ``save_tiles`` receives every tile after it was authenticated (TileReader.SaveTiles):
    the only point where keeping a tile is safe. A tile whose data is the same as in
    ``authenticated`` (tiles saved before, against a tree this one was found
    consistent with) skips the check against its parent; the tiles that rebuild
    the tree hash are always checked.

    ``stored``: stored hashes computed before from tiles authenticated against a
    tree this one was found consistent with (the verifier's, shared by its lookups).
    A stored hash never changes once the log has it, so a read that finds every
    wanted hash there reads no tile, and the tree hash check takes the edge's
    hashes from it; what a read computes is added. Each is rehashed from a tile
    otherwise: the edge's large subtrees serve every read of a tree, and
    rehashing them was most of a lookup's CPU (a few hundred SHA-256 calls, in a
    worker thread holding the GIL that the event loop waits for).
    """

    def __init__(
        self,
        tree: Tree,
        height: int,
        read_tiles: ReadTiles,
        save_tiles: SaveTiles = _save_nothing,
        authenticated: Lru[Tile, bytes] | None = None,
        stored: Lru[int, bytes] | None = None,
    ) -> None:
        self._tree = tree
        self._height = height
        self._read_tiles = read_tiles
        self._save_tiles = save_tiles
        self._authenticated = authenticated
        self._stored = stored

    async def read_hashes(self, indexes: Sequence[int]) -> list[bytes]:
        stored = self._stored
        if stored is not None:
            found = [stored.get(x) for x in indexes]
            if None not in found:
                return cast(list[bytes], found)
        plan = self._plan_reads(indexes)
        data = await self._read_tiles(plan.tiles)
        # Read on the loop: the maps belong to the verifier, which changes them there.
        authenticated = self._authenticated
        known = [None if authenticated is None else authenticated.get(t) for t in plan.tiles]
        edge = [None if stored is None else stored.get(x) for x in plan.stx]
        had = [None if stored is None else stored.get(x) for x in plan.indexes]
        args = (plan, data, known, (edge, had))
        if self._hashes_to_compute(plan, data, known, edge, had) <= INLINE_HASHES:
            hashes, edge_hashes = self._authenticate(*args)
        else:  # tiles to check (milliseconds of hashing): off the event loop
            hashes, edge_hashes = await asyncio.to_thread(self._authenticate, *args)
        self._save_tiles(plan.tiles, data)
        if stored is not None:
            stored.update(zip(plan.stx, edge_hashes, strict=True))
            stored.update(zip(plan.indexes, hashes, strict=True))
        return hashes

    def _hashes_to_compute(
        self,
        plan: _Plan,
        data: list[bytes],
        known: list[bytes | None],
        edge: list[bytes | None],
        had: list[bytes | None],
    ) -> int:
        """The SHA-256 calls ``_authenticate`` makes, about; more than INLINE_HASHES
        for any tile it must check against its parent."""
        tiles = plan.tiles
        if any(known[i] != data[i] for i in range(plan.stx_tiles, len(tiles))):
            return INLINE_HASHES + 1
        count = 0
        for x, h in zip((*plan.stx, *plan.indexes), (*edge, *had), strict=True):
            if h is None:
                _, start, end = tile_for_index(self._height, x)
                count += (end - start) // HASH_SIZE
        return count

    def _plan_reads(self, indexes: Sequence[int]) -> _Plan:
        """The tiles to read: those that rebuild the tree hash first, then those
        holding ``indexes``, each after its parent."""
        if self._tree.n == 0:
            raise SumdbVerifyError("the empty tree stores no hashes")
        tiles: list[Tile] = []
        order: dict[Tile, int] = {}  # order[tiles[i]] == i
        stx = subtree_indexes(0, self._tree.n)
        stx_order = [self._plan(self._edge_tile(x), tiles, order) for x in stx]
        stx_tiles = len(tiles)
        end = stored_hash_index(0, self._tree.n)
        for x in indexes:
            if not 0 <= x < end:
                raise SumdbVerifyError(f"stored hash {x} is not in tree {self._tree.n}")
        index_order = [self._plan_index(x, tiles, order) for x in indexes]
        return _Plan(tiles, order, stx, stx_order, stx_tiles, list(indexes), index_order)

    def _authenticate(
        self,
        plan: _Plan,
        data: list[bytes],
        known: list[bytes | None],
        stored: tuple[list[bytes | None], list[bytes | None]],
    ) -> tuple[list[bytes], list[bytes]]:
        """Worker thread: check every tile (``known`` ones against their parent
        only if their data changed), then return the wanted hashes and those that
        rebuild the tree hash (``stored``: of each, the ones known before)."""
        edge, had = stored
        tiles, order = plan.tiles, plan.order
        if len(data) != len(tiles):
            raise SumdbVerifyError(f"read {len(data)} tiles, wanted {len(tiles)}")
        for tile, tile_data in zip(tiles, data, strict=True):
            if len(tile_data) != tile.w * HASH_SIZE:
                raise SumdbVerifyError(f"tile {tile.path}: {len(tile_data)} bytes")

        stx_order = plan.stx_order
        edge_hashes = [
            hash_from_tile(tiles[j], data[j], x) if h is None else h
            for j, x, h in zip(stx_order, plan.stx, edge, strict=True)
        ]
        self._check_tree_hash(edge_hashes)
        # Parents come before children in `tiles`, so each check uses a checked parent.
        for i in range(plan.stx_tiles, len(tiles)):
            if known[i] == data[i]:
                continue
            parent = tile_parent(tiles[i], 1, self._tree.n)
            assert parent is not None, "a full tile below the edge has a parent"
            j = order[parent]
            expected = hash_from_tile(
                parent, data[j], stored_hash_index(parent.l * parent.h, tiles[i].n)
            )
            if tile_hash(data[i]) != expected:
                raise SumdbVerifyError(f"downloaded inconsistent tile {tiles[i].path}")
        wanted = [
            hash_from_tile(tiles[j], data[j], x) if h is None else h
            for j, x, h in zip(plan.index_order, plan.indexes, had, strict=True)
        ]
        return wanted, edge_hashes

    def _edge_tile(self, index: int) -> Tile:
        tile = tile_parent(tile_for_index(self._height, index)[0], 0, self._tree.n)
        assert tile is not None, "a subtree of the tree lies in one of its tiles"
        return tile

    @staticmethod
    def _plan(tile: Tile, tiles: list[Tile], order: dict[Tile, int]) -> int:
        if tile not in order:
            order[tile] = len(tiles)
            tiles.append(tile)
        return order[tile]

    def _plan_index(self, index: int, tiles: list[Tile], order: dict[Tile, int]) -> int:
        """Plan the tile holding ``index`` and its parents up to one already planned."""
        tile = tile_for_index(self._height, index)[0]
        chain: list[Tile] = []
        for k in range(MAX_LEVELS):
            parent = tile_parent(tile, k, self._tree.n)
            if parent is None:
                break
            if parent in order:
                for child in reversed(chain):  # walk back down: parents before children
                    if not child.full:
                        raise SumdbVerifyError(f"tile {child.path} has a parent but is partial")
                    self._plan(child, tiles, order)
                return order[chain[0] if chain else parent]
            chain.append(parent)
        raise SumdbVerifyError(f"no tile of tree {self._tree.n} leads to stored hash {index}")

    def _check_tree_hash(self, edge_hashes: list[bytes]) -> None:
        """The tree hash rebuilt from its subtrees' stored hashes."""
        if subtrees_hash(edge_hashes) != self._tree.hash:
            raise SumdbVerifyError(f"downloaded inconsistent tile: tree {self._tree.n} hash")
