"""Credentials for upstreams and for an outbound HTTP proxy.

Credentials are resolved once at start-up and kept out of every repr, log
line, metric and error message: only the upstream's name is ever printed.
"""

from __future__ import annotations

import netrc
import os
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit, urlunsplit

import aiohttp

from sidecar.config import UpstreamConfig


@dataclass(frozen=True, slots=True)
class OutboundProxy:
    url: str = field(repr=False)
    headers: dict[str, str] | None = field(repr=False, default=None)  # Proxy-Authorization


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
        return aiohttp.encode_basic_auth(cfg.auth.basic.username, cfg.auth.basic.password)
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
    return aiohttp.encode_basic_auth(login or "", password or "")


def outbound_proxy_for(url: str, env: Mapping[str, str] | None = None) -> OutboundProxy | None:
    """The corporate proxy for ``url`` from HTTPS_PROXY/HTTP_PROXY/NO_PROXY."""
    environ = os.environ if env is None else env
    proxies = {k.lower(): v for k, v in environ.items() if k.lower().endswith("_proxy") and v}
    parts = urlsplit(url)
    host = parts.hostname or ""
    no_proxy = proxies.get("no_proxy", "")
    if no_proxy and _bypassed(host, parts.port, no_proxy):
        return None
    proxy = proxies.get(f"{parts.scheme}_proxy")
    if not proxy:
        return None
    if "://" not in proxy:
        proxy = f"http://{proxy}"
    p = urlsplit(proxy)
    headers = None
    if p.username is not None:
        value = aiohttp.encode_basic_auth(unquote(p.username), unquote(p.password or ""))
        headers = {"Proxy-Authorization": value}
    return OutboundProxy(url=redact_url(proxy), headers=headers)


def _bypassed(host: str, port: int | None, no_proxy: str) -> bool:
    if no_proxy.strip() == "*":
        return True
    target = f"{host}:{port}" if port else host
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
    return bool(bypass(target, {"no": no_proxy}))
