"""The words the configuration is declared in (``sidecar/config/``).

A section of sidecar.yaml is a class decorated with :func:`section` (a frozen,
slotted dataclass), a key a field declared with :func:`setting`, whose *kind*
turns the raw YAML value into the typed one or raises :class:`Invalid` saying
what was expected and what was found. ``finish(self, check) -> Self`` on a
section holds what one key cannot say alone (rules between keys, values from
the environment), reporting through :class:`Check`. ``sidecar.config_loader``
walks the declarations: defaults, unknown keys, overrides and errors follow.

Not msgspec, pydantic or cattrs: msgspec stops at the first error, and
``check`` reports every problem in one pass; pydantic collects them, but in
its own words ("Input should be a valid integer"), so each kind would still be
a custom validator of ours, as would the ``(set by VAR)`` and ``GOPRIVATE[2]``
origins, and it is no dependency today (``from pydantic import BaseModel``:
74-163 ms of start-up by ``python3 -X importtime``, load average 2.5); cattrs
needs the same hooks. What a library would take over is the walk, 100 lines.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, Generic, TypeVar, dataclass_transform
from urllib.parse import urlsplit, urlunsplit

from sidecar.errors import ConfigError
from sidecar.units import parse_duration, parse_size

T = TypeVar("T")
C = TypeVar("C")
E = TypeVar("E", bound=enum.Enum)

_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
_USERINFO = re.compile(r"//[^/?#]*@")


class Invalid(ValueError):
    """A kind's complaint: ``(suffix, message)`` pairs; a suffix extends the key (``[2]``)."""

    def __init__(self, message: str, suffix: str = "", *more: tuple[str, str]) -> None:
        super().__init__(message)
        self.problems = [(suffix, message), *more]


# ---------------------------------------------------------------- declaring


@dataclass(frozen=True, slots=True)
class Setting:
    """A key's declaration: its kind, and its value when absent (MISSING: required)."""

    kind: Kind[Any]
    fallback: object = MISSING


def setting(
    kind: Kind[Any], *, default: Any = MISSING, absent: Any = MISSING, repr: bool = True
) -> Any:
    """A key of the section. ``absent``: the value of a missing key where the
    dataclass has no default (a constructor argument, yet optional in YAML)."""
    metadata = {"setting": Setting(kind, default if absent is MISSING else absent)}
    if default is MISSING:
        return field(metadata=metadata, repr=repr)
    return field(default=default, metadata=metadata, repr=repr)


# A plain field() is no key: a value ``finish`` fills in (credentials from the environment).
@dataclass_transform(frozen_default=True, field_specifiers=(setting, field))
def section(cls: type[C]) -> type[C]:
    return dataclass(frozen=True, slots=True)(cls)


def declared(cls: type[Any]) -> Iterator[tuple[str, Setting]]:
    """The keys of a section, in declaration order (the order errors are reported in)."""
    for f in fields(cls):
        if "setting" in f.metadata:
            yield f.name, f.metadata["setting"]


def key_tree(cls: type[Any]) -> dict[str, object]:
    """Key names, nested for sections: what :func:`suggest` searches."""
    return {
        name: key_tree(s.kind.cls) if isinstance(s.kind, Section) else None
        for name, s in declared(cls)
    }


class Check:
    """What a section's ``finish`` reports through: errors named by key."""

    def __init__(
        self, path: str, env: Mapping[str, str], base_dir: str, errors: list[ConfigError]
    ) -> None:
        self.path = path
        self.env = env  # the environment the config is loaded with
        self.base_dir = base_dir  # what policy.paths are relative to
        self.errors = errors
        self.present: set[str] = set()  # keys the document has
        self.refused: set[str] = set()  # keys whose value was refused
        self.muted = False  # not a mapping: one error, no "required" noise after it

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def child(self, name: str) -> Check:
        return Check(self.key(name), self.env, self.base_dir, self.errors)

    def fail(self, message: str, name: str | None = None) -> None:
        """An error at this section (``name`` None) or at one of its keys."""
        if not self.muted:
            self.errors.append(ConfigError(self.path if name is None else self.key(name), message))

    def fail_at(self, key: str, message: str) -> None:
        """An error at a key outside the document: an environment variable."""
        self.errors.append(ConfigError(key, message))


# ---------------------------------------------------------------- kinds


