"""Tests for sidecar.goproxy.

The module-path, escaping and semver tables are transcribed from
golang.org/x/mod (module/module_test.go, semver/semver_test.go) and the tile
cases from sumdb/tlog/tile_test.go, so the parser agrees with the go command.
"""

from __future__ import annotations

import os.path
import re
from collections.abc import Callable

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from sidecar import goproxy
from sidecar.errors import RequestError
from sidecar.goproxy import (
    MAX_PATH_LENGTH,
    GoproxyRequest,
    Kind,
    check_module_path,
    check_module_version,
    check_path_major,
    escape_path,
    escape_version,
    is_canonical_version,
    parse_request_path,
    semver_build,
    semver_canonical,
    semver_is_valid,
    semver_major,
    split_path_version,
    unescape_path,
    unescape_version,
)


def _status(fn: Callable[..., object], *args: str) -> int | None:
    """Call fn(*args); the RequestError status it raised, or None."""
    try:
        fn(*args)
    except RequestError as exc:
        return exc.status
    return None


# --- x/mod module_test.go: checkTests (module.Check) -------------------------

CHECK_TESTS = [
    ("rsc.io/quote", "0.1.0", False),
    ("rsc io/quote", "v1.0.0", False),
    ("github.com/go-yaml/yaml", "v0.8.0", True),
    ("github.com/go-yaml/yaml", "v1.0.0", True),
    ("github.com/go-yaml/yaml", "v2.0.0", False),
    ("github.com/go-yaml/yaml", "v2.1.5", False),
    ("github.com/go-yaml/yaml", "v3.0.0", False),
    ("github.com/go-yaml/yaml/v2", "v1.0.0", False),
    ("github.com/go-yaml/yaml/v2", "v2.0.0", True),
    ("github.com/go-yaml/yaml/v2", "v2.1.5", True),
    ("github.com/go-yaml/yaml/v2", "v3.0.0", False),
    ("gopkg.in/yaml.v0", "v0.8.0", True),
    ("gopkg.in/yaml.v0", "v1.0.0", False),
    ("gopkg.in/yaml.v0", "v2.0.0", False),
    ("gopkg.in/yaml.v0", "v2.1.5", False),
    ("gopkg.in/yaml.v0", "v3.0.0", False),
    ("gopkg.in/yaml.v1", "v0.8.0", False),
    ("gopkg.in/yaml.v1", "v1.0.0", True),
    ("gopkg.in/yaml.v1", "v2.0.0", False),
    ("gopkg.in/yaml.v1", "v2.1.5", False),
    ("gopkg.in/yaml.v1", "v3.0.0", False),
    ("gopkg.in/check.v1", "v0.0.0", False),
    ("gopkg.in/check.v1", "v0.0.0-20160102150405-abcdef123456", True),
    ("gopkg.in/yaml.v2", "v1.0.0", False),
    ("gopkg.in/yaml.v2", "v2.0.0", True),
    ("gopkg.in/yaml.v2", "v2.1.5", True),
    ("gopkg.in/yaml.v2", "v3.0.0", False),
    ("rsc.io/quote", "v17.0.0", False),
    ("rsc.io/quote", "v17.0.0+incompatible", True),
]


@pytest.mark.parametrize(("path", "version", "ok"), CHECK_TESTS)
def test_check_module_version(path: str, version: str, ok: bool) -> None:
    assert _status(check_module_version, path, version) == (None if ok else 404)


# --- x/mod module_test.go: checkPathTests (the module-path column) ------------

