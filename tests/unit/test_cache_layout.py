"""The on-disk layout: no key leaves the cache directory, records round-trip."""

from __future__ import annotations

import hashlib
import json
import os
import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sidecar.cache.layout as layout_module
from sidecar.cache.layout import (
    Identity,
    Layout,
    Record,
    commit,
    hash_file,
    key_problem,
    make_dirs_inside,
    new_blob_id,
    open_blob,
    open_temp,
    read_record,
    read_small,
    records,
    remove_entry,
    sweep_temp,
    write_all,
)
from sidecar.cache.store import _set_atimes
from sidecar.errors import CacheError, CacheIntegrityError, CacheWriteError, RequestError
from sidecar.goproxy import parse_request_path

ROOT = Layout.at("/srv/cache")


def record(key: str = "example.com/m/@v/v1.0.0.mod", **kw: object) -> Record:
    fields: dict[str, object] = dict(
        key=key,
        kind="mod",
        blob="ab" * 16,
        size=3,
        sha256=hashlib.sha256(b"abc").hexdigest(),
        content_type="text/plain",
        stored=1.0,
        verified=1.0,
        immutable=True,
        upstream="up0",
    )
    fields.update(kw)
    return Record(**fields)  # type: ignore[arg-type]


def _inside_index(path: str) -> bool:
    return os.path.normpath(path).startswith(ROOT.index + os.sep)


# Characters that make traversal interesting, plus a bit of everything else.
_NASTY = st.lists(st.sampled_from([*"./\\%!@~-_aZ09:\x00 é", "..", "%2e", "%2f"]), max_size=30).map(
    "".join
)


@settings(max_examples=2000, deadline=None)
@given(st.one_of(_NASTY, st.text(max_size=60)))
def test_no_key_leaves_the_index(key: str) -> None:
    try:
        path = ROOT.record_path(key)
    except CacheError:
        return
    assert _inside_index(path), (key, path)
    assert ROOT.key_of(path) == key  # one key, one path: no aliasing either


_SEGMENT = st.text(
    alphabet=string.ascii_letters + string.digits + "._~!%-@+", min_size=1, max_size=12
)


@settings(max_examples=2000, deadline=None)
@given(
    st.lists(
        st.one_of(_SEGMENT, st.sampled_from(["..", ".", "", "%2e%2e", "@v", "@latest"])),
        min_size=1,
        max_size=8,
    ),
    st.sampled_from(["", ".zip", ".mod", ".info", "/list"]),
)
def test_no_request_path_leads_out_of_the_cache(segments: list[str], suffix: str) -> None:
    raw = "/" + "/".join(segments) + suffix
    try:
        req = parse_request_path(raw)
    except RequestError:
        return
    path = ROOT.record_path(req.cache_key)  # a valid request always has a usable key
    assert _inside_index(path), (raw, path)


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/etc/passwd",
        "a/../../b",
        "a/./b",
        "a//b",
        "a\\b",
        "a/b\x00",
        "a/é",
        "..",
        "a/b/",
        "x" * 2000,
    ],
)
def test_bad_keys_are_refused(key: str) -> None:
    assert key_problem(key) is not None
    with pytest.raises(CacheError):
        ROOT.record_path(key)


def test_blob_ids_are_hex_only() -> None:
    with pytest.raises(CacheError):
        ROOT.blob_path("../../etc/passwd")
    assert ROOT.blob_path("ab" * 16) == "/srv/cache/v1/blobs/ab/" + "ab" * 16


def test_a_record_compares_by_its_fields_evolves_into_a_copy_and_is_read_only_compiled() -> None:
    blob = new_blob_id()
    assert len(blob) == 32 and set(blob) <= set("0123456789abcdef")
    assert new_blob_id() != blob
    # key, kind, blob, size, sha256, content type, then the times and the rest
    head = ("example.com/m/@v/v1.0.0.info", "info", blob, 3, "ab" * 32, "application/json")
    made = Record(*head, 17.5, 17.5, True, "up0")
    again = Record(*head, 17.5, 17.5, True, "up0", None)
    assert made == again and hash(made) == hash(again) and repr(made) == repr(again)
    assert repr(made).startswith("Record(key='example.com/m/@v/v1.0.0.info', kind='info'")
    assert made != Record(*head, 17.5, 18.0, True, "up0")
    assert made.valid() and Record.from_json(made.to_json()) == made
    identity = Identity(3, 1, 2, 3)
    later = made.evolve(verified=20.0, identity=identity)
    assert (later.verified, later.identity, later.stored) == (20.0, identity, 17.5)
    assert made.verified == 17.5 and made.identity is None  # the original is unchanged
    assert made.evolve(verified=21.0).identity is None  # None keeps the identity
    assert later.evolve(verified=21.0).identity == identity
    if not layout_module.__file__.endswith(".py"):  # Final fields: read-only compiled
        with pytest.raises(AttributeError):
            made.size = 4  # type: ignore[misc]


