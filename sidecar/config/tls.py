"""``tls``: HTTPS on the GOPROXY port (sidecar/server/tls.py): the go command sends
.netrc/GOAUTH credentials over HTTPS only.
"""

from __future__ import annotations

import enum
from dataclasses import replace

from sidecar.config.common import PATH, beside
from sidecar.config_kinds import Check, Choice, section, setting


class TlsVersion(enum.Enum):
    # nginx's ssl_protocols names: an unquoted YAML 1.2 would be a float
    TLS1_2 = "TLSv1.2"
    TLS1_3 = "TLSv1.3"


@section
class TlsConfig:
    """The listener's certificate chain and key (PEM); off while unset."""

    certificate: str | None = setting(PATH, default=None)
    key: str | None = setting(PATH, default=None)
    min_version: TlsVersion = setting(Choice(TlsVersion), default=TlsVersion.TLS1_2)

    def finish(self, check: Check) -> TlsConfig:
        for name, other in (("certificate", "key"), ("key", "certificate")):
            if getattr(self, other) and not getattr(self, name):
                check.fail(f"required with tls.{other}", name)
        done = replace(
            self, certificate=beside(check, self.certificate), key=beside(check, self.key)
        )
        if done.enabled and not check.refused:
            # Refused at load, like a bad credential file: not at the first handshake.
            from sidecar.errors import TlsError
            from sidecar.server.tls import load_context

            try:
                load_context(done)
            except TlsError as exc:
                check.fail(exc.message, exc.key)
        return done

    @property
    def enabled(self) -> bool:
        return bool(self.certificate and self.key)
