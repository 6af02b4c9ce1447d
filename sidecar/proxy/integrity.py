"""What upstreams serve, judged by the checksum database (issue 15).

A ``.mod`` or ``.zip`` of a public module is hashed (``h1:``, as go.sum has
it) and compared with the record the checksum database vouches for
(``sidecar.sumdb.lookup``: signed tree head, record proven in the tree). The
caller holds the bytes until the check is done: a mismatch raises
UpstreamIntegrityError, which the request path treats as a failure of that
upstream (never served as 200, never cached, the next upstream is tried).

Modules matched by ``verify.skip``, ``GONOSUMDB`` or ``routing.private``
(GOPRIVATE included) are neither checked nor looked up: their paths never
leave the host. When the database cannot vouch either way (unreachable, an
answer that does not verify), ``verify.unavailable`` decides: serve (the go
command checks again) or refuse; either is counted and logged.

Hashing a zip runs in worker threads, concurrently with the lookup: a cache
fill's zip is hashed while it is written (``sidecar.sumdb.zipstream``, the
gate's sink), and only when that cannot be trusted is the stored file hashed
again once complete (``hash_zip``). A fill's gate starts the lookup as the
fill starts, so that it runs during the download. The lookup's costly CPU
(a new tree head's signature, tiles not hashed before) runs in worker threads
too (``sidecar.sumdb.lookup``), and concurrent checks of one module@version
share one lookup.
"""

from __future__ import annotations

import asyncio
import io
import logging
import tempfile
from collections.abc import Awaitable
from typing import IO, BinaryIO, Final

from sidecar.config import Config, VerifyMode, WhenUnavailable
from sidecar.errors import (
    RequestError,
    SumdbError,
    SumdbVerifyError,
    UpstreamIntegrityError,
    UpstreamProtocolError,
    UpstreamUnverified,
    ZipHashError,
)
from sidecar.goproxy import GoproxyRequest, Kind
from sidecar.proxy.lograte import LogRate
from sidecar.proxy.recorder import Recorder
from sidecar.routing import Glob, compile_glob
from sidecar.sumdb.dirhash import hash_gomod, hash_zip
from sidecar.sumdb.lookup import Fetch, ModuleHashes, SumdbVerifier
from sidecar.sumdb.note import parse_verifier_key
from sidecar.sumdb.zipstream import ZipStream
from sidecar.upstreams import UpstreamResponse

log = logging.getLogger("sidecar.integrity")

CHECKED_KINDS: Final = frozenset({Kind.MOD, Kind.ZIP})
SKIP_MEMO: Final = 4096  # module paths whose skip decision is kept (bounded)
# A relayed body is spooled to a temp file before it is checked; the go command
# refuses a module zip larger than this (x/mod zip.MaxZipFile).
SPOOL_MAX: Final = 500 << 20
SPOOL_BATCH: Final = 1 << 20  # bytes written per worker-thread hop

ZipSource = str | bytes | IO[bytes]  # a file path, a small zip's bytes, an open file


