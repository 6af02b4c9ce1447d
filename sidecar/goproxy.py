"""GOPROXY request parsing: request kind, module path, case-escaping, version.

Pure functions, no I/O; ``parse_request_path`` runs once per request.

The rules are those of golang.org/x/mod (``module.CheckPath``,
``EscapePath``/``UnescapePath``, ``EscapeVersion``/``UnescapeVersion``,
``CheckPathMajor``, ``semver``) and of ``sumdb/tlog`` for tile paths. How the
go command spells a request matters too (``cmd/go/internal/modfetch/proxy.go``):
it percent-escapes each path with ``url.PathEscape``, so the ``!`` of the case
encoding arrives as ``%21`` and a version query may carry other escapes, while
checksum-database requests (``web.Join``) arrive with a raw ``!``. Escapes are
therefore decoded, and the path forwarded upstream is rebuilt from the decoded,
validated parts: one canonical spelling per request.

Status codes: 400 for input no go command sends and that may be hostile
(control or non-ASCII characters, backslashes, dot segments, empty segments,
broken or dangerous percent-escapes, over-long paths); 404 for a well-formed
path that is not a GOPROXY endpoint or names an invalid module or version,
because the go command reads 404 as "not here" and moves on.
"""

from __future__ import annotations

import enum
import re
from typing import Final

from sidecar.errors import RequestError

MAX_PATH_LENGTH: Final = 1024


class Kind(str, enum.Enum):  # noqa: UP042 - the shared contract spells it so
    """What a request asks for; the value is used as a metric label."""

    LIST = "list"
    LATEST = "latest"
    INFO = "info"
    MOD = "mod"
    ZIP = "zip"
    SUMDB_SUPPORTED = "sumdb-supported"
    SUMDB_LOOKUP = "sumdb-lookup"
    SUMDB_TILE = "sumdb-tile"
    SUMDB_LATEST = "sumdb-latest"


# A kind's metric label: ``Kind.X.value`` is an enum property, a Python call
# (0.3 µs) where a dict lookup is 30 ns, and every request reads it.
KIND_LABEL: Final = {kind: kind.value for kind in Kind}


class GoproxyRequest:
    """One valid GOPROXY request.

    ``path`` is the canonical escaped path to forward (no leading slash,
    already percent-encoded where needed); ``cache_key`` is derived from it
    only and is a safe relative file path (no ``..``, no empty segment, no
    backslash, no control or non-ASCII character).

    A plain class with a constructor of its own: one is made for every
    request not seen before. Compiled, its fields are read as a struct's
    (a named tuple's were generic attribute lookups, and its ``__new__`` an
    interpreted lambda); a frozen dataclass would set each field through
    ``object.__setattr__``. Never changed once made (``Final``: read-only
    attributes when compiled); compared and hashed by its fields.
    """

    __slots__ = ("cache_key", "immutable", "kind", "module", "path", "sumdb", "version")

    def __init__(
        self,
        kind: Kind,
        path: str,
        module: str,
        version: str | None,
        sumdb: str | None,
        immutable: bool,
        cache_key: str,
    ) -> None:
        self.kind: Final = kind
        self.path: Final = path
        self.module: Final = module
        self.version: Final = version
        self.sumdb: Final = sumdb
        self.immutable: Final = immutable
        self.cache_key: Final = cache_key

    def _fields(self) -> tuple[Kind, str, str, str | None, str | None, bool, str]:
        return (
            self.kind,
            self.path,
            self.module,
            self.version,
            self.sumdb,
            self.immutable,
            self.cache_key,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GoproxyRequest):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return (
            f"GoproxyRequest(kind={self.kind!r}, path={self.path!r}, module={self.module!r}, "
            f"version={self.version!r}, sumdb={self.sumdb!r}, immutable={self.immutable!r}, "
            f"cache_key={self.cache_key!r})"
        )


# --- semver (golang.org/x/mod/semver) ---------------------------------------