CHECK_PATH_TESTS = [
    ("x.y/z", True),
    ("x.y", True),
    ("", False),
    ("x.y/\xffz", False),  # Go: invalid UTF-8; here: non-ASCII
    ("/x.y/z", False),
    ("x./z", False),
    (".x/z", False),
    ("-x/z", False),
    ("x..y/z", True),
    ("x.y/z/../../w", False),
    ("x.y//z", False),
    ("x.y/z//w", False),
    ("x.y/z/", False),
    ("x.y/z/v0", False),
    ("x.y/z/v1", False),
    ("x.y/z/v2", True),
    ("x.y/z/v2.0", False),
    ("X.y/z", False),
    ("!x.y/z", False),
    ("_x.y/z", False),
    ("x.y!/z", False),
    ('x.y"/z', False),
    ("x.y#/z", False),
    ("x.y$/z", False),
    ("x.y%/z", False),
    ("x.y&/z", False),
    ("x.y'/z", False),
    ("x.y(/z", False),
    ("x.y)/z", False),
    ("x.y*/z", False),
    ("x.y+/z", False),
    ("x.y,/z", False),
    ("x.y-/z", True),
    ("x.y./zt", False),
    ("x.y:/z", False),
    ("x.y;/z", False),
    ("x.y</z", False),
    ("x.y=/z", False),
    ("x.y>/z", False),
    ("x.y?/z", False),
    ("x.y@/z", False),
    ("x.y[/z", False),
    ("x.y\\/z", False),
    ("x.y]/z", False),
    ("x.y^/z", False),
    ("x.y_/z", False),
    ("x.y`/z", False),
    ("x.y{/z", False),
    ("x.y}/z", False),
    ("x.y~/z", False),
    ("x.y/z!", False),
    ('x.y/z"', False),
    ("x.y/z#", False),
    ("x.y/z$", False),
    ("x.y/z%", False),
    ("x.y/z&", False),
    ("x.y/z'", False),
    ("x.y/z(", False),
    ("x.y/z)", False),
    ("x.y/z*", False),
    ("x.y/z++", False),
    ("x.y/z,", False),
    ("x.y/z-", True),
    ("x.y/z.t", True),
    ("x.y/z/t", True),
    ("x.y/z:", False),
    ("x.y/z;", False),
    ("x.y/z<", False),
    ("x.y/z=", False),
    ("x.y/z>", False),
    ("x.y/z?", False),
    ("x.y/z@", False),
    ("x.y/z[", False),
    ("x.y/z\\", False),
    ("x.y/z]", False),
    ("x.y/z^", False),
    ("x.y/z_", True),
    ("x.y/z`", False),
    ("x.y/z{", False),
    ("x.y/z}", False),
    ("x.y/z~", True),
    ("x.y/x.foo", True),
    ("x.y/aux.foo", False),
    ("x.y/prn", False),
    ("x.y/prn2", True),
    ("x.y/com", True),
    ("x.y/com1", False),
    ("x.y/com1.txt", False),
    ("x.y/calm1", True),
    ("x.y/z~", True),
    ("x.y/z~0", False),
    ("x.y/z~09", False),
    ("x.y/z09", True),
    ("x.y/z09~", True),
    ("x.y/z09~09z", True),
    ("x.y/z09~09z~09", False),
    # the first element and a middle one too (x/mod checks every element)
    ("com1.example/x", False),
    ("Lpt3.example/x", False),
    ("x~1.example/y", False),
    ("x.y/NUL/z", False),
    ("x.y/a~2/z", False),
    ("x.y/a~2b/z", True),
    ("github.com/!123/logrus", False),
    ("github.com/user/unicode/испытание", False),
    ("../x", False),
    ("./y", False),
    ("x:y", False),
    ("\\temp\\foo", False),
    (".gitignore", False),
    (".github/ISSUE_TEMPLATE", False),
    ("x☺y", False),
]


@pytest.mark.parametrize(("path", "ok"), CHECK_PATH_TESTS)
def test_check_module_path(path: str, ok: bool) -> None:
    assert _status(check_module_path, path) == (None if ok else 404)


@pytest.mark.parametrize(("path", "ok"), CHECK_PATH_TESTS)
def test_split_path_version_adds_up(path: str, ok: bool) -> None:
    prefix, major, _ = split_path_version(path)
    assert prefix + major == path


@pytest.mark.parametrize(
    ("prefix", "major"),
    [
        ("x.y/z", ""),
        ("x.y/z", "/v2"),
        ("x.y/z", "/v3"),
        ("x.y/v", ""),
        ("gopkg.in/yaml", ".v0"),
        ("gopkg.in/yaml", ".v1"),
        ("gopkg.in/yaml", ".v2"),
        ("gopkg.in/yaml", ".v3"),
    ],
)
def test_split_path_version(prefix: str, major: str) -> None:
    assert split_path_version(prefix + major) == (prefix, major, True)


@pytest.mark.parametrize(
    ("version", "path_major", "ok"),
    [
        ("v0.0.0", "", True),
        ("v0.0.0", "/v2", False),
        ("v0.0.0", ".v0", True),
        ("v0.0.0-20190510104115-cbcb75029529", ".v1", True),
        ("v1.0.0", "/v2", False),
        ("v1.0.0", ".v1", True),
        ("v1.0.0", ".v1-unstable", True),
        ("v2.0.0+incompatible", "", True),
        ("v2.0.0", "", False),
        ("v2.0.0", "/v2", True),
        ("v2.0.0", ".v2", True),
    ],
)
def test_check_path_major(version: str, path_major: str, ok: bool) -> None:
    assert (check_path_major(version, path_major) is None) == ok


# --- x/mod module_test.go: escapeTests, badUnescape --------------------------

ESCAPE_TESTS = [
    (
        "ascii.com/abcdefghijklmnopqrstuvwxyz.-/~_0123456789",
        "ascii.com/abcdefghijklmnopqrstuvwxyz.-/~_0123456789",
    ),
    ("github.com/GoogleCloudPlatform/omega", "github.com/!google!cloud!platform/omega"),
]

BAD_UNESCAPE = [
    "github.com/GoogleCloudPlatform/omega",
    "github.com/!google!cloud!platform!/omega",
    "github.com/!0google!cloud!platform/omega",
    "github.com/!_google!cloud!platform/omega",
    "github.com/!!google!cloud!platform/omega",
    "",
]

INVALID_PATHS = [path for path, ok in CHECK_PATH_TESTS if not ok]


@pytest.mark.parametrize(("path", "escaped"), ESCAPE_TESTS)
def test_escape_path(path: str, escaped: str) -> None:
    assert escape_path(path) == escaped
    assert unescape_path(escaped) == path


@pytest.mark.parametrize("path", INVALID_PATHS)
def test_escape_path_refuses_invalid_paths(path: str) -> None:
    assert _status(escape_path, path) == 404


