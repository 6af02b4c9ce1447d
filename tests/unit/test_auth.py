"""The parts of client authentication on their own: htpasswd files from Apache's
own `htpasswd`, token files, access rules, trusted networks, the throttle and
the credential cache on a test clock."""

from __future__ import annotations

import hashlib
import secrets
import subprocess
from pathlib import Path

import pytest

from sidecar.auth.access import Access, Identity
from sidecar.auth.credcache import CredentialCache
from sidecar.auth.credentials import load_credentials
from sidecar.auth.htpasswd import load_htpasswd
from sidecar.auth.networks import TrustedNetworks
from sidecar.auth.throttle import Throttle, client_key
from sidecar.auth.tokens import load_tokens, parse_tokens, token_line
from sidecar.config import (
    AccessRule,
    ClientAuthConfig,
    CredentialCacheConfig,
    CredentialFiles,
    EndpointAccess,
    EndpointRules,
    GroupConfig,
    ThrottleConfig,
    load_config,
)
from sidecar.errors import AuthFileError, ConfigError, ConfigErrors
from tests.tools import require_tool


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def htpasswd(path: Path, flag: str, user: str, password: str) -> Path:
    tool = require_tool("htpasswd")
    create = "c" if not path.exists() else ""
    subprocess.run([str(tool), f"-{create}b{flag}", str(path), user, password], check=True)
    return path


def test_bcrypt_entries_made_by_htpasswd_verify(tmp_path: Path) -> None:
    path = htpasswd(tmp_path / "h", "B", "alice", "correct horse")
    htpasswd(path, "B", "bob", "x" * 80)  # past bcrypt's 72 bytes: Apache cuts there
    file = load_htpasswd(str(path))
    assert file.verify("alice", "correct horse")
    assert not file.verify("alice", "correct hors")
    assert not file.verify("carol", "correct horse")
    assert file.verify("bob", "x" * 80) and file.verify("bob", "x" * 72)
    assert "secret" not in repr(file) and "$2y$" not in repr(file)


@pytest.mark.parametrize(
    ("flag", "kind"),
    [
        ("m", "an MD5 ($apr1$) hash"),
        ("s", "an unsalted SHA-1 ({SHA}) hash"),
        ("d", "a DES crypt hash"),
        ("p", "a plain-text password or unknown hash"),
    ],
)
def test_weak_formats_are_refused_naming_file_and_line(
    tmp_path: Path, flag: str, kind: str
) -> None:
    path = htpasswd(tmp_path / "h", "B", "alice", "one")
    htpasswd(path, flag, "carol", "Sekr1t-two")
    with pytest.raises(AuthFileError) as caught:
        load_htpasswd(str(path))
    message = str(caught.value)
    fix = "only bcrypt is accepted: recreate it with `htpasswd -B`"
    assert message == f"{path}:2: user 'carol' has {kind}: {fix}"
    assert "Sekr1t" not in message and "\n" not in message


def test_htpasswd_syntax_errors(tmp_path: Path) -> None:
    path = tmp_path / "h"
    path.write_text("# users\n\nnot a line\n")
    with pytest.raises(AuthFileError, match=r":3: not a `user:hash` line"):
        load_htpasswd(str(path))
    with pytest.raises(AuthFileError, match=r"missing: cannot read: No such file"):
        load_htpasswd(str(tmp_path / "missing"))


def test_tokens_are_stored_hashed_and_matched(tmp_path: Path) -> None:
    token = secrets.token_urlsafe(32)
    line = token_line("ci", token)
    assert token not in line and line == f"ci sha256:{hashlib.sha256(token.encode()).hexdigest()}"
    path = tmp_path / "tokens"
    path.write_text(f"# runners\n{line}\n{token_line('deploy', 'other-token')}\n")
    tokens = load_tokens(str(path))
    assert tokens.match(token) == "ci"
    assert tokens.match("other-token") == "deploy"
    assert tokens.match(token[:-1]) is None
    assert tokens.names == {"ci", "deploy"}


