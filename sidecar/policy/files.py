"""Find and read the policy files the way ``opa run -s PATH...`` does.

Under each configured path (a folder or a single file):
- every ``*.rego`` is a module, except ``*_test.rego`` (only ``opa test``
  needs those);
- every ``*.json``, ``*.yaml`` and ``*.yml`` is data, placed at the folder it
  sits in relative to the path: ``policies/thresholds.yaml`` is merged at the
  root of ``data``, ``policies/a/b/x.json`` under ``data.a.b``. A file at the
  root must hold an object. Objects merge key by key; any other value defined
  twice is a conflict that refuses the whole set, as OPA does.
Symlinks are followed. Names starting with ``..`` are skipped: they are the
Kubernetes ConfigMap's internal copies (``..data``, ``..2024_…``), which would
otherwise be loaded twice. No configured path: the policies shipped inside
the package (``sidecar/policies``). The merged ``data.sidecar.config`` must
fit ``schema.SCHEMA``: a typo there is refused like a syntax error.

Everything here is blocking file I/O: call it through a thread.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import sidecar
from sidecar.errors import PolicyLoadError
from sidecar.policy import schema

PACKAGED_POLICIES = Path(sidecar.__file__).parent / "policies"
REGO_SUFFIX = ".rego"
TEST_SUFFIX = "_test.rego"
DATA_SUFFIXES = (".json", ".yaml", ".yml")


@dataclass(frozen=True, slots=True)
class SourceFile:
    path: Path
    name: str  # as shown in messages: relative to the working directory when below it
    prefix: tuple[str, ...]  # where a data file lands in `data`

    @property
    def is_rego(self) -> bool:
        return self.path.name.endswith(REGO_SUFFIX)


@dataclass(frozen=True, slots=True)
class PolicySet:
    """What the engines load: modules, merged data and a fingerprint of both."""

    modules: tuple[tuple[str, str], ...]  # (name, source)
    data: dict[str, Any]
    fingerprint: str
    data_files: tuple[tuple[SourceFile, Any], ...]  # for locating a data value
    warnings: tuple[str, ...] = ()  # accepted but worth telling: a removed key

    def source_of(self, keys: Sequence[str]) -> str | None:
        """Name of the data file that defines ``data.<keys>``, if one does."""
        for source, doc in self.data_files:
            value: Any = doc
            rest = list(keys)
            prefix = list(source.prefix)
            while prefix and rest and prefix[0] == rest[0]:
                prefix.pop(0)
                rest.pop(0)
            if prefix:
                continue
            for key in rest:
                if not isinstance(value, dict) or key not in value:
                    break
                value = value[key]
            else:
                return source.name
        return None


def resolve_paths(paths: Sequence[str]) -> tuple[Path, ...]:
    """The configured paths, or the packaged policies when there are none."""
    return tuple(Path(p) for p in paths) if paths else (PACKAGED_POLICIES,)


def display_name(path: Path) -> str:
    try:
        return str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def discover(paths: Sequence[str]) -> list[SourceFile]:
    """Every policy and data file under ``paths``, in a stable order."""
    found: list[SourceFile] = []
    for root in resolve_paths(paths):
        if root.is_file():
            if _wanted(root.name):
                found.append(SourceFile(root, display_name(root), ()))
            continue
        if not root.is_dir():
            raise PolicyLoadError(display_name(root), None, "no such file or directory")
        for folder, dirs, names in os.walk(root, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".."))
            prefix = Path(folder).relative_to(root).parts
            for name in sorted(names):
                if _wanted(name):
                    path = Path(folder, name)
                    found.append(SourceFile(path, display_name(path), prefix))
    return found


def _wanted(name: str) -> bool:
    if name.startswith(".."):
        return False
    if name.endswith(REGO_SUFFIX):
        return not name.endswith(TEST_SUFFIX)
    return name.endswith(DATA_SUFFIXES)


def fingerprint(paths: Sequence[str]) -> str:
    """Content hash of every file ``load_policy_set`` would read; cheap for a few KiB.

    A missing path is part of the fingerprint, not an error: the reloader
    then tries a load, which reports it.
    """
    digest = hashlib.sha256()
    try:
        sources = discover(paths)
    except PolicyLoadError as exc:
        digest.update(str(exc).encode())
        return digest.hexdigest()
    for source in sources:
        digest.update(source.name.encode() + b"\0")
        try:
            digest.update(source.path.read_bytes())
        except OSError as exc:
            digest.update(f"unreadable: {exc}".encode())
        digest.update(b"\0")
    return digest.hexdigest()


def load_policy_set(paths: Sequence[str]) -> PolicySet:
    """Read and parse every file; ``PolicyLoadError`` naming the file (and line) if one is bad."""
    digest = hashlib.sha256()
    modules: list[tuple[str, str]] = []
    data_files: list[tuple[SourceFile, Any]] = []
    for source in discover(paths):
        raw = _read(source)
        digest.update(source.name.encode() + b"\0" + raw + b"\0")
        text = _decode(source, raw)
        if source.is_rego:
            modules.append((source.name, text))
        else:
            data_files.append((source, _parse_data(source, text)))
    if not modules:
        where = ", ".join(display_name(p) for p in resolve_paths(paths))
        raise PolicyLoadError(where, None, "no .rego policy files found")
    policy = PolicySet(
        tuple(modules), _merge_all(data_files), digest.hexdigest(), tuple(data_files)
    )
    problems, warnings = schema.validate(policy.data)
    if problems:
        raise _data_error(policy, problems)
    return dataclasses.replace(policy, warnings=tuple(_located(policy, w) for w in warnings))


def _located(policy: PolicySet, finding: schema.Finding) -> str:
    return f"{policy.source_of(finding.keys) or 'data'}: {finding}"


def _data_error(policy: PolicySet, problems: Sequence[schema.Finding]) -> PolicyLoadError:
    """Every problem on one line, at the file of the first (others name theirs)."""
    file = policy.source_of(problems[0].keys) or "data"
    parts = [str(problems[0])]
    for problem in problems[1:]:
        where = policy.source_of(problem.keys) or "data"
        parts.append(str(problem) if where == file else f"{where}: {problem}")
    return PolicyLoadError(file, None, "; ".join(parts))


def _read(source: SourceFile) -> bytes:
    try:
        return source.path.read_bytes()
    except OSError as exc:
        raise PolicyLoadError(source.name, None, exc.strerror or str(exc)) from exc


def _decode(source: SourceFile, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise PolicyLoadError(source.name, line, "not valid UTF-8") from exc


# YAML as OPA reads it: a SafeLoader whose dates stay strings (OPA converts
# YAML to JSON, which has no dates).
_Loader: Any = type("_Loader", (yaml.SafeLoader,), {})
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _parse_data(source: SourceFile, text: str) -> Any:
    try:
        is_json = source.path.suffix == ".json"
        doc = json.loads(text) if is_json else yaml.load(text, Loader=_Loader)
        # Only what JSON can hold: OPA converts YAML to JSON before using it.
        doc = json.loads(json.dumps(doc, allow_nan=False))
    except json.JSONDecodeError as exc:
        raise PolicyLoadError(source.name, exc.lineno, exc.msg) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        message = str(getattr(exc, "problem", None) or exc)
        raise PolicyLoadError(source.name, line, message) from exc
    except (TypeError, ValueError) as exc:
        raise PolicyLoadError(source.name, None, f"not representable as JSON: {exc}") from exc
    if not source.prefix and not isinstance(doc, dict):
        raise PolicyLoadError(source.name, None, "document must be of type object")
    return doc


def _merge_all(data_files: Sequence[tuple[SourceFile, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    owners: dict[tuple[str, ...], str] = {}  # leaf path -> file that set it
    for source, doc in data_files:
        # A copy: merging must not alter the documents kept for source_of().
        _merge_at(data, source.prefix, copy.deepcopy(doc), source.name, owners)
    return data


def _merge_at(
    data: dict[str, Any],
    prefix: tuple[str, ...],
    doc: Any,
    name: str,
    owners: dict[tuple[str, ...], str],
) -> None:
    node = data
    for depth, key in enumerate(prefix):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            _conflict(prefix[: depth + 1], name, owners)
        node = child
    if not prefix or isinstance(doc, dict):
        if not isinstance(doc, dict):  # only reachable for root documents
            raise PolicyLoadError(name, None, "document must be of type object")
        _merge_objects(node, doc, prefix, name, owners)
        return
    # A non-object document below the root replaces the folder's key entirely.
    parent = data
    for key in prefix[:-1]:
        parent = parent[key]
    if parent.get(prefix[-1]) not in (None, {}):
        _conflict(prefix, name, owners)
    parent[prefix[-1]] = doc
    owners[prefix] = name


def _merge_objects(
    target: dict[str, Any],
    doc: dict[str, Any],
    path: tuple[str, ...],
    name: str,
    owners: dict[tuple[str, ...], str],
) -> None:
    for key, value in doc.items():
        here = (*path, key)
        if key not in target:
            target[key] = value
            owners[here] = name
        elif isinstance(target[key], dict) and isinstance(value, dict):
            _merge_objects(target[key], value, here, name, owners)
        else:
            _conflict(here, name, owners)


def _conflict(path: tuple[str, ...], name: str, owners: dict[tuple[str, ...], str]) -> None:
    other = next(
        (
            owner
            for leaf, owner in owners.items()
            if leaf[: len(path)] == path or path[: len(leaf)] == leaf
        ),
        "another file",
    )
    raise PolicyLoadError(
        name,
        None,
        f"merge error: conflicting values at data.{'.'.join(path)}, also defined in {other}",
    )