_NUM = r"(?:0|[1-9][0-9]*)"
# A numeric prerelease identifier must not have a leading zero.
_PRE_ID = r"(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)"
_PRE = rf"-{_PRE_ID}(?:\.{_PRE_ID})*"
_BUILD = r"\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*"
# vMAJOR and vMAJOR.MINOR are shorthands; they take no prerelease or build.
_SEMVER: Final = re.compile(rf"v({_NUM})(?:\.({_NUM})(?:\.({_NUM})({_PRE})?({_BUILD})?)?)?")
# module.CanonicalVersion(v) == v: semver.Canonical keeps "+incompatible".
_CANONICAL: Final = re.compile(rf"v({_NUM})\.{_NUM}\.{_NUM}(?:{_PRE})?(\+incompatible)?")


def semver_is_valid(v: str) -> bool:
    """semver.IsValid."""
    return _SEMVER.fullmatch(v) is not None


def semver_canonical(v: str) -> str:
    """semver.Canonical: fill in .MINOR/.PATCH, drop build metadata; "" if invalid."""
    m = _SEMVER.fullmatch(v)
    if m is None:
        return ""
    if m.group(5) is not None:
        return v[: m.start(5)]
    if m.group(2) is None:
        return v + ".0.0"
    if m.group(3) is None:
        return v + ".0"
    return v


def semver_major(v: str) -> str:
    """semver.Major: "v2" for "v2.1.0"; "" if invalid."""
    m = _SEMVER.fullmatch(v)
    return "" if m is None else "v" + m.group(1)


def semver_build(v: str) -> str:
    """semver.Build: "+meta" for "v1.2.3+meta"; "" if none or invalid."""
    m = _SEMVER.fullmatch(v)
    return "" if m is None else m.group(5) or ""


def is_canonical_version(v: str) -> bool:
    """True if v is a canonical module version (pseudo-versions and +incompatible too)."""
    return _CANONICAL.fullmatch(v) is not None


# --- module paths (golang.org/x/mod/module) ----------------------------------

# A module path element: letters, digits, "-._~"; no leading or trailing dot.
_ELEM = r"[A-Za-z0-9_~-](?:[A-Za-z0-9._~-]*[A-Za-z0-9_~-])?"
_MODULE_PATH: Final = re.compile(rf"{_ELEM}(?:/{_ELEM})*")
_FIRST_ELEM: Final = re.compile(r"[a-z0-9.-]+")
_WINDOWS = r"(?:CON|PRN|AUX|NUL|COM[1-9]|LPT[1-9])"
# Both searched in "/" + path: a pattern that starts with a literal is found
# by a fast scan for it, where "(?:^|/)" was tried at every character (the
# two searches were a tenth of a miss's parse).
_WINDOWS_IN_PATH: Final = re.compile(rf"/{_WINDOWS}(?=[./]|\Z)", re.IGNORECASE)
_WINDOWS_ELEM: Final = re.compile(rf"{_WINDOWS}(?=\.|\Z)", re.IGNORECASE)
_WINDOWS_INITIALS: Final = frozenset("CcPpAaNnLl")
# The part of an element before its first dot must not end in "~" and digits
# (it would look like a Windows short name).
_TILDE_IN_PATH: Final = re.compile(r"/[^/.]*~[0-9]+(?=[./]|\Z)")
_PATH_MAJOR: Final = re.compile(r"/v([0-9.]+)\Z")
_GOPKG_MAJOR: Final = re.compile(r"\.v([0-9]+)(?:-unstable)?\Z")
_MOD_CHAR: Final = re.compile(r"[A-Za-z0-9._~-]")


def _quote(s: str) -> str:
    """Quote s for a message: control and non-ASCII characters are escaped."""
    return '"' + s.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'


def _not_found(message: str) -> RequestError:
    return RequestError(404, "not found: " + message)


def _bad_request(message: str) -> RequestError:
    return RequestError(400, "bad request: " + message)


def split_path_version(path: str) -> tuple[str, str, bool]:
    """module.SplitPathVersion: (prefix, "/vN" or ".vN" or "", ok)."""
    if path.startswith("gopkg.in/"):
        m = _GOPKG_MAJOR.search(path)
        if m is None:
            return path, "", False
        if m.group(1)[0] == "0" and m.group(1) != "0":
            return path, "", False
        return path[: m.start()], path[m.start() :], True
    m = _PATH_MAJOR.search(path)
    if m is None:
        return path, "", True
    digits = m.group(1)
    if "." in digits or digits[0] == "0" or digits == "1":
        return path, "", False
    return path[: m.start()], path[m.start() :], True