@pytest.mark.parametrize("escaped", BAD_UNESCAPE + INVALID_PATHS)
def test_unescape_path_refuses(escaped: str) -> None:
    assert _status(unescape_path, escaped) == 404


@pytest.mark.parametrize(
    ("version", "escaped"),
    [
        ("v1.0.0", "v1.0.0"),
        ("v1.0.0-RC1", "v1.0.0-!r!c1"),
        ("Master", "!master"),
        ("feature x#1", "feature x#1"),
        (".hidden", ".hidden"),
    ],
)
def test_escape_version(version: str, escaped: str) -> None:
    assert escape_version(version) == escaped
    assert unescape_version(escaped) == version


@pytest.mark.parametrize(
    "version",
    ["", ".", "..", "v1.", "a/b", "a!b", "a\\b", "a:b", "a*b", "a?b", "con", "Nul.x", "a\x00", "é"],
)
def test_escape_version_refuses(version: str) -> None:
    assert _status(escape_version, version) == 404


@pytest.mark.parametrize("escaped", ["V1.0.0", "v1!", "v1!!a", "v1!0", "", "..", "a/b", "é"])
def test_unescape_version_refuses(escaped: str) -> None:
    assert _status(unescape_version, escaped) == 404


# --- x/mod semver_test.go: tests ----------------------------------------------

SEMVER_TESTS = [
    ("bad", ""),
    ("v1-alpha.beta.gamma", ""),
    ("v1-pre", ""),
    ("v1+meta", ""),
    ("v1-pre+meta", ""),
    ("v1.2-pre", ""),
    ("v1.2+meta", ""),
    ("v1.2-pre+meta", ""),
    ("v1.0.0-alpha", "v1.0.0-alpha"),
    ("v1.0.0-alpha.1", "v1.0.0-alpha.1"),
    ("v1.0.0-alpha.beta", "v1.0.0-alpha.beta"),
    ("v1.0.0-beta", "v1.0.0-beta"),
    ("v1.0.0-beta.2", "v1.0.0-beta.2"),
    ("v1.0.0-beta.11", "v1.0.0-beta.11"),
    ("v1.0.0-rc.1", "v1.0.0-rc.1"),
    ("v1", "v1.0.0"),
    ("v1.0", "v1.0.0"),
    ("v1.0.0", "v1.0.0"),
    ("v1.2", "v1.2.0"),
    ("v1.2.0", "v1.2.0"),
    ("v1.2.3-456", "v1.2.3-456"),
    ("v1.2.3-456.789", "v1.2.3-456.789"),
    ("v1.2.3-456-789", "v1.2.3-456-789"),
    ("v1.2.3-456a", "v1.2.3-456a"),
    ("v1.2.3-pre", "v1.2.3-pre"),
    ("v1.2.3-pre+meta", "v1.2.3-pre"),
    ("v1.2.3-pre.1", "v1.2.3-pre.1"),
    ("v1.2.3-zzz", "v1.2.3-zzz"),
    ("v1.2.3", "v1.2.3"),
    ("v1.2.3+meta", "v1.2.3"),
    ("v1.2.3+meta-pre", "v1.2.3"),
    ("v1.2.3+meta-pre.sha.256a", "v1.2.3"),
]

# Extra cases for the rules semver.go spells out (leading zeros, empty parts).
SEMVER_EXTRA = [
    ("", ""),
    ("1.2.3", ""),
    ("v01.2.3", ""),
    ("v1.02.3", ""),
    ("v1.2.03", ""),
    ("v1.2.3-01", ""),
    ("v1.2.3-0", "v1.2.3-0"),
    ("v1.2.3-0a", "v1.2.3-0a"),
    ("v1.2.3-", ""),
    ("v1.2.3-a..b", ""),
    ("v1.2.3+", ""),
    ("v1.2.3+a..b", ""),
    ("v1.2.3+01", "v1.2.3"),
    ("v1.2.3.4", ""),
    ("v1.2.3\n", ""),
    ("v0.0.0-20191109021931-daa7c04131f5", "v0.0.0-20191109021931-daa7c04131f5"),
]


@pytest.mark.parametrize(("version", "canonical"), SEMVER_TESTS + SEMVER_EXTRA)
def test_semver(version: str, canonical: str) -> None:
    assert semver_is_valid(version) == (canonical != "")
    assert semver_canonical(version) == canonical
    assert semver_major(version) == canonical.partition(".")[0]
    build = version[version.index("+") :] if canonical and "+" in version else ""
    assert semver_build(version) == build


@pytest.mark.parametrize(
    ("version", "canonical"),
    [
        *[(v, semver_canonical(v) == v and v != "") for v, _ in SEMVER_TESTS + SEMVER_EXTRA],
        ("v2.0.0+incompatible", True),
        ("v1.0.0-pre+incompatible", True),
        ("v2.0+incompatible", False),
        ("v2.0.0+incompatible.1", False),
        ("v2.0.0+meta", False),
        ("v0.0.0-20191109021931-daa7c04131f5", True),
        ("master", False),
    ],
)
def test_is_canonical_version(version: str, canonical: bool) -> None:
    assert is_canonical_version(version) == canonical


