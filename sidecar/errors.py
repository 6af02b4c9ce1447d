"""Every exception goproxy-sidecar raises on purpose.

    SidecarError
    ├── ConfigError            invalid configuration; names the key
    ├── RequestError           not a valid GOPROXY request; carries the HTTP status
    ├── UpstreamError          one upstream failed to answer usefully
    │   ├── UpstreamTimeout        connect / first-byte / idle timeout
    │   ├── UpstreamConnectError   refused, reset, DNS, TLS, proxy errors
    │   ├── UpstreamStatusError    5xx, 429, 401/407 (a failure status), a refused redirect
    │   ├── UpstreamTruncated      body shorter than its Content-Length, or cut by a reset
    │   ├── UpstreamProtocolError  an answer the sidecar does not trust: malformed, over
    │                              the header limits, an encoding it did not ask for
    │   ├── UpstreamIntegrityError a .mod or .zip that does not match the checksum database
    │   └── UpstreamUnverified     a body that could not be checked, refused (verify.unavailable)
    ├── UpstreamBusy           no connection to that upstream in time (admission
    │                          overflow): the sidecar's own load, never a failure
    ├── ListenError            the listen address cannot be bound (in use, not
    │                          permitted, not an address of this host)
    ├── AuthFileError          an htpasswd or token file is refused (file, line); never
    │                          quotes a credential
    ├── PolicyError
    │   ├── PolicyLoadError        a policy or data file is refused (file, line)
    │   └── PolicyEvalError        evaluation failed or returned garbage
    ├── CacheError
    │   ├── CacheIntegrityError    size or SHA-256 mismatch on disk
    │   └── CacheWriteError        disk full, permission, I/O error
    └── SumdbError             the checksum database cannot vouch for module@version
        ├── SumdbKeyError          a malformed verifier key or GOSUMDB value
        ├── SumdbUnavailable       a lookup or tile could not be fetched
        ├── SumdbVerifyError       a hostile answer: bad signature, proof, tile or syntax
        └── ZipHashError           a module zip that cannot be hashed (not a zip, bad name)

Library exceptions (httptools, OSError, ssl, regopy) are translated at the boundary
with ``raise X from exc``; nothing outside this tree crosses module lines.
"""

from __future__ import annotations


class SidecarError(Exception):
    """Base of every error raised on purpose by the sidecar."""


class ConfigError(SidecarError):
    """Invalid configuration. ``key`` is the dotted path of the offending key."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


class ConfigErrors(ConfigError):
    """Several configuration errors found in one pass, reported together."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = errors
        super().__init__("", "\n".join(str(e) for e in errors))


class RequestError(SidecarError):
    """Not a valid GOPROXY request: answered with ``status`` and never forwarded."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(message)


class UpstreamError(SidecarError):
    """An upstream failed. ``failure`` is the class used in metrics and stats."""

    failure = "error"

    def __init__(self, upstream: str, message: str, status: int | None = None) -> None:
        self.upstream = upstream
        self.message = message
        self.status = status
        super().__init__(f"{upstream}: {message}")


class UpstreamTimeout(UpstreamError):
    failure = "timeout"


class UpstreamConnectError(UpstreamError):
    failure = "connect"


class UpstreamStatusError(UpstreamError):
    failure = "status"


class UpstreamTruncated(UpstreamError):
    failure = "truncated"


class UpstreamProtocolError(UpstreamError):
    failure = "protocol"


class UpstreamIntegrityError(UpstreamError):
    """The body does not hash to what the checksum database vouches for: a wrong
    answer of this upstream, never served as 200 and never cached."""

    failure = "integrity"

    def __init__(
        self,
        upstream: str,
        subject: str,
        kind: str,
        want: str,
        got: str,
        against: str = "the checksum database",  # or go.sum (warm)
    ) -> None:
        self.subject = subject  # module@version
        self.kind = kind  # mod | zip
        self.want = want
        self.got = got
        super().__init__(upstream, f"{subject} .{kind} does not match {against}: {got} != {want}")


class UpstreamUnverified(UpstreamError):
    """The body could not be checked (database unavailable, a body too large to keep)
    and ``verify.unavailable`` is ``refuse``. No fault of the upstream: it is recorded
    as an answer, not a failure."""

    failure = "unverified"


class UpstreamBusy(SidecarError):
    """The upstream's pool and pending queue were full, or ``pool.max_wait`` ran out.

    Not an UpstreamError on purpose: nothing was asked of the upstream, so
    nothing may count it as a failure. ``waited`` is the time spent queued.
    """

    def __init__(self, upstream: str, message: str, waited: float) -> None:
        self.upstream = upstream
        self.message = message
        self.waited = waited
        super().__init__(f"{upstream}: {message}")


class ListenError(SidecarError):
    """The listen address cannot be bound; ``reason`` in the words of the errno."""

    def __init__(self, address: str, reason: str) -> None:
        self.address = address
        self.reason = reason
        super().__init__(f"listen {address}: {reason}")


class AuthFileError(SidecarError):
    """A client credential file was refused; ``file`` and ``line`` locate it.
    The message names the problem, never the hash or token on that line."""

    def __init__(self, file: str, line: int | None, message: str) -> None:
        self.file = file
        self.line = line
        self.message = message
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {message}")


class TlsError(SidecarError):
    """The listener's certificate or key was refused; ``key`` is the config key
    (``certificate`` or ``key``) whose file is at fault, ``file`` that file."""

    def __init__(self, key: str, file: str, message: str) -> None:
        self.key = key
        self.file = file
        self.message = message
        super().__init__(f"tls.{key}: {message}")


class PolicyError(SidecarError):
    """Base of policy loading and evaluation errors."""


class PolicyLoadError(PolicyError):
    """A policy or data file was refused; ``file`` and ``line`` locate it."""

    def __init__(self, file: str, line: int | None, message: str) -> None:
        self.file = file
        self.line = line
        self.message = message
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {message}")


class PolicyEvalError(PolicyError):
    """Evaluation failed, timed out, or returned something that is not a decision."""


class CacheError(SidecarError):
    """Base of cache errors; the proxy turns them into 'proxy without caching'."""


class CacheIntegrityError(CacheError):
    """A cached entry's size or SHA-256 does not match what was recorded."""


class CacheWriteError(CacheError):
    """Writing an entry failed (disk full, permissions, I/O)."""


class SumdbError(SidecarError):
    """Base of checksum-database errors: module@version could not be vouched for."""


class SumdbKeyError(SumdbError):
    """A malformed verifier key or GOSUMDB value (the config loader names the key)."""


class SumdbUnavailable(SumdbError):
    """A lookup or tile could not be fetched: the database says nothing either way."""


class SumdbVerifyError(SumdbError):
    """The database's answer does not verify: bad signature, proof, tile or syntax.

    Unlike SumdbUnavailable this is evidence of a hostile or broken database (or of
    whatever carried its answer), never a reason to trust the module bytes.
    """


class ZipHashError(SumdbError):
    """A module zip cannot be hashed (not a zip, unreadable member, a name with a newline)."""
