"""Credentials for upstreams, and the outbound HTTP proxy from the environment.

Credentials are resolved once at start-up and kept out of every repr, log
line, metric and error message: only the upstream's name is ever printed.
"""

from __future__ import annotations

import base64
import netrc
import os
import urllib.request
from collections.abc import Mapping
from urllib.parse import unquote, urlsplit, urlunsplit

from sidecar.config import UpstreamConfig
from sidecar.errors import ConfigError
from sidecar.upstreams.route import Origin, Route


def encode_basic_auth(username: str, password: str) -> str:
    """An ``Authorization`` / ``Proxy-Authorization`` value (RFC 7617, UTF-8)."""
    token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


def redact_url(url: str) -> str:
    """The URL without any user:password part, safe to log."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def basic_auth_for(cfg: UpstreamConfig, netrc_file: str | None = None) -> str | None:
    """The Authorization header value from the config's env vars, else ~/.netrc."""
    if cfg.auth.basic is not None:
        return encode_basic_auth(cfg.auth.basic.username, cfg.auth.basic.password)
    if cfg.auth.netrc:
        return _from_netrc(urlsplit(cfg.url).hostname or "", netrc_file)
    return None


def _from_netrc(host: str, netrc_file: str | None) -> str | None:
    try:
        entry = netrc.netrc(netrc_file).authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError):
        return None
    if entry is None:
        return None
    login, _account, password = entry
    return encode_basic_auth(login or "", password or "")


def route_for(url: str, env: Mapping[str, str] | None = None) -> Route:
    """How to reach ``url``: through HTTPS_PROXY / HTTP_PROXY unless NO_PROXY
    names its host. ConfigError (naming the variable) for a proxy URL that
    is not ``http://``: TLS to the proxy itself is not supported."""
    origin = Origin.of(url)
    environ = os.environ if env is None else env
    proxies = {k.lower(): v for k, v in environ.items() if k.lower().endswith("_proxy") and v}
    no_proxy = proxies.get("no_proxy", "")
    if no_proxy and _bypassed(origin.host, urlsplit(url).port, no_proxy):
        return Route(origin)
    variable = f"{origin.scheme}_proxy"
    proxy = proxies.get(variable)
    if not proxy:
        return Route(origin)
    if "://" not in proxy:
        proxy = f"http://{proxy}"
    parts = urlsplit(proxy)
    if parts.scheme.lower() != "http" or not parts.hostname:
        raise ConfigError(
            variable.upper(), f"expected an http://host:port proxy, got {redact_url(proxy)!r}"
        )
    authorization = None
    if parts.username is not None:
        authorization = encode_basic_auth(unquote(parts.username), unquote(parts.password or ""))
    return Route(origin, Origin("http", parts.hostname, parts.port or 80), authorization)


def _bypassed(host: str, port: int | None, no_proxy: str) -> bool:
    if no_proxy.strip() == "*":
        return True
    target = f"{host}:{port}" if port else host
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
    return bool(bypass(target, {"no": no_proxy}))
