"""HTTPS on the GOPROXY port: the listener's context, and its reload.

The go command sends ``.netrc``/``GOAUTH`` credentials over HTTPS only, so
the front door needs TLS; terminating it here spares a second proxy.

A listening server keeps the context it was created with, so the first one
loaded stays the listener's and picks, for each handshake, the context in
service (its ``sni_callback`` runs on every ClientHello, with or without a
server name): a reload builds a fresh context from the files and swaps it in,
and new connections use it while open ones keep theirs. A pair that does not
load is refused and the context in service stays.

The files are polled like the credential files (sidecar/auth/reloader.py): a
change is acted on once they have stayed the same for one more poll, since
cert-manager or an operator replaces the certificate and the key one after
the other; SIGHUP reloads at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import logging
import ssl
from typing import Final

from cryptography import x509

from sidecar.config import TlsConfig, TlsVersion
from sidecar.errors import TlsError
from sidecar.filewatch import FileWatch
from sidecar.metrics import Metrics

log = logging.getLogger("sidecar.tls")

# A handshake that does not complete in this long is cut: a client that opens
# connections and says nothing must not hold them (nginx: client_header_timeout 60 s).
HANDSHAKE_TIMEOUT_S: Final = 10.0
POLL_S: Final = 2.0
_VERSIONS: Final = {
    TlsVersion.TLS1_2: ssl.TLSVersion.TLSv1_2,
    TlsVersion.TLS1_3: ssl.TLSVersion.TLSv1_3,
}


def load_context(cfg: TlsConfig) -> ssl.SSLContext:
    """A server context from the certificate chain and key (blocking); TlsError
    names the key whose file is missing, unreadable, not PEM or not matching."""
    assert cfg.certificate is not None and cfg.key is not None
    pems = {name: _read(name, path) for name, path in _files(cfg)}
    if b"-----BEGIN CERTIFICATE-----" not in pems["certificate"]:
        raise TlsError("certificate", cfg.certificate, f"no PEM certificate in {cfg.certificate}")
    if b"PRIVATE KEY-----" not in pems["key"]:
        raise TlsError("key", cfg.key, f"no PEM private key in {cfg.key}")
    if b"ENCRYPTED" in pems["key"]:
        raise TlsError("key", cfg.key, f"{cfg.key} is encrypted: give the key unencrypted")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[cfg.min_version]
    try:
        # A password, even empty: without one OpenSSL would prompt on the terminal.
        context.load_cert_chain(cfg.certificate, cfg.key, password=b"")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            message = f"{cfg.key} does not match the certificate in {cfg.certificate}"
            raise TlsError("key", cfg.key, message) from None
        message = f"cannot load {cfg.certificate} with {cfg.key}: {exc.reason or exc}"
        raise TlsError("certificate", cfg.certificate, message) from None
    except OSError as exc:  # replaced between the read and the load
        raise TlsError("certificate", cfg.certificate, f"cannot read: {exc}") from None
    return context


def _files(cfg: TlsConfig) -> tuple[tuple[str, str], ...]:
    return (("certificate", cfg.certificate or ""), ("key", cfg.key or ""))


def _read(name: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        reason = str(exc.strerror or exc).lower()
        raise TlsError(name, path, f"cannot read {path}: {reason}") from None


def describe(cfg: TlsConfig) -> str:
    """``check``'s line: the certificate's subject and expiry (a pair that loads
    may still have expired: OpenSSL does not look at dates when loading)."""
    assert cfg.certificate is not None
    leaf = _leaf(cfg.certificate)
    until = leaf.not_valid_after_utc
    expired = " EXPIRED" if until < datetime.datetime.now(datetime.UTC) else ""
    return (
        f"tls ok: {cfg.certificate} ({leaf.subject.rfc4514_string()}, "
        f"valid until {until:%Y-%m-%d %H:%M} UTC{expired}), key {cfg.key}, "
        f"min {cfg.min_version.value}"
    )


def _leaf(path: str) -> x509.Certificate:
    """The first certificate of the chain: the one presented."""
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def fingerprint(cfg: TlsConfig) -> str:
    """The content of both files (a missing one reads as empty: its reload is refused)."""
    digest = hashlib.sha256()
    for _, path in _files(cfg):
        try:
            with open(path, "rb") as f:
                digest.update(f.read())
        except OSError:
            pass
        digest.update(b"\0")
    return digest.hexdigest()


class ListenerTls(FileWatch):
    """The listener's context and the one in service; a reload
    (``sidecar.filewatch``) swaps a freshly loaded pair in."""

    def __init__(
        self, cfg: TlsConfig, metrics: Metrics | None = None, poll_s: float = POLL_S
    ) -> None:
        super().__init__("tls-reloader", poll_s, fingerprint(cfg))
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self.listener = self.current = load_context(cfg)
        self.listener.sni_callback = self._pick
        self._expiry(cfg)
        self.reloads = 0  # pairs swapped in since start

    def _pick(self, sock: ssl.SSLObject, name: str | None, context: ssl.SSLContext) -> None:
        current = self.current
        if current is not context:
            sock.context = current

    def fingerprint(self) -> str:
        return fingerprint(self.cfg)

    async def load(self) -> bool:
        try:
            context = await asyncio.to_thread(load_context, self.cfg)
        except TlsError as exc:
            self.metrics.tls_reloads.labels("failed").inc()
            log.error(
                "TLS certificate reload refused; the previous one stays",
                extra={"error": str(exc)},
            )
            return False
        self.current = context
        self.reloads += 1
        self.metrics.tls_reloads.labels("ok").inc()
        await asyncio.to_thread(self._expiry, self.cfg)
        log.info("TLS certificate reloaded", extra={"certificate": self.cfg.certificate})
        return True

    def _expiry(self, cfg: TlsConfig) -> None:
        assert cfg.certificate is not None
        with contextlib.suppress(OSError, ValueError):  # loaded: only a race could fail
            expiry = _leaf(cfg.certificate).not_valid_after_utc.timestamp()
            self.metrics.tls_certificate_expiry.set(expiry)