class IntegrityChecker:
    """Checks bodies of one sidecar against its configured checksum database."""

    def __init__(self, config: Config, recorder: Recorder, fetch: Fetch) -> None:
        verify = config.verify
        self.mode = verify.mode
        self.name = verify.name
        self._refuse = verify.unavailable is WhenUnavailable.REFUSE
        self._recorder = recorder
        self._verifier = SumdbVerifier(parse_verifier_key(verify.key), fetch)
        self._skip = skip_globs(config)
        self._skip_memo: dict[str, bool] = {}
        # With the database out of reach every miss cannot be vouched for: one line
        # per reason now and then, with the count, instead of one per request.
        self._unavailable_log = LogRate[tuple[str, str]]()

    def wants(self, req: GoproxyRequest) -> bool:
        """True if ``req``'s body must be checked before it is served."""
        if self.mode is VerifyMode.OFF or req.kind not in CHECKED_KINDS:
            return False
        skipped = self._skip_memo.get(req.module)
        if skipped is None:
            if len(self._skip_memo) >= SKIP_MEMO:
                self._skip_memo.clear()
            skipped = self._skip_memo[req.module] = any(g.matches(req.module) for g in self._skip)
        return not skipped

    async def check_mod(self, req: GoproxyRequest, upstream: str, body: bytes) -> None:
        """Raise UpstreamIntegrityError (enforce) if ``body`` is not the vouched go.mod."""
        await self._check(req, upstream, _done(hash_gomod(body)), self._lookup(req))

    async def check_zip(
        self,
        req: GoproxyRequest,
        upstream: str,
        source: ZipSource,
        streamed: ZipStream | None = None,
        lookup: Awaitable[ModuleHashes] | None = None,
    ) -> None:
        """Raise UpstreamIntegrityError (enforce) if the zip at ``source`` is not the
        vouched one. ``source`` is complete and no longer written to; ``streamed``,
        if given, was fed all of it; ``lookup``, if given, is its record's lookup,
        started earlier."""
        hashing = asyncio.to_thread(_hash_zip, source, streamed)
        await self._check(req, upstream, hashing, lookup or self._lookup(req))

    async def check(
        self,
        req: GoproxyRequest,
        upstream: str,
        source: ZipSource,
        streamed: ZipStream | None = None,
        lookup: Awaitable[ModuleHashes] | None = None,
    ) -> None:
        """``check_mod`` or ``check_zip`` by the request's kind."""
        if req.kind is Kind.ZIP:
            await self.check_zip(req, upstream, source, streamed, lookup)
            return
        body = source if isinstance(source, bytes) else await asyncio.to_thread(_read, source)
        await self._check(req, upstream, _done(hash_gomod(body)), lookup or self._lookup(req))

    def gate(
        self,
        req: GoproxyRequest,
        upstream: str,
        lookup: asyncio.Future[ModuleHashes] | None = None,
    ) -> BodyGate:
        """The gate a cache fill of ``req``'s body passes (``sidecar.cache.fill.Gate``);
        ``lookup``: its record's lookup, if started already."""
        return BodyGate(self, req, upstream, lookup)

    async def lookup(self, module: str, version: str) -> ModuleHashes:
        """The verified record of module@version (raises SumdbError, RequestError)."""
        return await self._verifier.lookup(module, version)

    def start_lookup(self, req: GoproxyRequest) -> asyncio.Future[ModuleHashes]:
        """``req``'s lookup, running from now on; its failure is the awaiter's to
        judge (none if nobody awaits it: a fill that failed first)."""
        started = asyncio.ensure_future(self._lookup(req))
        started.add_done_callback(_retrieve)
        return started

    def _lookup(self, req: GoproxyRequest) -> Awaitable[ModuleHashes]:
        return self._verifier.lookup(req.module, req.version or "")

    async def _check(
        self,
        req: GoproxyRequest,
        upstream: str,
        hashing: Awaitable[str],
        lookup: Awaitable[ModuleHashes],
    ) -> None:
        kind = req.kind.value
        subject = f"{req.module}@{req.version}"
        hashed = asyncio.ensure_future(hashing)  # the zip hashes while the lookup runs
        failed: BaseException | None = None
        try:
            hashes = await lookup
        except BaseException as exc:
            failed = exc
        if failed is not None:
            # Awaited after the except clause (server.connection.sendfile says why).
            await _settle(hashed)
            if not isinstance(failed, (SumdbError, RequestError)):
                raise failed
            try:
                self._unavailable(subject, kind, upstream, failed)
            finally:
                # The lookup's tasks keep this exception, and its traceback keeps
                # their frames: a cycle per failed lookup that only the cyclic GC
                # frees, in pauses of tens of ms that every request in flight waits
                # out (the p99 of issue 14). Nobody reads the traceback after here.
                failed.__traceback__ = None
            return
        want = hashes.zip if req.kind is Kind.ZIP else hashes.gomod
        got = await hashed
        if want is None or got == want:
            return  # no h1: line: the go command accepts whatever it downloaded
        label = "zip_unreadable" if got.startswith("unreadable") else kind
        self._recorder.integrity(upstream, label)
        log.error(
            "checksum mismatch",
            extra={
                "upstream": upstream,
                "artifact": subject,
                "kind": kind,
                "want": want,
                "got": got,
                "served": self.mode is VerifyMode.REPORT,
            },
        )
        if self.mode is VerifyMode.ENFORCE:
            raise UpstreamIntegrityError(upstream, subject, kind, want, got)

    def unchecked(self, req: GoproxyRequest, upstream: str, reason: str) -> None:
        """The body cannot be checked at all (not kept whole): as if unavailable."""
        self._unavailable(f"{req.module}@{req.version}", req.kind.value, upstream, reason)

    def _unavailable(
        self, subject: str, kind: str, upstream: str, why: SumdbError | RequestError | str
    ) -> None:
        action = "refused" if self._refuse else "served"
        self._recorder.counter(self._recorder.metrics.verify_unavailable, kind, action)()
        reason = "not_kept_whole" if isinstance(why, str) else type(why).__name__
        unlogged = self._unavailable_log.admit((reason, action))
        if unlogged is not None:
            log.warning(
                "checksum database cannot vouch",
                extra={
                    "artifact": subject,
                    "kind": kind,
                    "upstream": upstream,
                    "sumdb": self.name,
                    "reason": reason,
                    "hostile": isinstance(why, SumdbVerifyError),
                    "error": str(why),
                    "action": action,
                    "unlogged_before": unlogged,
                },
            )
        if self._refuse:
            raise UpstreamUnverified(
                upstream, f"{subject} .{kind} not served: {self.name} cannot vouch for it: {why}"
            )


