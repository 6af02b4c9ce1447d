"""``verify``: checking .mod and .zip bodies against the checksum database."""

from __future__ import annotations

import enum
from dataclasses import replace

from sidecar.config.common import env_globs
from sidecar.config_kinds import Check, Choice, HttpUrl, Strings, Text, section, setting
from sidecar.errors import SumdbKeyError

# sum.golang.org's published key (cmd/go/internal/modfetch/key.go): the database the
# go command trusts when GOSUMDB is unset.
DEFAULT_VERIFY_KEY = "sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8"


class VerifyMode(enum.Enum):
    ENFORCE = "enforce"  # a mismatch is never served: the next upstream is tried
    REPORT = "report"  # a mismatch is served as today, and counted and logged
    OFF = "off"


class WhenUnavailable(enum.Enum):
    SERVE = "serve"  # the go command checks again; counted and logged
    REFUSE = "refuse"


# Enforce: a checksum mismatch is a wrong answer the go command would refuse
# anyway (SECURITY ERROR), so serving it only turns one upstream's fault into
# every client's failed build, and caching it makes that last until a purge.
DEFAULT_VERIFY_MODE = VerifyMode.ENFORCE
DEFAULT_WHEN_UNAVAILABLE = WhenUnavailable.SERVE


@section
class VerifyConfig:
    """Checking .mod and .zip bodies against the checksum database (issue 15).

    ``key`` and ``url`` come from ``verify.key`` / ``verify.url``, else from
    ``GOSUMDB`` in the environment; ``skip`` holds ``verify.skip`` and
    ``GONOSUMDB`` (modules matched by ``routing.private``, GOPRIVATE included,
    are skipped too)."""

    mode: VerifyMode = setting(
        Choice(VerifyMode, false=VerifyMode.OFF), default=DEFAULT_VERIFY_MODE
    )
    key: str = setting(Text(), default=DEFAULT_VERIFY_KEY)  # a verifier key <name>+<hash>+<key>
    url: str | None = setting(HttpUrl(), default=None)  # None: through the upstreams' sumdb/<name>/
    skip: tuple[str, ...] = setting(Strings(glob=True), default=())
    unavailable: WhenUnavailable = setting(
        Choice(WhenUnavailable), default=DEFAULT_WHEN_UNAVAILABLE
    )

    @property
    def name(self) -> str:
        return self.key.split("+", 1)[0]

    def finish(self, check: Check) -> VerifyConfig:
        """verify.key, else GOSUMDB as the go command reads it (``off`` turns checking off)."""
        # Imported here: the checksum database's parser pulls in cryptography, which
        # only loading a config needs, not every module that imports these types.
        from sidecar.sumdb.gosumdb import parse_gosumdb

        given = "key" in check.present and "key" not in check.refused
        where, value = (
            (check.key("key"), self.key) if given else ("GOSUMDB", check.env.get("GOSUMDB", ""))
        )
        mode = self.mode
        try:
            database = parse_gosumdb(value)
        except SumdbKeyError as exc:
            check.fail_at(where, str(exc))
            database = parse_gosumdb("")
        if database is None:
            if given:
                check.fail("'off' is a mode: set verify.mode: off", "key")
            mode, database = VerifyMode.OFF, parse_gosumdb("")
        assert database is not None
        from_env = env_globs(check, "GONOSUMDB")
        return replace(
            self,
            mode=mode,
            key=database.verifier.text,
            url=self.url or database.url,
            skip=tuple(dict.fromkeys((*self.skip, *from_env))),
        )
