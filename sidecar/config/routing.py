"""``routing``: which modules go to which upstreams, which are private, which are
never cached.
"""

from __future__ import annotations

from dataclasses import replace

from sidecar.config.common import env_globs
from sidecar.config_kinds import Boolean, Check, Items, Strings, Text, section, setting


@section
class RouteRule:
    match: str = setting(Text(glob=True))
    upstreams: tuple[str, ...] | None = setting(  # None: every upstream
        Strings(empty="expected at least one upstream (omit the key to allow every upstream)"),
        default=None,
    )
    deny: bool = setting(Boolean(), default=False)
    cache: bool = setting(Boolean(), default=True)

    def finish(self, check: Check) -> RouteRule:
        if self.deny and "upstreams" in check.present:
            check.fail("a rule with deny: true takes no upstreams")
        return self


@section
class RoutingConfig:
    private: tuple[str, ...] = setting(Strings(glob=True), default=())
    rules: tuple[RouteRule, ...] = setting(Items(RouteRule), default=())

    def finish(self, check: Check) -> RoutingConfig:
        from_env = [*env_globs(check, "GOPRIVATE"), *env_globs(check, "GONOPROXY")]
        return replace(self, private=tuple(dict.fromkeys((*self.private, *from_env))))
