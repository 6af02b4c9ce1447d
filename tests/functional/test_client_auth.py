"""Client authentication (issue 17) against the real sidecar and a loopback
upstream that records every request: htpasswd files made by `htpasswd -B`,
token files, trusted networks, per-identity access to private modules, the
endpoints' rules, and what must never leak (credentials in the upstream's
requests, logs, /metrics, /status)."""

from __future__ import annotations

import asyncio
import base64
import logging
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from sidecar.app import Sidecar, SidecarService
from sidecar.auth.tokens import token_line
from sidecar.config import (
    AccessRule,
    CacheConfig,
    ClientAuthConfig,
    CredentialFiles,
    EndpointAccess,
    EndpointRules,
    GroupConfig,
    RoutingConfig,
    ThrottleConfig,
    UpstreamConfig,
)
from tests.conftest import FAST_TIMEOUTS
from tests.tools import require_tool
from tests.upstream import FakeGoproxy

PASSWORDS = {"alice": "alice-Pa55word", "bob": "bob-Pa55word"}
ADMIN = ("ops", "ops-Adm1n-secret")
TOKEN = "tok-9f8e7d6c5b4a39281706f5e4d3c2b1a0"
PUBLIC = "example.com/lib/@v/v1.0.0.info"
PLATFORM = "corp.example/platform/api/@v/v1.0.0.info"
SHARED = "corp.example/shared/util/@v/v1.0.0.info"
UNLISTED = "corp.example/other/@v/v1.0.0.info"
INFO = b'{"Version":"v1.0.0","Time":"2024-01-01T00:00:00Z"}'
FAILURES = "goproxy_sidecar_client_auth_failures_total"

Start = Callable[..., Awaitable[tuple[TestClient[Any, Any], Sidecar]]]


def htpasswd(path: Path, users: dict[str, str]) -> Path:
    """A file made by Apache's own tool, bcrypt (-B)."""
    tool = require_tool("htpasswd")
    for i, (user, password) in enumerate(users.items()):
        flags = "-cbB" if i == 0 and not path.exists() else "-bB"
        subprocess.run(
            [str(tool), flags, str(path), user, password], check=True, capture_output=True
        )
    return path


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


ALICE = basic("alice", PASSWORDS["alice"])
BOB = basic("bob", PASSWORDS["bob"])
OPS = basic(*ADMIN)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# ci runners\n{token_line('ci', TOKEN)}\n")
    return {
        "htpasswd": htpasswd(tmp_path / "htpasswd", PASSWORDS),
        "admin": htpasswd(tmp_path / "admin.htpasswd", dict([ADMIN])),
        "tokens": tokens,
    }


def auth_config(files: dict[str, Path], **overrides: Any) -> ClientAuthConfig:
    settings: dict[str, Any] = {
        "enabled": True,
        "realm": "Go modules",
        "htpasswd": str(files["htpasswd"]),
        "tokens_file": str(files["tokens"]),
        "admin": CredentialFiles(htpasswd=str(files["admin"])),
        "groups": (GroupConfig("platform", ("alice",)),),
        "access": (
            AccessRule(("corp.example/platform",), ("@platform",)),
            AccessRule(("corp.example/shared/*",), ("*",)),
        ),
        "endpoints": EndpointRules(breakers=EndpointAccess.ADMIN),
    }
    settings.update(overrides)
    return ClientAuthConfig(**settings)


@pytest.fixture
async def guarded(
    fake_upstreams: Any, sidecar_client: Start, files: dict[str, Path], tmp_path: Path
) -> Callable[..., Awaitable[tuple[TestClient[Any, Any], FakeGoproxy, SidecarService]]]:
    async def start(
        **overrides: Any,
    ) -> tuple[TestClient[Any, Any], FakeGoproxy, SidecarService]:
        [(fake, url)] = await fake_upstreams(1)
        for path in (PUBLIC, PLATFORM, SHARED, UNLISTED):
            fake.set(path, INFO)
        client, _ = await sidecar_client(
            [url],
            upstreams=(UpstreamConfig("athens", url, timeouts=FAST_TIMEOUTS, private_ok=True),),
            cache=CacheConfig(dir=str(tmp_path / "cache")),
            routing=RoutingConfig(private=("corp.example",)),
            client_auth=auth_config(files, **overrides),
        )
        return client, fake, client.server.service

    return start


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def get(
    client: TestClient[Any, Any], path: str, headers: dict[str, str] | None = None
) -> Any:
    return await client.get("/" + path.lstrip("/"), headers=headers or {})