def skip_globs(config: Config) -> tuple[Glob, ...]:
    """The modules never checked nor looked up: verify.skip (GONOSUMDB included)
    and routing.private (GOPRIVATE included)."""
    skip = [compile_glob(p, f"verify.skip[{i}]") for i, p in enumerate(config.verify.skip)]
    private = [
        compile_glob(p, f"routing.private[{i}]") for i, p in enumerate(config.routing.private)
    ]
    return (*skip, *private)


class BodyGate:
    """One fill's gate: the body of ``req`` from ``upstream``. A zip is hashed
    while the fill writes it (its sink), so little is left after the last byte."""

    __slots__ = ("_checker", "_lookup", "_req", "_stream", "_upstream")

    def __init__(
        self,
        checker: IntegrityChecker,
        req: GoproxyRequest,
        upstream: str,
        lookup: asyncio.Future[ModuleHashes] | None = None,
    ) -> None:
        self._checker, self._req, self._upstream = checker, req, upstream
        self._stream = ZipStream() if req.kind is Kind.ZIP else None
        # Made as the fill starts at the latest: the lookup (7-25 ms) runs during
        # the download, not after its last byte. Concurrent fills of one version
        # share it.
        self._lookup = lookup or checker.start_lookup(req)

    def sink(self) -> ZipStream | None:
        return self._stream

    async def check(self, path: str) -> None:
        await self._checker.check(self._req, self._upstream, path, self._stream, self._lookup)

    def unchecked(self, reason: str) -> None:
        self._checker.unchecked(self._req, self._upstream, reason)


async def spool(resp: UpstreamResponse) -> tuple[BinaryIO, int]:
    """The whole body in an anonymous temp file (rewound) and its size, so that a
    body relayed without the cache is checked before any byte is sent.
    Raises UpstreamError as ``resp.chunks`` does; releases ``resp``."""
    out = await asyncio.to_thread(tempfile.TemporaryFile)
    size, pending, batch = 0, [], 0
    try:
        async for chunk in resp.chunks():
            pending.append(bytes(chunk))
            size, batch = size + len(chunk), batch + len(chunk)
            if size > SPOOL_MAX:
                raise UpstreamProtocolError(resp.upstream.name, "body larger than a module zip")
            if batch >= SPOOL_BATCH:
                await asyncio.to_thread(out.writelines, pending)
                pending, batch = [], 0
        await asyncio.to_thread(_finish_spool, out, pending)
    except BaseException:
        resp.release(reuse=False)
        out.close()
        raise
    resp.release()
    return out, size


def _finish_spool(out: BinaryIO, pending: list[bytes]) -> None:
    out.writelines(pending)
    out.flush()
    out.seek(0)


def _retrieve(fut: asyncio.Future[ModuleHashes]) -> None:
    if not fut.cancelled():
        fut.exception()


def _done(value: str) -> Awaitable[str]:
    fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    fut.set_result(value)
    return fut


async def _settle(fut: asyncio.Future[str]) -> None:
    """Wait for a hash nobody needs any more: its thread must not outlive the file."""
    try:
        await asyncio.shield(fut)
    except Exception:  # a hash of a body that is not served: its result is moot
        return


def _hash_zip(source: ZipSource, streamed: ZipStream | None) -> str:
    """Worker thread: the zip's h1, or a marker that never equals one."""
    if streamed is not None and isinstance(source, str):
        h1 = streamed.finish(source)
        if h1 is not None:
            return h1
        log.debug("zip hashed again: its stream could not be followed", extra={"path": source})
    try:
        if isinstance(source, bytes):
            return hash_zip(io.BytesIO(source))
        if isinstance(source, str):
            return hash_zip(source)
        try:
            return hash_zip(source)
        finally:
            source.seek(0)  # the caller sends it next
    except (ZipHashError, OSError) as exc:
        return f"unreadable zip: {exc}"


def _read(source: str | IO[bytes]) -> bytes:
    if not isinstance(source, str):
        try:
            return source.read()
        finally:
            source.seek(0)
    with open(source, "rb") as f:
        return f.read()
