"""What the checksum database vouches for: verified ``h1:`` hashes of module@version.

A ``lookup/<module>@<version>`` answer is the record id, the record text (the
go.sum lines ``<module> <version> h1:...`` and ``<module> <version>/go.mod
h1:...``), a blank line, then the signed tree head. :class:`SumdbVerifier`
trusts the record only after, like the go command's sumdb client:

1. the tree head's note is signed by the configured key;
2. the tree is consistent with the largest tree this verifier accepted before
   (the smaller one's hash is rebuilt from the larger one's tiles), so a
   database cannot show different histories to different lookups;
3. the record is in the larger of the two: the hash of its text is the leaf
   hash at its id, read from tiles that were themselves checked against the
   signed tree hash (the go command's ``checkRecord``).

Records and tiles come from ``fetch(path)`` for ``sumdb/<name>/...`` paths; the
caller routes them (its upstreams' sumdb path, or a configured URL) and caches
them. ``fetch`` raises SumdbUnavailable (any other SidecarError is taken as
that) when it gets no answer; every wrong answer raises SumdbVerifyError. An
invalid module path or version raises RequestError (404) before any fetch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, cast

from sidecar.errors import SidecarError, SumdbError, SumdbUnavailable, SumdbVerifyError
from sidecar.goproxy import escape_path, escape_version
from sidecar.sumdb.note import Verifier, open_note
from sidecar.sumdb.tile import DEFAULT_TILE_HEIGHT, Lru, Tile, TileHashReader
from sidecar.sumdb.tlog import (
    HASH_SIZE,
    Tree,
    parse_record,
    parse_tree,
    record_hash,
    stored_hash_index,
    tree_hash,
)

Fetch = Callable[[str], Awaitable[bytes]]

# Verified answers kept per verifier: a record never changes once in the log, and a
# module's .mod and .zip are usually asked for together.
MEMO_SIZE: Final = 4096
# Authenticated tiles kept per verifier (8 KiB each at height 8). A tile's content
# never changes, partial ones included (the log only grows), and the upper levels
# serve every lookup.
TILE_MEMO_SIZE: Final = 256
# Stored hashes kept per verifier (~100 bytes each): the subtrees of the tree's edge
# serve every read of that tree (tile.TileHashReader).
STORED_HASH_MEMO_SIZE: Final = 16384
# Signed tree heads whose signature was checked, kept by their bytes: a database
# answers every lookup with the same head until its tree grows.
NOTE_MEMO_SIZE: Final = 16
# Rounds of "check against the newest tree, install it" while other lookups race ahead.
MAX_MERGE_ROUNDS: Final = 8


@dataclass(frozen=True, slots=True)
class LookupAnswer:
    record_id: int
    text: bytes  # the record: go.sum lines, each ending in a newline
    note: bytes  # the signed tree head


def parse_lookup(data: bytes) -> LookupAnswer:
    """Split a lookup answer; raises SumdbVerifyError when it is malformed."""
    record_id, text, note = parse_record(data)
    return LookupAnswer(record_id, text, note)


@dataclass(frozen=True, slots=True)
class ModuleHashes:
    """The database's hashes for module@version; None where it has no ``h1:`` line
    (the go command then accepts whatever it downloaded)."""

    module: str
    version: str
    zip: str | None
    gomod: str | None
    record_id: int
    tree: Tree  # the tree the record was proven in


def hashes_from_record(text: bytes, module: str, version: str) -> tuple[str | None, str | None]:
    """(zip h1, go.mod h1) from a record's lines: the first ``h1:`` line of each, as
    the go command's checkSumDB takes it."""
    prefix = f"{module} {version}"
    lines = text.decode("utf-8").splitlines()
    if not any(line.startswith((prefix + " ", prefix + "/go.mod ")) for line in lines):
        raise SumdbVerifyError(f"the record for {module}@{version} has no line for it")
    return _first_h1(lines, prefix + " "), _first_h1(lines, prefix + "/go.mod ")


def _first_h1(lines: list[str], prefix: str) -> str | None:
    for line in lines:
        if line.startswith(prefix + "h1:"):
            return line[len(prefix) :]
    return None


