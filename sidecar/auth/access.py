"""Who may fetch which modules: identities and groups -> module globs.

Rules are tried in order; the first whose ``modules`` match the module path
decides: allowed if the identity is in its ``allow`` list (a name, ``@group``
or ``*``), forbidden otherwise. A module no rule matches is open to every
identity, unless routing marks it private: a private module needs a rule that
allows the identity (the safe default for a module that must not leak).

Globs are routing's (``sidecar.routing.compile_glob``, GOPRIVATE semantics).
Decisions are memoised per (identity name, module), bounded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from sidecar.config import NETWORKS_GROUP, AccessRule, GroupConfig
from sidecar.routing import Glob, compile_glob

MEMO_LIMIT: Final = 8192
ANY: Final = "*"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a request comes from. ``name`` is empty for a trusted network;
    ``via`` is how it was established (basic, bearer, network, internal)."""

    name: str
    groups: frozenset[str]
    admin: bool = False
    via: str = "basic"

    def describe(self) -> str:
        return self.name or f"@{NETWORKS_GROUP}"


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    why: str  # which rule decided, for 403 bodies and `check --auth`


ANYONE: Final = Decision(True, "allowed: no client_auth.access rule covers it (any identity)")
PRIVATE: Final = Decision(False, "denied: a private module no client_auth.access rule covers")


@dataclass(frozen=True, slots=True)
class _Rule:
    key: str
    globs: tuple[Glob, ...]
    names: frozenset[str]
    groups: frozenset[str]
    anyone: bool

    def admits(self, identity: Identity) -> bool:
        return (
            self.anyone
            or (bool(identity.name) and identity.name in self.names)
            or not self.groups.isdisjoint(identity.groups)
        )


class Access:
    def __init__(self, rules: Sequence[AccessRule], groups: Sequence[GroupConfig]) -> None:
        self._groups = {g.name: frozenset(g.members) for g in groups}
        self._rules = tuple(
            _compile(rule, f"client_auth.access[{i}]") for i, rule in enumerate(rules)
        )
        self._memo: dict[tuple[str, str], Decision] = {}
        # module -> the rule and glob that cover it, or None: most requests are
        # for modules no rule covers, decided without looking at the identity.
        self._covered: dict[str, tuple[_Rule, str] | None] = {}

    def groups_of(self, name: str) -> frozenset[str]:
        return frozenset(g for g, members in self._groups.items() if name in members)

    def decide(self, identity: Identity, module: str, private: bool) -> Decision:
        try:
            covered = self._covered[module]
        except KeyError:
            if len(self._covered) >= MEMO_LIMIT:
                self._covered.clear()  # bounded: a scan of random paths cannot grow it
            covered = self._covered[module] = self._cover(module)
        if covered is None:
            return PRIVATE if private else ANYONE
        key = (identity.name, module)
        decision = self._memo.get(key)
        if decision is None:
            if len(self._memo) >= MEMO_LIMIT:
                self._memo.clear()
            rule, pattern = covered
            verdict = "allowed" if rule.admits(identity) else "denied"
            why = f"{verdict} by {rule.key} ({pattern})"
            decision = self._memo[key] = Decision(verdict == "allowed", why)
        return decision

    def _cover(self, module: str) -> tuple[_Rule, str] | None:
        """The first rule with a glob matching ``module``, and that glob."""
        if module:
            for rule in self._rules:
                for glob in rule.globs:
                    if glob.matches(module):
                        return rule, glob.pattern
        return None


def _compile(rule: AccessRule, key: str) -> _Rule:
    """The config loader checked every glob and group already: a ConfigError
    here can only come from a ClientAuthConfig built by hand."""
    globs = tuple(compile_glob(p, f"{key}.modules[{i}]") for i, p in enumerate(rule.modules))
    groups = frozenset(a[1:] for a in rule.allow if a.startswith("@"))
    names = frozenset(a for a in rule.allow if a != ANY and not a.startswith("@"))
    return _Rule(key, globs, names, groups, ANY in rule.allow)
