"""Loads sidecar.yaml (or the embedded default) into ``sidecar.config.Config``.

Read YAML -> apply the SIDECAR_* overrides to the raw document -> walk the
declaration over it, collecting *every* error -> ConfigErrors or the Config.
Plain dicts live only here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import MISSING
from typing import Any, TypeVar

import yaml

from sidecar.config import DEFAULT_BACKUP_URL, DEFAULT_LISTEN, DEFAULT_PRIMARY_URL, Config
from sidecar.config_kinds import (
    Check,
    Invalid,
    Items,
    Kind,
    Section,
    Setting,
    Strings,
    declared,
    key_tree,
    show,
    suggest,
)
from sidecar.errors import ConfigError, ConfigErrors

ENV_PREFIX = "SIDECAR_"

# Variables Kubernetes injects for Services named "sidecar" or "sidecar-*"
# (service links: SIDECAR_METRICS_SERVICE_HOST, SIDECAR_PORT_3001_TCP, ...);
# they are not config overrides and must not break start-up.
_K8S_SERVICE_LINK = re.compile(
    r"SIDECAR_(\w+_)?(SERVICE_HOST|SERVICE_PORT\w*|PORT|PORT_\d+_(TCP|UDP|SCTP)\w*)"
)

_T = TypeVar("_T")
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
    return build(Config, document, os.path.dirname(os.path.abspath(path)), environ)


def default_config(env: Mapping[str, str] | None = None) -> Config:
    """The embedded default (no ``--config``), with environment overrides applied."""
    environ = os.environ if env is None else env
    return build(Config, _default_document(), os.getcwd(), environ)


def _default_document() -> dict[str, object]:
    return {
        "listen": DEFAULT_LISTEN,
        "upstreams": [
            {"name": "athens", "url": DEFAULT_PRIMARY_URL},
            {"name": "public", "url": DEFAULT_BACKUP_URL},
        ],
    }


def build(root: type[_T], document: object, base_dir: str, env: Mapping[str, str]) -> _T:
    """The declared ``root`` section from a raw document and ``SIDECAR_*`` overrides."""
    if not isinstance(document, dict):
        problem = f"the configuration must be a mapping of keys, got {show(document)}"
        raise ConfigErrors([ConfigError("", problem)])
    errors: list[ConfigError] = []
    origins = _apply_env(root, document, env, errors)
    value: _T = _section(root, document, Check("", env, base_dir, errors))
    if errors:
        raise ConfigErrors([_with_origin(error, origins) for error in errors])
    return value


def _with_origin(error: ConfigError, origins: Mapping[str, str]) -> ConfigError:
    """Point an error on an overridden key at the variable that set it."""
    for key, var in origins.items():
        if error.key == key or error.key.startswith((key + ".", key + "[")):
            return ConfigError(error.key, f"{error.message} (set by {var})")
    return error


# ---------------------------------------------------------------- the walk


def _section(cls: type[Any], raw: object, check: Check, item: bool = False) -> Any:
    """One mapping: unknown keys, then each declared key in order, then ``finish``."""
    mapping: dict[Any, Any] = raw if isinstance(raw, dict) else {}
    if isinstance(raw, dict):
        keys = {name for name, _ in declared(cls)}
        for name in raw:
            if name not in keys:
                check.fail(f"unknown key{suggest(str(name), key_tree(cls))}", str(name))
        check.present = keys.intersection(raw)
    elif raw is not None or item:
        check.fail(f"expected a mapping, got {show(raw)}")
        check.muted = True
    built = cls(**{name: _value(name, s, mapping, check) for name, s in declared(cls)})
    finish = getattr(built, "finish", None)
    return built if finish is None else finish(check)


def _value(name: str, s: Setting, mapping: dict[Any, Any], check: Check) -> Any:
    kind, raw = s.kind, mapping.get(name)
    if raw is None and isinstance(kind, Section) and s.fallback is not None:
        return _section(kind.cls, None, check.child(name))  # `cache:` alone, or none: defaults
    if name not in mapping or (raw is None and isinstance(kind, Items)):
        if s.fallback is MISSING:
            check.fail(kind.required if isinstance(kind, Items) else "required", name)
    elif isinstance(kind, Section):
        return _section(kind.cls, raw, check.child(name))
    elif isinstance(kind, Items):
        return _items(kind, raw, name, check)
    else:
        try:
            return kind.convert(raw)
        except Invalid as exc:
            for suffix, message in exc.problems:
                check.fail(message, name + suffix)
            check.refused.add(name)
    return kind.blank if s.fallback is MISSING else s.fallback


def _items(kind: Items[Any], raw: object, name: str, check: Check) -> Any:
    if not isinstance(raw, list):
        check.fail(f"expected a list, got {show(raw)}", name)
        return ()
    if not raw and kind.empty:
        check.fail(kind.empty, name)
    key = check.key(name)
    items = [_section(kind.cls, x, check.child(f"{name}[{i}]"), True) for i, x in enumerate(raw)]
    first: dict[object, int] = {}
    for i, value in enumerate(getattr(x, kind.unique) for x in items if kind.unique):
        if value in first:
            check.fail(
                f"duplicate {kind.unique} {value!r} (also {key}[{first[value]}])",
                f"{name}[{i}].{kind.unique}",
            )
        elif value:
            first[value] = i
    return tuple(items)


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
    root: type[Any], document: dict[Any, Any], env: Mapping[str, str], errors: list[ConfigError]
) -> dict[str, str]:
    """Apply every SIDECAR_<PATH> variable; return {dotted key: variable}."""
    origins: dict[str, str] = {}
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or _K8S_SERVICE_LINK.fullmatch(var):
            continue
        found = _resolve(root, var[len(ENV_PREFIX) :])
        if found is None:
            errors.append(ConfigError(var, _unknown_variable(root, var)))
            continue
        path, kind = found
        problem = _set_path(document, path, _env_value(kind, env[var]))
        if problem:
            errors.append(ConfigError(var, problem))
        else:
            origins[_dotted(path)] = var
    return origins


def _unknown_variable(root: type[Any], var: str) -> str:
    import difflib  # only on the error path

    names = [ENV_PREFIX + name for name in _variable_names(root)]
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


def _variable_names(cls: type[Any]) -> list[str]:
    """Every override name below a section, list indexes written ``<N>``."""
    names: list[str] = []
    for key, s in declared(cls):
        if isinstance(s.kind, Section):
            names += [f"{key.upper()}_{rest}" for rest in _variable_names(s.kind.cls)]
        elif isinstance(s.kind, Items):
            names += [f"{key.upper()}_<N>_{rest}" for rest in _variable_names(s.kind.cls)]
        else:
            names.append(key.upper())
    return names


def _resolve(cls: type[Any], name: str) -> tuple[_Path, Kind[Any]] | None:
    """Map the rest of a variable name (``UPSTREAMS_0_URL``) to a key's path and kind."""
    for key, s in declared(cls):
        upper = key.upper()
        if name != upper and not name.startswith(upper + "_"):
            continue
        rest = name[len(upper) + 1 :]
        if isinstance(s.kind, Section):
            found = _resolve(s.kind.cls, rest)
            if found is not None:
                return [key, *found[0]], found[1]
        elif isinstance(s.kind, Items):
            match = re.fullmatch(r"(\d+)_(.+)", rest)
            found = _resolve(s.kind.cls, match.group(2)) if match else None
            if match and found is not None:
                return [key, int(match.group(1)), *found[0]], found[1]
        elif not rest:
            return [key], s.kind
    return None


def _env_value(kind: Kind[Any], text: str) -> object:
    """As the kind says: verbatim, a YAML scalar, or comma-separated."""
    if kind.env == "list":
        items = [item.strip() for item in text.split(",") if item.strip()]
        if isinstance(kind, Strings) and kind.paths:  # relative to the working directory
            return [os.path.abspath(os.path.expanduser(item)) for item in items]
        return items
    if kind.env != "scalar":
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
