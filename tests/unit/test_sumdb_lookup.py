"""sidecar.sumdb.lookup on real answers of sum.golang.org, checked with its published key.

tests/sumdb/data/sum.golang.org holds what the go command fetched (through the
Go module proxy) to verify rsc.io/quote v1.5.2 and rsc.io/sampler v1.3.0: the
two lookup answers (signed tree heads of 51,929,436 and 66,327,379 records),
the tiles it read, and the signed tree head it kept (72,097,574 records).
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from sidecar.errors import RequestError, SumdbUnavailable, SumdbVerifyError, UpstreamStatusError
from sidecar.sumdb import tile as tile_module
from sidecar.sumdb.gosumdb import SUM_GOLANG_ORG_KEY, parse_gosumdb
from sidecar.sumdb.lookup import SumdbVerifier, hashes_from_record, parse_lookup
from sidecar.sumdb.note import parse_verifier_key
from tests.sumdb.gosumdb import signer_key

DATA = Path(__file__).resolve().parents[1] / "sumdb" / "data" / "sum.golang.org"
QUOTE = ("rsc.io/quote", "v1.5.2")
QUOTE_H1 = "h1:w5fcysjrx7yqtD/aO+QwRjYZOKnaM9Uh2b40tElTs3Y="
QUOTE_GOMOD_H1 = "h1:LzX7hefJvL54yjefDEDHNONDjII0t9xZLPXsUe+TKr0="
SAMPLER = ("rsc.io/sampler", "v1.3.0")
SAMPLER_H1 = "h1:7uVkIFmeBqHfdjD+gZwtXXI+RODJ2Wc4O7MPEh/QiW4="
LATEST_N = 72097574


class Files:
    """fetch() over the stored answers; ``changes`` rewrites one path's answer."""

    def __init__(self, changes: dict[str, bytes] | None = None) -> None:
        self.changes = changes or {}
        self.paths: list[str] = []

    async def fetch(self, path: str) -> bytes:
        self.paths.append(path)
        rel = path.removeprefix("sumdb/sum.golang.org/")
        if rel in self.changes:
            return self.changes[rel]
        file = DATA / rel
        if not file.is_file():
            raise SumdbUnavailable(f"{path}: 404")
        return file.read_bytes()


def sum_golang_org(files: Files) -> SumdbVerifier:
    gosumdb = parse_gosumdb("")
    assert gosumdb is not None
    return SumdbVerifier(gosumdb.verifier, files.fetch)


async def test_real_records_verify() -> None:
    files = Files()
    verifier = sum_golang_org(files)
    assert (await verifier.merge_latest((DATA / "latest").read_bytes())).n == LATEST_N
    quote = await verifier.lookup(*QUOTE)
    assert (quote.zip, quote.gomod, quote.record_id) == (QUOTE_H1, QUOTE_GOMOD_H1, 942)
    sampler = await verifier.lookup(*SAMPLER)
    assert (sampler.zip, sampler.record_id) == (SAMPLER_H1, 469)
    # Both proven in the newest tree, and each old tree head checked as its prefix.
    assert quote.tree.n == sampler.tree.n == LATEST_N
    assert files.paths[1] == "sumdb/sum.golang.org/tile/8/3/000.p/4"
    # Verified tiles are kept: the upper levels are fetched once for both lookups.
    assert len(files.paths) == len(set(files.paths))


