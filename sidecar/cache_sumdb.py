"""``goproxy-sidecar cache verify --sumdb``: cached modules judged by the checksum database.

Every cached ``.mod`` and ``.zip`` of a module that is not skipped (``verify.skip``,
``GONOSUMDB``, ``routing.private``, ``GOPRIVATE``) is hashed (``h1:``) and compared
with the verified record of its module@version, as a live fill is (issue 15).
A mismatch is evicted and reported; an entry the database cannot vouch for
(unreachable, unknown to it, an answer that does not verify) is reported and
kept. The database is asked at ``verify.url``, else through the upstreams'
``sumdb/<name>/`` paths in order. No sidecar needs to run.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from sidecar.cache.layout import Layout, Record, mark_changed, remove_entry
from sidecar.cache.offline import list_entries
from sidecar.cache.pack import Pack
from sidecar.config import Config
from sidecar.errors import RequestError, SumdbError, ZipHashError
from sidecar.goproxy import GoproxyRequest, Kind, parse_request_path
from sidecar.proxy.integrity import skip_globs
from sidecar.proxy.internal import direct_fetch, walk_fetch
from sidecar.sumdb.dirhash import hash_gomod, hash_zip
from sidecar.sumdb.lookup import SumdbVerifier
from sidecar.sumdb.note import parse_verifier_key
from sidecar.upstreams import Upstream

JOBS: Final = 8  # entries checked at a time (lookups in flight)


@dataclass(slots=True)
class SumdbReport:
    database: str
    checked: int = 0
    skipped: int = 0  # modules never looked up
    bad: list[tuple[str, str]] = field(default_factory=list)  # (key, both hashes)
    unvouched: list[tuple[str, str]] = field(default_factory=list)  # (key, why)


async def verify_sumdb(
    config: Config, progress: Callable[[int, int], None] | None = None
) -> SumdbReport:
    layout = Layout.at(config.cache.dir)
    report = SumdbReport(config.verify.name)
    skip = skip_globs(config)
    entries = []
    for item in list_entries(layout):
        req = _request(item.record)
        if req is None:
            continue
        if any(g.matches(req.module) for g in skip):
            report.skipped += 1
        else:
            entries.append((item.record, req))
    if config.verify.url is not None:
        fetch, upstream = direct_fetch(config.verify.url, config.verify.name)
        upstreams = [upstream]
    else:
        upstreams = [Upstream(cfg, "primary") for cfg in config.upstreams]
        fetch = walk_fetch(upstreams)
    verifier = SumdbVerifier(parse_verifier_key(config.verify.key), fetch)
    pack = Pack(layout.pack)
    limit = asyncio.Semaphore(JOBS)
    done = 0

    async def one(record: Record, req: GoproxyRequest) -> None:
        nonlocal done
        async with limit:
            await _check(layout, pack, verifier, record, req, report)
        done += 1
        if progress is not None:
            progress(done, len(entries))

    for upstream in upstreams:
        await upstream.start()
    try:
        await asyncio.gather(*(one(record, req) for record, req in entries))
    finally:
        pack.close()
        for upstream in upstreams:
            await upstream.close()
    if report.bad:
        mark_changed(layout)  # a running sidecar forgets the evicted entries
    return report


def _request(record: Record) -> GoproxyRequest | None:
    """The .mod or .zip request a cache entry answers; None for any other entry."""
    if record.kind not in (Kind.MOD.value, Kind.ZIP.value):
        return None
    try:
        req = parse_request_path("/" + record.key)
    except RequestError:
        return None
    return req if req.kind in (Kind.MOD, Kind.ZIP) and req.version else None


async def _check(
    layout: Layout,
    pack: Pack,
    verifier: SumdbVerifier,
    record: Record,
    req: GoproxyRequest,
    report: SumdbReport,
) -> None:
    version = req.version or ""
    try:
        hashes = await verifier.lookup(req.module, version)
    except (SumdbError, RequestError) as exc:
        report.unvouched.append((record.key, str(exc)))
        return
    want = hashes.zip if req.kind is Kind.ZIP else hashes.gomod
    body = pack.body(record.key, record.blob)  # small entries live in the pack
    got = await asyncio.to_thread(_h1, layout, record, body, req.kind)
    if got is None:
        return  # removed or replaced since the listing: not this entry any more
    report.checked += 1
    if want is None or got == want:
        return
    if body is not None:
        pack.delete(record.key, record.blob)
    else:
        remove_entry(layout, record.key, record.blob)
    report.bad.append((record.key, f"{got} != {want} in {report.database} (evicted)"))


def _h1(layout: Layout, record: Record, body: bytes | None, kind: Kind) -> str | None:
    """Worker thread: the entry's h1:, a marker for an unreadable zip, None if gone."""
    try:
        if body is not None:
            return hash_zip(io.BytesIO(body)) if kind is Kind.ZIP else hash_gomod(body)
        path = layout.blob_path(record.blob)
        if kind is Kind.ZIP:
            return hash_zip(path)
        with open(path, "rb") as f:
            return hash_gomod(f.read())
    except FileNotFoundError:
        return None
    except (ZipHashError, OSError) as exc:
        return f"unreadable ({exc})"