class Kind(Generic[T]):
    """Converts a raw YAML value. ``env`` says how a SIDECAR_* override is read:
    ``text`` verbatim, ``scalar`` as a YAML scalar, ``list`` comma-separated."""

    env: ClassVar[str] = "text"
    blank: ClassVar[object] = None  # a required key's value when it is missing or refused

    def convert(self, raw: object) -> T:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Section(Kind[C]):
    """A nested mapping declared by another section class."""

    cls: type[C]


@dataclass(frozen=True, slots=True)
class Items(Kind[tuple[C, ...]]):
    """A list of mappings; ``unique`` names a key no two items may share."""

    cls: type[C]
    required: str = "required"  # the message when the key is missing
    empty: str | None = None  # the message when the list is empty
    unique: str | None = None
    blank: ClassVar[object] = ()


@dataclass(frozen=True, slots=True)
class Text(Kind[str]):
    wanted: str = "a non-empty string"
    pattern: str = ".+"
    glob: bool = False  # a GOPRIVATE-style pattern
    blank: ClassVar[object] = ""

    def convert(self, raw: object) -> str:
        if not isinstance(raw, str) or not re.fullmatch(self.pattern, raw, re.DOTALL):
            raise Invalid(f"expected {self.wanted}, got {show(raw)}")
        problem = glob_problem(raw) if self.glob else None
        if problem:
            raise Invalid(problem)
        return raw


NAME = Text("a name matching [a-z0-9][a-z0-9_-]*", "[a-z0-9][a-z0-9_-]*")
ENV_NAME = Text("an environment variable name", "[A-Za-z_][A-Za-z0-9_]*")
RULE_PATH = Text(
    "a rule path like 'sidecar/breaker/decisions'",
    "[A-Za-z_][A-Za-z0-9_]*(?:/[A-Za-z_][A-Za-z0-9_]*)*",
)


@dataclass(frozen=True, slots=True)
class Strings(Kind[tuple[str, ...]]):
    """A list of non-empty strings (stripped)."""

    glob: bool = False  # every item a GOPRIVATE-style pattern, every bad one reported
    paths: bool = False  # file paths: an override's are relative to the working directory
    empty: str | None = None  # the message when an empty list is refused
    env: ClassVar[str] = "list"
    blank: ClassVar[object] = ()

    def convert(self, raw: object) -> tuple[str, ...]:
        if not isinstance(raw, list):
            raise Invalid(f"expected a list of strings, got {show(raw)}")
        for i, item in enumerate(raw):
            if not isinstance(item, str) or not item.strip():
                raise Invalid(f"expected a non-empty string, got {show(item)}", f"[{i}]")
        if not raw and self.empty:
            raise Invalid(self.empty)
        items = tuple(item.strip() for item in raw)
        bad = [(f"[{i}]", p) for i, g in enumerate(items) if self.glob and (p := glob_problem(g))]
        if bad:
            raise Invalid(bad[0][1], bad[0][0], *bad[1:])
        return items


class Boolean(Kind[bool]):
    env: ClassVar[str] = "scalar"

    def convert(self, raw: object) -> bool:
        if not isinstance(raw, bool):
            raise Invalid(f"expected true or false, got {show(raw)}")
        return raw


@dataclass(frozen=True, slots=True)
class Integer(Kind[int]):
    low: int
    high: int | None = None
    env: ClassVar[str] = "scalar"

    def convert(self, raw: object) -> int:
        wanted = f"from {self.low} to {self.high}" if self.high else f">= {self.low}"
        if not isinstance(raw, int) or isinstance(raw, bool):
            raise Invalid(f"expected an integer {wanted}, got {show(raw)}")
        if raw < self.low or (self.high is not None and raw > self.high):
            raise Invalid(f"expected an integer {wanted}, got {raw}")
        return raw


class Fraction(Kind[float]):
    env: ClassVar[str] = "scalar"

    def convert(self, raw: object) -> float:
        if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 <= raw <= 1:
            raise Invalid(f"expected a number from 0 to 1 (0.1 = 10 %), got {show(raw)}")
        return float(raw)


@dataclass(frozen=True, slots=True)
class Duration(Kind[float]):
    """Go-style (``800ms``, ``1h30m``) or bare seconds; ``auto`` allows the word (None)."""

    positive: bool
    auto: bool = False

    def convert(self, raw: object) -> Any:
        if self.auto and raw == "auto":
            return None
        try:
            if not isinstance(raw, str | int | float):
                raise ValueError(raw)
            seconds = parse_duration(raw)
        except ValueError:
            wanted = "'auto' or a duration" if self.auto else "a duration"
            raise Invalid(f"expected {wanted} like '800ms' or '2m', got {show(raw)}") from None
        if self.positive and seconds <= 0:
            raise Invalid(f"must be greater than 0, got {show(raw)}")
        return seconds