async def test_a_verifier_rehashes_no_kept_subtree(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stored hashes are kept: a second lookup in the same tree hashes less than
    the same lookup alone (the tree hash's edge, and the tiles above the record's,
    are the first one's)."""
    hashed: list[bytes] = []
    real = tile_module.sha256

    # sha256 is hashlib's, read from the module's globals on each call, compiled
    # or not: every interior node of a subtree is hashed through it.
    def recording(data: bytes) -> Any:
        hashed.append(bytes(data))
        return real(data)

    monkeypatch.setattr(tile_module, "sha256", recording)

    async def sampler_after(*first: tuple[str, str]) -> int:
        verifier = sum_golang_org(Files())
        await verifier.merge_latest((DATA / "latest").read_bytes())
        for module_version in first:
            await verifier.lookup(*module_version)
        hashed.clear()
        assert (await verifier.lookup(*SAMPLER)).zip == SAMPLER_H1
        return len(hashed)

    alone = await sampler_after()
    warm = await sampler_after(QUOTE)
    # Fixed data, so fixed counts: 1,099 against 2,002 node hashes. (With the
    # record's audit path rebuilt as well, before the leaf read alone, 1,347
    # against 2,744; with the stored hashes not kept either, 2,249 against 3,015.)
    assert 0 < warm < alone * 0.6


async def test_kept_tiles_are_read_without_a_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles the verifier kept are read in the caller's own step: no fetch and no
    task per tile (gather's tasks cost a pass of the event loop, and the .mod
    waiting for the lookup waits for it: issue 14)."""
    files = Files()
    verifier = sum_golang_org(files)
    await verifier.merge_latest((DATA / "latest").read_bytes())
    await verifier.lookup(*QUOTE)
    tiles = [p.removeprefix("sumdb/sum.golang.org/") for p in files.paths if "/tile/" in p]
    gathered: list[int] = []
    real = asyncio.gather

    def counting(*aws: Any, **kwargs: Any) -> Any:
        gathered.append(len(aws))
        return real(*aws, **kwargs)

    monkeypatch.setattr(asyncio, "gather", counting)
    fetched = len(files.paths)
    kept = [tile_module.Tile(*parse_tile_path(t)) for t in tiles]
    assert await verifier._read_tiles(kept) == [(DATA / t).read_bytes() for t in tiles]
    assert (gathered, len(files.paths)) == ([], fetched)
    await verifier.lookup(*SAMPLER)  # new tiles: fetched together
    assert gathered and len(files.paths) > fetched


def parse_tile_path(path: str) -> tuple[int, int, int, int]:
    """(h, l, n, w) of ``tile/H/L/NNN[.p/W]`` (the inverse of Tile.path)."""
    m = re.fullmatch(r"tile/(\d+)/(\d+)/((?:x\d{3}/)*\d{3})(?:\.p/(\d+))?", path)
    assert m is not None, path
    h = int(m[1])
    return h, int(m[2]), int(m[3].replace("x", "").replace("/", "")), int(m[4] or 1 << h)


async def test_old_tree_alone_is_enough() -> None:
    """Without a newer head the record is proven in its own tree. Most tiles at that
    tree's edge have been completed since: their partial forms are gone (404) and
    are cut from the full tiles, as the go command does. (tile/8/3/000.p/3 is the
    first 3 hashes of the stored 000.p/4, as the database serves it.)"""
    files = Files()
    sampler = await sum_golang_org(files).lookup(*SAMPLER)
    assert (sampler.tree.n, sampler.zip) == (66327379, SAMPLER_H1)
    prefix = "sumdb/sum.golang.org/tile/8/0/x259/091"
    assert files.paths.index(f"{prefix}.p/83") < files.paths.index(prefix)


async def test_bad_input_fetches_nothing() -> None:
    files = Files()
    with pytest.raises(RequestError):
        await sum_golang_org(files).lookup("../etc/passwd", "v1.0.0")
    with pytest.raises(RequestError):
        await sum_golang_org(files).lookup("rsc.io/quote", "v1.5.2/../x")
    assert files.paths == []


async def test_every_tile_read_is_checked() -> None:
    files = Files()
    verifier = sum_golang_org(files)
    await verifier.merge_latest((DATA / "latest").read_bytes())
    await verifier.lookup(*QUOTE)
    tiles = [p.removeprefix("sumdb/sum.golang.org/") for p in files.paths if "/tile/" in p]
    assert len(tiles) >= 8
    for tile in tiles:
        data = bytearray((DATA / tile).read_bytes())
        data[len(data) // 2] ^= 0x01
        tampered = sum_golang_org(Files({tile: bytes(data)}))
        await tampered.merge_latest((DATA / "latest").read_bytes())
        with pytest.raises(SumdbVerifyError):
            await tampered.lookup(*QUOTE)


async def test_a_changed_record_line_is_refused() -> None:
    answer = (DATA / "lookup/rsc.io/quote@v1.5.2").read_bytes()
    forged = answer.replace(QUOTE_H1.encode(), SAMPLER_H1.encode())
    assert forged != answer
    with pytest.raises(SumdbVerifyError, match="cannot authenticate the record"):
        await sum_golang_org(Files({"lookup/rsc.io/quote@v1.5.2": forged})).lookup(*QUOTE)


async def test_a_genuine_record_under_another_id_is_refused() -> None:
    """The id is not signed: only the leaf hash read at that id vouches for the
    record (record 943 shares record 942's tile, so every tile is at hand)."""
    answer = (DATA / "lookup/rsc.io/quote@v1.5.2").read_bytes()
    assert answer.startswith(b"942\n")
    moved = b"943\n" + answer.removeprefix(b"942\n")
    with pytest.raises(SumdbVerifyError, match="not record 943 of tree"):
        await sum_golang_org(Files({"lookup/rsc.io/quote@v1.5.2": moved})).lookup(*QUOTE)


async def test_a_changed_tree_head_is_refused() -> None:
    answer = (DATA / "lookup/rsc.io/quote@v1.5.2").read_bytes()
    forged = answer.replace(b"\n51929436\n", b"\n51929437\n")
    with pytest.raises(SumdbVerifyError, match="invalid signature"):
        await sum_golang_org(Files({"lookup/rsc.io/quote@v1.5.2": forged})).lookup(*QUOTE)


async def test_another_key_of_the_same_name_is_refused() -> None:
    _, vkey = signer_key("sum.golang.org")
    verifier = SumdbVerifier(parse_verifier_key(vkey), Files().fetch)
    with pytest.raises(SumdbVerifyError, match=r"no signature by sum\.golang\.org"):
        await verifier.lookup(*QUOTE)


async def test_a_missing_answer_is_unavailable_not_wrong() -> None:
    with pytest.raises(SumdbUnavailable):
        await sum_golang_org(Files()).lookup("rsc.io/quote", "v1.5.1")

    async def failing(path: str) -> bytes:
        raise UpstreamStatusError("up0", "503", 503)

    verifier = SumdbVerifier(parse_verifier_key(SUM_GOLANG_ORG_KEY), failing)
    with pytest.raises(SumdbUnavailable, match="503"):
        await verifier.lookup(*QUOTE)


async def test_concurrent_lookups_share_one_fetch_and_answers_are_kept() -> None:
    files = Files()
    verifier = sum_golang_org(files)
    results = await asyncio.gather(*(verifier.lookup(*QUOTE) for _ in range(5)))
    assert {r.zip for r in results} == {QUOTE_H1}
    await verifier.lookup(*QUOTE)
    assert files.paths.count("sumdb/sum.golang.org/lookup/rsc.io/quote@v1.5.2") == 1


def test_parse_lookup_and_record_lines() -> None:
    answer = parse_lookup((DATA / "lookup/rsc.io/quote@v1.5.2").read_bytes())
    assert answer.record_id == 942
    assert answer.note.startswith(b"go.sum database tree\n51929436\n")
    assert hashes_from_record(answer.text, *QUOTE) == (QUOTE_H1, QUOTE_GOMOD_H1)
    with pytest.raises(SumdbVerifyError):
        parse_lookup(b"942\nrsc.io/quote v1.5.2 h1:x=\n")  # no blank line, no note


def test_record_lines_as_the_go_command_reads_them() -> None:
    text = b"m v1.0.0 h2:future=\nm v1.0.0 h1:first=\nm v1.0.0 h1:second=\n"
    assert hashes_from_record(text, "m", "v1.0.0") == ("h1:first=", None)
    assert hashes_from_record(b"m v1.0.0 h2:future=\n", "m", "v1.0.0") == (None, None)
    with pytest.raises(SumdbVerifyError):
        hashes_from_record(b"other v1.0.0 h1:x=\n", "m", "v1.0.0")
    with pytest.raises(SumdbVerifyError):  # v1.0.0 is not v1.0.0-rc
        hashes_from_record(b"m v1.0.0-rc h1:x=\n", "m", "v1.0.0")
