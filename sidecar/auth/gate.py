"""The front door: who a request comes from, and whether it may go on.

Every request on the GOPROXY port passes here before anything else looks at
it (``SidecarService`` calls ``now`` before any endpoint or cache hit, and
``admit`` when ``now`` cannot decide without bcrypt). Open endpoints are let
through untouched; everything else needs an identity:

- ``Authorization: Basic`` checked against the htpasswd files,
- ``Authorization: Bearer`` checked against the token hashes,
- or, with no credential at all, an address in ``trusted_networks``.

A credential seen and verified within the cache TTL is accepted at once, on
the event loop; any other goes to bcrypt in a thread pool of its own (so a
guessing flood cannot take the threads the cache's file I/O runs on), at
most ``MAX_INFLIGHT_PER_ADDRESS`` at a time per address, and only if the
address is not being throttled for earlier failures.

Refusals: 401 with ``WWW-Authenticate: Basic realm=...`` (no or wrong
credential), 403 (an identity the endpoint or module rule does not allow),
429 with ``Retry-After`` (too many failures). Each is counted by reason in
``goproxy_sidecar_client_auth_failures_total``; no name, address or
credential goes into a label, a log line or a response body except the
identity's own name in its own 403.
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import hmac
import ipaddress
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Final

from sidecar.auth.access import Access, Identity
from sidecar.auth.credcache import CredentialCache
from sidecar.auth.credentials import Credentials
from sidecar.auth.networks import TrustedNetworks
from sidecar.auth.throttle import Throttle
from sidecar.config import NETWORKS_GROUP, ClientAuthConfig, EndpointAccess
from sidecar.metrics import Metrics
from sidecar.server.exchange import TEXT_PLAIN, Exchange

log = logging.getLogger("sidecar.auth")

BCRYPT_THREADS: Final = 2  # the machine kind has 2 cores; more threads only queue
MAX_INFLIGHT_PER_ADDRESS: Final = 4
FORWARDED_FOR: Final = b"x-forwarded-for"
NETWORK: Final = Identity("", frozenset({NETWORKS_GROUP}), via="network")
# The sidecar's own requests (checksum-database lookups through its handler).
INTERNAL: Final = Identity("", frozenset(), via="internal")
OPEN = EndpointAccess.OPEN
# A connection's last verified credential: (Authorization value, expiry,
# generation, identity). A go command sends the same value on every request of
# a keep-alive connection; comparing it (in constant time: a proxy in front
# may carry several clients on one connection) costs a tenth of hashing it.
_Memo = tuple[bytes, float, int, Identity]
ADMIN = EndpointAccess.ADMIN


class FrontDoor:
    def __init__(
        self,
        cfg: ClientAuthConfig,
        credentials: Credentials,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.credentials = credentials
        self.access = Access(cfg.access, cfg.groups)
        self.networks = TrustedNetworks(cfg.trusted_networks)
        self.proxies = TrustedNetworks(cfg.forwarded_by, "client_auth.forwarded_by")
        self.throttle = Throttle(cfg.throttle, clock)
        self.cache: CredentialCache[Identity] = CredentialCache(cfg.credential_cache, clock)
        self._clock = clock
        self._generation = 0  # of the credentials in service: a reload outdates every memo
        self._failures = metrics.client_auth_failures
        self._challenge = {
            "Content-Type": TEXT_PLAIN,
            "WWW-Authenticate": f'Basic realm="{cfg.realm}"',
        }
        self._inflight: dict[str, int] = {}  # verifications running, per address
        self._pending: dict[bytes, asyncio.Task[Identity | str]] = {}
        self._pool = ThreadPoolExecutor(BCRYPT_THREADS, thread_name_prefix="client-auth")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def swap(self, credentials: Credentials) -> None:
        """New credential files: every cached verification is forgotten."""
        self.credentials = credentials
        self.cache.clear()
        self._generation += 1

    # -- the request path ------------------------------------------------
    def endpoint_need(self, path: str) -> EndpointAccess:
        return self.cfg.endpoints.for_path(path)

    def now(self, ex: Exchange, need: EndpointAccess) -> bool | None:
        """True: go on (``ex.identity`` set unless the need is open); False:
        refused and answered; None: bcrypt is needed, call ``admit``."""
        if need is OPEN:
            return True
        value = ex.authorization
        if value is None:
            if self.networks and self.networks.of(self._client(ex)) is not None:
                ex.identity = NETWORK
                return self._may(ex, NETWORK, need)
            return self._refuse(ex, "missing")
        conn = ex.connection
        memo: _Memo | None = conn.credential
        if (
            memo is not None
            and memo[2] == self._generation
            and memo[1] > self._clock()
            and hmac.compare_digest(memo[0], value)
        ):
            identity = ex.identity = memo[3]
            return need is not ADMIN or self._may(ex, identity, need)
        entry = self.cache.entry(hashlib.sha256(value).digest())
        if entry is not None:
            conn.credential = (value, entry[0], self._generation, entry[1])
            ex.identity = entry[1]
            return self._may(ex, entry[1], need)
        retry = self.throttle.retry_after(self._client(ex))
        if retry:
            return self._refuse(ex, "throttled", retry)
        return None

    async def admit(self, ex: Exchange, need: EndpointAccess) -> bool:
        """``now``, then the credential verified off the event loop if needed."""
        quick = self.now(ex, need)
        if quick is not None:
            return quick
        value = ex.authorization
        assert value is not None  # now() answers a request without one
        key = hashlib.sha256(value).digest()
        identity = await self._verify(self._client(ex), key, value)
        if isinstance(identity, str):
            return self._refuse(ex, identity)
        ex.identity = identity
        return self._may(ex, identity, need)

    def module_refused(self, ex: Exchange, module: str, private: bool) -> bool:
        """Refuse (403, answered) a module ``ex.identity`` may not fetch. Runs
        after routing and before the cache: a hit is no way around it."""
        identity: Identity | None = ex.identity
        if identity is INTERNAL:
            return False
        if identity is None:  # a request that came round the door: never served
            return self._refuse(ex, "missing") is False
        decision = self.access.decide(identity, module, private)
        if decision.allowed:
            return False
        self._failures.labels("forbidden").inc()
        _send(
            ex,
            403,
            f"goproxy-sidecar: {identity.describe()} may not fetch {module}: {decision.why}",
        )
        return True

    def _client(self, ex: Exchange) -> str:
        """The client's address: the peer, or the one a proxy in ``forwarded_by``
        names last in X-Forwarded-For (the hops before it are the client's word)."""
        peer = ex.peer
        if not self.proxies or self.proxies.of(peer) is None:
            return peer
        forwarded = _header(ex, FORWARDED_FOR)
        if forwarded is None:
            return peer
        last = forwarded.rpartition(b",")[2].strip().decode("latin-1")
        try:
            return str(ipaddress.ip_address(last))
        except ValueError:
            return peer

    # -- verification ----------------------------------------------------
    async def _verify(self, address: str, key: bytes, value: bytes) -> Identity | str:
        """The identity of a credential, or the failure reason. The check runs
        as a task of its own: a client leaving does not waste a verification
        that others with the same credential wait for."""
        task = self._pending.get(key)
        if task is None:
            if self._inflight.get(address, 0) >= MAX_INFLIGHT_PER_ADDRESS:
                return "throttled"
            self._inflight[address] = self._inflight.get(address, 0) + 1
            task = asyncio.get_running_loop().create_task(self._settle(address, key, value))
            self._pending[key] = task
        return await asyncio.shield(task)

    async def _settle(self, address: str, key: bytes, value: bytes) -> Identity | str:
        try:
            identity = await self._check(value)
        finally:
            del self._pending[key]
            left = self._inflight.pop(address) - 1
            if left:
                self._inflight[address] = left
        if isinstance(identity, Identity):
            self.cache.put(key, identity)
        elif identity == "bad_credentials" and self.throttle.failed(address):
            log.warning(
                "client throttled after failed credentials",
                extra={
                    "client": address,
                    "failures": self.throttle.max_failures,
                    "window_s": self.throttle.window,
                },
            )
        return identity

    async def _check(self, value: bytes) -> Identity | str:
        scheme, _, rest = value.partition(b" ")
        scheme = scheme.lower()
        credentials = self.credentials  # one set for the whole check, even across a reload
        loop = asyncio.get_running_loop()
        if scheme == b"basic":
            pair = _basic(rest.strip())
            if pair is None:
                return "malformed"
            user, password = pair
            admin = await loop.run_in_executor(self._pool, credentials.verify_basic, user, password)
            return "bad_credentials" if admin is None else self._identity(user, admin, "basic")
        if scheme == b"bearer":
            token = rest.strip().decode("latin-1")
            found = credentials.verify_token(token)  # one SHA-256 per token entry: no thread
            return "bad_credentials" if found is None else self._identity(*found, "bearer")
        return "malformed"

    def _identity(self, name: str, admin: bool, via: str) -> Identity:
        return Identity(name, self.access.groups_of(name), admin, via)

    # -- answers ---------------------------------------------------------
    def _may(self, ex: Exchange, identity: Identity, need: EndpointAccess) -> bool:
        if need is ADMIN and not identity.admin:
            self._failures.labels("admin_required").inc()
            _send(ex, 403, "goproxy-sidecar: this endpoint needs the admin credential")
            return False
        return True

    def _refuse(self, ex: Exchange, reason: str, retry_after: int = 0) -> bool:
        self._failures.labels(reason).inc()
        if reason == "throttled":
            headers = {"Content-Type": TEXT_PLAIN, "Retry-After": str(retry_after or 1)}
            ex.send(429, headers, b"goproxy-sidecar: too many failed credentials; retry later\n")
        else:
            ex.send(401, self._challenge, b"goproxy-sidecar: authentication required\n")
        return False


def _header(ex: Exchange, wanted: bytes) -> bytes | None:
    """A raw header value (ex.header decodes, and lowercases every name it passes)."""
    size = len(wanted)
    for name, value in ex.headers:
        if len(name) == size and name.lower() == wanted:
            return value
    return None


def _basic(encoded: bytes) -> tuple[str, str] | None:
    try:
        decoded = binascii.a2b_base64(encoded, strict_mode=True)
    except binascii.Error:
        return None
    user, sep, password = decoded.partition(b":")
    if not sep or not user:
        return None
    try:
        return user.decode(), password.decode()
    except UnicodeDecodeError:
        return None


def _send(ex: Exchange, status: int, message: str) -> None:
    ex.send(status, {"Content-Type": TEXT_PLAIN}, (message + "\n").encode())
