"""Config loading: real files in tmp_path, environments passed as dicts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.config import (
    DEFAULT_BACKUP_URL,
    DEFAULT_CACHE_SCRUB_RATE,
    DEFAULT_PRIMARY_URL,
    AuthConfig,
    BasicAuth,
    CacheConfig,
    Config,
    PolicyConfig,
    PolicyEngineKind,
    PolicyMode,
    PoolConfig,
    RouteRule,
    RoutingConfig,
    StatsConfig,
    TimeoutsConfig,
    UpstreamConfig,
    default_config,
    load_config,
)
from sidecar.errors import ConfigError, ConfigErrors

DESIGN_EXAMPLE = """\
listen: "127.0.0.1:3001"
upstreams:                       # order = preference; first is the primary
  - name: athens
    url: "http://127.0.0.1:3000"
    pool: {max_connections: 64}
    timeouts: {connect: 2s, first_byte: 15s, idle: 30s}
    auth: {netrc: true}          # or {basic: {username_env: X, password_env: Y}}
  - name: public
    url: "https://proxy.golang.org"
cache:
  dir: "./.sidecar-cache"
  max_bytes: 10GiB
  mutable_ttl: 60s               # list / @latest
policy:
  engine: embedded               # embedded | opa
  paths: ["policies/"]           # *.rego + data files (*.yaml / *.json)
  decision: "sidecar/breaker/decisions"
  opa_url: "http://127.0.0.1:8181"
  interval: 1s
  mode: enforce                  # enforce | shadow
  reject_status: 503             # 503 fails closed; 404 lets `go` try its next GOPROXY entry
stats:
  window: 2m                     # sliding window the policy sees
  slice: 10s                     # width of one entry of `series`
routing:                         # GOPRIVATE-style globs, matched on path prefixes
  private: ["*.corp.example", "github.com/acme/*"]   # only to upstreams with private_ok: true
  rules:                         # first match wins
    - {match: "github.com/blocked/*", deny: true}
    - {match: "golang.org/x/*", upstreams: [public]}
"""

# Lines indented by four spaces appended to MINIMAL belong to upstreams[1].
MINIMAL = """\
upstreams:
  - {name: athens, url: "http://127.0.0.1:3000"}
  - name: public
    url: "https://proxy.golang.org"
"""


def write(tmp_path: Path, text: str, name: str = "sidecar.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Config:
    return load_config(write(tmp_path, text), env={} if env is None else env)


def errors_of(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """{key: message} of every error the loader reports."""
    with pytest.raises(ConfigErrors) as info:
        load(tmp_path, text, env)
    return {error.key: error.message for error in info.value.errors}


# ---------------------------------------------------------------- valid input


def test_design_example_parses_to_the_expected_objects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)  # cache.dir is relative to the working directory
    config = load(tmp_path, DESIGN_EXAMPLE)
    assert config == Config(
        listen="127.0.0.1:3001",
        upstreams=(
            UpstreamConfig(
                name="athens",
                url="http://127.0.0.1:3000",
                pool=PoolConfig(max_connections=64),
                timeouts=TimeoutsConfig(connect=2.0, first_byte=15.0, idle=30.0),
                auth=AuthConfig(netrc=True),
            ),
            UpstreamConfig(name="public", url="https://proxy.golang.org"),
        ),
        cache=CacheConfig(
            dir=str(workdir / ".sidecar-cache"), max_bytes=10 * 1024**3, mutable_ttl=60.0
        ),
        policy=PolicyConfig(
            engine=PolicyEngineKind.EMBEDDED,
            paths=(str(tmp_path / "policies"),),  # relative to the config file
            decision="sidecar/breaker/decisions",
            opa_url="http://127.0.0.1:8181",
            interval=1.0,
            mode=PolicyMode.ENFORCE,
            reject_status=503,
        ),
        stats=StatsConfig(window=120.0, slice=10.0),
        routing=RoutingConfig(
            private=("*.corp.example", "github.com/acme/*"),
            rules=(
                RouteRule(match="github.com/blocked/*", deny=True),
                RouteRule(match="golang.org/x/*", upstreams=("public",)),
            ),
        ),
        shutdown_grace=10.0,
    )
    assert (config.host, config.port) == ("127.0.0.1", 3001)


def test_missing_keys_take_their_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, MINIMAL, env={"HOME": "/home/dev"})
    assert config.listen == "127.0.0.1:3001"
    assert config.upstreams[0] == UpstreamConfig(name="athens", url="http://127.0.0.1:3000")
    assert config.cache == CacheConfig(dir="/home/dev/.cache/goproxy-sidecar")
    assert config.policy == PolicyConfig()
    assert config.stats == StatsConfig()
    assert config.routing == RoutingConfig()
    assert config.shutdown_grace == 10.0


def test_admission_keys(tmp_path: Path) -> None:
    config = load(
        tmp_path, MINIMAL + "    pool: {max_connections: 8, max_pending: 0, max_wait: 250ms}\n"
    )
    assert config.upstreams[0].pool == PoolConfig(max_pending=1024, max_wait=5.0)
    assert config.upstreams[1].pool == PoolConfig(max_connections=8, max_pending=0, max_wait=0.25)


@pytest.mark.parametrize(
    ("value", "rate"),
    [("8MiB/s", 8 * 1024**2), ("512KiB", 512 * 1024), ("1GB/s", 10**9), ("0", 0), ("0/s", 0)],
)
def test_scrub_rate(tmp_path: Path, value: str, rate: int) -> None:
    assert load(tmp_path, MINIMAL).cache.scrub_rate == DEFAULT_CACHE_SCRUB_RATE == 8 * 1024**2
    assert load(tmp_path, MINIMAL + f"cache: {{scrub_rate: {value}}}\n").cache.scrub_rate == rate
    overridden = load(tmp_path, MINIMAL, {"SIDECAR_CACHE_SCRUB_RATE": value})
    assert overridden.cache.scrub_rate == rate


def test_extra_keys_and_alternatives(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """\
listen: "[::1]:8080"
shutdown_grace: 0s
upstreams:
  - name: corp-athens_2
    url: "http://athens.internal:3000/goproxy/"
    private_ok: true
    auth: {basic: {username_env: ATHENS_USER, password_env: ATHENS_PASSWORD}}