def _elem_reason(elem: str) -> str | None:
    """Why one module path element is invalid, in x/mod's words (error path only)."""
    if not elem:
        return "empty path element"
    if elem.count(".") == len(elem):
        return f"invalid path element {_quote(elem)}"
    if elem[0] == ".":
        return "leading dot in path element"
    if elem[-1] == ".":
        return "trailing dot in path element"
    for c in elem:
        if _MOD_CHAR.fullmatch(c) is None:
            return f"invalid char {_quote(c)}"
    return None


def _syntax_reason(path: str) -> str:
    if not path:
        return "empty string"
    if path[0] == "-":
        return "leading dash"
    if "//" in path:
        return "double slash"
    if path[-1] == "/":
        return "trailing slash"
    for elem in path.split("/"):
        reason = _elem_reason(elem)
        if reason is not None:
            return reason
    return "invalid path"


def _module_path_reason(path: str) -> str | None:
    """Why path is not a valid module path (module.CheckPath), or None."""
    if _MODULE_PATH.fullmatch(path) is None or path[0] == "-":
        return _syntax_reason(path)
    rooted = "/" + path
    if m := _WINDOWS_IN_PATH.search(rooted):
        name = m.group(0).lstrip("/")
        return f"{_quote(name)} disallowed as path element component on Windows"
    if "~" in path and _TILDE_IN_PATH.search(rooted):
        return "trailing tilde and digits in path element"
    first = path.partition("/")[0]
    if "." not in first:
        return "missing dot in first path element"
    if _FIRST_ELEM.fullmatch(first) is None:
        return "invalid char in first path element"
    if not split_path_version(path)[2]:
        return "invalid version"
    return None


def check_module_path(path: str) -> None:
    """module.CheckPath; raises RequestError(404) naming the reason."""
    reason = _module_path_reason(path)
    if reason is not None:
        raise _not_found(f"malformed module path {_quote(path)}: {reason}")


def check_path_major(v: str, path_major: str) -> str | None:
    """module.CheckPathMajor: why v does not fit path_major ("/v2", ".v1", ""), or None."""
    if path_major.startswith(".v") and path_major.endswith("-unstable"):
        path_major = path_major[: -len("-unstable")]
    if v.startswith("v0.0.0-") and path_major == ".v1":
        return None  # old pseudo-versions of gopkg.in/x.v1 are still accepted
    major = semver_major(v)
    if path_major == "":
        if major in ("v0", "v1") or semver_build(v) == "+incompatible":
            return None
        want = "v0 or v1"
    elif major == path_major[1:]:
        return None
    else:
        want = path_major[1:]
    return f"should be {want}, not {major}"


def check_module_version(path: str, version: str) -> None:
    """module.Check: valid path, valid semver, and the major versions agree."""
    check_module_path(path)
    if not semver_is_valid(version):
        raise _not_found(f"{path}@{_quote(version)}: not a semantic version")
    _check_major(path, version)


def _check_major(path: str, version: str) -> None:
    reason = check_path_major(version, split_path_version(path)[1])
    if reason is not None:
        raise _not_found(f"{path}@{version}: invalid version: {reason}")


# --- case escaping ("!" + lower-case letter) ---------------------------------

_UPPER: Final = re.compile(r"[A-Z]")
_BANG_LOWER: Final = re.compile(r"!([a-z])")
_BAD_BANG: Final = re.compile(r"![^a-z]|!\Z")


def _escape_string(s: str) -> str:
    if _UPPER.search(s) is None:
        return s
    return _UPPER.sub(lambda m: "!" + m.group(0).lower(), s)


def _unescape_string(escaped: str) -> str | None:
    """Undo the case encoding; None if an upper-case letter or a bad "!" is found."""
    # lower() of an ASCII string differs from it only by an upper-case letter:
    # a third of a regex search.
    if not escaped.isascii() or escaped.lower() != escaped:
        return None
    if "!" not in escaped:
        return escaped
    if _BAD_BANG.search(escaped) is not None:
        return None
    return _BANG_LOWER.sub(lambda m: m.group(1).upper(), escaped)


