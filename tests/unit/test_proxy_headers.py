"""The head a relayed small body is sent with: ``response_block`` is the
``header_block`` of ``response_headers``, byte for byte, refusals included."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.proxy.headers import response_block, response_headers
from sidecar.server.exchange import header_block

ANSWERS = [
    [("Content-Type", "application/json"), ("Content-Length", "101")],
    [("content-length", "0")],
    [
        ("content-type", "text/plain; charset=utf-8"),
        ("Content-Length", "101"),
        ("ETag", '"abc"'),
        ("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT"),
        ("Cache-Control", "public, max-age=60"),
        ("Set-Cookie", "session=secret"),
        ("Content-Type", "text/html"),
        ("Connection", "close"),
    ],
    [("Cache-Control", "no-store"), ("Content-Type", "application/zip"), ("X-Other", "é")],
]


@pytest.mark.parametrize("raw", ANSWERS)
def test_the_block_is_the_mapping_serialised(raw: list[tuple[str, str]]) -> None:
    upstream = CIMultiDictProxy(CIMultiDict(raw))
    block = response_block(upstream, "up0")
    assert block == header_block(response_headers(upstream, "up0"))
    assert block.endswith(b"X-Sidecar-Upstream: up0\r\n")
    assert b"Set-Cookie" not in block and b"Content-Length" not in block


@pytest.mark.parametrize("value", ["a\r\nSet-Cookie: x=y", "a\nb", "a\rb"])
def test_a_line_break_in_a_value_is_refused_as_header_block_refuses_it(value: str) -> None:
    upstream = CIMultiDictProxy(CIMultiDict([("ETag", value)]))
    with pytest.raises(ValueError, match="line break"):
        header_block(response_headers(upstream, "up0"))
    with pytest.raises(ValueError, match="line break"):
        response_block(upstream, "up0")
    with pytest.raises(ValueError, match="line break"):
        response_block(CIMultiDictProxy(CIMultiDict()), "up\r\n0")
