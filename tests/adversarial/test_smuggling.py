"""Request smuggling and ambiguous framing: each is refused with a 400 (or the
status named) and a closed connection, the request hidden behind it is never
answered, and nothing reaches the upstream. These are refused today (llhttp
in strict mode and the server's own checks); the tests keep them refused.

Each case is a raw request followed by a plain GET on the same connection:
a server that mis-framed the first would answer the second (or a request
hidden inside the first) as well.
"""

from __future__ import annotations

import asyncio
from functools import partial
from pathlib import Path

import pytest

from tests.adversarial.rawhttp import INFO, INFO_BODY, closed, read_response, request, start_sidecar

SMUGGLED = request(INFO)
HIDDEN = f"GET {INFO} HTTP/1.1\r\nHost: t\r\n\r\n"

CASES = {
    # Content-Length and Transfer-Encoding together (CL.TE / TE.CL)
    "cl-and-te": f"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n"
    f"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n{HIDDEN}",
    "te-and-cl": f"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
    f"Content-Length: 60\r\n\r\n0\r\n\r\n{HIDDEN}",
    # two Content-Length headers, equal or not, or a list
    "two-cl-same": "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
    "Content-Length: 5\r\n\r\nhello",
    "two-cl-differ": "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n"
    f"Content-Length: {len(HIDDEN)}\r\n\r\n{HIDDEN}",
    "cl-list": "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5, 5\r\n\r\nhello",
    "cl-plus": "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: +5\r\n\r\nhello",
    "cl-negative": "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n",
    "cl-hex": "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 0x5\r\n\r\nhello",
    # Transfer-Encoding that is not exactly "chunked" last
    "te-gzip": "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\nxx",
    "te-chunked-gzip": "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
    "te-identity": "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: identity\r\n\r\n",
    "te-xchunked": "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "te-twice": "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
    "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-space-before-colon": "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding : chunked\r\n\r\n"
    "0\r\n\r\n",
    "te-in-http10": "POST / HTTP/1.0\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    # bad chunk framing
    "chunk-size-junk": "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    "zz\r\nhello\r\n0\r\n\r\n",
    "chunk-size-negative": "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    "-5\r\nhello\r\n0\r\n\r\n",
    "chunk-size-overflow": "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    "ffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
    "chunk-size-bare-lf": "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    "5\nhello\r\n0\r\n\r\n",
    "chunk-data-overrun": "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    "5\r\nhelloXX0\r\n\r\n",
    # line folding and stray line ends
    "obs-fold": f"GET {INFO} HTTP/1.1\r\nHost: t\r\nX-A: a\r\n b\r\n\r\n",
    "obs-fold-tab": f"GET {INFO} HTTP/1.1\r\nHost: t\r\nX-A: a\r\n\tb\r\n\r\n",
    "bare-lf-everywhere": f"GET {INFO} HTTP/1.1\nHost: t\n\n",
    "bare-lf-in-headers": f"GET {INFO} HTTP/1.1\r\nHost: t\nX: y\r\n\r\n",
    "bare-cr-in-headers": f"GET {INFO} HTTP/1.1\r\nHost: t\rX: y\r\n\r\n",
    "cr-in-value": f"GET {INFO} HTTP/1.1\r\nHost: t\r\nX: a\rb\r\n\r\n",
    # bytes no header may hold
    "nul-in-value": f"GET {INFO} HTTP/1.1\r\nHost: t\r\nX: a\x00b\r\n\r\n",
    "nul-in-name": f"GET {INFO} HTTP/1.1\r\nHost: t\r\nX\x00: ab\r\n\r\n",
    "del-in-value": f"GET {INFO} HTTP/1.1\r\nHost: t\r\nX: a\x7fb\r\n\r\n",
    "space-before-colon": f"GET {INFO} HTTP/1.1\r\nHost: t\r\nX-A : b\r\n\r\n",
    "tab-in-name": f"GET {INFO} HTTP/1.1\r\nHost: t\r\nX\tA: b\r\n\r\n",
    "space-before-first-header": f"GET {INFO} HTTP/1.1\r\n Host: t\r\n\r\n",
    # request lines
    "not-http": "this is not http\r\n\r\n",
    "lower-case-version": f"GET {INFO} http/1.1\r\nHost: t\r\n\r\n",
    "bad-method": f"G(T {INFO} HTTP/1.1\r\nHost: t\r\n\r\n",
    "control-in-target": "GET /a\x01b HTTP/1.1\r\nHost: t\r\n\r\n",
    "tab-in-target": "GET /a\tb HTTP/1.1\r\nHost: t\r\n\r\n",
    # absolute-form naming another host: the sidecar is no forward proxy
    "absolute-other-host": f"GET http://evil.example{INFO} HTTP/1.1\r\nHost: t\r\n\r\n",
    "absolute-userinfo": f"GET http://t@evil.example{INFO} HTTP/1.1\r\nHost: t\r\n\r\n",
    "absolute-https-other": f"GET https://evil.example{INFO} HTTP/1.1\r\nHost: t\r\n\r\n",
    # Host: none, two, or a bad one
    "no-host": f"GET {INFO} HTTP/1.1\r\n\r\n",
    "two-hosts": f"GET {INFO} HTTP/1.1\r\nHost: t\r\nHost: evil.example\r\n\r\n",
    "host-with-path": f"GET {INFO} HTTP/1.1\r\nHost: evil.example/x\r\n\r\n",
}
STATUS = {
    "http09": 505,
    "http2-text": 505,
    "expect-unknown": 417,
}
CASES |= {
    "http09": "GET /\r\n\r\n",
    "http2-text": f"GET {INFO} HTTP/2.0\r\nHost: t\r\n\r\n",
    "expect-unknown": f"GET {INFO} HTTP/1.1\r\nHost: t\r\nExpect: 200-ok\r\n\r\n",
}


@pytest.fixture
def sidecar(fake_upstreams, sidecar_client, tmp_path: Path):
    return partial(start_sidecar, fake_upstreams, sidecar_client, tmp_path)


@pytest.mark.parametrize("name", sorted(CASES))
async def test_ambiguous_framing_is_refused_and_closed(sidecar, name):
    fake, client = await sidecar()
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(CASES[name].encode("latin-1") + SMUGGLED)
    status, headers, body = await read_response(reader)
    assert status == STATUS.get(name, 400), body
    assert headers["connection"] == "close"
    assert await closed(reader)  # and nothing after the refusal: no second answer
    assert fake.received == []
    writer.close()


async def test_a_refused_request_does_not_undo_the_ones_before_it(sidecar):
    """Requests before the broken one are answered, in order; none after it."""
    _, client = await sidecar()
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(request(INFO) + CASES["cl-and-te"].encode() + SMUGGLED)
    assert (await read_response(reader))[::2] == (200, INFO_BODY)
    status, headers, _ = await read_response(reader)
    assert (status, headers["connection"]) == (400, "close")
    assert await closed(reader)
    writer.close()


async def test_an_upgrade_is_answered_plainly_and_what_follows_is_not_read(sidecar):
    fake, client = await sidecar()
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    upgrade = request(INFO, "Upgrade: websocket", "Connection: Upgrade")
    writer.write(upgrade + SMUGGLED)
    status, headers, body = await read_response(reader)
    assert (status, body, headers["connection"]) == (200, INFO_BODY, "close")
    assert await closed(reader)
    assert fake.received == [INFO.lstrip("/")]
    writer.close()