class Size(Kind[int]):
    def convert(self, raw: object) -> int:
        try:
            if not isinstance(raw, str | int):
                raise ValueError(raw)
            size = parse_size(raw)
        except ValueError:
            raise Invalid(f"expected a size like '10GiB' or '512MiB', got {show(raw)}") from None
        if size <= 0:
            raise Invalid(f"must be greater than 0, got {show(raw)}")
        return size


class Rate(Kind[int]):
    """Bytes per second: a size, optionally written with ``/s`` (``8MiB/s``); 0 allowed."""

    def convert(self, raw: object) -> int:
        text = raw.removesuffix("/s") if isinstance(raw, str) else raw
        try:
            if not isinstance(text, str | int):
                raise ValueError(text)
            return parse_size(text)
        except ValueError:
            raise Invalid(
                f"expected a rate like '8MiB/s' (or 0 to turn it off), got {show(raw)}"
            ) from None


@dataclass(frozen=True, slots=True)
class Choice(Kind[E]):
    kind: type[E]
    false: E | None = None  # YAML 1.1 reads an unquoted `off` as false: what the user wrote

    def convert(self, raw: object) -> E:
        if raw is False and self.false is not None:
            return self.false
        for member in self.kind:
            if raw == member.value:
                return member
        names = ", ".join(repr(m.value) for m in self.kind)
        raise Invalid(f"expected one of {names}, got {show(raw)}")


class HttpUrl(Kind[str]):
    """An http(s) base URL with a host; normalised without a trailing slash."""

    blank: ClassVar[object] = ""

    def convert(self, raw: object) -> str:
        if not isinstance(raw, str):
            raise Invalid(f"not an http(s) URL: {show(raw)}")
        shown = _USERINFO.sub("//***@", raw)  # never echo a password
        try:
            parts = urlsplit(raw)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise Invalid(f"not an http(s) URL: {shown!r}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise Invalid(f"not an http(s) URL: {shown!r}")
        if " " in raw or not raw.isprintable():
            raise Invalid(f"not an http(s) URL: {shown!r}")
        if "@" in parts.netloc:
            raise Invalid(f"credentials in the URL are not allowed (use auth): {shown!r}")
        if "?" in raw or "#" in raw:
            raise Invalid(f"a base URL takes no query or fragment: {shown!r}")
        return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


class Listen(Kind[str]):
    def convert(self, raw: object) -> str:
        if not isinstance(raw, str):
            raise Invalid(f"expected 'host:port' like '127.0.0.1:3001', got {show(raw)}")
        host, sep, port = raw.rpartition(":")
        if not sep or not (port.isascii() and port.isdigit()):
            raise Invalid(f"expected 'host:port' like '127.0.0.1:3001', got {show(raw)}")
        if not 1 <= int(port) <= 65535:
            raise Invalid(f"port must be from 1 to 65535, got {show(raw)}")
        problem = _host_problem(host)
        if problem:
            raise Invalid(f"{problem}, got {show(raw)}")
        return raw


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


def glob_problem(pattern: str) -> str | None:
    """Compiled as the Router will, so every bad pattern is reported in one pass."""
    # Imported here: sidecar.routing imports sidecar.config, which imports this module.
    from sidecar.routing import compile_glob

    try:
        compile_glob(pattern, "")
    except ConfigError as exc:
        return exc.message
    return None


# ---------------------------------------------------------------- messages


def show(value: object) -> str:
    """A value as an error message quotes it."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def suggest(name: str, tree: Mapping[str, object]) -> str:
    """`` (did you mean '...'?)`` for an unknown key: the same name one level
    down (``pool.max_connections``), else a close spelling; or nothing."""
    for nested in _nested_keys(tree):
        if nested.rsplit(".", 1)[-1] == name:
            return f" (did you mean '{nested}'?)"
    import difflib  # only on the error path

    close = difflib.get_close_matches(name, list(tree), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _nested_keys(tree: Mapping[str, object]) -> list[str]:
    keys: list[str] = []
    for key, child in tree.items():
        if isinstance(child, Mapping):
            keys += [f"{key}.{sub}" for sub in [*child, *_nested_keys(child)]]
    return keys


def suggest_name(name: str, names: Sequence[str]) -> str:
    import difflib  # only on the error path

    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    known = ", ".join(repr(n) for n in names if n)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {known})"
