"""The proxy against real loopback upstreams: passthrough, fall-through, failures."""

from __future__ import annotations

import asyncio
import logging
import os
import socket

import aiohttp
import pytest

from sidecar.config import AuthConfig, BasicAuth, HedgeConfig, UpstreamConfig
from tests.conftest import FAST_TIMEOUTS
from tests.upstream import Reply

ZIP = "github.com/!azure/go-autorest/@v/v1.0.0.zip"
INFO = "github.com/!azure/go-autorest/@v/v1.0.0.info"

KINDS = [
    ("github.com/!azure/go-autorest/@v/list", b"v1.0.0\nv1.1.0\n", "text/plain"),
    (INFO, b'{"Version":"v1.0.0","Time":"2020-01-01T00:00:00Z"}', "application/json"),
    (
        "github.com/!azure/go-autorest/@v/v1.0.0.mod",
        b"module github.com/Azure/go-autorest\n",
        "text/plain",
    ),
    (ZIP, os.urandom(3 * 1024 * 1024 + 17), "application/zip"),
    ("github.com/!azure/go-autorest/@latest", b'{"Version":"v1.1.0"}', "application/json"),
    ("sumdb/sum.golang.org/supported", b"", "text/plain"),
    (
        "sumdb/sum.golang.org/lookup/golang.org/x/text@v0.3.0",
        b"123\ngolang.org/x/text v0.3.0 h1:x\n",
        "text/plain",
    ),
    ("sumdb/sum.golang.org/tile/8/0/001", os.urandom(8192), "application/octet-stream"),
]


@pytest.mark.parametrize(("path", "body", "ctype"), KINDS, ids=[k[0][-24:] for k in KINDS])
async def test_every_kind_passes_byte_exact(fake_upstreams, sidecar_client, path, body, ctype):
    [(up, url)] = await fake_upstreams(1)
    up.set(
        path,
        Reply(
            body=body,
            headers={
                "Content-Type": ctype,
                "ETag": '"abc"',
                "Last-Modified": "Wed, 01 Jan 2020 00:00:00 GMT",
            },
        ),
    )
    client, _ = await sidecar_client([url])
    resp = await client.get("/" + path)
    assert resp.status == 200
    assert await resp.read() == body
    assert resp.headers["Content-Type"].startswith(ctype)
    assert resp.headers["ETag"] == '"abc"'
    assert resp.headers["Last-Modified"] == "Wed, 01 Jan 2020 00:00:00 GMT"
    assert resp.headers["X-Sidecar-Upstream"] == "up0"
    assert up.received == [path]


async def test_hop_by_hop_and_foreign_headers_are_dropped(fake_upstreams, sidecar_client):
    [(up, url)] = await fake_upstreams(1)
    up.set(
        INFO,
        Reply(
            body=b"{}",
            headers={
                "Set-Cookie": "s=1",
                "Connection": "x-secret",
                "X-Secret": "1",
                "WWW-Authenticate": "Basic",
            },
        ),
    )
    client, _ = await sidecar_client([url])
    resp = await client.get("/" + INFO)
    assert resp.status == 200
    for name in ("Set-Cookie", "X-Secret", "WWW-Authenticate"):
        assert name not in resp.headers


async def test_head_is_answered_without_a_body(fake_upstreams, sidecar_client):
    [(up, url)] = await fake_upstreams(1)
    up.set(ZIP, Reply(body=b"z" * 5000, headers={"Content-Type": "application/zip"}))
    client, _ = await sidecar_client([url])
    resp = await client.head("/" + ZIP)
    assert resp.status == 200
    assert resp.headers["Content-Length"] == "5000"
    assert await resp.read() == b""


async def test_404_falls_through_and_counts_a_masked_failure(fake_upstreams, sidecar_client):
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    b.set(INFO, b'{"Version":"v1.0.0"}')
    client, sidecar = await sidecar_client([url_a, url_b])
    resp = await client.get("/" + INFO)
    assert resp.status == 200
    assert resp.headers["X-Sidecar-Upstream"] == "up1"
    assert a.received == [INFO] and b.received == [INFO]
    snap = sidecar.windows["up0"].snapshot()
    assert snap.masked_failures == 1 and snap.not_found == 1 and snap.errors == 0
    assert _metric(sidecar, "goproxy_sidecar_masked_failures_total", upstream="up0") == 1


async def test_last_404_is_returned_with_its_text(fake_upstreams, sidecar_client):
    (_a, url_a), (b, url_b) = await fake_upstreams(2)
    b.default = Reply(status=410, body=b"gone: module withdrawn")
    client, _ = await sidecar_client([url_a, url_b])
    resp = await client.get("/" + INFO)
    assert resp.status == 410
    assert "withdrawn" in await resp.text()


