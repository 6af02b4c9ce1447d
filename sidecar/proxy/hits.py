"""Answers from the cache: a hit or a stale serve, whole or one byte range,
from bytes in memory or from the entry's file.

An entry not yet verified is hashed first; one found broken (evicted
meanwhile) answers nothing, and the caller fetches it again.
"""

from __future__ import annotations

from typing import Final

from sidecar.breaker.plan import UpstreamPlan
from sidecar.cache.base import CachedEntry, ModuleCache
from sidecar.goproxy import GoproxyRequest
from sidecar.proxy.failures import Attempts
from sidecar.proxy.headers import SOURCE_HEADER, STALE_HEADER
from sidecar.proxy.ranges import UNSATISFIABLE, byte_range, content_range
from sidecar.proxy.stream import Reply, send_file
from sidecar.server import Exchange
from sidecar.server.exchange import header_block

STALE_WARNING: Final = '110 - "Response is Stale"'
# Content types whose hit header lines are kept serialised: a handful in
# practice; the bound is for an upstream that sends a new one every time.
LEAD_MEMO: Final = 64

Answer = tuple[str, str]  # who answered, outcome; the response is sent by then


class Hits:
    """Serves the entries of one cache (None: the handler has no cache)."""

    def __init__(self, cache: ModuleCache | None) -> None:
        self.cache = cache
        self._leads: dict[str, bytes] = {}  # content type -> its hit's first header lines

    async def cache_action(
        self,
        ex: Exchange,
        req: GoproxyRequest,
        target: UpstreamPlan,
        attempts: Attempts,
        reply: Reply,
    ) -> Answer | None:
        cache = self.cache if attempts.use_cache else None
        entry = cache.lookup(req, allow_stale=True) if cache is not None else None
        if entry is not None and cache is not None:
            answer = await self.from_cache(ex, entry, cache.is_stale(entry), reply)
            if answer is not None:
                return answer
        attempts.skipped.append(f"{target.name}: cache miss ({target.breaker.reason})")
        return None

    async def from_cache(
        self, ex: Exchange, entry: CachedEntry, stale: bool, reply: Reply
    ) -> Answer | None:
        """Serve an entry from memory or its file; None if it turned out broken
        (evicted meanwhile): the caller fetches it again."""
        cache = self.cache
        assert cache is not None
        if not entry.verified and not await cache.verify(entry):
            return None
        part = wanted_range(ex, entry)
        body = await cache.small_body(entry)
        if body is not None or part == UNSATISFIABLE:  # a 416 needs no bytes
            return self.send_hit(ex, entry, body or b"", stale, part)
        if not cache.acquire(entry):
            return None
        served = "stale" if stale else "hit"
        reply.answering("cache", served)
        try:
            blob = await cache.open_blob(entry)  # checked against what was hashed
            if blob is None:
                return None
            headers = self._headers(entry, stale)
            outcome = await send_file(ex, blob, entry.size, headers, reply, part)
        finally:
            cache.release(entry)
        return "cache", served if outcome == "ok" else outcome

    def send_hit(
        self,
        ex: Exchange,
        entry: CachedEntry,
        body: bytes,
        stale: bool,
        part: tuple[int, int] | None,
    ) -> Answer:
        """A hit from bytes in memory, whole or ``part`` of it (wanted_range)."""
        if part is None and not stale:  # most of a build's requests
            ex.send(200, self._hit_lines(entry), body)
            return "cache", "hit"
        headers = self._headers(entry, stale)
        if part is None:
            ex.send(200, headers, body)
        else:
            headers["Content-Range"] = content_range(part, entry.size)
            if part == UNSATISFIABLE:
                ex.send(416, headers, b"")
                return "cache", "unsatisfiable"
            ex.send(206, headers, body[part[0] : part[1] + 1])
        return "cache", "stale" if stale else "hit"

    def _hit_lines(self, entry: CachedEntry) -> bytes:
        """``_headers`` of a fresh hit, serialised: the lines before Age are made
        (and checked) once per content type."""
        assert self.cache is not None
        content_type = entry.record.content_type  # (not the property: every hit)
        lead = self._leads.get(content_type)
        if lead is None:
            if len(self._leads) >= LEAD_MEMO:
                self._leads.clear()
            lead = header_block({"Content-Type": content_type, SOURCE_HEADER: "cache"})
            self._leads[content_type] = lead
        return lead + b"Age: %d\r\n" % self.cache.age(entry)

    def _headers(self, entry: CachedEntry, stale: bool) -> dict[str, str]:
        assert self.cache is not None
        headers = {
            "Content-Type": entry.content_type,
            SOURCE_HEADER: "cache",
            "Age": str(self.cache.age(entry)),
        }
        if stale:
            headers[STALE_HEADER] = "1"
            headers["Warning"] = STALE_WARNING
        return headers


def wanted_range(ex: Exchange, entry: CachedEntry) -> tuple[int, int] | None:
    """The single byte range a GET asks for in ``entry``, if any (see
    sidecar.proxy.ranges)."""
    if ex.method != "GET":
        return None
    header = ex.header("range")
    if header is None:
        return None
    return byte_range(header, entry.record.size, ex.header("if-range"))