# --- parse_request_path: one row per request kind ----------------------------

AZ = "github.com/!azure/go-autorest"
AZ_MOD = "github.com/Azure/go-autorest"
SUM = "sumdb/sum.golang.org"

# raw path, kind, forwarded path, module, version, sumdb, immutable
Row = tuple[str, Kind, str, str, str | None, str | None, bool]


def _row(
    raw: str,
    kind: Kind,
    path: str,
    module: str = "",
    version: str | None = None,
    sumdb: str | None = None,
    immutable: bool = False,
) -> Row:
    return (raw, kind, path, module, version, sumdb, immutable)


VALID_REQUESTS: list[Row] = [
    _row("/golang.org/x/text/@v/list", Kind.LIST, "golang.org/x/text/@v/list", "golang.org/x/text"),
    _row(f"/{AZ}/@v/list", Kind.LIST, f"{AZ}/@v/list", AZ_MOD),
    _row("/github.com/%21azure/go-autorest/@v/list", Kind.LIST, f"{AZ}/@v/list", AZ_MOD),
    _row(
        "/golang.org/x/text/@latest", Kind.LATEST, "golang.org/x/text/@latest", "golang.org/x/text"
    ),
    _row(
        "/github.com/%21azure/go-autorest/@v/v1.0.0.zip",
        Kind.ZIP,
        f"{AZ}/@v/v1.0.0.zip",
        AZ_MOD,
        version="v1.0.0",
        immutable=True,
    ),
    _row(
        f"/{AZ}/@v/v1.0.0.mod",
        Kind.MOD,
        f"{AZ}/@v/v1.0.0.mod",
        AZ_MOD,
        version="v1.0.0",
        immutable=True,
    ),
    _row(
        f"/{AZ}/@v/v1.0.0.info",
        Kind.INFO,
        f"{AZ}/@v/v1.0.0.info",
        AZ_MOD,
        version="v1.0.0",
        immutable=True,
    ),
    _row(
        "/golang.org/x/text/@v/v0.0.0-20170915032832-14c0d48ead0c.zip",
        Kind.ZIP,
        "golang.org/x/text/@v/v0.0.0-20170915032832-14c0d48ead0c.zip",
        "golang.org/x/text",
        version="v0.0.0-20170915032832-14c0d48ead0c",
        immutable=True,
    ),
    _row(
        "/github.com/go-yaml/yaml/@v/v2.0.0+incompatible.zip",
        Kind.ZIP,
        "github.com/go-yaml/yaml/@v/v2.0.0+incompatible.zip",
        "github.com/go-yaml/yaml",
        version="v2.0.0+incompatible",
        immutable=True,
    ),
    _row(
        "/github.com/go-yaml/yaml/@v/v2.0.0%2Bincompatible.mod",
        Kind.MOD,
        "github.com/go-yaml/yaml/@v/v2.0.0+incompatible.mod",
        "github.com/go-yaml/yaml",
        version="v2.0.0+incompatible",
        immutable=True,
    ),
    _row(
        "/github.com/x/y/@v/v1.0.0-!r!c1.zip",
        Kind.ZIP,
        "github.com/x/y/@v/v1.0.0-!r!c1.zip",
        "github.com/x/y",
        version="v1.0.0-RC1",
        immutable=True,
    ),
    _row(
        "/gopkg.in/yaml.v2/@v/v2.4.0.zip",
        Kind.ZIP,
        "gopkg.in/yaml.v2/@v/v2.4.0.zip",
        "gopkg.in/yaml.v2",
        version="v2.4.0",
        immutable=True,
    ),
    _row(
        "/gopkg.in/check.v1/@v/v0.0.0-20161208181325-20d25e280405.mod",
        Kind.MOD,
        "gopkg.in/check.v1/@v/v0.0.0-20161208181325-20d25e280405.mod",
        "gopkg.in/check.v1",
        version="v0.0.0-20161208181325-20d25e280405",
        immutable=True,
    ),
    _row(
        "/rsc.io/quote/v3/@v/v3.1.0.zip",
        Kind.ZIP,
        "rsc.io/quote/v3/@v/v3.1.0.zip",
        "rsc.io/quote/v3",
        version="v3.1.0",
        immutable=True,
    ),
    # .info of a query (branch, commit, short version) is valid but mutable.
    _row(
        "/golang.org/x/text/@v/master.info",
        Kind.INFO,
        "golang.org/x/text/@v/master.info",
        "golang.org/x/text",
        version="master",
    ),
    _row(
        "/golang.org/x/text/@v/v0.3.info",
        Kind.INFO,
        "golang.org/x/text/@v/v0.3.info",
        "golang.org/x/text",
        version="v0.3",
    ),
    _row(
        "/golang.org/x/text/@v/14c0d48ead0c.info",
        Kind.INFO,
        "golang.org/x/text/@v/14c0d48ead0c.info",
        "golang.org/x/text",
        version="14c0d48ead0c",
    ),
    _row(
        "/golang.org/x/text/@v/!feature%20x%23.info",
        Kind.INFO,
        "golang.org/x/text/@v/!feature%20x%23.info",
        "golang.org/x/text",
        version="Feature x#",
    ),
    _row(
        "/golang.org/x/text/@v/%76%31.info",
        Kind.INFO,
        "golang.org/x/text/@v/v1.info",
        "golang.org/x/text",
        version="v1",
    ),
    _row(
        "/rsc.io/quote/@v/v17.0.0.info",
        Kind.INFO,
        "rsc.io/quote/@v/v17.0.0.info",
        "rsc.io/quote",
        version="v17.0.0",
        immutable=True,
    ),
    # The checksum database proxy.
    _row(f"/{SUM}/supported", Kind.SUMDB_SUPPORTED, f"{SUM}/supported", "", sumdb="sum.golang.org"),
    _row(f"/{SUM}/latest", Kind.SUMDB_LATEST, f"{SUM}/latest", "", sumdb="sum.golang.org"),
    _row(
        f"/{SUM}/lookup/golang.org/x/text@v0.3.0",
        Kind.SUMDB_LOOKUP,
        f"{SUM}/lookup/golang.org/x/text@v0.3.0",
        "golang.org/x/text",
        version="v0.3.0",
        sumdb="sum.golang.org",
    ),
    _row(
        f"/{SUM}/lookup/{AZ}@v1.0.0-!r!c1",
        Kind.SUMDB_LOOKUP,
        f"{SUM}/lookup/{AZ}@v1.0.0-!r!c1",
        AZ_MOD,
        version="v1.0.0-RC1",
        sumdb="sum.golang.org",
    ),
    _row(
        f"/{SUM}/lookup/rsc.io/quote@v17.0.0+incompatible",
        Kind.SUMDB_LOOKUP,
        f"{SUM}/lookup/rsc.io/quote@v17.0.0+incompatible",
        "rsc.io/quote",
        version="v17.0.0+incompatible",
        sumdb="sum.golang.org",
    ),
    _row(
        "/sumdb/sum.golang.google.cn/supported",
        Kind.SUMDB_SUPPORTED,
        "sumdb/sum.golang.google.cn/supported",
        "",
        sumdb="sum.golang.google.cn",
    ),
]