FAILURES = {
    "500": Reply(status=500, body=b"boom"),
    "502": Reply(status=502),
    "429": Reply(status=429),
    "reset": Reply(reset=True),
    "first-byte-timeout": Reply(delay=3.0, body=b"late"),
    "truncated": Reply(body=b"x" * 1000, truncate_at=100),
}


@pytest.mark.parametrize("failure", FAILURES)
async def test_each_failure_class_falls_through(fake_upstreams, sidecar_client, failure):
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    a.set(INFO, FAILURES[failure])
    b.set(INFO, b'{"Version":"v1.0.0"}')
    # Not hedged: the slow primary must time out here (hedging: test_hedging.py).
    client, sidecar = await sidecar_client([url_a, url_b], hedge=HedgeConfig(enabled=False))
    resp = await client.get("/" + INFO)
    assert resp.status == 200
    assert await resp.read() == b'{"Version":"v1.0.0"}'
    snap = sidecar.windows["up0"].snapshot()
    assert snap.errors == 1
    assert snap.timeouts == (1 if failure == "first-byte-timeout" else 0)


async def test_connection_refused_falls_through(fake_upstreams, sidecar_client):
    [(b, url_b)] = await fake_upstreams(1)
    b.set(INFO, b"{}")
    client, sidecar = await sidecar_client([f"http://127.0.0.1:{_closed_port()}", url_b])
    resp = await client.get("/" + INFO)
    assert resp.status == 200
    assert sidecar.windows["up0"].snapshot().errors == 1


async def test_all_upstreams_failing_gives_502_with_a_reason(fake_upstreams, sidecar_client):
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    a.default = Reply(status=500)
    b.default = Reply(status=503, body=b"maintenance")
    client, _ = await sidecar_client([url_a, url_b])
    resp = await client.get("/" + INFO)
    assert resp.status == 502
    text = await resp.text()
    assert "up1" in text and "503" in text


async def test_truncated_large_body_is_never_passed_off_as_complete(fake_upstreams, sidecar_client):
    [(a, url)] = await fake_upstreams(1)
    a.set(ZIP, Reply(body=b"z" * (2 * 1024 * 1024), truncate_at=1024 * 1024))
    client, sidecar = await sidecar_client([url])
    resp = await client.get("/" + ZIP)
    assert resp.status == 200  # headers were sent before the cut
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    await asyncio.sleep(0.05)
    assert sidecar.windows["up0"].snapshot().errors == 1


FAILED_ZIP = 'goproxy_sidecar_requests_total{kind="zip",outcome="failed",upstream="up0"} 1.0'


async def test_a_body_cut_mid_relay_is_answered_not_retried_elsewhere(
    fake_upstreams, sidecar_client, caplog
):
    """Once the head is out, the request is answered: a body the upstream cuts
    is a cut connection for the client and a failure of that upstream, not a
    reason to ask the next upstream for an answer that could not be sent."""
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    a.set(ZIP, Reply(body=b"z" * (2 * 1024 * 1024), truncate_at=1024 * 1024))
    b.set(ZIP, b"z" * (2 * 1024 * 1024))
    client, sidecar = await sidecar_client([url_a, url_b], hedge=HedgeConfig(enabled=False))
    resp = await client.get("/" + ZIP)
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    metrics = ""
    for _ in range(100):
        metrics = await (await client.get("/metrics")).text()
        if FAILED_ZIP in metrics:
            break
        await asyncio.sleep(0.02)
    assert FAILED_ZIP in metrics
    assert ZIP not in b.received
    assert sidecar.windows["up0"].snapshot().errors == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_client_hangup_cancels_upstream_and_is_not_a_failure(fake_upstreams, sidecar_client):
    [(a, url)] = await fake_upstreams(1)
    a.set(ZIP, Reply(body=b"z" * (8 * 1024 * 1024), chunk_delay=0.02))
    client, sidecar = await sidecar_client([url])
    resp = await client.get("/" + ZIP)
    await resp.content.read(64 * 1024)
    resp.close()
    for _ in range(100):
        if a.cancelled:
            break
        await asyncio.sleep(0.02)
    assert a.cancelled == 1 and a.completed == 0
    await asyncio.sleep(0.05)
    snap = sidecar.windows["up0"].snapshot()
    assert snap.errors == 0


