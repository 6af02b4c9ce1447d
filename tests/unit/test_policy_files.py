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
    write(tmp_path / "root.yaml", "team:\n  config:\n    a: 1\n")
    write(tmp_path / "more.json", '{"team": {"config": {"b": 2}}}')
    write(tmp_path / "team" / "config" / "deep.yml", "c: 3\n")
    write(tmp_path / "lists" / "l.json", "[1, 2]")
    policy = files.load_policy_set([str(tmp_path)])
    assert policy.data == {
        "team": {"config": {"a": 1, "b": 2, "c": 3}},
        "lists": [1, 2],
    }
    assert policy.source_of(("team", "config", "c")) == str(
        tmp_path / "team" / "config" / "deep.yml"
    )
    assert policy.source_of(("team", "config", "a")) == str(tmp_path / "root.yaml")
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


# ---------------------------------------------------------------- data.sidecar.config


def load_thresholds(tmp_path: Path, text: str) -> files.PolicySet:
    write(tmp_path / "p.rego", MODULE)
    write(tmp_path / "thresholds.yaml", "sidecar:\n  config:\n" + text)
    return files.load_policy_set([str(tmp_path)])


def refusal(tmp_path: Path, text: str) -> PolicyLoadError:
    with pytest.raises(PolicyLoadError) as caught:
        load_thresholds(tmp_path, text)
    return caught.value


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "    thresholds: {error_rat: 0.05}\n",
            "sidecar.config.thresholds.error_rat: unknown key (did you mean 'error_rate'?)",
        ),
        (
            "    thresholds: {min_requests: many}\n",
            "sidecar.config.thresholds.min_requests: expected an integer >= 1, got 'many'",
        ),
        (
            "    thresholds: {error_rate: 5}\n",
            "sidecar.config.thresholds.error_rate: expected a number in [0, 1], got 5",
        ),
        (
            "    thresholds: {stall_requests: 2.5}\n",
            "sidecar.config.thresholds.stall_requests: expected an integer >= 1, got 2.5",
        ),
        (
            "    thresholds: {queue_for_s: -1}\n",
            "sidecar.config.thresholds.queue_for_s: expected a number >= 0, got -1",
        ),
        (
            "    thresholds: {stall_ms: true}\n",
            "sidecar.config.thresholds.stall_ms: expected a number >= 0, got True",
        ),
        (
            "    thresholds: {ttfb_p99_ms: }\n",
            "sidecar.config.thresholds.ttfb_p99_ms: expected a number >= 0, got null",
        ),
        (
            "    breaker: {probes: 0}\n",
            "sidecar.config.breaker.probes: expected an integer >= 1, got 0",
        ),
        (
            "    thresholds: [1]\n",
            "sidecar.config.thresholds: expected a mapping, got a list",
        ),
        (
            # Forgot the section: the suggestion names the nested key.
            "    error_rate: 0.05\n",
            "sidecar.config.error_rate: unknown key (did you mean 'thresholds.error_rate'?)",
        ),
    ],
)
def test_bad_threshold_data_is_refused_naming_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    error = refusal(tmp_path, text)
    assert error.file == str(tmp_path / "thresholds.yaml")
    assert error.message == message


def test_every_problem_is_named_at_once(tmp_path: Path) -> None:
    write(tmp_path / "sidecar" / "config" / "breaker" / "b.json", '{"cooldwn_s": 3}')
    error = refusal(tmp_path, "    thresholds: {error_rat: 0.05, min_requests: 0}\n")
    assert error.file == str(tmp_path / "thresholds.yaml")
    assert error.message == (
        "sidecar.config.thresholds.error_rat: unknown key (did you mean 'error_rate'?); "
        "sidecar.config.thresholds.min_requests: expected an integer >= 1, got 0; "
        f"{tmp_path / 'sidecar' / 'config' / 'breaker' / 'b.json'}: "
        "sidecar.config.breaker.cooldwn_s: unknown key (did you mean 'cooldown_s'?)"
    )


def test_every_shipped_key_is_accepted(tmp_path: Path) -> None:
    shipped = (files.PACKAGED_POLICIES / "thresholds.yaml").read_text()
    write(tmp_path / "p.rego", MODULE)
    write(tmp_path / "thresholds.yaml", shipped)
    policy = files.load_policy_set([str(tmp_path)])
    assert len(policy.data["sidecar"]["config"]["thresholds"]) == 17
    assert policy.warnings == ()


def test_whole_numbers_may_be_written_as_floats(tmp_path: Path) -> None:
    policy = load_thresholds(tmp_path, "    thresholds: {min_requests: 20.0, error_rate: 1}\n")
    assert policy.data["sidecar"]["config"]["thresholds"]["min_requests"] == 20.0


def test_removed_key_is_accepted_with_a_warning(tmp_path: Path) -> None:
    policy = load_thresholds(tmp_path, "    thresholds: {pool_saturation: 0.9}\n")
    [warning] = policy.warnings
    assert warning.startswith(
        f"{tmp_path / 'thresholds.yaml'}: "
        "sidecar.config.thresholds.pool_saturation: removed key, ignored"
    )
    assert "queue_wait_p99_ms" in warning


def test_data_outside_sidecar_config_is_left_alone(tmp_path: Path) -> None:
    write(tmp_path / "p.rego", MODULE)
    write(tmp_path / "mine.yaml", "sidecar:\n  mine: {error_rat: 7}\nteam: {config: {x: 1}}\n")
    policy = files.load_policy_set([str(tmp_path)])
    assert policy.data["sidecar"] == {"mine": {"error_rat": 7}}