# tlog tile_test.go fuzz seeds and tlog.Tile.Path() forms: (tile path, valid, full)
TILES = [
    ("tile/4/0/001", True, True),
    ("tile/4/0/001.p/5", True, False),
    ("tile/3/5/x123/x456/078", True, True),
    ("tile/3/5/x123/x456/078.p/2", True, False),
    ("tile/1/0/x003/x057/500", True, True),
    ("tile/3/5/123/456/078", False, False),
    ("tile/3/-1/123/456/078", False, False),
    ("tile/1/data/x003/x057/500", True, True),
    ("tile/8/data/000.p/255", True, False),
    ("tile/8/0/000.p/256", False, False),
    ("tile/8/0/000.p/0", False, False),
    ("tile/8/0/000.p/05", False, False),
    ("tile/8/0/x000/123", False, False),
    ("tile/0/0/000", False, False),
    ("tile/30/0/000", True, True),
    ("tile/31/0/000", False, False),
    ("tile/08/0/000", False, False),
    ("tile/8/00/000", False, False),
    ("tile/8/0/12", False, False),
    ("tile/8/0/1234", False, False),
    ("tile/8/0/x1/000", False, False),
    ("tile/8/0/x001/x002/x003/x004/x005/x006/007", False, False),
    ("tile/8/0/000.p", False, False),
    ("tile/8/0/000.p/5/6", False, False),
    ("tile/8/1", False, False),
    ("tile/8/data", False, False),
]


@pytest.mark.parametrize(
    ("raw", "kind", "path", "module", "version", "sumdb", "immutable"), VALID_REQUESTS
)
def test_valid_requests(
    raw: str,
    kind: Kind,
    path: str,
    module: str,
    version: str | None,
    sumdb: str | None,
    immutable: bool,
) -> None:
    assert parse_request_path(raw) == GoproxyRequest(
        kind, path, module, version, sumdb, immutable, path
    )


@pytest.mark.parametrize(("tile", "valid", "full"), TILES)
def test_tiles(tile: str, valid: bool, full: bool) -> None:
    raw = f"/{SUM}/{tile}"
    if not valid:
        assert _status(parse_request_path, raw) == 404
        return
    assert parse_request_path(raw) == GoproxyRequest(
        Kind.SUMDB_TILE, raw[1:], "", None, "sum.golang.org", full, raw[1:]
    )


