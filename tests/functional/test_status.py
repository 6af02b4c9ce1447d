"""/status against a real sidecar with two loopback upstreams, one of them
tripped by the real policy, and the page rendered by real headless Chromium.

The windows and breakers run on a fake clock (as in test_breakers.py), so
"held over two slices" does not depend on this machine's speed.

``SIDECAR_STATUS_SCREENSHOT=out.png python3 -m pytest tests/functional/test_status.py
-k chromium`` keeps the screenshot the Chromium test took. (The README's,
docs/status.png, is of a real ``goproxy-sidecar run`` with Athens absent.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import shutil
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from sidecar.app import Sidecar, SidecarService, build_sidecar
from sidecar.config import (
    AuthConfig,
    BasicAuth,
    CacheConfig,
    PolicyConfig,
    PolicyMode,
    RouteRule,
    RoutingConfig,
    StatsConfig,
)
from sidecar.status_html import safe_url
from tests.conftest import make_config
from tests.serving import SidecarTestServer
from tests.tools import require_tool
from tests.upstream import Reply

POLICIES = Path(__file__).resolve().parents[2] / "policies"
SLICE_S = 0.5
THRESHOLDS = """\
sidecar:
  config:
    thresholds: {ttfb_p99_ms: 100, ttfb_p99_for_s: 1, error_rate: 0.05, min_requests: 5,
                 queue_wait_p99_ms: 50, queue_for_s: 1, min_span_s: 1}
    breaker: {cooldown_s: 30, probes: 2}
"""
HOSTILE = '<script>alert("x")</script><img src="http://evil.example/x.png">'
HOSTILE_POLICY = """\
package sidecar.breaker