cache: {dir: /var/cache/sidecar, enabled: false, max_bytes: 512MiB, mutable_ttl: 0}
policy: {engine: opa, mode: shadow, reject_status: 404, interval: 800ms, paths: []}
routing:
  rules:
    - {match: "example.com/*", cache: false}
""",
        env={"ATHENS_USER": "ci", "ATHENS_PASSWORD": "s3cret"},
    )
    upstream = config.upstreams[0]
    assert upstream.url == "http://athens.internal:3000/goproxy"  # trailing slash stripped
    assert upstream.private_ok is True
    assert upstream.auth.basic == BasicAuth("ATHENS_USER", "ATHENS_PASSWORD", "ci", "s3cret")
    assert "s3cret" not in repr(config)
    assert (config.host, config.port) == ("::1", 8080)
    assert config.shutdown_grace == 0.0
    assert config.cache == CacheConfig(
        dir="/var/cache/sidecar", max_bytes=512 * 1024**2, mutable_ttl=0.0, enabled=False
    )
    assert config.policy.engine is PolicyEngineKind.OPA
    assert config.policy.mode is PolicyMode.SHADOW
    assert (config.policy.reject_status, config.policy.interval) == (404, 0.8)
    assert config.policy.paths == ()  # empty: the policies shipped in the package
    assert config.routing.rules == (RouteRule(match="example.com/*", cache=False),)


def test_empty_basic_credentials_are_set(tmp_path: Path) -> None:
    text = MINIMAL + "    auth: {basic: {username_env: TOKEN, password_env: EMPTY}}\n"
    config = load(tmp_path, text, env={"TOKEN": "t", "EMPTY": ""})
    assert config.upstreams[1].auth.basic == BasicAuth("TOKEN", "EMPTY", "t", "")


# ---------------------------------------------------------------- embedded default


def test_embedded_default() -> None:
    config = default_config(env={"HOME": "/home/dev"})
    assert config.listen == "127.0.0.1:3001"
    assert [(u.name, u.url) for u in config.upstreams] == [
        ("athens", DEFAULT_PRIMARY_URL),
        ("public", DEFAULT_BACKUP_URL),
    ]
    assert DEFAULT_PRIMARY_URL == "http://127.0.0.1:3000"
    assert DEFAULT_BACKUP_URL == "https://proxy.golang.org"
    assert config.cache.dir == "/home/dev/.cache/goproxy-sidecar"
    assert config.policy.engine is PolicyEngineKind.EMBEDDED
    assert config.policy.paths == ()
    assert load_config(None, env={"HOME": "/home/dev"}) == config


@pytest.mark.parametrize(
    ("env", "cache_dir"),
    [
        ({"HOME": "/h", "XDG_CACHE_HOME": "/xdg"}, "/xdg/goproxy-sidecar"),
        ({"HOME": "/h", "XDG_CACHE_HOME": "relative"}, "/h/.cache/goproxy-sidecar"),
        ({"HOME": "/h", "XDG_CACHE_HOME": ""}, "/h/.cache/goproxy-sidecar"),
    ],
)
def test_embedded_default_cache_dir(env: dict[str, str], cache_dir: str) -> None:
    assert default_config(env=env).cache.dir == cache_dir


def test_embedded_default_takes_overrides() -> None:
    config = default_config(
        env={
            "HOME": "/h",
            "SIDECAR_LISTEN": "0.0.0.0:3001",
            "SIDECAR_UPSTREAMS_0_URL": "http://athens:3000",
            "SIDECAR_CACHE_DIR": "/cache",
        }
    )
    assert config.listen == "0.0.0.0:3001"
    assert config.upstreams[0].url == "http://athens:3000"
    assert config.cache.dir == "/cache"


# ---------------------------------------------------------------- errors name their key

ERROR_CASES = [
    # (config text, key, fragment of the message)
    ('listen: "localhost"\n' + MINIMAL, "listen", "expected 'host:port'"),
    ('listen: "127.0.0.1:0"\n' + MINIMAL, "listen", "port must be from 1 to 65535"),
    ('listen: "127.0.0.1:70000"\n' + MINIMAL, "listen", "port must be from 1 to 65535"),
    ('listen: "::1:3001"\n' + MINIMAL, "listen", "needs brackets"),
    ('listen: "[nope]:3001"\n' + MINIMAL, "listen", "not an IPv6 address"),
    ('listen: ":3001"\n' + MINIMAL, "listen", "missing host"),
    ("listen: 3001\n" + MINIMAL, "listen", "expected 'host:port'"),
    ("listen: 127.0.0.1:3001\n", "upstreams", "required: at least one upstream"),
    ("upstreams: []\n", "upstreams", "at least one upstream"),
    ("upstreams:\n", "upstreams", "required: at least one upstream"),
    ("upstreams: {name: a}\n", "upstreams", "expected a list"),
    ("upstreams: [null]\n", "upstreams[0]", "expected a mapping, got null"),
    ('upstreams: [{url: "http://h"}]\n', "upstreams[0].name", "required"),
    ("upstreams: [{name: a}]\n", "upstreams[0].url", "required"),
    ('upstreams: [{name: Athens, url: "http://h"}]\n', "upstreams[0].name", "[a-z0-9]"),
    ('upstreams: [{name: "-a", url: "http://h"}]\n', "upstreams[0].name", "[a-z0-9]"),
    (
        'upstreams: [{name: a, url: "http://h"}, {name: a, url: "http://i"}]\n',
        "upstreams[1].name",
        "duplicate name 'a' (also upstreams[0])",
    ),
    (
        'upstreams: [{name: a, url: "not a url"}]\n',
        "upstreams[0].url",
        "not an http(s) URL: 'not a url'",
    ),
    ('upstreams: [{name: a, url: "ftp://h"}]\n', "upstreams[0].url", "not an http(s) URL"),
    ('upstreams: [{name: a, url: "http://"}]\n', "upstreams[0].url", "not an http(s) URL"),
    ('upstreams: [{name: a, url: "http://h:99999"}]\n', "upstreams[0].url", "not an http(s)"),
    ('upstreams: [{name: a, url: "http://h/?a=1"}]\n', "upstreams[0].url", "no query"),
    ('upstreams: [{name: a, url: "http://h/#x"}]\n', "upstreams[0].url", "no query"),
    (
        MINIMAL + "    pool: {max_connections: 0}\n",
        "upstreams[1].pool.max_connections",
        "expected an integer >= 1, got 0",
    ),
    (
        MINIMAL + "    pool: {max_connections: many}\n",
        "upstreams[1].pool.max_connections",
        "expected an integer >= 1, got 'many'",
    ),
    (
        MINIMAL + "    pool: {max_pending: -1}\n",
        "upstreams[1].pool.max_pending",
        "expected an integer >= 0, got -1",
    ),
    (
        MINIMAL + "    pool: {max_wait: 0s}\n",
        "upstreams[1].pool.max_wait",
        "must be greater than 0",
    ),
    (MINIMAL + "    pool: 4\n", "upstreams[1].pool", "expected a mapping, got 4"),
    (
        MINIMAL + "    timeouts: {connect: 0s}\n",
        "upstreams[1].timeouts.connect",
        "must be greater than 0",
    ),
    (
        MINIMAL + "    timeouts: {first_byte: soon}\n",
        "upstreams[1].timeouts.first_byte",
        "expected a duration like '800ms' or '2m', got 'soon'",
    ),
    (
        MINIMAL + "    timeouts: {idle: -1s}\n",
        "upstreams[1].timeouts.idle",
        "expected a duration",
    ),
    (MINIMAL + '    auth: {netrc: "yes"}\n', "upstreams[1].auth.netrc", "expected true or false"),
    (
        MINIMAL + "    auth: {netrc: true, basic: {username_env: U, password_env: U}}\n",
        "upstreams[1].auth",
        "either netrc: true or basic",
    ),
    (
        MINIMAL + "    auth: {basic: {username_env: U}}\n",
        "upstreams[1].auth.basic.password_env",
        "required",
    ),
    (
        MINIMAL + "    auth: {basic: {username_env: U, password_env: not-a-var}}\n",
        "upstreams[1].auth.basic.password_env",
        "expected an environment variable name",
    ),
    (
        MINIMAL + "    auth: {basic: {username_env: U, password_env: MISSING_PASSWORD}}\n",
        "upstreams[1].auth.basic.password_env",
        "environment variable MISSING_PASSWORD is not set",
    ),
    (MINIMAL + "    private_ok: 1\n", "upstreams[1].private_ok", "expected true or false"),
    (MINIMAL + "cache: {dir: ''}\n", "cache.dir", "expected a non-empty string"),
    (MINIMAL + "cache: {dir: 5}\n", "cache.dir", "expected a non-empty string"),
    (
        MINIMAL + "cache: {max_bytes: lots}\n",
        "cache.max_bytes",
        "expected a size like '10GiB'",
    ),
    (MINIMAL + "cache: {max_bytes: 0}\n", "cache.max_bytes", "must be greater than 0"),
    (MINIMAL + "cache: {mutable_ttl: -1s}\n", "cache.mutable_ttl", "expected a duration"),
    (MINIMAL + "cache: {enabled: maybe}\n", "cache.enabled", "expected true or false"),
    (MINIMAL + "cache: {scrub_rate: fast}\n", "cache.scrub_rate", "expected a rate like '8MiB/s'"),
    (MINIMAL + "cache: {scrub_rate: -1MiB/s}\n", "cache.scrub_rate", "expected a rate"),
    (MINIMAL + "cache: {scrub_rate: 8MiB/h}\n", "cache.scrub_rate", "expected a rate"),
    (MINIMAL + "cache: []\n", "cache", "expected a mapping, got a list"),
    (
        MINIMAL + "policy: {engine: rego}\n",
        "policy.engine",
        "expected one of 'embedded', 'opa', got 'rego'",
    ),
    (MINIMAL + "policy: {paths: policies/}\n", "policy.paths", "expected a list of strings"),
    (MINIMAL + "policy: {paths: [a, 3]}\n", "policy.paths[1]", "expected a non-empty string"),
    (MINIMAL + "policy: {decision: ''}\n", "policy.decision", "expected a rule path"),
    (MINIMAL + "policy: {decision: /a/b}\n", "policy.decision", "expected a rule path"),
    (MINIMAL + "policy: {decision: a//b}\n", "policy.decision", "expected a rule path"),
    (MINIMAL + "policy: {opa_url: localhost:8181}\n", "policy.opa_url", "not an http(s) URL"),
    (
        MINIMAL + "policy: {interval: fast}\n",
        "policy.interval",
        "expected a duration like '800ms' or '2m', got 'fast'",
    ),
    (MINIMAL + "policy: {interval: 0}\n", "policy.interval", "must be greater than 0"),
    (MINIMAL + "policy: {mode: loud}\n", "policy.mode", "'enforce', 'shadow'"),
    (MINIMAL + "policy: {reject_status: 200}\n", "policy.reject_status", "from 400 to 599"),
    (MINIMAL + "policy: {reject_status: '503'}\n", "policy.reject_status", "got '503'"),
    (MINIMAL + "stats: {window: 0s}\n", "stats.window", "must be greater than 0"),
    (MINIMAL + "stats: {slice: never}\n", "stats.slice", "expected a duration"),
    (
        MINIMAL + "stats: {window: 65s, slice: 10s}\n",
        "stats.window",
        "whole multiple of stats.slice (10s), got 1m5s",
    ),
    (MINIMAL + "stats: {window: 1h, slice: 1s}\n", "stats.window", "at most 1000 slices"),
    (MINIMAL + "routing: {private: '*.corp'}\n", "routing.private", "expected a list"),
    (MINIMAL + "routing: {private: ['']}\n", "routing.private[0]", "non-empty string"),
    (MINIMAL + "routing: {rules: {match: x}}\n", "routing.rules", "expected a list"),
    (MINIMAL + "routing: {rules: [{deny: true}]}\n", "routing.rules[0].match", "required"),
    (
        MINIMAL + "routing: {rules: [{match: x, upstreams: [pubic]}]}\n",
        "routing.rules[0].upstreams[0]",
        "unknown upstream 'pubic' (did you mean 'public'?)",
    ),
    (
        MINIMAL + "routing: {rules: [{match: x, upstreams: [zzz]}]}\n",
        "routing.rules[0].upstreams[0]",
        "unknown upstream 'zzz' (known: 'athens', 'public')",
    ),
    (
        MINIMAL + "routing: {rules: [{match: x, upstreams: []}]}\n",
        "routing.rules[0].upstreams",
        "at least one upstream",
    ),
    (
        MINIMAL + "routing: {rules: [{match: x, deny: true, upstreams: [public]}]}\n",
        "routing.rules[0]",
        "deny: true takes no upstreams",
    ),
    (
        MINIMAL + "routing: {rules: [{match: x, cache: no-thanks}]}\n",
        "routing.rules[0].cache",
        "true",
    ),
    (
        MINIMAL + "routing: {private: [ok.example, 'a/[']}\n",
        "routing.private[1]",
        "bad pattern 'a/[': unterminated character class",
    ),
    (
        MINIMAL + "routing: {rules: [{match: 'x\\'}]}\n",
        "routing.rules[0].match",
        "trailing backslash",
    ),
    (MINIMAL + "routing: {rules: [{match: /}]}\n", "routing.rules[0].match", "empty pattern"),
    (MINIMAL + "shutdown_grace: later\n", "shutdown_grace", "expected a duration"),
]


@pytest.mark.parametrize(("text", "key", "fragment"), ERROR_CASES)
def test_error_names_the_key(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    errors = errors_of(tmp_path, text)
    assert key in errors, errors
    assert fragment in errors[key]


def test_url_credentials_are_refused_and_never_echoed(tmp_path: Path) -> None:
    text = 'upstreams: [{name: a, url: "https://bob:hunter2@h.example"}]\n'
    errors = errors_of(tmp_path, text)
    assert "credentials in the URL" in errors["upstreams[0].url"]
    assert "hunter2" not in errors["upstreams[0].url"]
    assert "bob" not in errors["upstreams[0].url"]


def test_missing_credential_names_the_variable_not_a_value(tmp_path: Path) -> None:
    text = MINIMAL + "    auth: {basic: {username_env: ATHENS_USER, password_env: ATHENS_PW}}\n"
    with pytest.raises(ConfigErrors) as info:
        load(tmp_path, text, env={"ATHENS_USER": "very-secret-user"})
    assert str(info.value) == (
        "upstreams[1].auth.basic.password_env: environment variable ATHENS_PW is not set"
    )


# ---------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        (
            MINIMAL + "    timeout: {connect: 1s}\n",
            "upstreams[1].timeout",
            "unknown key (did you mean 'timeouts'?)",
        ),
        (
            MINIMAL + "    max_connections: 3\n",
            "upstreams[1].max_connections",
            "unknown key (did you mean 'pool.max_connections'?)",
        ),
        (MINIMAL + "listne: x\n", "listne", "unknown key (did you mean 'listen'?)"),
        (MINIMAL + "interval: 1s\n", "interval", "unknown key (did you mean 'policy.interval'?)"),
        (MINIMAL + "cache: {maxbytes: 1GiB}\n", "cache.maxbytes", "did you mean 'max_bytes'?"),
        (MINIMAL + "stats: {windows: 2m}\n", "stats.windows", "did you mean 'window'?"),
        (MINIMAL + "colour: blue\n", "colour", "unknown key"),
    ],
)
def test_unknown_key(tmp_path: Path, text: str, key: str, message: str) -> None:
    errors = errors_of(tmp_path, text)
    assert message in errors[key]


def test_unknown_key_without_a_close_match_has_no_suggestion(tmp_path: Path) -> None:
    assert errors_of(tmp_path, MINIMAL + "colour: blue\n") == {"colour": "unknown key"}


# ---------------------------------------------------------------- several errors at once


def test_all_errors_are_reported_together(tmp_path: Path) -> None:
    text = """\
