"""Loads sidecar.yaml (or the embedded default) into ``sidecar.config.Config``."""

from __future__ import annotations

import dataclasses
import enum
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, Union
from urllib.parse import urlsplit, urlunsplit

import yaml

from sidecar.config import (
    DEFAULT_BACKUP_URL,
    DEFAULT_CACHE_MAX_BYTES,
    DEFAULT_CACHE_SCRUB_RATE,
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_FIRST_BYTE_TIMEOUT_S,
    DEFAULT_HEDGE_BUDGET,
    DEFAULT_HEDGE_BURST,
    DEFAULT_HEDGE_FLOOR_S,
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_LISTEN,
    DEFAULT_MUTABLE_TTL_S,
    DEFAULT_OPA_URL,
    DEFAULT_POLICY_DECISION,
    DEFAULT_POLICY_INTERVAL_S,
    DEFAULT_POOL_MAX_CONNECTIONS,
    DEFAULT_POOL_MAX_PENDING,
    DEFAULT_POOL_MAX_WAIT_S,
    DEFAULT_PRIMARY_URL,
    DEFAULT_REJECT_STATUS,
    DEFAULT_SEND_TIMEOUT_S,
    DEFAULT_SHUTDOWN_GRACE_S,
    DEFAULT_STATS_SLICE_S,
    DEFAULT_STATS_WINDOW_S,
    DEFAULT_VERIFY_MODE,
    DEFAULT_WHEN_UNAVAILABLE,
    AuthConfig,
    BasicAuth,
    CacheConfig,
    Config,
    HedgeConfig,
    PolicyConfig,
    PolicyEngineKind,
    PolicyMode,
    PoolConfig,
    RouteRule,
    RoutingConfig,
    StatsConfig,
    TimeoutsConfig,
    UpstreamConfig,
    VerifyConfig,
    VerifyMode,
    WhenUnavailable,
)
from sidecar.errors import ConfigError, ConfigErrors, SumdbKeyError
from sidecar.routing import compile_glob
from sidecar.sumdb.gosumdb import parse_gosumdb
from sidecar.units import format_duration, parse_duration, parse_size

# --------------------------------------------------------------------------
# Loader. Plain dicts live only below this line.
#
# Pipeline: read YAML (or build the embedded default document) -> apply the
# SIDECAR_* environment overrides to the raw document -> validate every key
# into the dataclasses above, collecting *all* errors -> raise ConfigErrors or
# return the Config. Relative paths: `cache.dir` is relative to the working
# directory (a config file usually sits in a read-only ConfigMap), entries of
# `policy.paths` are relative to the config file's directory (policies ship
# beside their config), or to the working directory when they come from
# SIDECAR_POLICY_PATHS or when there is no config file.
# --------------------------------------------------------------------------

ENV_PREFIX = "SIDECAR_"
CACHE_DIR_NAME = "goproxy-sidecar"
MAX_STATS_SLICES = 1000

# Variables Kubernetes injects for Services named "sidecar" or "sidecar-*"
# (service links: SIDECAR_METRICS_SERVICE_HOST, SIDECAR_PORT_3001_TCP, ...);
# they are not config overrides and must not break start-up.
_K8S_SERVICE_LINK = re.compile(
    r"SIDECAR_(\w+_)?(SERVICE_HOST|SERVICE_PORT\w*|PORT|PORT_\d+_(TCP|UDP|SCTP)\w*)"
)