async def test_upstream_path_prefix_and_basic_auth(fake_upstreams, sidecar_client, monkeypatch):
    [(a, url)] = await fake_upstreams(1)
    a.set("goproxy/" + INFO, b"{}")
    auth = AuthConfig(basic=BasicAuth("U", "P", username="ci-bot", password="s3cret-pw"))
    cfg = UpstreamConfig(name="corp", url=url + "/goproxy", timeouts=FAST_TIMEOUTS, auth=auth)
    client, sidecar = await sidecar_client([url], upstreams=(cfg,))
    resp = await client.get("/" + INFO)
    assert resp.status == 200
    assert a.headers_seen[0]["Authorization"].startswith("Basic ")
    assert "s3cret-pw" not in repr(sidecar.config)
    metrics = await (await client.get("/metrics")).text()
    assert "s3cret-pw" not in metrics and "ci-bot" not in metrics


async def test_401_is_a_failure_with_a_hint_and_no_secret_in_logs(
    fake_upstreams, sidecar_client, caplog
):
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    a.default = Reply(status=401, body=b"auth required")
    b.set(INFO, b"{}")
    auth = AuthConfig(basic=BasicAuth("U", "P", username="ci-bot", password="s3cret-pw"))
    cfgs = (
        UpstreamConfig(name="corp", url=url_a, timeouts=FAST_TIMEOUTS, auth=auth),
        UpstreamConfig(name="public", url=url_b, timeouts=FAST_TIMEOUTS),
    )
    client, sidecar = await sidecar_client([url_a, url_b], upstreams=cfgs)
    for _ in range(3):
        assert (await client.get("/" + INFO)).status == 200
    hints = [r for r in caplog.records if r.getMessage() == "upstream refused credentials"]
    assert len(hints) == 1  # logged once, not per request
    assert all("s3cret-pw" not in r.getMessage() + str(r.__dict__) for r in caplog.records)
    assert sidecar.windows["corp"].snapshot().errors == 3


BAD_TARGETS = [
    "http://evil.example/x/@v/list",  # absolute-form: an open-proxy request
    "//evil.example/x/@v/list",
    "/github.com/x/y/@v/../../../etc/passwd",
    "/github.com/x/y/%2e%2e/@v/list",
    "/github.com/x/y/%2e%2e%2f%2e%2e%2fetc/@v/list",
    "/github.com/x/y/@v/v1.0.0.zip/../../../../x",
    "/github.com%2fevil/@v/list",
]


@pytest.mark.parametrize("target", BAD_TARGETS)
async def test_sidecar_only_talks_to_configured_upstreams(fake_upstreams, sidecar_client, target):
    [(a, url)] = await fake_upstreams(1)
    client, _ = await sidecar_client([url])
    status = await raw_get(client.host, client.port, target)
    assert 400 <= status < 500, target
    assert a.received == []


async def raw_get(host: str, port: int, target: str) -> int:
    """Send a request line exactly as given (clients normalise what tests need raw)."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    line = await reader.readline()
    writer.close()
    return int(line.split()[1])


async def test_non_get_methods_are_refused(fake_upstreams, sidecar_client):
    [(a, url)] = await fake_upstreams(1)
    client, _ = await sidecar_client([url])
    resp = await client.post("/" + INFO, data=b"x")
    assert resp.status == 405 and resp.headers["Allow"] == "GET, HEAD"
    # the connection stays usable after a request with a body
    assert (await client.post("/metrics", data=b"y" * 100_000)).status == 405
    assert (await client.get("/healthz")).status == 200
    assert a.received == []


async def test_health_and_metrics_endpoints(fake_upstreams, sidecar_client):
    [(a, url)] = await fake_upstreams(1)
    a.set(INFO, b"{}")
    client, _ = await sidecar_client([url])
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200
    await client.get("/" + INFO)
    text = await (await client.get("/metrics")).text()
    assert 'goproxy_sidecar_requests_total{kind="info",outcome="ok",upstream="up0"} 1.0' in text
    assert "goproxy_sidecar_upstream_pool_limit" in text
    assert "autorest" not in text  # no module path in any label


async def test_debug_level_logs_one_line_per_request(fake_upstreams, sidecar_client, caplog):
    [(a, url)] = await fake_upstreams(1)
    a.set(INFO, b"{}")
    caplog.set_level(logging.DEBUG, logger="sidecar.proxy")
    client, _ = await sidecar_client([url])
    assert (await client.get("/" + INFO)).status == 200
    lines = [r for r in caplog.records if r.name == "sidecar.proxy" and r.msg == "request"]
    assert len(lines) == 1
    line = lines[0]
    assert (line.method, line.status, line.source, line.outcome) == ("GET", 200, "up0", "ok")
    assert line.path == INFO and line.ms >= 0


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _metric(sidecar, name: str, **labels: str) -> float:
    value = sidecar.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value