def escape_path(path: str) -> str:
    """module.EscapePath; raises RequestError(404) for an invalid module path."""
    check_module_path(path)
    return _escape_string(path)


def unescape_path(escaped: str) -> str:
    """module.UnescapePath; raises RequestError(404) for a bad encoding or path."""
    path = _unescape_string(escaped)
    if path is None:
        raise _not_found(f"invalid escaped module path {_quote(escaped)}")
    check_module_path(path)
    return path


# A version is a file name: letters, digits and "!#$%&()+,-.=@[]^_{}~ ".
_FILE_CHARS = r"\-A-Za-z0-9!#$%&()+,=@\[\]^_{}~ "
_FILE_ELEM: Final = re.compile(rf"[{_FILE_CHARS}.]*[{_FILE_CHARS}]")


def _version_reason(v: str) -> str | None:
    """Why v is not a valid file-name element (checkElem for file paths), or None."""
    if not v or v.count(".") == len(v):
        return "empty or dot-only version"
    if _FILE_ELEM.fullmatch(v) is None or v[-1] == ".":
        return "disallowed version string"
    if v[0] in _WINDOWS_INITIALS and _WINDOWS_ELEM.match(v):
        return "disallowed as path element component on Windows"
    return None


def escape_version(v: str) -> str:
    """module.EscapeVersion; raises RequestError(404) for a disallowed version."""
    if "!" in v or _version_reason(v) is not None:
        raise _not_found(f"version {_quote(v)} invalid: disallowed version string")
    return _escape_string(v)


def unescape_version(escaped: str) -> str:
    """module.UnescapeVersion; raises RequestError(404) for a bad encoding or version."""
    return _unescaped_version(escaped)[0]


def _unescaped_version(escaped: str) -> tuple[str, bool]:
    """``unescape_version``, and whether the version is canonical."""
    v = _unescape_string(escaped)
    if v is None:
        raise _not_found(f"invalid escaped version {_quote(escaped)}")
    if _CANONICAL.fullmatch(v) is not None:
        # "v", digits, dots, "-", "+" and letters, ending in neither a dot nor
        # a Windows name: a valid file name, and its escaped spelling needs no
        # percent-encoding. Most requests name one: two regexes fewer each.
        return v, True
    reason = _version_reason(v)
    if reason is not None:
        raise _not_found(f"invalid escaped version {_quote(escaped)}: {reason}")
    return v, False


# --- request paths ------------------------------------------------------------

# RFC 3986 pchar and "/": what a client may put raw in a path. Everything
# else (space, quotes, "\\", "<>", "{}", "^", "`", "|", "#", "?", controls,
# non-ASCII) is refused before anything is decoded.
_RAW_OK: Final = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@/%-]*")
_PCT: Final = re.compile(r"%([0-9A-Fa-f]{2})")
# Escapes may stand for printable ASCII only, and never for a separator, a dot
# (traversal), a backslash or "%" itself (double encoding).
_DECODABLE: Final = {f"{b:02X}": chr(b) for b in range(0x20, 0x7F) if chr(b) not in "/.\\%"}
# Characters left raw in a forwarded version; the rest is percent-encoded.
_SAFE_VERSION: Final = re.compile(r"[a-z0-9._~!+-]*")
_FILE_KINDS: Final = {"info": Kind.INFO, "mod": Kind.MOD, "zip": Kind.ZIP}
_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_SUMDB_NAME: Final = re.compile(rf"{_LABEL}(?:\.{_LABEL})+")
# tlog.Tile.Path(): tile/H/L/[xNNN/...]NNN[.p/W], L a level or "data".
_TILE: Final = re.compile(
    r"([1-9]|[12][0-9]|30)/(data|0|[1-9][0-9]{0,17})/((?:x[0-9]{3}/){0,5}[0-9]{3})"
    r"(?:\.p/([1-9][0-9]{0,9}))?"
)


def _decode_escape(m: re.Match[str]) -> str:
    c = _DECODABLE.get(m.group(1).upper())
    if c is None:
        raise _bad_request("percent-escape of a forbidden character")
    return c