def test_record_round_trip_and_refusals() -> None:
    r = record()
    assert Record.from_json(r.to_json()) == r
    for bad in (
        b"{",
        b"[]",
        b'{"format": 1}',
        r.to_json().replace(b'"format":1', b'"format":9'),
        record(blob="../x").to_json(),
        record(size=-1).to_json(),
        record(key="../x").to_json(),
        json.dumps({**json.loads(r.to_json()), "size": True}).encode(),
        json.dumps({**json.loads(r.to_json()), "size": 3.0}).encode(),
        json.dumps({**json.loads(r.to_json()), "immutable": 1}).encode(),
    ):
        with pytest.raises(CacheError):
            Record.from_json(bad)


def test_identity_round_trips_and_an_old_record_without_one_loads() -> None:
    r = record(identity=Identity(3, 1_700_000_000_123_456_789, 2**40, 64769))
    assert Record.from_json(r.to_json()) == r
    old = json.loads(record().to_json())
    del old["identity"]  # written by a version before identities
    assert Record.from_json(json.dumps(old).encode()).identity is None
    for bad in ([1, 2, 3], [1, 2, 3, -4], [1, 2, 3, "4"], [1, 2, 3, True], {"size": 3}, "x"):
        with pytest.raises(CacheError):
            Record.from_json(json.dumps({**old, "identity": bad}).encode())


def test_what_a_blob_open_or_hash_reports_follows_every_kind_of_change(tmp_path: Path) -> None:
    from sidecar.cache.layout import prepare

    layout = Layout.at(str(tmp_path))
    prepare(layout)
    r = _commit(layout, "example.com/m/@v/v1.0.0.mod", b"module m\n")
    path = layout.blob_path(r.blob)
    f, found = open_blob(path)
    f.close()
    hashed = hash_file(path)
    assert found == r.identity == hashed.identity and hashed.problem(r) is None
    assert read_small(path, r) == (b"module m\n", r.identity)

    with open(path, "r+b") as f:  # one byte, in place, mtime restored: same identity
        f.write(b"M")
    os.utime(path, ns=(r.identity.mtime_ns, r.identity.mtime_ns))
    assert open_blob(path)[1] == r.identity  # what only the scrub (a hash) can find
    assert "sha256" in (hash_file(path).problem(r) or "")
    with pytest.raises(CacheIntegrityError):
        read_small(path, r)

    os.utime(path)  # touched: a new mtime
    assert open_blob(path)[1].mtime_ns != r.identity.mtime_ns
    replacement = tmp_path / "new"
    replacement.write_bytes(b"module m\n")
    os.utime(replacement, ns=(r.identity.mtime_ns, r.identity.mtime_ns))
    os.rename(replacement, path)  # replaced by rename: same size and mtime, new inode
    f, found = open_blob(path)
    f.close()
    assert found.size == r.size and found.mtime_ns == r.identity.mtime_ns
    assert found.ino != r.identity.ino
    assert hash_file(path).problem(r) is None  # good bytes: re-hashed, then trusted


def test_verify_hashes_every_byte_and_records_the_identity_of_good_blobs(
    tmp_path: Path,
) -> None:
    from sidecar.cache.layout import prepare
    from sidecar.cache.offline import verify_all

    layout = Layout.at(str(tmp_path))
    prepare(layout)
    r = _commit(layout, "example.com/m/@v/v1.0.0.mod", b"module m\n")
    path = layout.blob_path(r.blob)
    os.utime(path, ns=(1, 5_000_000_000))  # restored from a backup: bytes intact
    report = verify_all(layout)
    assert (report.checked, report.bad) == (1, [])
    rerecorded = read_record(layout, layout.record_path(r.key))
    assert rerecorded is not None and rerecorded.identity == Identity.of(os.stat(path))
    assert rerecorded.identity != r.identity and rerecorded.verified > r.verified

    with open(path, "r+b") as f:  # a same-size write, identity put back
        f.write(b"M")
    os.utime(path, ns=(1, 5_000_000_000))
    assert Identity.of(os.stat(path)) == rerecorded.identity
    report = verify_all(layout)
    assert [key for key, _why in report.bad] == [r.key]  # the full check is not fooled
    assert list(records(layout)) == [] and not os.path.exists(path)


