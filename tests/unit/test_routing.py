"""Routing rules: GOPRIVATE glob semantics (table from x/mod's module_test.go,
TestMatchPrefixPatterns) and the routes the Router compiles."""

from __future__ import annotations

import dataclasses

import pytest

from sidecar.config import (
    AccessRule,
    CacheConfig,
    ClientAuthConfig,
    Config,
    RouteRule,
    RoutingConfig,
    UpstreamConfig,
)
from sidecar.errors import ConfigError
from sidecar.routing import Router, compile_glob

MATCH_PREFIX_PATTERNS = [
    ("*/quote", "rsc.io/quote", True),
    ("*/quo", "rsc.io/quote", False),
    ("*/quo??", "rsc.io/quote", True),
    ("*/quo*", "rsc.io/quote", True),
    ("*quo*", "rsc.io/quote", False),
    ("rsc.io", "rsc.io/quote", True),
    ("*.io", "rsc.io/quote", True),
    ("rsc.io/", "rsc.io/quote", True),
    ("rsc", "rsc.io/quote", False),
    ("rsc*", "rsc.io/quote", True),
    ("rsc.io", "rsc.io/quote/v3", True),
    ("*/quote", "rsc.io/quote/v3", True),
    ("*/quote/", "rsc.io/quote/v3", True),
    ("*/quote/*", "rsc.io/quote/v3", True),
    ("*/quote/*/", "rsc.io/quote/v3", True),
    ("*/v3", "rsc.io/quote/v3", False),
    ("*/*/v3", "rsc.io/quote/v3", True),
    ("*/*/*", "rsc.io/quote/v3", True),
    ("*/*/*/", "rsc.io/quote/v3", True),
    ("*/*/*", "rsc.io/quote", False),
    ("*/*/*/", "rsc.io/quote", False),
    # and the shapes operators write
    ("*.corp.example", "git.corp.example/payments/ledger", True),
    ("*.corp.example", "corp.example/x", False),
    ("github.com/acme/*", "github.com/acme/tool/v2", True),
    ("github.com/acme/*", "github.com/acmeco/tool", False),
    ("github.com/acme", "github.com/acme/tool", True),
    ("github.com/[ab]cme", "github.com/bcme/x", True),
    ("github.com/[^ab]cme", "github.com/bcme/x", False),
    ("github.com/\\*", "github.com/*/x", True),
]


@pytest.mark.parametrize(("glob", "target", "want"), MATCH_PREFIX_PATTERNS)
def test_glob_semantics_match_the_go_command(glob: str, target: str, want: bool) -> None:
    assert compile_glob(glob, "k").matches(target) is want


@pytest.mark.parametrize("bad", ["", "/", "github.com/[", "x/[]", "x\\"])
def test_bad_patterns_name_their_key(bad: str) -> None:
    with pytest.raises(ConfigError) as err:
        compile_glob(bad, "routing.rules[3].match")
    assert err.value.key == "routing.rules[3].match"


def config(rules=(), private=(), private_ok=("athens",)) -> Config:
    ups = tuple(
        UpstreamConfig(n, f"http://127.0.0.1:{3000 + i}", private_ok=n in private_ok)
        for i, n in enumerate(("athens", "corp", "public"))
    )
    return Config(
        listen="127.0.0.1:3001",
        upstreams=ups,
        cache=CacheConfig(dir="/tmp/x"),
        routing=RoutingConfig(private=tuple(private), rules=tuple(rules)),
    )


def test_public_modules_go_everywhere_in_order() -> None:
    assert Router(config()).route("github.com/x/y").targets == ("athens", "corp", "public")


def test_private_modules_only_reach_private_ok_upstreams() -> None:
    r = Router(config(private=["*.corp.example"], private_ok=("athens", "corp")))
    route = r.route("git.corp.example/payments/ledger")
    assert route.private and route.targets == ("athens", "corp")


def test_a_rule_cannot_send_a_private_module_to_a_public_upstream() -> None:
    r = Router(
        config(
            private=["github.com/acme/*"],
            rules=[RouteRule("github.com/acme/*", upstreams=("public", "athens"))],
        )
    )
    assert r.route("github.com/acme/secret").targets == ("athens",)


def test_private_module_without_any_allowed_upstream_has_no_target() -> None:
    r = Router(config(private=["*.corp.example"], private_ok=()))
    assert r.route("git.corp.example/x").targets == ()


def test_first_matching_rule_wins_and_flags_carry() -> None:
    rules = [
        RouteRule("github.com/blocked/*", deny=True),
        RouteRule("golang.org/x/*", upstreams=("public",), cache=False),
        RouteRule("golang.org/*", upstreams=("athens",)),
    ]
    r = Router(config(rules=rules))
    assert r.route("github.com/blocked/thing").deny
    x = r.route("golang.org/x/text")
    assert x.targets == ("public",) and x.cache is False and x.rule == "golang.org/x/*"
    assert r.route("golang.org/y").targets == ("athens",)


def test_requests_without_a_module_use_every_upstream() -> None:
    assert Router(config(private=["*"])).route("").targets == ("athens", "corp", "public")


def test_memo_is_bounded() -> None:
    r = Router(config(private=["*.corp.example"]))
    for i in range(10_000):
        r.route(f"example.com/m{i}")
    assert len(r._memo) <= 4096


def test_describe_lists_the_compiled_rules() -> None:
    cfg = dataclasses.replace(config(rules=[RouteRule("golang.org/x/*", upstreams=("public",))]))
    view = Router(cfg).describe()
    assert view["rules"] == [
        {"match": "golang.org/x/*", "upstreams": ["public"], "deny": False, "cache": True}
    ]
    assert view["private_ok"] == ["athens"]


def test_the_front_door_looks_only_at_private_and_access_covered_modules() -> None:
    auth = ClientAuthConfig(
        enabled=True, access=(AccessRule(("github.com/acme/*", "rsc.io"), ("@platform",)),)
    )
    cfg = dataclasses.replace(config(private=["*.corp.example"]), client_auth=auth)
    r = Router(cfg)
    guarded = {
        m: r.route(m).guarded
        for m in (
            "git.corp.example/x",
            "github.com/acme/tool",
            "rsc.io/quote",
            "github.com/other/x",
            "",
        )
    }
    assert guarded == {
        "git.corp.example/x": True,  # private
        "github.com/acme/tool": True,  # an access rule covers it
        "rsc.io/quote": True,
        "github.com/other/x": False,
        "": False,
    }
    # client_auth off: its rules guard nothing (private modules stay guarded).
    off = Router(dataclasses.replace(cfg, client_auth=dataclasses.replace(auth, enabled=False)))
    assert not off.route("github.com/acme/tool").guarded
    assert off.route("git.corp.example/x").guarded