def _decode(raw_path: str) -> str:
    """Check the raw path and percent-decode it; the result has no leading "/"."""
    if len(raw_path) > MAX_PATH_LENGTH:
        raise _bad_request("path too long")
    if _RAW_OK.fullmatch(raw_path) is None:
        raise _bad_request("path is not absolute or has a forbidden character")
    path = raw_path[1:]
    if "%" in path:
        if path.count("%") != len(_PCT.findall(path)):
            raise _bad_request("malformed percent-escape")
        path = _PCT.sub(_decode_escape, path)
    if path[:1] == "/" or "//" in path:
        raise _bad_request("empty path segment")
    if path[-1:] == "/":
        raise _bad_request("trailing slash")
    if "." in path:
        # Segments "." and "..": substring tests, a tenth of a regex search.
        segments = f"/{path}/"
        if "/./" in segments or "/../" in segments:
            raise _bad_request("dot segment in path")
    return path


def _quote_version(v: str) -> str:
    if _SAFE_VERSION.fullmatch(v) is not None:
        return v
    return "".join(c if _SAFE_VERSION.fullmatch(c) else f"%{ord(c):02X}" for c in v)


def _request(
    kind: Kind,
    path: str,
    module: str,
    version: str | None = None,
    sumdb: str | None = None,
    immutable: bool = False,
) -> GoproxyRequest:
    return GoproxyRequest(kind, path, module, version, sumdb, immutable, path)


def _parse_file(esc_module: str, module: str, name: str) -> GoproxyRequest:
    """<module>/@v/<version>.info|.mod|.zip"""
    esc_version, dot, ext = name.rpartition(".")
    kind = _FILE_KINDS.get(ext)
    if kind is None or not dot or "/" in name:
        raise _not_found("not a GOPROXY endpoint")
    version, canonical = _unescaped_version(esc_version)
    if kind is not Kind.INFO:
        if not canonical:
            raise _not_found(f"{module}@{_quote(version)}: .{ext} needs a canonical version")
        _check_major(module, version)
    quoted = esc_version if canonical else _quote_version(esc_version)
    path = f"{esc_module}/@v/{quoted}.{ext}"
    return _request(kind, path, module, version, immutable=canonical)


def _parse_module(path: str) -> GoproxyRequest:
    """<module>/@v/list, <module>/@latest, <module>/@v/<file>"""
    i = path.find("/@")
    if i < 0:
        raise _not_found("not a GOPROXY endpoint")
    esc_module, tail = path[:i], path[i + 2 :]
    module = unescape_path(esc_module)
    if tail == "v/list":
        return _request(Kind.LIST, path, module)
    if tail == "latest":
        return _request(Kind.LATEST, path, module)
    if tail.startswith("v/"):
        return _parse_file(esc_module, module, tail[2:])
    raise _not_found("not a GOPROXY endpoint")


def _parse_tile(path: str, name: str, tile: str) -> GoproxyRequest:
    m = _TILE.fullmatch(tile)
    if m is None or m.group(3).startswith("x000"):
        raise _not_found("malformed tile path")
    width = m.group(4)
    if width is not None and int(width) >= 1 << int(m.group(1)):
        raise _not_found("malformed tile path")
    # A partial tile (.p/W) grows into a full one; only full tiles never change.
    return _request(Kind.SUMDB_TILE, path, "", sumdb=name, immutable=width is None)


def _parse_lookup(path: str, name: str, target: str) -> GoproxyRequest:
    esc_module, at, esc_version = target.partition("@")
    if not at or "@" in esc_version or "/" in esc_version:
        raise _not_found("malformed checksum database lookup")
    module = unescape_path(esc_module)
    version, canonical = _unescaped_version(esc_version)
    if not canonical:
        raise _not_found(f"{module}@{_quote(version)}: lookup needs a canonical version")
    _check_major(module, version)
    # The answer ends with the current signed tree head: not immutable.
    return _request(Kind.SUMDB_LOOKUP, path, module, version, sumdb=name)