def test_a_plain_token_in_the_file_is_refused_without_quoting_it() -> None:
    with pytest.raises(AuthFileError) as caught:
        parse_tokens("ci Zm9vYmFyLXNlY3JldC10b2tlbg\n", "$TOKENS")
    assert str(caught.value) == "$TOKENS:1: not a `NAME sha256:HEX` line (64 hex digits)"
    with pytest.raises(AuthFileError, match="listed twice"):
        parse_tokens(f"{token_line('a', 'x')}\n{token_line('a', 'y')}\n", "t")


def test_credentials_from_files_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clients = htpasswd(tmp_path / "clients", "B", "alice", "pw-a")
    admins = htpasswd(tmp_path / "admins", "B", "ops", "pw-o")
    monkeypatch.setenv("SIDECAR_TEST_TOKENS", f"{token_line('ci', 't1')},{token_line('cd', 't2')}")
    cfg = ClientAuthConfig(
        enabled=True,
        htpasswd=str(clients),
        tokens_env="SIDECAR_TEST_TOKENS",
        admin=CredentialFiles(htpasswd=str(admins)),
    )
    creds = load_credentials(cfg)
    assert creds.verify_basic("alice", "pw-a") is False  # verified, not an admin
    assert creds.verify_basic("ops", "pw-o") is True
    assert creds.verify_basic("ops", "pw-a") is None
    assert creds.verify_token("t2") == ("cd", False)
    assert creds.count == 4
    htpasswd(admins, "B", "alice", "other")
    with pytest.raises(AuthFileError, match="'alice' is both a client and an admin"):
        load_credentials(cfg)
    monkeypatch.delenv("SIDECAR_TEST_TOKENS")
    with pytest.raises(AuthFileError, match=r"^\$SIDECAR_TEST_TOKENS: the variable is not set"):
        load_credentials(ClientAuthConfig(tokens_env="SIDECAR_TEST_TOKENS"))


def test_access_rules_first_match_decides() -> None:
    access = Access(
        [
            AccessRule(("corp.example/secret",), ("alice",)),
            AccessRule(("corp.example/*",), ("@platform", "ci")),
            AccessRule(("github.com/corp",), ("*",)),
        ],
        [GroupConfig("platform", ("bob", "alice"))],
    )
    alice = Identity("alice", access.groups_of("alice"))
    bob = Identity("bob", access.groups_of("bob"))
    ci = Identity("ci", access.groups_of("ci"), via="bearer")
    carol = Identity("carol", frozenset())

    def allowed(who: Identity, module: str, private: bool = True) -> bool:
        return access.decide(who, module, private).allowed

    assert allowed(alice, "corp.example/secret/v2") and not allowed(bob, "corp.example/secret")
    assert allowed(bob, "corp.example/tools") and allowed(ci, "corp.example/tools")
    assert not allowed(carol, "corp.example/tools")
    assert allowed(carol, "github.com/corp/x")
    assert allowed(carol, "golang.org/x/mod", private=False)  # no rule, not private
    assert not allowed(alice, "other.example/x", private=True)  # private, no rule
    why = access.decide(bob, "corp.example/secret", True).why
    assert why == "denied by client_auth.access[0] (corp.example/secret)"


def test_client_auth_config_errors_name_the_key(tmp_path: Path) -> None:
    """The whole section through the real loader: every problem, each naming its key."""
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(
        f"""
upstreams: [{{name: up, url: "http://127.0.0.1:3000"}}]
cache: {{dir: "{tmp_path / "cache"}"}}
client_auth:
  enabled: true
  htpasswd: users.htpasswd
  tokens_env: SIDECAR_TEST_NO_SUCH_VARIABLE
  realm: 'say "hi"'
  trusted_networks: ["10.0.0.1/8"]
  groups:
    - {{name: networks, members: [alice]}}
    - {{name: ops, members: ["bad name"]}}
  access:
    - {{modules: ["a.example"], allow: ["@nobody"]}}
    - {{modules: ["b.example/[x"], allow: ["*"]}}
    - {{modules: [], allow: []}}
  endpoints: {{metrics: closed}}
  throttle: {{max_failures: 0}}
"""
    )
    with pytest.raises(ConfigErrors) as caught:
        load_config(str(cfg), env={})
    found = {e.key: e.message for e in caught.value.errors}
    assert found["client_auth.tokens_env"] == (
        "environment variable SIDECAR_TEST_NO_SUCH_VARIABLE is not set"
    )
    assert found["client_auth.realm"].startswith("expected a realm without quotes")
    assert found["client_auth.trusted_networks[0]"].startswith("not a network in CIDR form")
    assert found["client_auth.groups[0].name"].startswith("is built in")
    assert found["client_auth.groups[1].members[0]"].startswith("not a name")
    assert found["client_auth.access[0].allow"] == "no such group: @nobody (see client_auth.groups)"
    assert "client_auth.access[1].modules[0]" in found
    assert found["client_auth.access[2].modules"] == "expected at least one module pattern"
    assert found["client_auth.access[2].allow"] == "expected at least one name, @group or *"
    assert found["client_auth.endpoints.metrics"].startswith("expected one of 'open'")
    assert found["client_auth.throttle.max_failures"] == "expected an integer >= 1, got 0"


