"""Module routing rules and private modules, compiled once from the config.

Patterns have GOPRIVATE semantics (golang.org/x/mod/module.MatchPrefixPatterns):
a glob of N path elements is matched, with path.Match rules, against the
first N elements of the module path. ``github.com/acme`` and
``github.com/acme/*`` both cover ``github.com/acme/tool/v2``: the first as a
prefix, the second because ``*`` matches ``tool``.

A request's route is the ordered list of upstreams it may go to. A private
module may only ever go to upstreams flagged ``private_ok``; nothing on the
request path (reroute, 404 fall-through, cache miss) can add one that the
route does not list.

The config loader compiles every pattern first, so a bad one is reported
with the other config errors, naming its key or its GOPRIVATE/GONOPROXY
entry; here a ConfigError can only come from a Config built by hand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Final

from sidecar.config import Config
from sidecar.errors import ConfigError

ROUTE_CACHE_LIMIT: Final = 4096


@dataclass(frozen=True, slots=True)
class Glob:
    pattern: str
    elements: int  # how many leading path elements it is matched against
    regex: re.Pattern[str]

    def matches(self, module: str) -> bool:
        prefix = _prefix(module, self.elements)
        return prefix is not None and self.regex.fullmatch(prefix) is not None


@dataclass(frozen=True, slots=True)
class Route:
    """Where one module may go. ``targets`` is ordered by preference."""

    targets: tuple[str, ...]
    private: bool = False
    deny: bool = False
    cache: bool = True
    rule: str | None = None  # the rule pattern that matched, for logs and `check --route`
    # The front door must look at it: private, or covered by a
    # client_auth.access rule. Decided once per module with its route, so a
    # request for any other module costs the door nothing past the credential
    # (asking the door for each one was a fifth of what the door costs a hit).
    guarded: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "targets": list(self.targets),
            "private": self.private,
            "deny": self.deny,
            "cache": self.cache,
            "rule": self.rule,
        }


@dataclass(frozen=True, slots=True)
class _Rule:
    glob: Glob
    upstreams: tuple[str, ...] | None
    deny: bool
    cache: bool


class Router:
    def __init__(self, config: Config) -> None:
        self._all = tuple(u.name for u in config.upstreams)
        self._private_ok = tuple(u.name for u in config.upstreams if u.private_ok)
        self._private = tuple(
            compile_glob(p, f"routing.private[{i}]") for i, p in enumerate(config.routing.private)
        )
        self._rules = tuple(
            _Rule(compile_glob(r.match, f"routing.rules[{i}].match"), r.upstreams, r.deny, r.cache)
            for i, r in enumerate(config.routing.rules)
        )
        auth = config.client_auth
        self._guarded = (
            tuple(
                compile_glob(p, f"client_auth.access[{i}].modules[{j}]")
                for i, rule in enumerate(auth.access)
                for j, p in enumerate(rule.modules)
            )
            if auth.enabled
            else ()
        )
        self.default = Route(self._all)
        self._memo: dict[str, Route] = {}

    def route(self, module: str) -> Route:
        """The route of a module path ('' for requests that name no module)."""
        if not module:
            return self.default
        route = self._memo.get(module)
        if route is None:
            if len(self._memo) >= ROUTE_CACHE_LIMIT:
                self._memo.clear()  # bounded: a scan of random paths cannot grow it
            route = self._compute(module)
            if route.private or any(g.matches(module) for g in self._guarded):
                route = replace(route, guarded=True)
            self._memo[module] = route
        return route

    def _compute(self, module: str) -> Route:
        private = any(g.matches(module) for g in self._private)
        allowed = self._private_ok if private else self._all
        for rule in self._rules:
            if rule.glob.matches(module):
                if rule.deny:
                    return Route((), private, deny=True, rule=rule.glob.pattern)
                chosen = rule.upstreams if rule.upstreams is not None else self._all
                # Preference stays the order of `upstreams:`, whatever the rule lists.
                targets = tuple(n for n in allowed if n in chosen)
                return Route(targets, private, cache=rule.cache, rule=rule.glob.pattern)
        return self.default if not private else Route(allowed, private=True)

    def describe(self) -> dict[str, Any]:
        """The compiled rules, for /routes."""
        return {
            "upstreams": list(self._all),
            "private_ok": list(self._private_ok),
            "private": [g.pattern for g in self._private],
            "rules": [
                {
                    "match": r.glob.pattern,
                    "upstreams": list(r.upstreams or self._all),
                    "deny": r.deny,
                    "cache": r.cache,
                }
                for r in self._rules
            ],
        }


def compile_glob(pattern: str, key: str) -> Glob:
    """A path.Match glob as a regex; ConfigError naming ``key`` when malformed."""
    glob = pattern.rstrip("/")
    if not glob:
        raise ConfigError(key, f"empty pattern {pattern!r}")
    try:
        regex = re.compile("/".join(_element(e) for e in glob.split("/")))
    except (ValueError, re.error) as exc:
        raise ConfigError(key, f"bad pattern {pattern!r}: {exc}") from exc
    return Glob(pattern, glob.count("/") + 1, regex)


def _element(element: str) -> str:
    """One path element of a glob: * ? [class] and \\ escapes, as path.Match."""
    out: list[str] = []
    i = 0
    while i < len(element):
        c = element[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\":
            if i + 1 == len(element):
                raise ValueError("trailing backslash")
            i += 1
            out.append(re.escape(element[i]))
        elif c == "[":
            end = element.find("]", i + 2 if element[i + 1 : i + 2] in ("^", "]") else i + 1)
            if end < 0:
                raise ValueError("unterminated character class")
            body = element[i + 1 : end]
            negate = body.startswith("^")
            body = body[1:] if negate else body
            if not body:
                raise ValueError("empty character class")
            out.append(f"[{'^' if negate else ''}{_class_body(body)}]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _class_body(body: str) -> str:
    return "".join("\\" + ch if ch in "\\]^[" else ch for ch in body)


def _prefix(module: str, elements: int) -> str | None:
    """The first ``elements`` path elements of ``module``, or None if it has fewer."""
    cut = -1
    for _ in range(elements):
        cut = module.find("/", cut + 1)
        if cut < 0:
            return module if _ == elements - 1 else None
    return module[:cut]