def test_persisting_access_times_keeps_the_mtime_a_hit_compares(tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(b"x")
    os.utime(blob, ns=(5, 123_456_789_012))  # say, changed by hand since it was recorded
    _set_atimes([(str(blob), 1_000.5)])
    st = os.stat(blob)
    assert st.st_atime_ns == 1_000_500_000_000 and st.st_mtime_ns == 123_456_789_012


def _commit(layout: Layout, key: str, data: bytes) -> Record:
    fd, temp = open_temp(layout, "cd" * 16)
    hasher = hashlib.sha256()
    write_all(fd, [data[:2], data[2:]], hasher)
    r = record(key=key, blob="cd" * 16, size=len(data), sha256=hasher.hexdigest())
    try:
        committed = commit(layout, fd, temp, r)
    finally:
        os.close(fd)
    assert committed == r.evolve(identity=committed.identity)
    return committed


def test_commit_makes_blob_then_record_visible(tmp_path: Path) -> None:
    from sidecar.cache.layout import prepare

    layout = Layout.at(str(tmp_path))
    prepare(layout)
    r = _commit(layout, "example.com/m/@v/v1.0.0.mod", b"module m\n")
    assert Path(layout.blob_path(r.blob)).read_bytes() == b"module m\n"
    assert r.identity == Identity.of(os.stat(layout.blob_path(r.blob)))  # after the rename
    assert read_record(layout, layout.record_path(r.key)) == r
    assert os.listdir(layout.tmp) == []
    assert [rec for _p, rec in records(layout)] == [r]
    remove_entry(layout, r.key, r.blob)
    assert list(records(layout)) == [] and not os.path.exists(layout.blob_path(r.blob))
    assert (tmp_path / "CACHEDIR.TAG").read_text().startswith("Signature: 8a477f597d28d172789f")


def test_remove_keeps_a_record_that_names_another_blob(tmp_path: Path) -> None:
    from sidecar.cache.layout import prepare

    layout = Layout.at(str(tmp_path))
    prepare(layout)
    r = _commit(layout, "example.com/m/@v/list", b"v1\n")
    remove_entry(layout, r.key, "ef" * 16)  # an older blob of the same key
    assert read_record(layout, layout.record_path(r.key)) == r


def test_make_dirs_inside_refuses_symlinks_out(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)
    with pytest.raises(CacheWriteError):
        make_dirs_inside(str(root / "link" / "a" / "b"), str(root))
    assert list(outside.iterdir()) == []
    make_dirs_inside(str(root / "ok" / "a"), str(root))
    assert (root / "ok" / "a").is_dir()


def test_make_dirs_inside_follows_no_symlink_and_remembers_what_it_checked(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    (root / "real").mkdir(parents=True)
    (root / "alias").symlink_to(root / "real")  # even a link that stays inside
    (root / "file").write_text("x")
    known: set[str] = set()
    for bad in ("alias/a", "file/a"):
        with pytest.raises(CacheWriteError, match="not a directory"):
            make_dirs_inside(str(root / bad), str(root), known)
    with pytest.raises(CacheWriteError, match="leaves the cache directory"):
        make_dirs_inside(str(tmp_path / "elsewhere" / "a"), str(root), known)
    assert list((root / "real").iterdir()) == []
    make_dirs_inside(str(root / "real" / "a" / "b"), str(root), known)
    assert known == {str(root / "real"), str(root / "real" / "a"), str(root / "real" / "a" / "b")}


def test_sweep_keeps_only_live_foreign_temp_files(tmp_path: Path) -> None:
    from sidecar.cache.layout import prepare

    layout = Layout.at(str(tmp_path))
    prepare(layout)
    tmp = Path(layout.tmp)
    mine = tmp / f"{os.getpid()}-{'a' * 32}.part"
    dead = tmp / f"999999999-{'b' * 32}.meta"
    live = tmp / f"1-{'c' * 32}.part"
    junk = tmp / "junk"
    for f in (mine, dead, live, junk):
        f.write_bytes(b"x")
    assert sweep_temp(layout) == 3
    assert sorted(os.listdir(tmp)) == [live.name]


def test_commit_recreates_a_remembered_directory_removed_behind_its_back(tmp_path) -> None:
    import hashlib
    import os
    import shutil

    from sidecar.cache import layout as lay

    layout = lay.Layout.at(str(tmp_path / "c"))
    lay.prepare(layout)

    def commit_one(key: str, body: bytes) -> None:
        blob = lay.new_blob_id()
        fd, temp = lay.open_temp(layout, blob)
        try:
            lay.write_all(fd, [body], hashlib.sha256())
            record = lay.Record(
                key=key,
                kind="mod",
                blob=blob,
                size=len(body),
                sha256=hashlib.sha256(body).hexdigest(),
                content_type="text/plain",
                stored=1.0,
                verified=1.0,
                immutable=True,
                upstream="up",
            )
            lay.commit(layout, fd, temp, record)
        finally:
            os.close(fd)

    commit_one("example.com/a/@v/v1.0.0.mod", b"module a\n")
    assert layout.known_dirs  # remembered
    shutil.rmtree(layout.index)  # an operator cleans up under a running sidecar
    commit_one("example.com/a/@v/v1.1.0.mod", b"module a\n")
    assert (tmp_path / "c").exists()
    assert lay.read_record(layout, layout.record_path("example.com/a/@v/v1.1.0.mod")) is not None