decisions := {name: d |
	some name, _ in input.upstreams
	d := {"action": "reroute", "reason": %s, "alert": true}
}
"""
# The page's state colours (sidecar/status.py _CSS): open and closed badges.
OPEN_RGB = (0xC6, 0x28, 0x28)
CLOSED_RGB = (0x2E, 0x85, 0x40)
# Where a screenshot for the README goes when asked (docs/status.png).
SCREENSHOT_ENV = "SIDECAR_STATUS_SCREENSHOT"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


Start = Callable[..., Awaitable[tuple[TestClient[Any, Any], Sidecar]]]


@pytest.fixture
async def status_sidecar(tmp_path: Path) -> AsyncIterator[tuple[Start, FakeClock]]:
    clock = FakeClock()
    clients: list[TestClient[Any, Any]] = []

    async def start(
        urls: list[str], policy_dir: Path, mode: PolicyMode = PolicyMode.ENFORCE, **overrides: Any
    ) -> tuple[TestClient[Any, Any], Sidecar]:
        config = make_config(
            urls,
            tmp_path,
            policy=PolicyConfig(paths=(str(policy_dir),), interval=0.1, mode=mode),
            stats=StatsConfig(window=4 * SLICE_S, slice=SLICE_S),
            cache=CacheConfig(dir=str(tmp_path / "cache")),
            **overrides,
        )
        sc = build_sidecar(config, clock=clock)
        client = TestClient(SidecarTestServer(SidecarService(sc, run_control=False)))
        await client.start_server()
        clients.append(client)
        return client, sc

    yield start, clock
    for client in clients:
        await client.close()


def shipped_policy(tmp_path: Path) -> Path:
    target = tmp_path / "policies"
    shutil.copytree(POLICIES, target)
    (target / "thresholds.yaml").write_text(THRESHOLDS)
    return target


async def tripped(
    fake_upstreams: Any,
    status_sidecar: tuple[Start, FakeClock],
    tmp_path: Path,
    mode: PolicyMode = PolicyMode.ENFORCE,
) -> tuple[TestClient[Any, Any], Sidecar]:
    """up0 answers 500 to everything and trips; up1 serves and stays closed."""
    start, clock = status_sidecar
    (a, url_a), (b, url_b) = await fake_upstreams(2)
    a.default = Reply(status=500)
    paths = [f"example.com/mod/@v/v1.0.{i}.info" for i in range(10)]
    for path in paths:
        b.set(path, b"{}")
    client, sc = await start([url_a, url_b], shipped_policy(tmp_path), mode)
    # Distinct versions: each falls through to up1 and is cached, none is a
    # cache hit that would spare up0. The rate rule needs two slices.
    for n, burst in enumerate((paths[:5], paths[5:])):
        clock.now += SLICE_S * n
        statuses = await asyncio.gather(*(client.get("/" + p) for p in burst))
        assert [r.status for r in statuses] == [200] * 5
        for r in statuses:
            r.release()
    await sc.control.step()
    want = "open" if mode is PolicyMode.ENFORCE else "closed"
    assert sc.breakers["up0"].state.value == want
    return client, sc


async def page(client: TestClient[Any, Any]) -> str:
    resp = await client.get("/status")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    return await resp.text()


def row_of(html: str, name: str) -> str:
    """The module row of upstream ``name`` (from its label to the end of the row)."""
    match = re.search(rf"<strong>{name}</strong>.*?</tr>", html, re.S)
    assert match, name
    return match.group(0)


async def test_status_shows_each_upstream_its_state_and_sparklines(
    fake_upstreams, status_sidecar, tmp_path
):
    client, _ = await tripped(fake_upstreams, status_sidecar, tmp_path)
    html = await page(client)
    assert '<meta http-equiv="refresh" content="5">' in html
    up0, up1 = row_of(html, "up0"), row_of(html, "up1")
    assert '<span class="state open">open</span>' in up0
    assert "error rate 100.0% &gt; 5.0%" in up0  # the policy's reason, escaped
    assert '<span class="state closed">closed</span>' in up1
    assert "ok: ttfb p99" in up1  # a closed breaker has a reason too
    # TTFB p99, error rate, queue wait, hedges: one chart each per upstream,
    # and TTFB and error rate of each checksum breaker.
    assert html.count("<svg") == 2 * 4 + 2 * 2
    assert up0.count("<polyline") == 4  # the window had slices to draw
    assert "<h2>Recent transitions</h2>" in html
    transitions = html.split("<h2>Recent transitions</h2>", 1)[1].split("<h2>", 1)[0]
    assert "up0" in transitions and "error rate 100.0%" in transitions
    assert "<dt>engine</dt><dd>embedded</dd>" in html
    assert "<dt>mode</dt><dd>enforce</dd>" in html
    assert "<dt>entries</dt><dd>10</dd>" in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # nothing external
    assert "<script" not in html.lower()


async def test_status_shows_half_open_probes_and_each_transition(
    fake_upstreams, status_sidecar, tmp_path
):
    client, sc = await tripped(fake_upstreams, status_sidecar, tmp_path)
    _, clock = status_sidecar
    clock.now += 31  # past the 30 s cool-down
    sc.breakers["up0"].tick()
    html = await page(client)
    up0 = row_of(html, "up0")
    assert '<span class="state half-open">half-open</span>' in up0
    assert "probes 0/2 ok, 0 in flight" in up0
    transitions = html.split("<h2>Recent transitions</h2>", 1)[1].split("<h2>", 1)[0]
    assert "last 2, newest first" in transitions
    newest, oldest = transitions.split("<tr>")[2:4]
    assert '<span class="state open">open</span> → <span class="state half-open">' in newest
    assert '<span class="state closed">closed</span> → <span class="state open">' in oldest


async def test_status_in_shadow_mode_shows_what_the_policy_would_do(
    fake_upstreams, status_sidecar, tmp_path
):
    client, _ = await tripped(fake_upstreams, status_sidecar, tmp_path, PolicyMode.SHADOW)
    html = await page(client)
    up0 = row_of(html, "up0")
    assert '<span class="state closed">closed</span>' in up0  # shadow never moves a breaker
    assert "<span class=would>shadow: cache</span>" in up0
    assert "<span class=would>shadow: error rate 100.0% &gt; 5.0%" in up0
    assert "shadow: allow" in row_of(html, "up1")
    assert "<dt>mode</dt><dd>shadow</dd>" in html
    assert "none since start" in html  # no transition happened


async def test_status_escapes_a_hostile_reason(fake_upstreams, status_sidecar, tmp_path):
    start, _ = status_sidecar
    policy_dir = tmp_path / "hostile"
    policy_dir.mkdir()
    quoted = '"' + HOSTILE.replace("\\", "\\\\").replace('"', '\\"') + '"'
    (policy_dir / "hostile.rego").write_text(HOSTILE_POLICY % quoted)
    (_, url_a), (_, url_b) = await fake_upstreams(2)
    client, sc = await start([url_a, url_b], policy_dir)
    await sc.control.step()
    assert sc.breakers["up0"].reason == HOSTILE  # it did reach the breaker as written
    html = await page(client)
    assert "<script" not in html.lower() and "<img" not in html.lower()
    assert 'src="http' not in html
    escaped = "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&lt;img src=&quot;http://"
    assert html.count(escaped) >= 4  # both breakers of both upstreams, and the transitions


async def test_status_shows_auth_by_its_variable_names_only(
    fake_upstreams, status_sidecar, tmp_path
):
    start, _ = status_sidecar
    (_, url_a), (_, url_b) = await fake_upstreams(2)
    client, sc = await start([url_a, url_b], shipped_policy(tmp_path))
    basic = BasicAuth("GOPROXY_USER", "GOPROXY_PASS", username="alice", password="s3cret-pw")
    up0 = dataclasses.replace(sc.config.upstreams[0], auth=AuthConfig(basic=basic))
    sc.config = dataclasses.replace(sc.config, upstreams=(up0, *sc.config.upstreams[1:]))
    html = await page(client)
    assert "<dt>last evaluation</dt><dd>none yet</dd>" in html  # renders before any
    assert "auth: basic from $GOPROXY_USER / $GOPROXY_PASS" in row_of(html, "up0")
    assert "s3cret-pw" not in html and "alice" not in html
    assert f"<code>{url_a}</code>" in row_of(html, "up0")
    assert safe_url("https://user:s3cret@proxy.example:8443/go?token=t0k#f") == (
        "https://proxy.example:8443/go"
    )


async def test_status_lists_the_routing_rules_escaped(fake_upstreams, status_sidecar, tmp_path):
    start, _ = status_sidecar
    (_, url_a), (_, url_b) = await fake_upstreams(2)
    routing = RoutingConfig(
        private=("corp.example/<i>*",),
        rules=(
            RouteRule("github.com/acme/*", upstreams=("up1",), cache=False),
            RouteRule("evil.example/*", deny=True),
        ),
    )
    client, _ = await start([url_a, url_b], shipped_policy(tmp_path), routing=routing)
    html = await page(client)
    assert "<dt>private patterns</dt><dd><code>corp.example/&lt;i&gt;*</code></dd>" in html
    assert "<i>" not in html
    assert (
        "<tr><td><code>github.com/acme/*</code></td><td><code>up1</code></td>"
        "<td></td><td>no</td></tr>"
    ) in html
    assert (
        "<tr><td><code>evil.example/*</code></td><td><code>up0</code> <code>up1</code></td>"
        "<td>deny</td><td>yes</td></tr>"
    ) in html


# --- real headless Chromium -------------------------------------------------------


async def chromium(*args: str, profile: Path) -> str:
    """Run headless Chromium without blocking the loop the sidecar serves on."""
    exe = require_tool("chromium")
    proc = await asyncio.create_subprocess_exec(
        str(exe),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=1200,900",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


def png_pixels(data: bytes) -> tuple[int, int, list[tuple[int, int, int]]]:
    """Width, height and RGB pixels of an 8-bit RGB or RGBA PNG (what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
    width, height, depth, colour = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and colour in (2, 6), (depth, colour)
    bpp = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    prev, pixels = bytearray(stride), []
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[i] = (line[i] + pred) & 0xFF
        pixels.extend(tuple(line[i : i + 3]) for i in range(0, stride, bpp))  # type: ignore[misc]
        prev = line
    return width, height, pixels


def near(pixel: tuple[int, int, int], want: tuple[int, int, int], tolerance: int = 8) -> bool:
    return all(abs(p - w) <= tolerance for p, w in zip(pixel, want, strict=True))


@pytest.mark.tool
async def test_status_renders_in_headless_chromium(fake_upstreams, status_sidecar, tmp_path):
    require_tool("chromium")
    client, _ = await tripped(fake_upstreams, status_sidecar, tmp_path)
    url = str(client.make_url("/status"))
    dom = await chromium("--dump-dom", url, profile=tmp_path / "profile-dom")
    for name, state in (("up0", "open"), ("up1", "closed")):
        match = re.search(rf"<strong>{name}</strong>.*?</tr>", dom, re.S)
        assert match, name
        assert f'<span class="state {state}">{state}</span>' in match.group(0)
    assert dom.count("<svg") == 12
    shot = tmp_path / "status.png"
    await chromium(f"--screenshot={shot}", url, profile=tmp_path / "profile-shot")
    width, height, pixels = png_pixels(shot.read_bytes())
    assert (width, height) == (1200, 900)
    assert len(set(pixels)) > 50  # text, tables, badges and charts: not a blank page
    # Both states are visible: the open badge's red and the closed badge's green.
    assert sum(near(p, OPEN_RGB) for p in pixels) > 100
    assert sum(near(p, CLOSED_RGB) for p in pixels) > 100
    target = os.environ.get(SCREENSHOT_ENV)
    if target:
        shutil.copyfile(shot, target)