async def test_no_credential_is_a_401_challenge_that_reaches_nothing(guarded: Any) -> None:
    client, fake, _ = await guarded()
    for path in (PUBLIC, "/metrics", "/status", "/routes", "/nonsense"):
        resp = await get(client, path)
        assert resp.status == 401, path
        assert resp.headers["WWW-Authenticate"] == 'Basic realm="Go modules"'
    assert fake.received == []
    metrics = await (await get(client, "/metrics", ALICE)).text()
    assert metric(metrics, FAILURES, reason="missing") == 5


async def test_wrong_credentials_are_refused_and_never_reach_the_upstream(guarded: Any) -> None:
    client, fake, _ = await guarded()
    wrong = [
        basic("alice", "not-her-password"),
        basic("mallory", PASSWORDS["alice"]),
        {"Authorization": "Bearer not-a-token"},
        {"Authorization": "Basic %%%"},
        {"Authorization": "Digest username=alice"},
    ]
    for headers in wrong:
        resp = await get(client, PUBLIC, headers)
        assert resp.status == 401, headers
        assert "WWW-Authenticate" in resp.headers
    assert fake.received == []
    metrics = await (await get(client, "/metrics", ALICE)).text()
    assert metric(metrics, FAILURES, reason="bad_credentials") == 3
    assert metric(metrics, FAILURES, reason="malformed") == 2


async def test_good_credentials_pass_and_are_never_forwarded(guarded: Any) -> None:
    client, fake, _ = await guarded()
    for headers in (ALICE, {"Authorization": f"Bearer {TOKEN}"}):
        resp = await get(client, SHARED if headers is ALICE else PUBLIC, headers)
        assert resp.status == 200, await resp.text()
        assert await resp.read() == INFO
    assert sorted(fake.received) == sorted([SHARED, PUBLIC])
    for seen in fake.headers_seen:
        assert not {k.lower() for k in seen} & {"authorization", "proxy-authorization"}, seen


async def test_a_cache_hit_is_no_way_around_a_rule(guarded: Any) -> None:
    client, fake, _ = await guarded()
    assert (await get(client, PLATFORM, ALICE)).status == 200
    assert (await get(client, PLATFORM, ALICE)).headers["X-Sidecar-Upstream"] == "cache"
    assert fake.received == [PLATFORM]
    assert (await get(client, PLATFORM)).status == 401
    assert (await get(client, PLATFORM, basic("alice", "guess"))).status == 401
    resp = await get(client, PLATFORM, BOB)
    assert resp.status == 403
    assert "bob may not fetch corp.example/platform/api" in await resp.text()
    assert fake.received == [PLATFORM]


async def test_per_identity_access_to_private_modules(guarded: Any) -> None:
    client, _, _ = await guarded()
    token = {"Authorization": f"Bearer {TOKEN}"}
    expected = {
        # module: (alice, bob, token "ci", admin "ops")
        PUBLIC: (200, 200, 200, 200),  # not private, no rule: any identity
        SHARED: (200, 200, 200, 200),  # private, rule "*"
        PLATFORM: (200, 403, 403, 403),  # private, rule "@platform"
        UNLISTED: (403, 403, 403, 403),  # private, no rule: nobody
    }
    for path, statuses in expected.items():
        got = tuple([(await get(client, path, h)).status for h in (ALICE, BOB, token, OPS)])
        assert got == statuses, path
    metrics = await (await get(client, "/metrics", ALICE)).text()
    assert metric(metrics, FAILURES, reason="forbidden") == 7


