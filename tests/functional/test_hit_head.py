"""The head of a cache hit as bytes on the wire: the lines a hit serialises
itself (hits.Hits._hit_lines) are those header_block would write, in order."""

from __future__ import annotations

import asyncio
import re

from tests.functional import test_cache_support
from tests.functional.test_cache_support import INFO, MOD, settled
from tests.upstream import Reply

cached_sidecar = test_cache_support.cached_sidecar  # the fixture

BODIES = {
    INFO: (b'{"Version":"v1.0.0","Time":"2020-01-01T00:00:00Z"}', "application/json"),
    MOD: (b"module github.com/Azure/go-autorest\n", "text/plain; charset=utf-8"),
}


async def _raw_get(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET /{path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    finally:
        writer.close()


async def test_a_hit_head_is_status_date_type_source_age_length(fake_upstreams, cached_sidecar):
    [(up, url)] = await fake_upstreams(1)
    for path, (body, ctype) in BODIES.items():
        up.set(path, Reply(body=body, headers={"Content-Type": ctype}))
    client, sc = await cached_sidecar([url])
    for path in BODIES:
        assert (await client.get("/" + path)).status == 200
    await settled(sc, len(BODIES))
    for _ in range(2):  # the second round takes the kept lines of each type
        for path, (body, ctype) in BODIES.items():
            head = (await _raw_get(client.port, path)).decode("latin-1")
            lines = head.split("\r\n")
            assert lines[0] == "HTTP/1.1 200 OK"
            assert re.fullmatch(r"Date: \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT", lines[1])
            assert lines[2:4] == [f"Content-Type: {ctype}", "X-Sidecar-Upstream: cache"]
            assert re.fullmatch(r"Age: \d+", lines[4])
            assert lines[5:] == [f"Content-Length: {len(body)}", "", ""]
    assert sorted(up.received) == sorted(BODIES)
