"""``goproxy-sidecar health``: ask the running sidecar's own ``/healthz`` the
way its config says it serves. The image's HEALTHCHECK runs it; a kubelet
sends probes of its own (deploy/kubernetes).

The config is read as ``run`` reads it (the file, then SIDECAR_* variables),
so the check follows a port moved with SIDECAR_LISTEN, HTTPS once ``tls`` is
set, and the ``/healthz`` rule of ``client_auth.endpoints``. A config that
``run`` would refuse fails the check too: the process may still serve (a
rotated certificate that does not load leaves the previous one in service),
but it would not start again.
"""

from __future__ import annotations

import http.client
import ssl
from dataclasses import dataclass

from sidecar.config import Config, EndpointAccess

DEFAULT_TIMEOUT_S = 4.0  # under the HEALTHCHECK's --timeout=5s: a clean "timed out" line
# Every interface includes loopback, and loopback is what is inside the container.
LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1"}
BODY_LIMIT = 4096  # /healthz says "ok"; never read an unbounded answer


@dataclass(frozen=True, slots=True)
class Probe:
    scheme: str
    host: str
    port: int
    need: EndpointAccess  # the /healthz rule: OPEN unless client_auth says otherwise

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/healthz"


def probe_for(config: Config) -> Probe:
    auth = config.client_auth
    return Probe(
        scheme="https" if config.tls.enabled else "http",
        host=LOOPBACK.get(config.host, config.host),
        port=config.port,
        need=auth.endpoints.healthz if auth.enabled else EndpointAccess.OPEN,
    )


def check(probe: Probe, token: str | None, timeout: float) -> tuple[bool, str]:
    """(healthy, one line saying what was asked and what came back)."""
    headers = {"User-Agent": "goproxy-sidecar-health"}
    if token is not None and probe.need is not EndpointAccess.OPEN:
        headers["Authorization"] = f"Bearer {token}"  # an open rule never sees it
    conn = _connection(probe, timeout)
    try:
        conn.request("GET", "/healthz", headers=headers)
        response = conn.getresponse()
        response.read(BODY_LIMIT)
    except (OSError, http.client.HTTPException) as exc:
        return False, f"unhealthy: {probe.url}: {_reason(exc)}"
    finally:
        conn.close()
    status = response.status
    if status == 200:
        return True, f"healthy: {probe.url}: 200"
    line = f"unhealthy: {probe.url}: {status} {response.reason}"
    if status in (401, 403, 429) and probe.need is not EndpointAccess.OPEN:
        hint = "give the check a token with --token-env" if token is None else "check the token"
        line += (
            f" (client_auth.endpoints.healthz is {probe.need.value}: {hint}, "
            "or leave /healthz open, the default)"
        )
    return False, line


def _connection(probe: Probe, timeout: float) -> http.client.HTTPConnection:
    if probe.scheme == "http":
        return http.client.HTTPConnection(probe.host, probe.port, timeout=timeout)
    # Not verified, as a kubelet's HTTPS probe is not: the certificate names
    # what clients put in GOPROXY, never this loopback address, and whether
    # its files load is the config's business (read above, as at start).
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return http.client.HTTPSConnection(probe.host, probe.port, timeout=timeout, context=context)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, http.client.RemoteDisconnected | ConnectionResetError):
        # What a TLS port does to a plain-HTTP request, and the reverse.
        return f"connection closed without an answer ({exc.__class__.__name__})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or exc.__class__.__name__
