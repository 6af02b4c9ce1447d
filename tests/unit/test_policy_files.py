"""Policy file discovery and data loading: the semantics of `opa run -s PATH`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sidecar.errors import PolicyLoadError
from sidecar.policy import files

MODULE = "package x\n\ny := 1\n"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_empty_paths_are_the_packaged_policies() -> None:
    assert files.resolve_paths(()) == (files.PACKAGED_POLICIES,)
    names = [Path(s.path).name for s in files.discover(())]
    assert "breaker.rego" in names
    assert "thresholds.yaml" in names
    assert "breaker_test.rego" not in names


def test_packaged_policies_are_the_repository_policies() -> None:
    repo_policies = Path(__file__).resolve().parents[2] / "policies"
    packaged = {s.path.relative_to(files.PACKAGED_POLICIES) for s in files.discover(())}
    here = {s.path.relative_to(repo_policies) for s in files.discover([str(repo_policies)])}
    assert packaged == here


def test_discovery_skips_tests_and_kubernetes_copies(tmp_path: Path) -> None:
    write(tmp_path / "a.rego", MODULE)
    write(tmp_path / "a_test.rego", MODULE)
    write(tmp_path / "notes.txt", "x")
    write(tmp_path / "..2024_01_01" / "a.rego", MODULE)
    write(tmp_path / "d" / "x.yml", "k: 1\n")
    names = [s.name for s in files.discover([str(tmp_path)])]
    assert names == [str(tmp_path / "a.rego"), str(tmp_path / "d" / "x.yml")]


def test_data_lands_at_its_folder(tmp_path: Path) -> None:
    write(tmp_path / "p.rego", MODULE)
    write(tmp_path / "root.yaml", "sidecar:\n  config:\n    a: 1\n")
    write(tmp_path / "more.json", '{"sidecar": {"config": {"b": 2}}}')
    write(tmp_path / "sidecar" / "config" / "deep.yml", "c: 3\n")
    write(tmp_path / "lists" / "l.json", "[1, 2]")
    policy = files.load_policy_set([str(tmp_path)])
    assert policy.data == {
        "sidecar": {"config": {"a": 1, "b": 2, "c": 3}},
        "lists": [1, 2],
    }
    assert policy.source_of(("sidecar", "config", "c")) == str(
        tmp_path / "sidecar" / "config" / "deep.yml"
    )
    assert policy.source_of(("sidecar", "config", "a")) == str(tmp_path / "root.yaml")
    assert policy.source_of(("nope",)) is None


def test_a_single_file_path_is_loaded_at_the_root(tmp_path: Path) -> None:
    rego = write(tmp_path / "p.rego", MODULE)
    data = write(tmp_path / "sub" / "t.yaml", "k: v\n")
    policy = files.load_policy_set([str(rego), str(data)])
    assert policy.data == {"k": "v"}
    assert [name for name, _ in policy.modules] == [str(rego)]


def test_yaml_dates_stay_strings(tmp_path: Path) -> None:
    write(tmp_path / "p.rego", MODULE)
    write(tmp_path / "d.yaml", "since: 2024-01-02\nflag: true\n")
    assert files.load_policy_set([str(tmp_path)]).data == {"since": "2024-01-02", "flag": True}


@pytest.mark.parametrize(
    ("name", "text", "line", "fragment"),
    [
        ("bad.yaml", "a: 1\nb: [\n", 3, "expected"),
        ("bad.json", '{"a": 1,\n "b": }', 2, "Expecting value"),
        ("list.yaml", "- 1\n", None, "must be of type object"),
        ("empty.json", "", 1, "Expecting value"),
        ("nan.yaml", "a: .nan\n", None, "JSON"),
    ],
)
def test_bad_data_file_names_file_and_line(
    tmp_path: Path, name: str, text: str, line: int | None, fragment: str
) -> None:
    write(tmp_path / "p.rego", MODULE)
    bad = write(tmp_path / name, text)
    with pytest.raises(PolicyLoadError) as caught:
        files.load_policy_set([str(tmp_path)])
    assert caught.value.file == str(bad)
    assert caught.value.line == line
    assert fragment in caught.value.message


def test_conflicting_values_are_refused_like_opa(tmp_path: Path) -> None:
    write(tmp_path / "p.rego", MODULE)
    write(tmp_path / "one.json", '{"a": {"x": 1}}')
    write(tmp_path / "two.json", '{"a": {"x": 1}}')  # equal values conflict too
    with pytest.raises(PolicyLoadError) as caught:
        files.load_policy_set([str(tmp_path)])
    assert "conflicting values at data.a.x" in str(caught.value)
    assert str(tmp_path / "one.json") in str(caught.value)


def test_folder_value_conflicting_with_root_value(tmp_path: Path) -> None:
    write(tmp_path / "p.rego", MODULE)
    write(tmp_path / "root.json", '{"a": 5}')
    write(tmp_path / "a" / "x.json", '{"k": 1}')
    with pytest.raises(PolicyLoadError, match=r"conflicting values at data\.a"):
        files.load_policy_set([str(tmp_path)])


def test_no_rego_files(tmp_path: Path) -> None:
    write(tmp_path / "d.yaml", "a: 1\n")
    with pytest.raises(PolicyLoadError, match=r"no \.rego policy files"):
        files.load_policy_set([str(tmp_path)])


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(PolicyLoadError, match="no such file or directory"):
        files.load_policy_set([str(tmp_path / "absent")])


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "p.rego"
    bad.write_bytes(b'package x\n\ny := "\xff"\n')
    with pytest.raises(PolicyLoadError) as caught:
        files.load_policy_set([str(tmp_path)])
    assert (caught.value.file, caught.value.line) == (str(bad), 3)


def test_fingerprint_follows_content_not_mtime(tmp_path: Path) -> None:
    rego = write(tmp_path / "p.rego", MODULE)
    data = write(tmp_path / "t.yaml", "a: 1\n")
    first = files.fingerprint([str(tmp_path)])
    assert first == files.load_policy_set([str(tmp_path)]).fingerprint
    os.utime(rego, (0, 0))
    assert files.fingerprint([str(tmp_path)]) == first
    data.write_text("a: 2\n")  # same size, possibly the same mtime
    assert files.fingerprint([str(tmp_path)]) != first
    write(tmp_path / "t_test.rego", MODULE)  # test files do not count
    assert files.fingerprint([str(tmp_path)]) == files.load_policy_set([str(tmp_path)]).fingerprint


def test_fingerprint_of_a_missing_path_is_stable(tmp_path: Path) -> None:
    paths = [str(tmp_path / "absent")]
    assert files.fingerprint(paths) == files.fingerprint(paths)