BAD_REQUESTS_400 = [
    "",
    "golang.org/x/text/@v/list",  # not absolute
    "http://evil.example/golang.org/x/text/@v/list",
    "//evil.example/golang.org/x/text/@v/list",
    "/http://evil.example/x/@v/list",
    "/" + "a" * MAX_PATH_LENGTH,
    "/golang.org/x/../text/@v/list",
    "/golang.org/x/text/..",
    "/../etc/passwd",
    "/./golang.org/x/text/@v/list",
    "/golang.org/x/text/./@v/list",
    "/golang.org/x/text/@v/.",
    "/golang.org/x/text/%2e%2e/@v/list",
    "/golang.org/x/text/%2E./@v/list",
    "/golang.org/x/text/.%2e/@v/list",
    "/golang.org/x/text%2F@v%2Flist",
    "/golang.org/x/text%2f@v/list",
    "/golang.org/x/text/%252e%252e/@v/list",
    "/golang.org/x/text/%25/@v/list",
    "/golang.org/x/text/%5c/@v/list",
    "/golang.org\\x\\text/@v/list",
    "/golang.org/x/text/%00/@v/list",
    "/golang.org/x/text/\x00/@v/list",
    "/golang.org/x/text/@v/list\x00",
    "/golang.org/x/text/%0a/@v/list",
    "/golang.org/x/text/\n/@v/list",
    "/golang.org/x/text/%7f/@v/list",
    "/golang.org/x/text/%C3%A9/@v/list",
    "/golang.org/x/tëxt/@v/list",
    "/golang.org/x/text/%zz/@v/list",
    "/golang.org/x/text/%2/@v/list",
    "/golang.org/x/text/@v/list%",
    "/golang.org/x/text/@v/list/",
    "/golang.org//x/text/@v/list",
    "/golang.org/x/text/@v/list?x=1",
    "/golang.org/x/text/@v/list#frag",
    "/golang.org/x/text/a b/@v/list",
    "/golang.org/x/text/<script>/@v/list",
    f"/{SUM}/lookup/",
    f"/{SUM}/",
    "/golang.org/x/text/@latest/",
    f"/{SUM}/../../etc/passwd",
    f"/{SUM}/tile/8/0/../000",
]

BAD_REQUESTS_404 = [
    "/",
    "/golang.org",
    "/golang.org/x/text",
    "/golang.org/x/text/@v",
    "/golang.org/x/text/@latest/x",
    "/golang.org/x/text/@latest.info",
    "/golang.org/x/text/@latest@v1.0.0",
    "/golang.org/x/text/@v/list@v1.0.0",
    "/golang.org/x/text/@v/list.txt",
    "/golang.org/x/text/@v/v1.0.0",
    "/golang.org/x/text/@v/v1.0.0.tar.gz",
    "/golang.org/x/text/@v/v1.0.0.ZIP",
    "/golang.org/x/text/@v/v1.0.0.zip/extra",
    "/golang.org/x/text/@v/.info",
    "/golang.org/x/text/@v/v1.0.0/list",
    "/golang.org/x/text/@v1.0.0/@v/list",
    "/golang.org/x/text/@foo",
    "/golang.org/x/text/@v/list.zip",  # version "list" is not canonical
    "/golang.org/x/text/@v/v1.0.zip",
    "/golang.org/x/text/@v/v1.0.0+meta.zip",
    "/golang.org/x/text/@v/master.mod",
    "/golang.org/x/text/@v/V1.0.0.zip",
    "/golang.org/x/text/@v/v1.0.0!.zip",
    "/golang.org/x/text/@v/con.info",
    "/golang.org/x/text/@v/a:b.info",
    "/github.com/Azure/go-autorest/@v/list",
    "/github.com/!!azure/go-autorest/@v/list",
    "/github.com/azure!/go-autorest/@v/list",
    "/github.com/!0zure/go-autorest/@v/list",
    "/github.com/go-yaml/yaml/@v/v2.0.0.zip",
    "/github.com/go-yaml/yaml/v2/@v/v3.0.0.mod",
    "/gopkg.in/yaml.v1/@v/v2.0.0.zip",
    "/localhost/x/@v/list",
    "/x.y/z/v1/@v/list",
    "/x.y/z/v0/@v/list",
    "/x..y/z/@v/list",  # valid for x/mod, but ".." is never served
    "/golang.org/x/te..xt/@v/list",
    "/golang.org/x/text/@v/v1..0.info",
    "/-x.y/z/@v/list",
    "/x.y/con/@v/list",
    "/x.y/z~1/@v/list",
    "/.x.y/z/@v/list",
    "/x.y/.z/@v/list",
    "/x.y/z./@v/list",
    "/golang.org/x/text:80/@v/list",
    "/sumdb",
    "/sumdb/sum.golang.org",
    f"/{SUM}/unknown",
    f"/{SUM}/supported/x",
    f"/{SUM}/latest/x",
    f"/{SUM}/lookup",
    f"/{SUM}/tile",
    f"/{SUM}/lookup/golang.org/x/text",
    f"/{SUM}/lookup/golang.org/x/text@v0.3",
    f"/{SUM}/lookup/golang.org/x/text@master",
    f"/{SUM}/lookup/golang.org/x/text@v0.3.0/go.mod",
    f"/{SUM}/lookup/golang.org/x/text@v0.3.0@v0.3.1",
    f"/{SUM}/lookup/rsc.io/quote@v17.0.0",
    f"/{SUM}/lookup/github.com/Azure/go-autorest@v1.0.0",
    f"/{SUM}/lookup/@v1.0.0",
    "/sumdb/localhost/supported",
    "/sumdb/Sum.golang.org/supported",
    "/sumdb/-sum.golang.org/supported",
    "/sumdb/sum.golang.org:443/supported",
    "/sumdb/sum_golang.org/supported",
]


@pytest.mark.parametrize("raw", BAD_REQUESTS_400)
def test_bad_requests_400(raw: str) -> None:
    assert _status(parse_request_path, raw) == 400


