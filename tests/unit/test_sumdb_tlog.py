"""sidecar.sumdb.tlog and .tile against x/mod's test vectors (sumdb/tlog/*_test.go)
and against a log built independently from RFC 6962 (tests/sumdb/tree.py)."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

from sidecar.errors import SumdbVerifyError
from sidecar.sumdb.tile import (
    Lru,
    Tile,
    TileHashReader,
    hash_from_tile,
    parse_data_tile,
    tile_for_index,
    tile_parent,
)
from sidecar.sumdb.tlog import (
    EMPTY_HASH,
    Tree,
    parse_record,
    parse_tree,
    record_hash,
    split_stored_hash_index,
    stored_hash_index,
    tree_hash,
)
from tests.sumdb.tree import Log, StoredHashes

# --- tree notes and records (note_test.go) ---------------------------------------

TREE_TEXT = "go.sum database tree\n123456789012\nTszzRgjTG6xce+z2AG31kAXYKBgQVtCSCE40HmuwBb0=\n"


def test_parse_tree_golden() -> None:
    assert parse_tree(TREE_TEXT) == Tree(123456789012, record_hash(b"hello world"))


@pytest.mark.parametrize(
    "text",
    [
        "not-" + TREE_TEXT,
        "go.sum database tree\n0xabcdef\nTszzRgjTG6xce+z2AG31kAXYKBgQVtCSCE40HmuwBb0=\n",
        "go.sum database tree\n123456789012\nTszzRgjTG6xce+z2AG31kAXYKBgQVtCSCE40HmuwBTOOBIG=\n",
        # strconv.FormatInt must give the number back: no sign, no leading zero
        "go.sum database tree\n+12\nTszzRgjTG6xce+z2AG31kAXYKBgQVtCSCE40HmuwBb0=\n",
        "go.sum database tree\n012\nTszzRgjTG6xce+z2AG31kAXYKBgQVtCSCE40HmuwBb0=\n",
        "go.sum database tree\n12\nTszzRgjTG6xce+z2AG31kAXYKBgQVtCSCE40HmuwBb0=",
    ],
)
def test_parse_tree_rejects(text: str) -> None:
    with pytest.raises(SumdbVerifyError):
        parse_tree(text)


@pytest.mark.parametrize("junk", ["JOE", "JOE\n", "JOE\n" * 1000])
def test_parse_tree_ignores_later_lines(junk: str) -> None:
    assert parse_tree(TREE_TEXT + junk).n == 123456789012


def test_parse_record_golden() -> None:
    message = b"123456789012\nhello, world\n\njunk on end\x01\xff"
    assert parse_record(message) == (123456789012, b"hello, world\n", b"junk on end\x01\xff")
    assert parse_record(b"123456789012\nhello, world\n\n") == (123456789012, b"hello, world\n", b"")


@pytest.mark.parametrize(
    "message",
    [
        b"not-123456789012\nhello, world\n\n",
        b"123\nhello\x01world\n\n",
        b"123\nhello\xffworld\n\n",
        b"123\nhello world\n",
        b"0x123\nhello world\n\n",
    ],
)
def test_parse_record_rejects(message: bytes) -> None:
    with pytest.raises(SumdbVerifyError):
        parse_record(message)


# --- stored hash indexes (tlog_test.go TestSplitStoredHashIndex) ---------------------


def test_split_stored_hash_index_round_trips() -> None:
    for level in range(10):
        for n in range(100):
            assert split_stored_hash_index(stored_hash_index(level, n)) == (level, n)


def test_stored_hash_index_is_the_append_order() -> None:
    order = Log.of(300).stored_order()
    assert [stored_hash_index(level, n) for level, n in order] == list(range(len(order)))


def test_empty_tree_hash_is_sha256_of_nothing() -> None:
    assert hashlib.sha256(b"").digest() == EMPTY_HASH


# --- tree hashes (tlog_test.go TestTree) -------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3, 7, 8, 9, 31, 64, 100])
async def test_tree_hashes_of_every_prefix(size: int) -> None:
    log = Log.of(size)
    storage = StoredHashes(log.stored_hashes())
    for prefix in range(1, size + 1):
        assert await tree_hash(prefix, storage) == log.root(prefix)
    # indexes are asked for in increasing order, as x/mod's tests insist
    assert all(read == sorted(read) for read in storage.reads)


# --- tile paths and tile hashes (tlog_test.go TestTilePath) -------------------------

TILE_PATHS = [
    ("tile/4/0/001", Tile(4, 0, 1, 16)),
    ("tile/4/0/001.p/5", Tile(4, 0, 1, 5)),
    ("tile/3/5/x123/x456/078", Tile(3, 5, 123456078, 8)),
    ("tile/3/5/x123/x456/078.p/2", Tile(3, 5, 123456078, 2)),
    ("tile/1/0/x003/x057/500", Tile(1, 0, 3057500, 2)),
    ("tile/1/data/x003/x057/500", Tile(1, -1, 3057500, 2)),
    ("tile/8/0/x281/631.p/38", Tile(8, 0, 281631, 38)),
]


@pytest.mark.parametrize(("path", "tile"), TILE_PATHS)
def test_tile_path(path: str, tile: Tile) -> None:
    assert tile.path == path


@pytest.mark.parametrize("h", [1, 2, 3, 8])
def test_every_stored_hash_is_read_from_its_tile(h: int) -> None:
    log = Log.of(100)
    tiles = log.tiles(h)
    for index, stored in enumerate(log.stored_hashes()):
        tile, _, _ = tile_for_index(h, index)
        edge = tile_parent(tile, 0, log.size)
        assert edge is not None and edge in tiles
        assert edge.w >= tile.w
        assert hash_from_tile(edge, tiles[edge], index) == stored


def test_hash_from_tile_refuses_the_wrong_tile() -> None:
    log = Log.of(64)
    tiles = log.tiles(2)
    with pytest.raises(SumdbVerifyError):
        hash_from_tile(Tile(2, 0, 1, 4), tiles[Tile(2, 0, 1, 4)], stored_hash_index(0, 0))
    with pytest.raises(SumdbVerifyError):
        hash_from_tile(Tile(2, 0, 0, 4), tiles[Tile(2, 0, 0, 4)][:64], stored_hash_index(0, 0))


def test_parse_data_tile() -> None:
    assert parse_data_tile(b"a 1\nb 2\n\nc 3\n\n", 2) == [b"a 1\nb 2\n", b"c 3\n"]
    for bad, width in [(b"a\n\n", 2), (b"a\n\nb\n\n", 1), (b"a\x01\n\n", 1), (b"a\n", 1)]:
        with pytest.raises(SumdbVerifyError):
            parse_data_tile(bad, width)


# --- the tile hash reader (TileHashReader) -----------------------------------------


class TileStore:
    def __init__(self, tiles: dict[Tile, bytes]) -> None:
        self.tiles = tiles
        self.fetched: list[Tile] = []
        self.saved: list[Tile] = []

    async def read(self, tiles: list[Tile]) -> list[bytes]:
        self.fetched.extend(tiles)
        return [self.tiles[t] for t in tiles]

    def save(self, tiles: list[Tile], data: list[bytes]) -> None:
        self.saved.extend(tiles)


@pytest.mark.parametrize(("size", "h"), [(1, 2), (5, 2), (16, 2), (45, 2), (100, 2), (301, 8)])
async def test_tile_reader_reads_leaves_and_checks_prefixes(size: int, h: int) -> None:
    log = Log.of(size)
    root = log.root()
    store = TileStore(log.tiles(h))
    reader = TileHashReader(Tree(size, root), h, store.read, store.save)
    for j in range(size):
        assert await reader.read_hashes([stored_hash_index(0, j)]) == [log.leaves[j]]
    for prefix in range(1, size + 1, max(1, size // 20)):
        assert await tree_hash(prefix, reader) == log.root(prefix)
    assert sorted(set(store.saved), key=repr) == sorted(set(store.fetched), key=repr)
    with pytest.raises(SumdbVerifyError):
        await reader.read_hashes([stored_hash_index(0, size)])


@pytest.mark.parametrize(
    ("size", "h", "record"), [(301, 8, 5), (301, 8, 300), (45, 2, 3), (100, 2, 77)]
)
async def test_tile_reader_detects_any_corrupted_tile(size: int, h: int, record: int) -> None:
    """Every tile the reader fetches matters: one flipped byte anywhere fails the read.

    (301, 8, 5) is the case x/mod before v0.43.0 got wrong: the record's full
    level-0 tile is not among the tiles of the tree hash, which share one tile.
    """
    log = Log.of(size)
    tiles = log.tiles(h)
    index = stored_hash_index(0, record)
    fetched = TileStore(tiles)
    await TileHashReader(Tree(size, log.root()), h, fetched.read).read_hashes([index])
    rng = random.Random(size * 1000 + record)
    for tile in fetched.fetched:
        data = bytearray(tiles[tile])
        data[rng.randrange(len(data))] ^= 0x80
        store = TileStore({**tiles, tile: bytes(data)})
        reader = TileHashReader(Tree(size, log.root()), h, store.read, store.save)
        with pytest.raises(SumdbVerifyError):
            await reader.read_hashes([index])
        assert store.saved == []


async def test_tile_reader_refuses_a_wrong_tree_hash_and_short_tiles() -> None:
    log = Log.of(20)
    tiles = log.tiles(2)
    reader = TileHashReader(Tree(20, record_hash(b"other")), 2, TileStore(tiles).read)
    with pytest.raises(SumdbVerifyError, match="inconsistent"):
        await reader.read_hashes([stored_hash_index(0, 3)])
    short = {t: d[:-1] if t == Tile(2, 0, 0, 4) else d for t, d in tiles.items()}
    reader = TileHashReader(Tree(20, log.root()), 2, TileStore(short).read)
    with pytest.raises(SumdbVerifyError):
        await reader.read_hashes([stored_hash_index(0, 3)])


async def test_known_tiles_skip_only_their_own_recheck() -> None:
    """A tile identical to an authenticated one skips the parent check; a tile with
    the same coordinates but other bytes is checked as usual."""
    log = Log.of(301)
    tiles = log.tiles(8)
    full = Tile(8, 0, 0, 256)
    index = stored_hash_index(0, 5)
    known: Lru[Tile, bytes] = Lru(4)  # the verifier's tiles, as it passes them
    known.put(full, tiles[full])
    reader = TileHashReader(Tree(301, log.root()), 8, TileStore(tiles).read, authenticated=known)
    assert await reader.read_hashes([index]) == [log.leaves[5]]
    forged = bytearray(tiles[full])
    forged[5 * 32] ^= 1
    store = TileStore({**tiles, full: bytes(forged)})
    reader = TileHashReader(Tree(301, log.root()), 8, store.read, authenticated=known)
    with pytest.raises(SumdbVerifyError, match="inconsistent"):
        await reader.read_hashes([index])


T = TypeVar("T")


async def test_a_leaf_from_authenticated_tiles_is_read_on_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A read whose tiles were all authenticated before, and that computes a few
    hashes, makes no hop to a worker thread (the hop cost a .mod more than the
    hashing: issue 14); a read with tiles to check does, and both read right."""
    hops: list[str] = []
    real = asyncio.to_thread

    async def counting(func: Callable[..., T], /, *args: Any) -> T:
        hops.append(getattr(func, "__name__", ""))
        return await real(func, *args)

    monkeypatch.setattr(asyncio, "to_thread", counting)
    log = Log.of(301)
    root = log.root()
    store = TileStore(log.tiles(8))
    known: Lru[Tile, bytes] = Lru(64)
    stored: Lru[int, bytes] = Lru(4096)

    def save(tiles: list[Tile], data: list[bytes]) -> None:
        known.update(zip(tiles, data, strict=True))

    reader = TileHashReader(Tree(301, root), 8, store.read, save, known, stored)
    assert await reader.read_hashes([stored_hash_index(0, 5)]) == [log.leaves[5]]
    assert hops == ["_authenticate"]  # new tiles: checked in a worker thread
    fetched = len(store.fetched)
    for record in (6, 7, 9, 300):
        assert await reader.read_hashes([stored_hash_index(0, record)]) == [log.leaves[record]]
    assert hops == ["_authenticate"] and len(store.fetched) > fetched