# The shape of the document: a leaf is the kind of its value, which decides how
# an environment override is read ("str" verbatim, "list" comma-separated,
# anything else as a YAML scalar); a one-item list is a list of that shape.
_Node = Union[str, "Mapping[str, _Node]", "list[_Node]"]
_UPSTREAM_SCHEMA: dict[str, _Node] = {
    "name": "str",
    "url": "str",
    "private_ok": "bool",
    "pool": {"max_connections": "int", "max_pending": "int", "max_wait": "duration"},
    "timeouts": {"connect": "duration", "first_byte": "duration", "idle": "duration"},
    "auth": {"netrc": "bool", "basic": {"username_env": "str", "password_env": "str"}},
    "hedge": {
        "enabled": "bool",
        "delay": "duration",
        "floor": "duration",
        "budget": "number",
        "burst": "int",
    },
}
_RULE_SCHEMA: dict[str, _Node] = {
    "match": "str",
    "upstreams": "list",
    "deny": "bool",
    "cache": "bool",
}
_SCHEMA: dict[str, _Node] = {
    "listen": "str",
    "shutdown_grace": "duration",
    "send_timeout": "duration",
    "upstreams": [_UPSTREAM_SCHEMA],
    "cache": {
        "dir": "str",
        "max_bytes": "size",
        "mutable_ttl": "duration",
        "enabled": "bool",
        "scrub_rate": "size",
    },
    "policy": {
        "engine": "str",
        "paths": "list",
        "decision": "str",
        "opa_url": "str",
        "interval": "duration",
        "mode": "str",
        "reject_status": "int",
    },
    "stats": {"window": "duration", "slice": "duration"},
    "routing": {"private": "list", "rules": [_RULE_SCHEMA]},
    "verify": {"mode": "str", "key": "str", "url": "str", "skip": "list", "unavailable": "str"},
}
_CWD_RELATIVE_OVERRIDES = {"policy.paths"}

_NO_STRINGS: tuple[str, ...] = ()
_T = TypeVar("_T")
_E = TypeVar("_E", bound=enum.Enum)
_Path = list[str | int]


def load_config(path: str | None, env: Mapping[str, str] | None = None) -> Config:
    """Read, override from ``env`` (default ``os.environ``) and validate a config file.

    ``path=None`` gives :func:`default_config`. Raises :class:`ConfigErrors`
    listing every problem found, each naming its key.
    """
    if path is None:
        return default_config(env)
    environ = os.environ if env is None else env
    document = _read_yaml(path)
    return _finish(document, os.path.dirname(os.path.abspath(path)), environ)


def default_config(env: Mapping[str, str] | None = None) -> Config:
    """The embedded default (no ``--config``), with environment overrides applied."""
    environ = os.environ if env is None else env
    return _finish(_default_document(environ), os.getcwd(), environ)


def default_cache_dir(env: Mapping[str, str]) -> str:
    """``$XDG_CACHE_HOME/goproxy-sidecar``, else ``~/.cache/goproxy-sidecar``."""
    xdg = env.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec says to ignore a relative value
        return os.path.join(xdg, CACHE_DIR_NAME)
    home = env.get("HOME") or os.path.expanduser("~")
    return os.path.join(home, ".cache", CACHE_DIR_NAME)


def _default_document(env: Mapping[str, str]) -> dict[str, object]:
    return {
        "listen": DEFAULT_LISTEN,
        "upstreams": [
            {"name": "athens", "url": DEFAULT_PRIMARY_URL},
            {"name": "public", "url": DEFAULT_BACKUP_URL},
        ],
        "cache": {"dir": default_cache_dir(env)},
    }


def _finish(document: object, base_dir: str, env: Mapping[str, str]) -> Config:
    if not isinstance(document, dict):
        problem = f"the configuration must be a mapping of keys, got {_show(document)}"
        raise ConfigErrors([ConfigError("", problem)])
    errors: list[ConfigError] = []
    origins = _apply_env(document, env, errors)
    config = _build(document, base_dir, env, errors)
    if errors:
        raise ConfigErrors([_with_origin(error, origins) for error in errors])
    return config


def _with_origin(error: ConfigError, origins: Mapping[str, str]) -> ConfigError:
    """Point an error on an overridden key at the variable that set it."""
    for key, var in origins.items():
        if error.key == key or error.key.startswith((key + ".", key + "[")):
            return ConfigError(error.key, f"{error.message} (set by {var})")
    return error


# ---------------------------------------------------------------- YAML