async def test_a_rule_on_a_public_module_holds_for_cache_hits(guarded: Any) -> None:
    # Not private, but covered by an access rule: the router marks it for the
    # door, and the entry alice's fetch cached is no way round the rule for bob.
    client, fake, _ = await guarded(access=(AccessRule(("example.com/lib",), ("@platform",)),))
    for _ in range(2):  # a miss, then a hit
        assert (await get(client, PUBLIC, ALICE)).status == 200
    resp = await get(client, PUBLIC, BOB)
    assert resp.status == 403
    assert "bob may not fetch example.com/lib: denied by client_auth.access[0]" in await resp.text()
    assert (await get(client, "example.com/other/@v/list", BOB)).status != 403
    assert fake.received == [PUBLIC, "example.com/other/@v/list"]


async def test_endpoint_rules_open_authenticated_admin(guarded: Any) -> None:
    client, _, _ = await guarded()
    assert (await get(client, "/healthz")).status == 200
    assert (await get(client, "/readyz")).status == 200
    assert (await get(client, "/metrics")).status == 401
    assert (await get(client, "/metrics", BOB)).status == 200
    assert (await get(client, "/status", BOB)).status == 200
    assert (await get(client, "/breakers")).status == 401
    resp = await get(client, "/breakers", BOB)
    assert resp.status == 403 and "admin credential" in await resp.text()
    assert (await get(client, "/breakers", OPS)).status == 200
    metrics = await (await get(client, "/metrics", OPS)).text()
    assert metric(metrics, FAILURES, reason="admin_required") == 1


async def test_open_metrics_need_no_credential(guarded: Any) -> None:
    client, _, _ = await guarded(endpoints=EndpointRules(metrics=EndpointAccess.OPEN))
    assert (await get(client, "/metrics")).status == 200
    assert (await get(client, "/status")).status == 401


async def test_trusted_networks_need_no_credential_but_keep_module_rules(guarded: Any) -> None:
    client, fake, _ = await guarded(
        trusted_networks=("127.0.0.0/8",),
        access=(AccessRule(("corp.example/shared",), ("@networks",)),),
    )
    assert (await get(client, PUBLIC)).status == 200
    assert (await get(client, SHARED)).status == 200
    assert (await get(client, PLATFORM)).status == 403  # private, no rule allows @networks
    # Credentials sent from a trusted network are still checked, and still decide.
    assert (await get(client, PUBLIC, basic("alice", "wrong"))).status == 401
    assert (await get(client, PLATFORM, ALICE)).status == 403
    assert sorted(fake.received) == sorted([PUBLIC, SHARED])


async def test_a_throttled_address_gets_429_but_keeps_verified_credentials(guarded: Any) -> None:
    client, _, service = await guarded(throttle=ThrottleConfig(max_failures=3, window=600.0))
    assert (await get(client, PUBLIC, ALICE)).status == 200  # verified and cached
    statuses = [(await get(client, PUBLIC, basic("bob", f"guess{i}"))).status for i in range(6)]
    assert statuses == [401, 401, 401, 429, 429, 429]
    resp = await get(client, PUBLIC, basic("bob", PASSWORDS["bob"]))
    assert resp.status == 429  # right, but not verified before: no bcrypt while throttled
    assert 590 <= int(resp.headers["Retry-After"]) <= 600
    assert (await get(client, PUBLIC, ALICE)).status == 200  # already verified: no guess
    assert service.door is not None and len(service.door.throttle) == 1