@pytest.mark.parametrize("raw", BAD_REQUESTS_404)
def test_bad_requests_404(raw: str) -> None:
    assert _status(parse_request_path, raw) == 404


def test_length_limit_is_inclusive() -> None:
    module = "example.com/" + "a" * (MAX_PATH_LENGTH - len("/example.com//@v/list"))
    raw = f"/{module}/@v/list"
    assert len(raw) == MAX_PATH_LENGTH
    assert parse_request_path(raw).module == module
    assert _status(parse_request_path, f"/{module}a/@v/list") == 400


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@pytest.mark.parametrize("raw", BAD_REQUESTS_400 + BAD_REQUESTS_404)
def test_messages_are_plain(raw: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_request_path(raw)
    message = info.value.message
    assert message.isascii() and not _CONTROL.search(message)
    assert message.startswith(("bad request: ", "not found: "))


# --- properties -----------------------------------------------------------------

TOKENS = [
    "/",
    "/",
    "/",
    ".",
    "..",
    "%2e",
    "%2E",
    "%2f",
    "%2F",
    "%5c",
    "%25",
    "%21",
    "%00",
    "%",
    "!",
    "@",
    "@v",
    "@v/",
    "@latest",
    "list",
    ".zip",
    ".mod",
    ".info",
    "v1.0.0",
    "v2",
    "+incompatible",
    "sumdb",
    "sum.golang.org",
    "lookup",
    "tile",
    "8",
    "data",
    "x001",
    "000",
    ".p",
    "\\",
    "\x00",
    "\n",
    "a",
    "A",
    "é",
    "~1",
    "con",
    "github.com",
    "golang.org",
    "x",
    "-",
    "_",
    ":",
    "//",
    "http:",
    "?",
    "#",
    " ",
]

token_paths = st.lists(st.sampled_from(TOKENS), max_size=24).map("".join)
MODULES = [
    "golang.org/x/text",
    AZ,
    "github.com/%21azure/go-autorest",
    "gopkg.in/yaml.v2",
    "rsc.io/quote/v3",
    "x.y/z~",
]
TAILS = [
    "@v/list",
    "@latest",
    "@v/v1.0.0.zip",
    "@v/v3.1.0.mod",
    "@v/v2.4.0.info",
    "@v/master.info",
    "@v/v1.0.0-!r!c1.info",
    "@v/feat%20x%23.info",
    "@v/v2.0.0+incompatible.zip",
]
SUMDB_TAILS = [
    "supported",
    "latest",
    "lookup/golang.org/x/text@v0.3.0",
    f"lookup/{AZ}@v1.0.0",
    "tile/8/0/x001/234",
    "tile/8/data/000.p/3",
    "tile/8/1/000",
]
structured_paths = st.one_of(
    st.builds(lambda m, t: f"/{m}/{t}", st.sampled_from(MODULES), st.sampled_from(TAILS)),
    st.builds(lambda t: f"/{SUM}/{t}", st.sampled_from(SUMDB_TAILS)),
)
# A valid path with one hostile token spliced in somewhere.
mutated_paths = st.builds(
    lambda p, i, tok: p[:i] + tok + p[i:],
    structured_paths,
    st.integers(0, 80),
    st.sampled_from(TOKENS),
)


def _assert_safe(req: GoproxyRequest) -> None:
    for text in (req.path, req.cache_key):
        assert text and text.isascii()
        assert not text.startswith("/") and "\\" not in text
        assert not _CONTROL.search(text)
        assert ".." not in text
        assert "" not in text.split("/") and "." not in text.split("/")
    joined = os.path.normpath(os.path.join("/cache", req.cache_key))
    assert joined.startswith("/cache/")
    # The forwarded path parses back to the same request: it is canonical.
    assert parse_request_path("/" + req.path) == req


@settings(max_examples=600)
@given(
    st.one_of(
        st.text(max_size=200), token_paths.map(lambda s: "/" + s), structured_paths, mutated_paths
    )
)
@example("/github.com/%21azure/go-autorest/@v/v1.0.0.zip")
@example("/sumdb/sum.golang.org/lookup/golang.org/x/text@v0.3.0")
@example("/golang.org/x/text/@v/%2e%2e%2f%2e%2e.info")
def test_any_input_is_refused_or_safe(raw: str) -> None:
    try:
        req = parse_request_path(raw)
    except RequestError as exc:
        assert exc.status in (400, 404)
        assert exc.message.isascii() and not _CONTROL.search(exc.message)
        return
    _assert_safe(req)


first_elements = st.lists(
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True), min_size=2, max_size=3
).map(".".join)
later_elements = st.lists(
    st.from_regex(r"[A-Za-z0-9_~-]([A-Za-z0-9._~-]{0,10}[A-Za-z0-9_~-])?", fullmatch=True),
    min_size=1,
    max_size=4,
)
module_paths = st.builds(
    lambda first, rest: "/".join([first, *rest]), first_elements, later_elements
)


def _is_valid_module(path: str) -> bool:
    try:
        check_module_path(path)
    except RequestError:
        return False
    return True