def _read_yaml(path: str) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigErrors([ConfigError("", f"{path}: cannot read: {reason}")]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigErrors([ConfigError("", f"{path}: not UTF-8 text: {exc}")]) from exc
    try:
        loader = _YAML_LOADER(text)
        try:
            node = loader.get_single_node()
            _check_duplicate_keys(node)
            return {} if node is None else loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ConfigErrors([ConfigError("", f"{path}: {_yaml_problem(exc)}")]) from exc


_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _check_duplicate_keys(node: object, seen_nodes: set[int] | None = None) -> None:
    """PyYAML keeps the last of two equal keys silently; a config must not."""
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:  # an alias, possibly recursive: checked already
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        keys: set[tuple[str, str]] = set()
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value != "<<":
                if (key.tag, key.value) in keys:
                    raise yaml.MarkedYAMLError(
                        problem=f"duplicate key {key.value!r}", problem_mark=key.start_mark
                    )
                keys.add((key.tag, key.value))
            _check_duplicate_keys(value, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicate_keys(item, seen_nodes)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return f"invalid YAML: {problem}"
    return f"line {mark.line + 1}, column {mark.column + 1}: invalid YAML: {problem}"


# ---------------------------------------------------------------- environment


def _apply_env(
    document: dict[Any, Any], env: Mapping[str, str], errors: list[ConfigError]
) -> dict[str, str]:
    """Apply every SIDECAR_<PATH> variable; return {dotted key: variable}."""
    origins: dict[str, str] = {}
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or _K8S_SERVICE_LINK.fullmatch(var):
            continue
        found = _resolve(_SCHEMA, var[len(ENV_PREFIX) :])
        if found is None:
            errors.append(ConfigError(var, _unknown_variable(var)))
            continue
        path, kind = found
        dotted = _dotted(path)
        value = _env_value(kind, env[var], dotted in _CWD_RELATIVE_OVERRIDES)
        problem = _set_path(document, path, value)
        if problem:
            errors.append(ConfigError(var, problem))
        else:
            origins[dotted] = var
    return origins


def _unknown_variable(var: str) -> str:
    import difflib  # only on the error path

    names = [ENV_PREFIX + name for name in _variable_names(_SCHEMA)]
    index = re.search(r"_(\d+)_", var)
    generic = re.sub(r"_\d+(?=_)", "_<N>", var)
    close = difflib.get_close_matches(generic, names, n=1, cutoff=0.7)
    if close:
        guess = close[0].replace("<N>", index.group(1) if index else "0")
        return f"no such configuration key (did you mean {guess}?)"
    return (
        "no such configuration key (a variable is SIDECAR_ + the key's path joined by '_', "
        "upper-cased, with list indexes: SIDECAR_CACHE_DIR, SIDECAR_UPSTREAMS_0_URL)"
    )


def _variable_names(node: _Node) -> list[str]:
    """Every override name below ``node``, list indexes written ``<N>``."""
    if isinstance(node, str):
        return [""]
    if isinstance(node, list):
        return ["<N>" + ("_" + rest if rest else "") for rest in _variable_names(node[0])]
    return [
        key.upper() + ("_" + rest if rest else "")
        for key, child in node.items()
        for rest in _variable_names(child)
    ]


def _resolve(node: _Node, name: str) -> tuple[_Path, str] | None:
    """Map the rest of a variable name (``UPSTREAMS_0_URL``) to a leaf path and kind."""
    if isinstance(node, str):
        return ([], node) if name == "" else None
    if isinstance(node, list):
        match = re.fullmatch(r"(\d+)_(.+)", name)
        found = _resolve(node[0], match.group(2)) if match else None
        return ([int(match.group(1)), *found[0]], found[1]) if match and found else None
    for key, child in node.items():
        upper = key.upper()
        if name == upper or name.startswith(upper + "_"):
            found = _resolve(child, name[len(upper) + 1 :])
            if found is not None:
                return [key, *found[0]], found[1]
    return None


def _env_value(kind: str, text: str, cwd_relative: bool) -> object:
    """Strings, durations and sizes verbatim; lists split on commas; numbers and bools as YAML."""
    if kind == "list":
        items = [item.strip() for item in text.split(",") if item.strip()]
        return [_absolute(item) for item in items] if cwd_relative else items
    if kind not in ("int", "number", "bool"):
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, str | int | float | bool) else text


def _set_path(document: dict[Any, Any], path: _Path, value: object) -> str | None:
    """Set one leaf, creating missing mappings (never list items); return a problem."""
    node: Any = document
    for depth, segment in enumerate(path[:-1]):
        wants_list = isinstance(path[depth + 1], int)
        if isinstance(segment, int):
            node = node[segment] if segment < len(node) else None
        else:
            if node.get(segment) is None and not wants_list:
                node[segment] = {}
            node = node.get(segment)
        if not isinstance(node, list if wants_list else dict):
            here = _dotted(path[: depth + 1])
            state = "missing" if node is None else f"not a {'list' if wants_list else 'mapping'}"
            return f"cannot set {_dotted(path)}: {here} is {state}"
    node[path[-1]] = value
    return None


def _dotted(path: Sequence[str | int]) -> str:
    out = ""
    for segment in path:
        out += f"[{segment}]" if isinstance(segment, int) else (f".{segment}" if out else segment)
    return out


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


# ---------------------------------------------------------------- sections


class _Invalid(ValueError):
    """A converter's complaint; ``suffix`` extends the key (``[2]`` for a list item)."""

    def __init__(self, message: str, suffix: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.suffix = suffix


class _Section:
    """One mapping of the raw document: typed reads, every problem recorded with its key."""

    def __init__(
        self,
        raw: object,
        path: str,
        schema: Mapping[str, _Node],
        errors: list[ConfigError],
        *,
        optional: bool = True,
    ) -> None:
        self.path = path
        self.schema = schema
        self.errors = errors
        self.failed = False
        self.muted = False  # not a mapping: one error, no "required" noise after it
        self.raw: dict[Any, Any] = {}
        if isinstance(raw, dict):
            self.raw = raw
            self._check_keys()
        elif raw is not None or not optional:
            self.fail(f"expected a mapping, got {_show(raw)}")
            self.muted = True

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def fail(self, message: str, name: str | None = None) -> None:
        self.failed = True
        if self.muted:
            return
        key = self.path if name is None else self.key(name)
        self.errors.append(ConfigError(key, message))

    def has(self, name: str) -> bool:
        return name in self.raw

    def get(self, name: str, convert: Callable[[object], _T], default: _T) -> _T:
        if name not in self.raw:
            return default
        try:
            return convert(self.raw[name])
        except _Invalid as exc:
            self.fail(exc.message, name + exc.suffix)
        return default

    def require(self, name: str, convert: Callable[[object], _T], default: _T) -> _T:
        if name not in self.raw:
            self.fail("required", name)
        return self.get(name, convert, default)

    def sub(self, name: str) -> _Section:
        schema = self.schema[name]
        assert isinstance(schema, Mapping)
        return _Section(self.raw.get(name), self.key(name), schema, self.errors)

    def items(self, name: str) -> list[_Section]:
        schema = self.schema[name]
        assert isinstance(schema, list) and isinstance(schema[0], Mapping)
        value = self.raw.get(name)
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(f"expected a list, got {_show(value)}", name)
            return []
        return [
            _Section(item, f"{self.key(name)}[{i}]", schema[0], self.errors, optional=False)
            for i, item in enumerate(value)
        ]

    def _check_keys(self) -> None:
        for name in self.raw:
            if name not in self.schema:
                self.fail(f"unknown key{_suggest(str(name), self.schema)}", str(name))


def _suggest(name: str, schema: Mapping[str, _Node]) -> str:
    for nested in _nested_keys(schema):
        if nested.rsplit(".", 1)[-1] == name:
            return f" (did you mean '{nested}'?)"
    import difflib  # only on the error path

    close = difflib.get_close_matches(name, list(schema), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _nested_keys(schema: Mapping[str, _Node]) -> list[str]:
    """Dotted paths of the keys below this level: ``pool.max_connections``."""
    keys: list[str] = []
    for key, child in schema.items():
        if isinstance(child, Mapping):
            keys += [f"{key}.{sub}" for sub in [*child, *_nested_keys(child)]]
    return keys


def _show(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------- converters
# Each takes the raw value and returns the typed one or raises _Invalid with a
# message that says what was expected and what was found.

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
_RULE_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:/[A-Za-z_][A-Za-z0-9_]*)*")
_USERINFO = re.compile(r"//[^/?#]*@")


def _string(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise _Invalid(f"expected a non-empty string, got {_show(value)}")
    return value


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {_show(value)}")
    return value


def _integer(low: int, high: int | None = None) -> Callable[[object], int]:
    wanted = f"an integer from {low} to {high}" if high else f"an integer >= {low}"

    def convert(value: object) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _Invalid(f"expected {wanted}, got {_show(value)}")
        if value < low or (high is not None and value > high):
            raise _Invalid(f"expected {wanted}, got {value}")
        return value

    return convert


def _duration(*, positive: bool) -> Callable[[object], float]:
    def convert(value: object) -> float:
        try:
            if not isinstance(value, str | int | float):
                raise ValueError(value)
            seconds = parse_duration(value)
        except ValueError:
            raise _Invalid(
                f"expected a duration like '800ms' or '2m', got {_show(value)}"
            ) from None
        if positive and seconds <= 0:
            raise _Invalid(f"must be greater than 0, got {_show(value)}")
        return seconds

    return convert


def _hedge_delay(value: object) -> float | None:
    """``auto`` (None) or a duration > 0."""
    if value == "auto":
        return None
    try:
        return _duration(positive=True)(value)
    except _Invalid as exc:
        raise _Invalid(exc.message.replace("expected a", "expected 'auto' or a", 1)) from None


def _fraction(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise _Invalid(f"expected a number from 0 to 1 (0.1 = 10 %), got {_show(value)}")
    return float(value)


def _size(value: object) -> int:
    try:
        if not isinstance(value, str | int):
            raise ValueError(value)
        size = parse_size(value)
    except ValueError:
        raise _Invalid(f"expected a size like '10GiB' or '512MiB', got {_show(value)}") from None
    if size <= 0:
        raise _Invalid(f"must be greater than 0, got {_show(value)}")
    return size


def _rate(value: object) -> int:
    """Bytes per second: a size, optionally written with ``/s`` (``8MiB/s``); 0 allowed."""
    text = value.removesuffix("/s") if isinstance(value, str) else value
    try:
        if not isinstance(text, str | int):
            raise ValueError(text)
        return parse_size(text)
    except ValueError:
        raise _Invalid(
            f"expected a rate like '8MiB/s' (or 0 to turn it off), got {_show(value)}"
        ) from None


def _choice(kind: type[_E]) -> Callable[[object], _E]:
    def convert(value: object) -> _E:
        for member in kind:
            if value == member.value:
                return member
        names = ", ".join(repr(m.value) for m in kind)
        raise _Invalid(f"expected one of {names}, got {_show(value)}")

    return convert


def _strings(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _Invalid(f"expected a list of strings, got {_show(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise _Invalid(f"expected a non-empty string, got {_show(item)}", f"[{i}]")
    return tuple(item.strip() for item in value)


def _name(value: object) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise _Invalid(f"expected a name matching [a-z0-9][a-z0-9_-]*, got {_show(value)}")
    return value


def _env_name(value: object) -> str:
    if not isinstance(value, str) or not _ENV_NAME.fullmatch(value):
        raise _Invalid(f"expected an environment variable name, got {_show(value)}")
    return value


def _rule_path(value: object) -> str:
    if not isinstance(value, str) or not _RULE_PATH.fullmatch(value):
        raise _Invalid(f"expected a rule path like 'sidecar/breaker/decisions', got {_show(value)}")
    return value


def _http_url(value: object) -> str:
    """An http(s) base URL with a host; normalised without a trailing slash."""
    if not isinstance(value, str):
        raise _Invalid(f"not an http(s) URL: {_show(value)}")
    shown = _USERINFO.sub("//***@", value)  # never echo a password
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise _Invalid(f"not an http(s) URL: {shown!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or not value.isprintable():
        raise _Invalid(f"not an http(s) URL: {shown!r}")
    if " " in value:
        raise _Invalid(f"not an http(s) URL: {shown!r}")
    if "@" in parts.netloc:
        raise _Invalid(f"credentials in the URL are not allowed (use auth): {shown!r}")
    if "?" in value or "#" in value:
        raise _Invalid(f"a base URL takes no query or fragment: {shown!r}")
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def _listen(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected 'host:port' like '127.0.0.1:3001', got {_show(value)}")
    host, sep, port = value.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()):
        raise _Invalid(f"expected 'host:port' like '127.0.0.1:3001', got {_show(value)}")
    if not 1 <= int(port) <= 65535:
        raise _Invalid(f"port must be from 1 to 65535, got {_show(value)}")
    problem = _host_problem(host)
    if problem:
        raise _Invalid(f"{problem}, got {_show(value)}")
    return value


def _host_problem(host: str) -> str | None:
    if not host:
        return "missing host (use '0.0.0.0:PORT' or '[::]:PORT' for every interface)"
    if host.startswith("[") and host.endswith("]"):
        import ipaddress  # only for bracketed hosts

        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return "not an IPv6 address inside the brackets"
        return None
    if ":" in host:
        return "an IPv6 address needs brackets, like '[::1]:3001'"
    return None if _HOSTNAME.fullmatch(host) else "not a host name or address"


# ---------------------------------------------------------------- builders


def _build(
    document: object, base_dir: str, env: Mapping[str, str], errors: list[ConfigError]
) -> Config:
    root = _Section(document, "", _SCHEMA, errors)
    listen = root.get("listen", _listen, DEFAULT_LISTEN)  # read in document order
    upstreams = _upstreams(root, env)
    names = [u.name for u in upstreams]
    return Config(
        listen=listen,
        upstreams=upstreams,
        cache=_cache(root.sub("cache"), env),
        policy=_policy(root.sub("policy"), base_dir),
        stats=_stats(root.sub("stats")),
        routing=_routing(root.sub("routing"), names, env),
        verify=_verify(root.sub("verify"), env),
        shutdown_grace=root.get(
            "shutdown_grace", _duration(positive=False), DEFAULT_SHUTDOWN_GRACE_S
        ),
        send_timeout=root.get("send_timeout", _duration(positive=True), DEFAULT_SEND_TIMEOUT_S),
    )


def _upstreams(root: _Section, env: Mapping[str, str]) -> tuple[UpstreamConfig, ...]:
    if not root.has("upstreams"):
        root.fail("required: at least one upstream", "upstreams")
    elif root.raw["upstreams"] == []:
        root.fail("expected at least one upstream, got an empty list", "upstreams")
    upstreams = tuple(_upstream(section, env) for section in root.items("upstreams"))
    first_index: dict[str, int] = {}
    for i, upstream in enumerate(upstreams):
        if upstream.name in first_index:
            other = first_index[upstream.name]
            root.fail(
                f"duplicate name {upstream.name!r} (also upstreams[{other}])",
                f"upstreams[{i}].name",
            )
        elif upstream.name:
            first_index[upstream.name] = i
    return upstreams


def _upstream(section: _Section, env: Mapping[str, str]) -> UpstreamConfig:
    pool, timeouts = section.sub("pool"), section.sub("timeouts")
    positive = _duration(positive=True)
    upstream = UpstreamConfig(
        name=section.require("name", _name, ""),
        url=section.require("url", _http_url, ""),
        pool=PoolConfig(
            max_connections=pool.get("max_connections", _integer(1), DEFAULT_POOL_MAX_CONNECTIONS),
            max_pending=pool.get("max_pending", _integer(0), DEFAULT_POOL_MAX_PENDING),
            max_wait=pool.get("max_wait", positive, DEFAULT_POOL_MAX_WAIT_S),
        ),
        timeouts=TimeoutsConfig(
            connect=timeouts.get("connect", positive, DEFAULT_CONNECT_TIMEOUT_S),
            first_byte=timeouts.get("first_byte", positive, DEFAULT_FIRST_BYTE_TIMEOUT_S),
            idle=timeouts.get("idle", positive, DEFAULT_IDLE_TIMEOUT_S),
        ),
        auth=_auth(section.sub("auth"), env),
        private_ok=section.get("private_ok", _boolean, False),
    )
    hedge = _hedge(section.sub("hedge"), upstream.timeouts.first_byte)
    return dataclasses.replace(upstream, hedge=hedge)


def _hedge(section: _Section, first_byte: float) -> HedgeConfig:
    delay = section.get("delay", _hedge_delay, None)
    floor = section.get("floor", _duration(positive=True), DEFAULT_HEDGE_FLOOR_S)
    for key, value in (("delay", delay), ("floor", floor)):
        if value is not None and value >= first_byte:
            section.fail(
                f"must be shorter than timeouts.first_byte ({format_duration(first_byte)}), "
                f"got {format_duration(value)}",
                key,
            )
    return HedgeConfig(
        enabled=section.get("enabled", _boolean, True),
        delay=delay,
        floor=floor,
        budget=section.get("budget", _fraction, DEFAULT_HEDGE_BUDGET),
        burst=section.get("burst", _integer(1), DEFAULT_HEDGE_BURST),
    )


def _auth(section: _Section, env: Mapping[str, str]) -> AuthConfig:
    netrc = section.get("netrc", _boolean, False)
    if not section.has("basic"):
        return AuthConfig(netrc=netrc)
    if netrc:
        section.fail("use either netrc: true or basic, not both")
    basic = section.sub("basic")
    username_env = basic.require("username_env", _env_name, "")
    password_env = basic.require("password_env", _env_name, "")
    for key, var in (("username_env", username_env), ("password_env", password_env)):
        if var and var not in env:
            basic.fail(f"environment variable {var} is not set", key)
    return AuthConfig(
        netrc=netrc,
        basic=BasicAuth(
            username_env=username_env,
            password_env=password_env,
            username=env.get(username_env, ""),
            password=env.get(password_env, ""),
        ),
    )


def _cache(section: _Section, env: Mapping[str, str]) -> CacheConfig:
    directory = section.get("dir", _string, "") or default_cache_dir(env)
    return CacheConfig(
        dir=_absolute(directory),
        max_bytes=section.get("max_bytes", _size, DEFAULT_CACHE_MAX_BYTES),
        mutable_ttl=section.get("mutable_ttl", _duration(positive=False), DEFAULT_MUTABLE_TTL_S),
        enabled=section.get("enabled", _boolean, True),
        scrub_rate=section.get("scrub_rate", _rate, DEFAULT_CACHE_SCRUB_RATE),
    )


def _policy(section: _Section, base_dir: str) -> PolicyConfig:
    paths = section.get("paths", _strings, _NO_STRINGS)
    return PolicyConfig(
        engine=section.get("engine", _choice(PolicyEngineKind), PolicyEngineKind.EMBEDDED),
        paths=tuple(os.path.normpath(os.path.join(base_dir, os.path.expanduser(p))) for p in paths),
        decision=section.get("decision", _rule_path, DEFAULT_POLICY_DECISION),
        opa_url=section.get("opa_url", _http_url, DEFAULT_OPA_URL),
        interval=section.get("interval", _duration(positive=True), DEFAULT_POLICY_INTERVAL_S),
        mode=section.get("mode", _choice(PolicyMode), PolicyMode.ENFORCE),
        reject_status=section.get("reject_status", _integer(400, 599), DEFAULT_REJECT_STATUS),
    )


def _stats(section: _Section) -> StatsConfig:
    positive = _duration(positive=True)
    window = section.get("window", positive, DEFAULT_STATS_WINDOW_S)
    width = section.get("slice", positive, DEFAULT_STATS_SLICE_S)
    if section.failed:
        return StatsConfig(window=window, slice=width)
    slices = window / width
    if abs(slices - round(slices)) > 1e-6 * max(1.0, slices):
        section.fail(
            f"must be a whole multiple of stats.slice ({format_duration(width)}), "
            f"got {format_duration(window)}",
            "window",
        )
    elif round(slices) > MAX_STATS_SLICES:
        section.fail(
            f"at most {MAX_STATS_SLICES} slices of {format_duration(width)} "
            f"({format_duration(width * MAX_STATS_SLICES)}), got {format_duration(window)}",
            "window",
        )
    return StatsConfig(window=window, slice=width)


def _routing(section: _Section, names: Sequence[str], env: Mapping[str, str]) -> RoutingConfig:
    private = section.get("private", _strings, _NO_STRINGS)
    for i, glob in enumerate(private):
        _check_glob(glob, f"{section.key('private')}[{i}]", section.errors)
    from_env: list[str] = []
    for var in ("GOPRIVATE", "GONOPROXY"):
        # Indexed like the go command splits it, empty entries included, so
        # GOPRIVATE[2] is the third comma-separated item as the user wrote it.
        for i, glob in enumerate(item.strip() for item in env.get(var, "").split(",")):
            if glob:
                _check_glob(glob, f"{var}[{i}]", section.errors)
                from_env.append(glob)
    merged = tuple(dict.fromkeys((*private, *from_env)))
    rules = tuple(_rule(rule, names) for rule in section.items("rules"))
    return RoutingConfig(private=merged, rules=rules)


def _verify(section: _Section, env: Mapping[str, str]) -> VerifyConfig:
    """verify.key (else GOSUMDB, as the go command reads it; ``off`` turns checking
    off), verify.url, and verify.skip plus GONOSUMDB."""
    mode = section.get("mode", _verify_mode, DEFAULT_VERIFY_MODE)
    url = section.get("url", _http_url, "") or None
    key_value = section.get("key", _string, "")
    where, value = ("verify.key", key_value) if key_value else ("GOSUMDB", env.get("GOSUMDB", ""))
    try:
        database = parse_gosumdb(value)
    except SumdbKeyError as exc:
        section.errors.append(ConfigError(where, str(exc)))
        database = parse_gosumdb("")
    if database is None:
        if where == "verify.key":
            section.fail("'off' is a mode: set verify.mode: off", "key")
        mode, database = VerifyMode.OFF, parse_gosumdb("")
    assert database is not None
    skip = section.get("skip", _strings, _NO_STRINGS)
    for i, glob in enumerate(skip):
        _check_glob(glob, f"{section.key('skip')}[{i}]", section.errors)
    from_env = [item.strip() for item in env.get("GONOSUMDB", "").split(",")]
    for i, glob in enumerate(from_env):
        if glob:
            _check_glob(glob, f"GONOSUMDB[{i}]", section.errors)
    return VerifyConfig(
        mode=mode,
        key=database.verifier.text,
        url=url or database.url,
        skip=tuple(dict.fromkeys((*skip, *(g for g in from_env if g)))),
        unavailable=section.get("unavailable", _choice(WhenUnavailable), DEFAULT_WHEN_UNAVAILABLE),
    )


def _verify_mode(value: object) -> VerifyMode:
    # YAML 1.1 reads an unquoted `mode: off` as false: that is what the user wrote.
    return VerifyMode.OFF if value is False else _choice(VerifyMode)(value)


def _check_glob(pattern: str, key: str, errors: list[ConfigError]) -> None:
    """Compile it as the Router will, so every bad pattern is reported in this one pass."""
    try:
        compile_glob(pattern, key)
    except ConfigError as exc:
        errors.append(exc)


def _rule(section: _Section, names: Sequence[str]) -> RouteRule:
    match = section.require("match", _string, "")
    if match:
        _check_glob(match, section.key("match"), section.errors)
    deny = section.get("deny", _boolean, False)
    upstreams: tuple[str, ...] | None = None
    if section.has("upstreams"):
        upstreams = section.get("upstreams", _strings, _NO_STRINGS)
        if section.raw["upstreams"] == []:
            section.fail(
                "expected at least one upstream (omit the key to allow every upstream)", "upstreams"
            )
        for i, name in enumerate(upstreams):
            if name not in names:
                section.fail(
                    f"unknown upstream {name!r}{_suggest_name(name, names)}", f"upstreams[{i}]"
                )
        if deny:
            section.fail("a rule with deny: true takes no upstreams")
    return RouteRule(
        match=match, upstreams=upstreams, deny=deny, cache=section.get("cache", _boolean, True)
    )


def _suggest_name(name: str, names: Sequence[str]) -> str:
    import difflib  # only on the error path

    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    known = ", ".join(repr(n) for n in names if n)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {known})"
