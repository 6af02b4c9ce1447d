"""The checksum database's transparency log (golang.org/x/mod/sumdb/tlog).

The log is an RFC 6962 Merkle tree over records (one per module version).
Leaf hashes are SHA-256(0x00 + record text), interior nodes SHA-256(0x01 +
left + right). Every hash the tree ever stores has a *stored hash index*: the
n-th hash of level L (the root of leaves [n·2^L, (n+1)·2^L)) is written right
after its last leaf, so a tree of N records has a fixed prefix of indexes.

A signed tree head is the note text ``go.sum database tree\\n<N>\\n<hash>\\n``.
A lookup answer is ``<id>\\n<record text>\\n`` followed by such a note.

Tree hashes read stored hashes through a :class:`HashReader`; with a tile
reader (:mod:`sidecar.sumdb.tile`) every hash it returns is already
authenticated against the tree head, so a record whose hash is the leaf read
at its id is in the tree.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from sidecar.errors import SumdbVerifyError
from sidecar.sumdb.note import b64decode_strict

HASH_SIZE: Final = 32
EMPTY_HASH: Final = hashlib.sha256(b"").digest()  # RFC 6962 2.1: the empty tree
TREE_PREFIX: Final = "go.sum database tree\n"
MAX_TREE_NOTE: Final = 1_000_000
_DECIMAL: Final = re.compile(r"0|[1-9][0-9]*")
_SIGNED_DECIMAL: Final = re.compile(r"[+-]?[0-9]+")
_INT64_MAX: Final = (1 << 63) - 1


def record_hash(data: bytes) -> bytes:
    """The leaf hash of a record: SHA-256(0x00 + data)."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """An interior node: SHA-256(0x01 + left + right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def maxpow2(n: int) -> tuple[int, int]:
    """(k, log2 k) for the largest power of two k smaller than n (k = 1 for n <= 2)."""
    level = max((n - 1).bit_length() - 1, 0)
    return 1 << level, level


def stored_hash_index(level: int, n: int) -> int:
    """Where the n-th hash of ``level`` sits in the linear stored-hash order."""
    # It follows its last leaf m = (n+1)·2^level - 1 and the level-1 lower hashes that
    # leaf completes: index(0, m) + level, where leaf m sits at m + m/2 + m/4 + ... =
    # 2m - popcount(m).
    m = ((n + 1) << level) - 1
    return 2 * m - m.bit_count() + level


def split_stored_hash_index(index: int) -> tuple[int, int]:
    """The inverse of :func:`stored_hash_index`: (level, n)."""
    n = index // 2
    index_n = stored_hash_index(0, n)
    while True:
        # Record n+1 adds itself and one hash per subtree it completes.
        following = index_n + 1 + _trailing_zeros(n + 1)
        if following > index:
            break
        n += 1
        index_n = following
    level = index - index_n
    return level, n >> level


def _trailing_zeros(x: int) -> int:
    return (x & -x).bit_length() - 1


class HashReader(Protocol):
    """Reads stored hashes by index (tlog.HashReader), one hash per index, in order."""

    async def read_hashes(self, indexes: Sequence[int]) -> list[bytes]: ...


async def _read(reader: HashReader, indexes: list[int]) -> list[bytes]:
    hashes = await reader.read_hashes(indexes)
    if len(hashes) != len(indexes):
        raise SumdbVerifyError(f"read {len(hashes)} hashes for {len(indexes)} indexes")
    return hashes


# --- subtrees and tree hashes ---------------------------------------------------


def subtree_indexes(lo: int, hi: int) -> list[int]:
    """Stored indexes of the complete subtrees that make up leaves [lo, hi)."""
    need = []
    while lo < hi:
        k, level = maxpow2(hi - lo + 1)
        need.append(stored_hash_index(level, lo >> level))
        lo += k
    return need


def subtrees_hash(hashes: Sequence[bytes]) -> bytes:
    """The hash over consecutive complete subtrees, from their stored hashes in the
    order of :func:`subtree_indexes`, folded right to left."""
    h = hashes[-1]
    for left in reversed(hashes[:-1]):
        h = node_hash(left, h)
    return h


async def tree_hash(n: int, reader: HashReader) -> bytes:
    """The root hash of the tree with ``n`` records (tlog.TreeHash)."""
    if n == 0:
        return EMPTY_HASH
    return subtrees_hash(await _read(reader, subtree_indexes(0, n)))


# --- tree heads and records -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tree:
    """A tree head: the number of records and the root hash."""

    n: int
    hash: bytes


def parse_tree(text: str) -> Tree:
    """tlog.ParseTree: the tree of a tree-head note text; later lines are ignored."""
    if not text.startswith(TREE_PREFIX) or text.count("\n") < 3 or len(text) > MAX_TREE_NOTE:
        raise SumdbVerifyError("malformed tree note")
    lines = text.split("\n", 3)
    # strconv.ParseInt then FormatInt must round-trip: no sign, no leading zeros.
    if _DECIMAL.fullmatch(lines[1]) is None or int(lines[1]) > _INT64_MAX:
        raise SumdbVerifyError("malformed tree note: bad size")
    root = b64decode_strict(lines[2])
    if root is None or len(root) != HASH_SIZE:
        raise SumdbVerifyError("malformed tree note: bad hash")
    return Tree(int(lines[1]), root)


def is_valid_record_text(text: bytes) -> bool:
    """UTF-8, no control character but newline, no blank line, ends in a newline."""
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError:
        return False
    if not decoded.endswith("\n") or "\n\n" in decoded:
        return False
    return not any(c < " " and c != "\n" for c in decoded)


def parse_record(message: bytes) -> tuple[int, bytes, bytes]:
    """tlog.ParseRecord: (record id, record text, the rest after the blank line)."""
    first, newline, message = message.partition(b"\n")
    if not newline or _SIGNED_DECIMAL.fullmatch(first.decode("ascii", "replace")) is None:
        raise SumdbVerifyError("malformed record data: bad record id")
    record_id = int(first)
    if not -_INT64_MAX - 1 <= record_id <= _INT64_MAX:
        raise SumdbVerifyError("malformed record data: bad record id")
    end = message.find(b"\n\n")
    if end < 0:
        raise SumdbVerifyError("malformed record data: no blank line")
    text, rest = message[: end + 1], message[end + 2 :]
    if not is_valid_record_text(text):
        raise SumdbVerifyError("malformed record data")
    return record_id, text, rest