async def test_a_reload_takes_new_users_and_refuses_a_weak_file(
    guarded: Any, files: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    client, _, service = await guarded()
    assert service._credentials is not None
    carol = basic("carol", "carol-Pa55word")
    assert (await get(client, PUBLIC, carol)).status == 401
    htpasswd(files["htpasswd"], {"carol": "carol-Pa55word"})
    assert await service._credentials.reload_now()
    assert (await get(client, PUBLIC, carol)).status == 200

    tool = require_tool("htpasswd")
    subprocess.run([str(tool), "-bs", str(files["htpasswd"]), "dave", "x"], check=True)
    with caplog.at_level(logging.ERROR, logger="sidecar.auth"):
        assert not await service._credentials.reload_now()
    refused = [r for r in caplog.records if "reload refused" in r.getMessage()]
    assert refused and f"{files['htpasswd']}:4: user 'dave' has an unsalted SHA-1" in str(
        refused[0].__dict__["error"]
    )
    assert (await get(client, PUBLIC, ALICE)).status == 200  # the previous file stays
    metrics = await (await get(client, "/metrics", ALICE)).text()
    assert metric(metrics, "goproxy_sidecar_client_auth_reloads_total", result="failed") == 1


async def test_a_removed_user_is_refused_after_the_reload(
    guarded: Any, files: dict[str, Path]
) -> None:
    client, _, service = await guarded()
    assert (await get(client, PUBLIC, BOB)).status == 200  # cached from here
    files["htpasswd"].write_text(
        "".join(
            line + "\n"
            for line in files["htpasswd"].read_text().splitlines()
            if not line.startswith("bob:")
        )
    )
    assert service._credentials is not None and await service._credentials.reload_now()
    assert (await get(client, PUBLIC, BOB)).status == 401


async def test_credentials_never_appear_in_logs_metrics_or_status(
    guarded: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client, _, _ = await guarded(throttle=ThrottleConfig(max_failures=2))
    with caplog.at_level(logging.DEBUG):
        for headers in (ALICE, BOB, OPS, basic("alice", "Wr0ng-Secret-Guess"), basic("alice", "x")):
            await get(client, PLATFORM, headers)
        await get(client, PUBLIC, basic("alice", "Wr0ng-Secret-Guess"))  # throttled
        await get(client, PUBLIC, {"Authorization": f"Bearer {TOKEN}"})
        pages = [
            await (await get(client, path, OPS)).text()
            for path in ("/metrics", "/status", "/breakers", "/routes")
        ]
    secrets = [*PASSWORDS.values(), ADMIN[1], TOKEN, "Wr0ng-Secret-Guess"]
    secrets += [h["Authorization"].split()[1] for h in (ALICE, BOB, OPS)]
    logged = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    for secret in secrets:
        assert secret not in logged
        for page in pages:
            assert secret not in page
    assert "throttled" in caplog.text  # the log did see the events


async def raw_get(port: int, source: str, headers: dict[str, str]) -> int:
    """One request from the loopback address ``source``; the status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write(f"GET /{PUBLIC} HTTP/1.1\r\nHost: x\r\n{lines}Connection: close\r\n\r\n".encode())
    status = int((await asyncio.wait_for(reader.readline(), 30)).split()[1])
    writer.close()
    return status


async def exchange_on_one_connection(port: int, heads: list[str]) -> list[int]:
    """Requests on one keep-alive connection (each ``heads`` item: extra header
    lines, CRLF-ended); the status of each."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    statuses = []
    try:
        for extra in heads:
            writer.write(f"GET /{PUBLIC} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
            status_line = await asyncio.wait_for(reader.readline(), 30)
            statuses.append(int(status_line.split()[1]))
            length = 0
            while (line := await asyncio.wait_for(reader.readline(), 30)) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            await reader.readexactly(length)
            if statuses[-1] == 400:  # refused requests close the connection
                break
    finally:
        writer.close()
    return statuses


async def test_each_request_on_a_connection_is_checked_on_its_own_credential(
    guarded: Any,
) -> None:
    """The connection remembers its last verified credential; a different one
    on the next request is checked afresh, not waved through."""
    client, fake, _ = await guarded()
    good = f"authorization: {ALICE['Authorization']}\r\n"  # any case of the name
    wrong = "Authorization: " + basic("alice", "wrong")["Authorization"] + "\r\n"
    statuses = await exchange_on_one_connection(client.server.port, [good, wrong, "", good])
    assert statuses == [200, 401, 401, 200]
    assert fake.received == [PUBLIC]  # the later 200 is a hit


async def test_two_authorization_headers_are_refused_before_any_check(guarded: Any) -> None:
    """A proxy in front may have checked the other one: 400, nothing reached."""
    client, fake, _ = await guarded()
    good = f"Authorization: {ALICE['Authorization']}\r\n"
    for second in (good, "Authorization: Basic bm9ib2R5Og==\r\n"):
        statuses = await exchange_on_one_connection(client.server.port, [good + second])
        assert statuses == [400]
    assert fake.received == []
    metrics = await (await get(client, "/metrics", ALICE)).text()
    assert metric(metrics, FAILURES) == 0  # refused by the parser, not by the door


async def test_a_brute_force_loop_is_throttled_and_bcrypt_stops(guarded: Any) -> None:
    client, fake, _ = await guarded(throttle=ThrottleConfig(max_failures=5, window=600.0))
    port = client.server.port
    statuses = [await raw_get(port, "127.0.0.2", basic("alice", f"guess-{i}")) for i in range(40)]
    assert statuses == [401] * 5 + [429] * 35
    metrics = await (await get(client, "/metrics", BOB)).text()  # another address: not throttled
    assert metric(metrics, FAILURES, reason="bad_credentials") == 5  # 5 bcrypt checks, no more
    assert metric(metrics, FAILURES, reason="throttled") == 35
    assert fake.received == []


async def test_the_throttle_table_stays_bounded_under_many_addresses(guarded: Any) -> None:
    cap = 32
    client, _, service = await guarded(
        throttle=ThrottleConfig(max_failures=2, window=600.0, table_size=cap)
    )
    door = service.door
    assert door is not None
    port = client.server.port
    sizes = []
    for i in range(200):
        source = f"127.{1 + i // 250}.{i % 250}.{1 + i % 7}"
        assert await raw_get(port, source, basic("mallory", "guess")) == 401
        sizes.append(len(door.throttle))
    assert max(sizes) == cap and sizes[-1] == cap
    assert door.throttle.evicted == 200 - cap
    # The most recent addresses are the ones remembered: the last one is still counted.
    assert await raw_get(port, source, basic("mallory", "guess")) == 401
    assert await raw_get(port, source, basic("mallory", "guess")) == 429


async def test_behind_a_proxy_the_forwarded_client_is_counted(guarded: Any) -> None:
    client, _, service = await guarded(
        forwarded_by=("127.0.0.1/32",),
        trusted_networks=("10.0.0.0/8",),
        throttle=ThrottleConfig(max_failures=2, window=600.0),
    )
    port = client.server.port

    def via_proxy(client_ip: str, headers: dict[str, str]) -> dict[str, str]:
        return {"X-Forwarded-For": f"198.51.100.7, {client_ip}", **headers}

    guess = basic("alice", "guess")
    assert [
        await raw_get(port, "127.0.0.1", via_proxy("203.0.113.1", guess)) for _ in range(3)
    ] == [
        401,
        401,
        429,
    ]
    # Another client behind the same proxy is not throttled for the first one's guesses.
    assert await raw_get(port, "127.0.0.1", via_proxy("203.0.113.2", ALICE)) == 200
    # A trusted network is judged by the forwarded address too.
    assert await raw_get(port, "127.0.0.1", via_proxy("10.9.8.7", {})) == 200
    assert await raw_get(port, "127.0.0.1", via_proxy("203.0.113.2", {})) == 401
    # From an address not in forwarded_by, the header is the client's word: ignored.
    assert await raw_get(port, "127.0.0.2", via_proxy("10.9.8.7", {})) == 401
    door = service.door
    assert door is not None and len(door.throttle) == 1


async def test_a_change_is_reloaded_once_it_has_settled(
    guarded: Any, files: dict[str, Path]
) -> None:
    client, _, service = await guarded()
    reloader = service._credentials
    assert reloader is not None
    assert await reloader.poll_once() is None  # nothing changed
    htpasswd(files["htpasswd"], {"carol": "carol-Pa55word"})
    assert await reloader.poll_once() is None  # changed: one more poll to settle
    assert (await get(client, PUBLIC, basic("carol", "carol-Pa55word"))).status == 401
    assert await reloader.poll_once() is True
    assert (await get(client, PUBLIC, basic("carol", "carol-Pa55word"))).status == 200
    files["htpasswd"].write_text(files["htpasswd"].read_text() + "dave:plain\n")
    assert await reloader.poll_once() is None
    assert await reloader.poll_once() is False  # refused; the same content is not retried
    assert await reloader.poll_once() is None
    assert (await get(client, PUBLIC, ALICE)).status == 200
