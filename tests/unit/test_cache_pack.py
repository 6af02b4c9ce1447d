"""The SQLite pack of small entries, on a real file."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from sidecar.cache.layout import Record, new_blob_id
from sidecar.cache.pack import Pack
from sidecar.errors import CacheError, CacheWriteError


def record(key: str, body: bytes, stored: float = 10.0) -> Record:
    return Record(
        key=key,
        kind="info",
        blob=new_blob_id(),
        size=len(body),
        sha256=hashlib.sha256(body).hexdigest(),
        content_type="application/json",
        stored=stored,
        verified=stored,
        immutable=True,
        upstream="athens",
    )


def test_rows_round_trip_and_change_only_the_entry_they_name(tmp_path: Path) -> None:
    pack = Pack(str(tmp_path / "small.db"))
    assert pack.records() == [] and pack.body("k", "b") is None  # nothing created by reads
    assert not (tmp_path / "small.db").exists()
    a, b = record("example.com/a/@v/v1.0.0.info", b"A"), record("example.com/b/@v/list", b"B\n")
    pack.put_many([(a, b"A"), (b, b"B\n")])
    assert {k: (r, t) for r, k, t in pack.records()} == {a.key: (a, 10.0), b.key: (b, 10.0)}
    assert pack.body(a.key, a.blob) == b"A"
    assert pack.body(a.key, new_blob_id()) is None  # another entry of the same key
    newer = record(a.key, b"A2", stored=20.0)
    pack.put_many([(newer, b"A2")])  # replaces the row
    assert not pack.delete(a.key, a.blob)  # the old entry is gone already
    assert pack.body(a.key, newer.blob) == b"A2"
    pack.touch_many([(newer.key, newer.blob, 99.0), (b.key, new_blob_id(), 77.0)])
    assert pack.rewrite(newer.evolve(verified=50.0))
    times = {k: t for _r, k, t in pack.records()}
    assert times == {a.key: 99.0, b.key: 10.0}
    assert [r.verified for r, k, _t in pack.records() if k == a.key] == [50.0]
    assert pack.keys("example.com/b/") == [b.key] and pack.keys("example.com/c") == []
    assert pack.delete(b.key) and pack.keys("example.com/") == [a.key]
    pack.close()


def test_pages_walk_every_row_once_in_key_order(tmp_path: Path) -> None:
    pack = Pack(str(tmp_path / "small.db"))
    assert pack.page("", 10) == []  # no file yet: nothing, and nothing created
    rows = {f"example.com/m{i:02d}/@v/list": f"v1.{i}.0\n".encode() for i in range(7)}
    records = {key: record(key, body) for key, body in rows.items()}
    pack.put_many((records[key], body) for key, body in reversed(rows.items()))
    seen: list[str] = []
    after = ""
    while page := pack.page(after, 3):
        assert len(page) <= 3
        for key, blob, size, sha256, body in page:
            r = records[key]
            assert (blob, size, sha256, body) == (r.blob, r.size, r.sha256, rows[key])
            seen.append(key)
        after = page[-1][0]
    assert seen == sorted(rows)
    pack.close()


def test_an_insane_row_is_reported_as_unreadable(tmp_path: Path) -> None:
    pack = Pack(str(tmp_path / "small.db"))
    good = record("example.com/a/@v/v1.0.0.mod", b"module a\n")
    pack.put_many([(good, b"module a\n")])
    pack.close()
    with sqlite3.connect(tmp_path / "small.db") as db:
        db.execute("UPDATE entries SET sha256 = 'not hex'")
    [(parsed, key, _t)] = Pack(str(tmp_path / "small.db")).records()
    assert parsed is None and key == good.key


def test_a_file_that_is_not_sqlite_is_an_error_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / "small.db").write_bytes(b"this is not a database" * 100)
    pack = Pack(str(tmp_path / "small.db"))
    with pytest.raises(CacheError):
        pack.records()
    with pytest.raises(CacheWriteError):
        pack.put_many([(record("k/@v/list", b"x"), b"x")])