listen: nowhere
upstreams:
  - {name: A, url: "not a url", timeout: 1s}
policy: {interval: fast, mode: loud}
cache: {max_bytes: lots}
"""
    with pytest.raises(ConfigErrors) as info:
        load(tmp_path, text)
    keys = [error.key for error in info.value.errors]
    assert keys == [
        "listen",
        "upstreams[0].timeout",
        "upstreams[0].name",
        "upstreams[0].url",
        "cache.max_bytes",
        "policy.interval",
        "policy.mode",
    ]
    lines = str(info.value).splitlines()
    assert len(lines) == 7
    assert "policy.interval: expected a duration like '800ms' or '2m', got 'fast'" in lines
    assert isinstance(info.value, ConfigError)  # one except clause catches every kind


def test_a_bad_value_does_not_cause_follow_up_errors(tmp_path: Path) -> None:
    # window is unreadable: no "not a multiple of slice" complaint on top.
    errors = errors_of(tmp_path, MINIMAL + "stats: {window: bad, slice: 7s}\n")
    assert list(errors) == ["stats.window"]


# ---------------------------------------------------------------- the file itself


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigErrors, match="cannot read: No such file or directory"):
        load_config(str(tmp_path / "absent.yaml"), env={})


def test_yaml_syntax_error_has_a_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigErrors, match=r"sidecar.yaml: line \d+, column \d+: invalid YAML"):
        load(tmp_path, MINIMAL + "  - {name: x\n")


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigErrors, match="line 5, column 1: invalid YAML: duplicate key 'upstreams'"
    ):
        load(tmp_path, MINIMAL + "upstreams: []\n")


def test_recursive_aliases_do_not_hang(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, MINIMAL + "routing: {private: &p [*p]}\n")
    assert "routing.private[0]" in errors


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "upstreams: required: at least one upstream"),
        ("# only a comment\n", "upstreams: required: at least one upstream"),
        ("- a\n- b\n", "the configuration must be a mapping of keys, got a list"),
        ("just text\n", "the configuration must be a mapping of keys, got 'just text'"),
    ],
)
def test_document_shape(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigErrors) as info:
        load(tmp_path, text)
    assert str(info.value) == message


# ---------------------------------------------------------------- relative paths


def test_policy_paths_are_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    confdir = tmp_path / "etc"
    confdir.mkdir()
    monkeypatch.chdir(tmp_path)
    text = MINIMAL + "policy: {paths: [policies/, /abs/rules.rego, ../shared]}\n"
    config = load_config(write(confdir, text), env={})
    assert config.policy.paths == (
        str(confdir / "policies"),
        "/abs/rules.rego",
        str(tmp_path / "shared"),
    )


def test_cache_dir_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    confdir = tmp_path / "etc"
    confdir.mkdir()
    monkeypatch.chdir(tmp_path)
    config = load_config(write(confdir, MINIMAL + "cache: {dir: cache}\n"), env={})
    assert config.cache.dir == str(tmp_path / "cache")


# ---------------------------------------------------------------- environment overrides


def test_overrides_replace_file_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    env = {
        "SIDECAR_LISTEN": "0.0.0.0:9000",
        "SIDECAR_CACHE_DIR": "/var/cache/x",
        "SIDECAR_CACHE_MAX_BYTES": "512MiB",
        "SIDECAR_CACHE_ENABLED": "false",
        "SIDECAR_POLICY_ENGINE": "opa",
        "SIDECAR_POLICY_MODE": "shadow",
        "SIDECAR_POLICY_INTERVAL": "800ms",
        "SIDECAR_POLICY_REJECT_STATUS": "404",
        "SIDECAR_POLICY_PATHS": "local, /etc/policies/",
        "SIDECAR_STATS_WINDOW": "5m",
        "SIDECAR_UPSTREAMS_0_URL": "http://athens.svc:3000/",
        "SIDECAR_UPSTREAMS_1_PRIVATE_OK": "true",
        "SIDECAR_UPSTREAMS_1_POOL_MAX_CONNECTIONS": "8",
        "SIDECAR_UPSTREAMS_1_TIMEOUTS_FIRST_BYTE": "5",
        "SIDECAR_ROUTING_PRIVATE": "a.example, b.example",
        "SIDECAR_SHUTDOWN_GRACE": "1m",
    }
    config = load(tmp_path, DESIGN_EXAMPLE, env)
    assert config.listen == "0.0.0.0:9000"
    assert config.cache == CacheConfig(
        dir="/var/cache/x", max_bytes=512 * 1024**2, mutable_ttl=60.0, enabled=False
    )
    assert config.policy.engine is PolicyEngineKind.OPA
    assert config.policy.mode is PolicyMode.SHADOW
    assert (config.policy.interval, config.policy.reject_status) == (0.8, 404)
    # paths from the environment are relative to the working directory
    assert config.policy.paths == (str(tmp_path / "local"), "/etc/policies")
    assert config.stats.window == 300.0
    assert config.upstreams[0].url == "http://athens.svc:3000"
    assert config.upstreams[0].auth.netrc is True  # untouched keys stay
    assert config.upstreams[1].private_ok is True
    assert config.upstreams[1].pool.max_connections == 8
    assert config.upstreams[1].timeouts.first_byte == 5.0
    assert config.routing.private == ("a.example", "b.example")
    assert config.shutdown_grace == 60.0


def test_override_creates_a_missing_section(tmp_path: Path) -> None:
    config = load(tmp_path, MINIMAL, {"SIDECAR_STATS_SLICE": "5s", "SIDECAR_STATS_WINDOW": "1m"})
    assert config.stats == StatsConfig(window=60.0, slice=5.0)


def test_overrides_of_rules(tmp_path: Path) -> None:
    env = {
        "SIDECAR_ROUTING_RULES_1_UPSTREAMS": "athens,public",
        "SIDECAR_ROUTING_RULES_0_DENY": "no",
    }
    config = load(tmp_path, DESIGN_EXAMPLE, env)
    assert config.routing.rules[0].deny is False
    assert config.routing.rules[1].upstreams == ("athens", "public")


def test_strings_are_taken_verbatim(tmp_path: Path) -> None:
    config = load(tmp_path, MINIMAL, {"SIDECAR_CACHE_DIR": "/tmp/null", "SIDECAR_LISTEN": "h:22"})
    assert (config.cache.dir, config.listen) == ("/tmp/null", "h:22")


@pytest.mark.parametrize(
    ("env", "key", "fragment"),
    [
        ({"SIDECAR_FOO": "1"}, "SIDECAR_FOO", "no such configuration key"),
        ({"SIDECAR_CACHE": "x"}, "SIDECAR_CACHE", "no such configuration key"),
        ({"SIDECAR_UPSTREAMS": "x"}, "SIDECAR_UPSTREAMS", "no such configuration key"),
        (
            {"SIDECAR_POLICY_INTERVALL": "1s"},
            "SIDECAR_POLICY_INTERVALL",
            "did you mean SIDECAR_POLICY_INTERVAL?",
        ),
        (
            {"SIDECAR_UPSTREAMS_1_URI": "http://h"},
            "SIDECAR_UPSTREAMS_1_URI",
            "did you mean SIDECAR_UPSTREAMS_1_URL?",
        ),
        (
            {"SIDECAR_UPSTREAMS_5_URL": "http://h"},
            "SIDECAR_UPSTREAMS_5_URL",
            "cannot set upstreams[5].url: upstreams[5] is missing",
        ),
        (
            {"SIDECAR_ROUTING_RULES_0_MATCH": "x"},
            "SIDECAR_ROUTING_RULES_0_MATCH",
            "routing.rules is missing",
        ),
        (
            {"SIDECAR_POLICY_INTERVAL": "fast"},
            "policy.interval",
            "got 'fast' (set by SIDECAR_POLICY_INTERVAL)",
        ),
        (
            {"SIDECAR_UPSTREAMS_0_URL": "nope"},
            "upstreams[0].url",
            "not an http(s) URL: 'nope' (set by SIDECAR_UPSTREAMS_0_URL)",
        ),
        (
            {"SIDECAR_UPSTREAMS_0_POOL_MAX_CONNECTIONS": "lots"},
            "upstreams[0].pool.max_connections",
            "got 'lots' (set by SIDECAR_UPSTREAMS_0_POOL_MAX_CONNECTIONS)",
        ),
        (
            {"SIDECAR_POLICY_MODE": ""},
            "policy.mode",
            "got '' (set by SIDECAR_POLICY_MODE)",
        ),
    ],
)
def test_override_errors(tmp_path: Path, env: dict[str, str], key: str, fragment: str) -> None:
    errors = errors_of(tmp_path, MINIMAL, env)
    assert key in errors, errors
    assert fragment in errors[key]


def test_override_into_a_non_mapping(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, MINIMAL + "cache: 5\n", {"SIDECAR_CACHE_DIR": "/x"})
    assert errors["SIDECAR_CACHE_DIR"] == "cannot set cache.dir: cache is not a mapping"
    assert errors["cache"] == "expected a mapping, got 5"


def test_kubernetes_service_link_variables_are_ignored(tmp_path: Path) -> None:
    env = {
        "SIDECAR_SERVICE_HOST": "10.0.0.1",
        "SIDECAR_SERVICE_PORT": "3001",
        "SIDECAR_SERVICE_PORT_HTTP": "3001",
        "SIDECAR_PORT": "tcp://10.0.0.1:3001",
        "SIDECAR_PORT_3001_TCP": "tcp://10.0.0.1:3001",
        "SIDECAR_PORT_3001_TCP_ADDR": "10.0.0.1",
    }
    assert load(tmp_path, MINIMAL, env).listen == "127.0.0.1:3001"


def test_other_variables_are_ignored(tmp_path: Path) -> None:
    env = {"PATH": "/bin", "SIDECARX": "1", "GOPROXY": "off", "sidecar_listen": "x"}
    assert load(tmp_path, MINIMAL, env).listen == "127.0.0.1:3001"


def test_os_environ_is_the_default(tmp_path: Path) -> None:
    # no env= argument: read os.environ (unchanged by this test)
    expected = load_config(write(tmp_path, MINIMAL), env=dict(os.environ))
    assert load_config(write(tmp_path, MINIMAL)) == expected


# ---------------------------------------------------------------- GOPRIVATE / GONOPROXY


def test_goprivate_and_gonoproxy_are_appended(tmp_path: Path) -> None:
    env = {
        "GOPRIVATE": "*.corp.example, git.internal/*,,",
        "GONOPROXY": "git.internal/*,github.com/acme/secret",
    }
    config = load(tmp_path, DESIGN_EXAMPLE, env)
    assert config.routing.private == (
        "*.corp.example",
        "github.com/acme/*",
        "git.internal/*",
        "github.com/acme/secret",
    )


def test_every_bad_pattern_is_reported_in_one_pass_naming_its_key(tmp_path: Path) -> None:
    text = MINIMAL + (
        "routing:\n"
        "  private: ['[', good.example, 'x/[]']\n"
        "  rules: [{match: ok/*}, {match: 'b/[^'}, {match: 'c\\', deny: true}]\n"
    )
    errors = errors_of(tmp_path, text, {"GOPRIVATE": "fine.example,,[z", "GONOPROXY": "a/["})
    assert errors == {
        "routing.private[0]": "bad pattern '[': unterminated character class",
        "routing.private[2]": "bad pattern 'x/[]': unterminated character class",
        "GOPRIVATE[2]": "bad pattern '[z': unterminated character class",
        "GONOPROXY[0]": "bad pattern 'a/[': unterminated character class",
        "routing.rules[1].match": "bad pattern 'b/[^': unterminated character class",
        "routing.rules[2].match": "bad pattern 'c\\\\': trailing backslash",
    }


def test_a_bad_pattern_set_by_a_variable_names_it(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, MINIMAL, {"SIDECAR_ROUTING_PRIVATE": "ok.example,b/["})
    assert errors == {
        "routing.private[1]": "bad pattern 'b/[': unterminated character class "
        "(set by SIDECAR_ROUTING_PRIVATE)"
    }


def test_a_bad_goprivate_is_refused_with_the_embedded_default() -> None:
    with pytest.raises(ConfigErrors) as info:
        default_config(env={"HOME": "/h", "GOPRIVATE": "["})
    assert str(info.value) == "GOPRIVATE[0]: bad pattern '[': unterminated character class"


def test_goprivate_applies_to_the_embedded_default() -> None:
    assert default_config(env={"HOME": "/h", "GOPRIVATE": "x.example"}).routing.private == (
        "x.example",
    )


# ---------------------------------------------------------------- robustness

_KEYS = [
    "listen",
    "upstreams",
    "name",
    "url",
    "pool",
    "max_connections",
    "timeouts",
    "auth",
    "basic",
    "netrc",
    "cache",
    "dir",
    "max_bytes",
    "policy",
    "paths",
    "interval",
    "stats",
    "window",
    "slice",
    "routing",
    "private",
    "rules",
    "match",
    "deny",
    "bogus",
]
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "1s", "10GiB", "http://h", "127.0.0.1:1", "[::1]:2", "athens", "x"]),
    st.text(max_size=12),
)
_DOCUMENTS = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(_KEYS), inner, max_size=5)
    ),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(document=st.dictionaries(st.sampled_from(_KEYS), _DOCUMENTS, max_size=6))
def test_any_document_gives_a_config_or_config_errors(
    tmp_path_factory: pytest.TempPathFactory, document: dict[str, object]
) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "sidecar.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    try:
        load_config(str(path), env={"HOME": "/h"})
    except ConfigErrors as exc:
        assert exc.errors and all(str(e) for e in exc.errors)


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(
        [
            "LISTEN",
            "CACHE_MAX_BYTES",
            "POLICY_INTERVAL",
            "UPSTREAMS_0_POOL_MAX_CONNECTIONS",
            "UPSTREAMS_1_PRIVATE_OK",
            "POLICY_PATHS",
            "ROUTING_PRIVATE",
            "STATS_WINDOW",
            "X",
        ]
    ),
    value=st.text(
        alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\0"), max_size=12
    ),
)
def test_any_override_value_gives_a_config_or_config_errors(name: str, value: str) -> None:
    try:
        default_config(env={"HOME": "/h", "SIDECAR_" + name: value})
    except ConfigErrors as exc:
        assert exc.errors


def test_kubernetes_service_links_of_any_sidecar_service_are_ignored() -> None:
    env = {
        "SIDECAR_METRICS_SERVICE_HOST": "10.0.0.1",
        "SIDECAR_METRICS_SERVICE_PORT": "9090",
        "SIDECAR_METRICS_PORT_9090_TCP_ADDR": "10.0.0.1",
        "SIDECAR_PORT": "tcp://10.0.0.2:80",
        "SIDECAR_LISTEN": "127.0.0.1:4000",
    }
    assert load_config(None, env).listen == "127.0.0.1:4000"