def _parse_sumdb(path: str) -> GoproxyRequest:
    """sumdb/<name>/supported | latest | lookup/<module>@<version> | tile/..."""
    name, _, rest = path[len("sumdb/") :].partition("/")
    if _SUMDB_NAME.fullmatch(name) is None or len(name) > 253:
        raise _not_found("not a checksum database name")
    if rest == "supported":
        return _request(Kind.SUMDB_SUPPORTED, path, "", sumdb=name)
    if rest == "latest":
        return _request(Kind.SUMDB_LATEST, path, "", sumdb=name)
    op, _, arg = rest.partition("/")
    if op == "lookup" and arg:
        return _parse_lookup(path, name, arg)
    if op == "tile" and arg:
        return _parse_tile(path, name, arg)
    raise _not_found("not a checksum database endpoint")


# The spelling of nearly every request the go command sends: a lower-case
# module path with a dotted first element and no "!", "~", "%" or major-version
# element other than a final /vN, and a list, @latest, or file of a canonical
# version without "+". Every path it matches is valid by the rules above and
# parses to what they would give (tests/unit/test_goproxy.py compares the two
# on generated paths); anything else takes the full check. One match instead of
# a dozen regexes and calls: a unique .info parsed in 12.4 -> 3 us, 48 k of a
# cache-off miss's 248 k instructions (bench/instructions.py). Its repeats are
# possessive: nothing after an element, a dotted part or a number can start
# with what the repeat takes, so giving characters back never finds a match,
# and without the backtracking state the match costs 10-50 % less (a pseudo-
# version half); a small miss's event loop 130.4 k -> 126.0 k instructions.
_NOT_WINDOWS = r"(?!(?:con|prn|aux|nul|com[1-9]|lpt[1-9])[./])"
_FAST_FIRST = rf"(?!gopkg\.in/){_NOT_WINDOWS}[a-z0-9][a-z0-9-]*+(?:\.[a-z0-9-]++)++"
_FAST_ELEM = rf"/(?!v[0-9.]){_NOT_WINDOWS}[a-z0-9_-]++(?:\.[a-z0-9_-]++)*+"
_FAST_PRE = r"(?:0|[1-9][0-9]*+|[0-9]*+[a-z-][0-9a-z-]*+)"
_FAST: Final = re.compile(
    rf"/(({_FAST_FIRST}(?:{_FAST_ELEM})*+(?:/v([2-9]|[1-9][0-9]+))?)/@"
    rf"(?:v/(?:list|(v({_NUM})\.{_NUM}\.{_NUM}(?:-{_FAST_PRE}(?:\.{_FAST_PRE})*)?)\.(info|mod|zip))"
    r"|latest))"
)


def _fast_parse(raw_path: str) -> GoproxyRequest | None:
    """``parse_request_path`` of the common spelling (``_FAST``), or None."""
    m = _FAST.fullmatch(raw_path)
    if m is None:
        return None
    path, module, path_major, version, major, ext = m.groups()
    if version is None:
        kind = Kind.LATEST if path[-7:] == "@latest" else Kind.LIST
        return GoproxyRequest(kind, path, module, None, None, False, path)
    if major != path_major if path_major is not None else major not in ("0", "1"):
        return None  # a mismatch: the full check words the error
    return GoproxyRequest(_FILE_KINDS[ext], path, module, version, None, True, path)


def parse_request_path(raw_path: str) -> GoproxyRequest:
    """Parse the raw URL path of a request (query string removed, leading "/").

    Raises RequestError: 400 for malformed or dangerous input, 404 for a path
    that is not a GOPROXY endpoint or names an invalid module or version.
    """
    if len(raw_path) <= MAX_PATH_LENGTH:
        fast = _fast_parse(raw_path)
        if fast is not None:
            return fast
    return _full_parse(raw_path)


def _full_parse(raw_path: str) -> GoproxyRequest:
    path = _decode(raw_path)
    if ".." in path:
        # Valid inside an element for x/mod ("x..y"), but keys and forwarded
        # paths are promised to be free of "..": not served here.
        raise _not_found('paths containing ".." are not served by this proxy')
    if path.startswith("sumdb/"):
        return _parse_sumdb(path)
    return _parse_module(path)