def test_credential_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "conf" / "sidecar.yaml"
    cfg.parent.mkdir()
    cfg.write_text(
        f"""
upstreams: [{{name: up, url: "http://127.0.0.1:3000"}}]
cache: {{dir: "{tmp_path / "cache"}"}}
client_auth: {{enabled: true, htpasswd: users, admin: {{tokens_file: admins.tokens}}}}
"""
    )
    auth = load_config(str(cfg), env={}).client_auth
    assert auth.htpasswd == str(cfg.parent / "users")
    assert auth.admin.tokens_file == str(cfg.parent / "admins.tokens")
    assert load_config(None, env={}).client_auth == ClientAuthConfig()  # off by default


def test_trusted_networks() -> None:
    nets = TrustedNetworks(["10.0.0.0/8", "fd00::/8"])
    assert str(nets.of("10.1.2.3")) == "10.0.0.0/8"
    assert str(nets.of("::ffff:10.1.2.3")) == "10.0.0.0/8"
    assert str(nets.of("fd12::1")) == "fd00::/8"
    assert nets.of("192.168.1.1") is None and nets.of("") is None
    with pytest.raises(ConfigError, match=r"trusted_networks\[0\]: not a network"):
        TrustedNetworks(["10.0.0.1/8"])


def test_throttle_window_and_bounded_table() -> None:
    clock = Clock()
    throttle = Throttle(ThrottleConfig(max_failures=3, window=60.0, table_size=100), clock)
    assert [throttle.failed("10.0.0.1") for _ in range(3)] == [False, False, True]
    assert throttle.retry_after("10.0.0.1") == 60
    clock.now += 45.5
    assert throttle.retry_after("10.0.0.1") == 15
    assert throttle.retry_after("10.0.0.2") == 0
    clock.now += 15
    assert throttle.retry_after("10.0.0.1") == 0 and len(throttle) == 0
    for i in range(10_000):
        throttle.failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
    assert len(throttle) == 100 and throttle.evicted == 9_900


def test_ipv6_clients_are_counted_per_64() -> None:
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::2")
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:10.0.0.1") != client_key("::ffff:10.0.0.2")
    assert client_key("10.0.0.1") == "10.0.0.1"


def test_credential_cache_ttl_and_size() -> None:
    clock = Clock()
    cache: CredentialCache[str] = CredentialCache(CredentialCacheConfig(ttl=30.0, size=2), clock)
    cache.put(b"a", "alice")
    cache.put(b"b", "bob")
    assert cache.get(b"a") == "alice"  # a is now the most recent
    cache.put(b"c", "carol")  # evicts b, the least recently used
    assert cache.get(b"b") is None and cache.get(b"a") == "alice" and len(cache) == 2
    clock.now += 30
    assert cache.get(b"a") is None and cache.get(b"c") is None


def test_endpoint_rules() -> None:
    rules = EndpointRules(metrics=EndpointAccess.OPEN)
    assert rules.for_path("/metrics") is EndpointAccess.OPEN
    assert rules.for_path("/healthz") is EndpointAccess.OPEN
    assert rules.for_path("/breakers") is EndpointAccess.AUTHENTICATED
    assert rules.for_path("/for_path") is EndpointAccess.AUTHENTICATED