class SumdbVerifier:
    """Verified lookups against one checksum database (name and key of ``verifier``)."""

    def __init__(
        self, verifier: Verifier, fetch: Fetch, tile_height: int = DEFAULT_TILE_HEIGHT
    ) -> None:
        self._verifier = verifier
        self._fetch = fetch
        self._height = tile_height
        self._latest: Tree | None = None
        self._memo: Lru[tuple[str, str], ModuleHashes] = Lru(MEMO_SIZE)
        self._inflight: dict[tuple[str, str], asyncio.Future[ModuleHashes]] = {}
        self._tiles: Lru[Tile, bytes] = Lru(TILE_MEMO_SIZE)
        self._stored: Lru[int, bytes] = Lru(STORED_HASH_MEMO_SIZE)
        self._notes: Lru[bytes, Tree] = Lru(NOTE_MEMO_SIZE)

    @property
    def name(self) -> str:
        return self._verifier.name

    @property
    def latest(self) -> Tree | None:
        """The largest tree head accepted so far."""
        return self._latest

    async def lookup(self, module: str, version: str) -> ModuleHashes:
        """The verified hashes of module@version (one lookup shared by concurrent callers)."""
        key = (module, version)
        known = self._memo.get(key)
        if known is not None:
            return known
        if key not in self._inflight:
            task = asyncio.ensure_future(self._lookup(module, version))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._settle(key, done))
        # shield: one caller giving up does not cancel the others' lookup.
        return await asyncio.shield(self._inflight[key])

    def _settle(self, key: tuple[str, str], done: asyncio.Future[ModuleHashes]) -> None:
        """Memoised in the same step that ends the flight: a caller arriving in
        between would start a second lookup."""
        self._inflight.pop(key, None)
        if done.cancelled() or done.exception() is not None:
            return  # retrieved: every caller may have left before it ended
        self._memo.put(key, done.result())

    async def _lookup(self, module: str, version: str) -> ModuleHashes:
        path = f"lookup/{escape_path(module)}@{escape_version(version)}"
        data = await self._get(path)
        # What costs milliseconds (a signature not seen before, hashing tiles) runs in
        # worker threads; the rest (parsing, a leaf read from tiles checked before) is
        # cheaper on the loop than a hop to a thread and back, whose wake-ups and GIL
        # hand-overs the requests in flight wait for.
        answer = parse_lookup(data)
        zip_h1, gomod_h1 = hashes_from_record(answer.text, module, version)
        tree = self._notes.get(answer.note)
        if tree is None:
            tree = await asyncio.to_thread(self._open_tree, answer.note)
            self._notes.put(answer.note, tree)
        if not 0 <= answer.record_id < tree.n:
            raise SumdbVerifyError(f"record {answer.record_id} is not in tree {tree.n}")
        # Check the record in the largest accepted tree, as the go command does: its
        # tiles serve every lookup, and an old tree's edge tiles may be gone. The leaf
        # read from authenticated tiles is the whole check (checkRecord in x/mod's
        # client): rebuilding and rehashing its audit path as well proves nothing
        # more, and cost ~145 µs of the event loop per lookup (bench/resilience.py
        # load, 4,450 lookups: 6.95 s of CPU against 6.24-6.39 s).
        latest = await self._accept_tree(tree)
        leaf_index = stored_hash_index(0, answer.record_id)
        leaf = (await self._reader(latest).read_hashes([leaf_index]))[0]
        if leaf != record_hash(answer.text):
            raise SumdbVerifyError(
                f"cannot authenticate the record for {module}@{version}: it is not "
                f"record {answer.record_id} of tree {latest.n}"
            )
        return ModuleHashes(module, version, zip_h1, gomod_h1, answer.record_id, latest)

    def _open_tree(self, signed_note: bytes) -> Tree:
        return parse_tree(open_note(signed_note, self._verifier).text)

    async def merge_latest(self, signed_note: bytes) -> Tree:
        """Accept a signed tree head (``sumdb/<name>/latest``, or one kept from an
        earlier run) after checking it like a lookup's; returns the latest tree."""
        return await self._accept_tree(await asyncio.to_thread(self._open_tree, signed_note))

    async def _accept_tree(self, tree: Tree) -> Tree:
        """Check ``tree`` against the latest accepted one; keep and return the larger."""
        for _ in range(MAX_MERGE_ROUNDS):
            latest = self._latest
            if latest is None:
                self._latest = tree
                return tree
            if tree.n <= latest.n:
                await self._check_prefix(tree, latest, self._reader(latest))
                return latest
            # Tiles of a tree not yet accepted are checked in full (no shortcut for
            # known tiles: a forked tree must not borrow the accepted tree's tiles)
            # and kept only once the tree is accepted.
            seen: tuple[list[Tile], list[bytes]] = ([], [])
            reader = TileHashReader(tree, self._height, self._read_tiles, _collect(seen))
            await self._check_prefix(latest, tree, reader)
            if self._latest is latest:  # no other lookup moved it while we awaited
                self._latest = tree
                self._save_tiles(*seen)
                return tree
        raise SumdbUnavailable(f"{self.name}: the tree head kept moving; try again")

    async def _check_prefix(self, older: Tree, newer: Tree, reader: TileHashReader) -> None:
        if older.n == newer.n:
            same = older.hash == newer.hash
        else:
            same = await tree_hash(older.n, reader) == older.hash
        if not same:
            raise SumdbVerifyError(
                f"{self.name} forked: tree {older.n} ({older.hash.hex()}) is not the "
                f"prefix of tree {newer.n} ({newer.hash.hex()})"
            )

    def _reader(self, accepted: Tree) -> TileHashReader:
        """A reader for an accepted tree: tiles already authenticated need no recheck."""
        return TileHashReader(
            accepted, self._height, self._read_tiles, self._save_tiles, self._tiles, self._stored
        )

    def _save_tiles(self, tiles: list[Tile], data: list[bytes]) -> None:
        self._tiles.update(zip(tiles, data, strict=True))

    async def _read_tiles(self, tiles: list[Tile]) -> list[bytes]:
        # Tiles kept are taken without a task each: gather's tasks cost the lookup
        # a pass of the event loop even when nothing is fetched, and under load a
        # pass is milliseconds that the .mod waiting for this lookup waits too.
        found = [self._kept_tile(t) for t in tiles]
        missing = [i for i, data in enumerate(found) if data is None]
        if not missing:
            return cast(list[bytes], found)
        results = await asyncio.gather(
            *(self._fetch_tile(tiles[i]) for i in missing), return_exceptions=True
        )
        for i, result in zip(missing, results, strict=True):
            if isinstance(result, BaseException):
                raise result
            found[i] = result
        return cast(list[bytes], found)

    def _kept_tile(self, tile: Tile) -> bytes | None:
        """The tile from the memo (a partial one cut from its full tile), or None."""
        full = Tile(tile.h, tile.l, tile.n, 1 << tile.h)
        for known in (tile, full):
            data = self._tiles.get(known)
            if data is not None:
                return data[: tile.w * HASH_SIZE]
        return None

    async def _fetch_tile(self, tile: Tile) -> bytes:
        """The tile; a partial one that is gone is cut from its full tile (as Go's client)."""
        full = Tile(tile.h, tile.l, tile.n, 1 << tile.h)
        try:
            return await self._get(tile.path)
        except SumdbUnavailable:
            if tile.full:
                raise
        # Fetched after the except clause (server.connection.sendfile says why).
        data = await self._get(full.path)
        if len(data) != full.w * HASH_SIZE:
            raise SumdbVerifyError(f"tile {full.path}: {len(data)} bytes")
        return data[: tile.w * HASH_SIZE]

    async def _get(self, path: str) -> bytes:
        full_path = f"sumdb/{self.name}/{path}"
        try:
            return await self._fetch(full_path)
        except SumdbError:
            raise
        except SidecarError as exc:
            raise SumdbUnavailable(f"{full_path}: {exc}") from exc


def _collect(into: tuple[list[Tile], list[bytes]]) -> Callable[[list[Tile], list[bytes]], None]:
    def save(tiles: list[Tile], data: list[bytes]) -> None:
        into[0].extend(tiles)
        into[1].extend(data)

    return save