@given(module_paths)
def test_escape_round_trip(module: str) -> None:
    assume(_is_valid_module(module) and ".." not in module)
    escaped = escape_path(module)
    assert not re.search(r"[A-Z]", escaped)
    assert unescape_path(escaped) == module
    req = parse_request_path(f"/{escaped}/@v/list")
    assert (req.kind, req.module, req.path) == (Kind.LIST, module, f"{escaped}/@v/list")
    percent = escaped.replace("!", "%21")  # how the go command sends it
    assert parse_request_path(f"/{percent}/@latest").path == f"{escaped}/@latest"
    _assert_safe(req)


versions = st.from_regex(
    r"v(0|[1-9][0-9]{0,3})\.(0|[1-9][0-9]{0,3})\.(0|[1-9][0-9]{0,3})(-[A-Za-z][A-Za-z0-9]{0,5})?",
    fullmatch=True,
)


@given(module_paths, versions)
def test_zip_round_trip(module: str, version: str) -> None:
    assume(_is_valid_module(module) and ".." not in module)
    assume(check_path_major(version, split_path_version(module)[1]) is None)
    escaped = f"{escape_path(module)}/@v/{escape_version(version)}.zip"
    req = parse_request_path("/" + escaped)
    assert (req.kind, req.module, req.version, req.immutable) == (Kind.ZIP, module, version, True)
    assert unescape_version(escape_version(version)) == version
    _assert_safe(req)


# The fast path (goproxy._fast_parse) takes the common spelling; on every path
# it takes, it must give exactly what the full check gives.
edge_elements = st.sampled_from(
    [
        *("con", "nul.x", "com1", "lpt9.y", "aux", "prn-x", "console", "cons.ole"),
        *("v0", "v1", "v2", "v02", "v2.1", "v10", "vv", "v", "v2x", "gopkg.in", "yaml.v2"),
        *("-x", "x-", "_y", "a.b", "a..b", ".a", "a.", "x~1", "x~", "!a", "A", "a_b", "0"),
        *("example.com", "go.uber.org", "k8s.io", "github.com", "x.y-z", "a%2eb", "é"),
    ]
)
fast_modules = st.one_of(
    st.lists(
        st.one_of(edge_elements, st.from_regex(r"[a-z0-9._~!-]{1,6}", fullmatch=True)),
        min_size=1,
        max_size=5,
    ).map("/".join),
    # Mostly the fast path's own shape, an edge element here and there.
    st.builds(
        lambda first, rest: "/".join([first, *rest]),
        first_elements,
        st.lists(
            st.one_of(edge_elements, st.from_regex(r"[a-z0-9_-]{1,5}", fullmatch=True)),
            max_size=4,
        ),
    ),
)
fast_versions = st.one_of(
    st.sampled_from(
        [
            *("v1.0.0", "v0.0.0-20191109021931-daa7c04131f5", "v2.0.0", "v3.1.4"),
            *("v2.0.0+incompatible", "v1.0.0-01", "v1.0.0-0", "v1.0.0-rc.1", "v01.0.0"),
            *("v1.0", "v1.0.0-", "v1.0.0-a..b", "master", "v1.2.3-pre", "v0.0.0-0.x-y"),
            *("v1.0.0-!r!c", "v1.0.0-RC", "v10.0.0", "v2.0.0-pre+meta", "v1.0.0-a.01"),
        ]
    ),
    versions,
)
fast_paths = st.builds(
    lambda module, version, tail: "/" + module + tail.format(version),
    fast_modules,
    fast_versions,
    st.sampled_from(
        ["/@v/list", "/@latest", "/@v/{}.info", "/@v/{}.mod", "/@v/{}.zip", "/@v/{}.txt", "/@v/{}"]
    ),
)


def _full(raw: str) -> GoproxyRequest | RequestError:
    try:
        return goproxy._full_parse(raw)
    except RequestError as exc:
        return exc


@settings(max_examples=3000)
@given(st.one_of(fast_paths, structured_paths, mutated_paths))
@example("/github.com/foo/bar/v2/@v/v1.0.0.mod")  # a path major the version breaks
@example("/gopkg.in/yaml.v2/@v/v2.4.0.mod")
@example("/con.example.com/x/@v/list")
def test_fast_parse_agrees_with_the_full_check(raw: str) -> None:
    fast = goproxy._fast_parse(raw)
    if fast is not None:
        assert fast == _full(raw)


@pytest.mark.parametrize(
    "raw",
    [
        "/golang.org/x/text/@v/list",
        "/golang.org/x/text/@latest",
        "/golang.org/x/text/@v/v0.3.7.info",
        "/github.com/spf13/cobra/@v/v1.8.0.mod",
        "/google.golang.org/grpc/@v/v1.60.1.zip",
        "/github.com/go-logr/logr/@v/v1.4.1.info",
        "/github.com/cespare/xxhash/v2/@v/v2.2.0.mod",
        "/golang.org/x/net/@v/v0.0.0-20191109021931-daa7c04131f5.zip",
        "/example.com/bench/unique/r1m0/@v/v1.0.0.info",
    ],
)
def test_fast_parse_takes_the_common_spelling(raw: str) -> None:
    fast = goproxy._fast_parse(raw)
    assert fast is not None and fast == goproxy._full_parse(raw)
