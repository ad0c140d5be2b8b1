"""Include/exclude rules of the directory watcher: globs, full-match regexes, defaults."""

from __future__ import annotations

import fnmatch

import pytest
from hypothesis import given
from hypothesis import strategies as st

from msi_prefect.transfer.filters import (
    DEFAULT_EXCLUDES,
    FileFilter,
    FilterRule,
    glob_to_regex,
)

# The paths OpenMSIStream's "…log" regex got wrong, plus real log files.
TRICKY = ("catalog.csv", "sample_login.dat", "dir/log/x.txt", "a.log", "dir/a.log", "logbook.txt")


@pytest.mark.parametrize(
    ("rules", "excluded"),
    [
        # A name pattern looks at the file name only, at any depth.
        (FileFilter(exclude=("*.log",)), {"a.log", "dir/a.log"}),
        # "log*" is about names starting with "log": not directories called log.
        (FileFilter(exclude=("log*",)), {"logbook.txt"}),
        # Full match: ".*" spans directories, but nothing matches a mere "log" inside a name.
        (FileFilter(exclude_regex=(r".*\.log",)), {"a.log", "dir/a.log"}),
        (FileFilter(exclude_regex=("log",)), set()),
        # What "everything under a directory called log" is spelled like.
        (FileFilter(exclude=("**/log/**",)), {"dir/log/x.txt"}),
    ],
)
def test_log_like_names_are_only_excluded_when_the_pattern_says_so(
    rules: FileFilter, excluded: set[str]
) -> None:
    assert {path for path in TRICKY if not rules.matches(path)} == excluded


def test_full_match_regex_never_matches_a_substring() -> None:
    rules = FileFilter(exclude_regex=("log",))
    assert rules.matches("catalog.csv")
    assert rules.matches("dir/log")  # fullmatch against the whole relative path
    assert not rules.matches("log")
    assert FileFilter(exclude_regex=(".*log.*",)).matches("catalog.csv") is False


def test_include_name_pattern_matches_at_any_depth() -> None:
    rules = FileFilter(include=("*.csv",))
    assert rules.matches("catalog.csv")
    assert rules.matches("run-1/sub/catalog.csv")
    assert not rules.matches("sample_login.dat")
    assert not rules.matches("catalog.csv.bak")
    assert rules.decide("sample_login.dat").rule is FilterRule.NO_INCLUDE_MATCH


@pytest.mark.parametrize(
    ("pattern", "hits", "misses"),
    [
        ("raw/*.tif", ["raw/a.tif"], ["a.tif", "x/raw/a.tif", "raw/sub/a.tif"]),
        ("/a.txt", ["a.txt"], ["sub/a.txt"]),
        ("a/**/b.txt", ["a/b.txt", "a/x/b.txt", "a/x/y/b.txt"], ["b.txt", "xa/b.txt", "a/b.txt.1"]),
        ("data/**", ["data/x", "data/x/y.h5"], ["data", "xdata/y", "sub/data/y"]),
        ("**/LOGS/**", ["LOGS/a", "x/y/LOGS/a/b"], ["LOGS", "xLOGS/a", "LOGSx/a"]),
        ("**/*.csv", ["a.csv", "x/a.csv", "x/y/a.csv"], ["a.csv/x", "a.csvx"]),
        ("sub/*", ["sub/a", "sub/.hidden"], ["sub/a/b", "sub"]),
        ("?.dat", ["a.dat", "x/b.dat"], ["ab.dat", ".dat"]),
    ],
)
def test_glob_semantics(pattern: str, hits: list[str], misses: list[str]) -> None:
    rules = FileFilter(include=(pattern,), use_default_excludes=False)
    assert [path for path in hits if not rules.matches(path)] == []
    assert [path for path in misses if rules.matches(path)] == []


def test_star_and_classes_never_cross_a_slash() -> None:
    assert not FileFilter(include=("d/x*y",)).matches("d/x/y")
    assert not FileFilter(include=("d/x[!a]y",)).matches("d/x/y")
    # "+-0" is a range that contains "/" (0x2F): still not allowed to match it.
    ranged = FileFilter(include=("d/a[+-0]b",))
    assert ranged.matches("d/a.b")
    assert not ranged.matches("d/a/b")


def test_character_classes_and_literal_metacharacters() -> None:
    assert FileFilter(include=("[ab].txt",)).matches("b.txt")
    assert not FileFilter(include=("[ab].txt",)).matches("c.txt")
    assert FileFilter(include=("[!ab].txt",)).matches("c.txt")
    assert FileFilter(include=("[^ab].txt",)).matches("c.txt")
    assert not FileFilter(include=("[!ab].txt",)).matches("a.txt")
    assert FileFilter(include=("frame[[]1].tif",)).matches("frame[1].tif")
    assert FileFilter(include=("what[?].txt",)).matches("what?.txt")
    assert not FileFilter(include=("what[?].txt",)).matches("whatX.txt")
    assert FileFilter(include=("[]]x",)).matches("]x")
    # Regex-special characters in a glob are literal.
    assert FileFilter(include=("a+(b).txt",)).matches("a+(b).txt")
    assert not FileFilter(include=("a.txt",)).matches("abtxt")


def test_matching_is_case_sensitive_and_star_matches_dotfiles() -> None:
    assert not FileFilter(include=("*.CSV",)).matches("a.csv")
    assert FileFilter(include=("*",), use_default_excludes=False).matches(".hidden")


def test_exclude_wins_over_include() -> None:
    rules = FileFilter(include=("*.csv",), exclude=("secret*",), include_regex=(r"keep/.*",))
    assert rules.matches("data.csv")
    assert rules.matches("keep/secret-notes.txt") is False
    assert not rules.matches("secret.csv")
    decision = rules.decide("secret.csv")
    assert (decision.rule, decision.pattern) == (FilterRule.EXCLUDE_GLOB, "secret*")
    assert not decision.included


def test_include_globs_and_regexes_are_a_union() -> None:
    rules = FileFilter(include=("*.csv",), include_regex=(r"raw/\d+\.bin",))
    assert rules.matches("x/a.csv")
    assert rules.matches("raw/0042.bin")
    assert not rules.matches("raw/x.bin")
    assert rules.decide("raw/0042.bin").rule is FilterRule.INCLUDE_REGEX


def test_empty_include_means_everything() -> None:
    rules = FileFilter()
    assert rules.includes_everything
    assert rules.matches("any/thing.at.all")
    assert rules.decide("x").rule is FilterRule.INCLUDE_ALL


def test_default_excludes_constant_lists_our_state_and_temp_files() -> None:
    assert isinstance(DEFAULT_EXCLUDES, tuple)
    for name in (".msi-staging", ".msi-state", "*.tmp", "*.part", "~$*", ".~lock.*#", "*.swp"):
        assert name in DEFAULT_EXCLUDES


@pytest.mark.parametrize(
    "path",
    [
        ".msi-staging/part-0001",
        ".msi-state/registry.sqlite",
        "sub/.msi-state/x",
        ".msi-state",
        "copy.tmp",
        "dir/upload.part",
        "~$report.docx",
        ".~lock.table.ods#",
        ".notes.txt.swp",
    ],
)
def test_default_excludes_apply_and_can_be_turned_off(path: str) -> None:
    rules = FileFilter()
    assert not rules.matches(path)
    assert rules.decide(path).rule is FilterRule.DEFAULT_EXCLUDE
    assert "use_default_excludes=False" in rules.explain(path)
    assert FileFilter(use_default_excludes=False).matches(path)


def test_default_excludes_do_not_catch_similar_names() -> None:
    rules = FileFilter()
    for path in ("tmp.dat", "a.tmp.dat", "msi-state/x", "x.partial", "a~$b", ".~lock.x"):
        assert rules.matches(path), path


def test_explain_names_verdict_rule_and_pattern() -> None:
    rules = FileFilter(include=("*.csv",), exclude_regex=(r".*/private/.*",))
    assert rules.explain("a.csv") == (
        "included: 'a.csv' matches include glob '*.csv' and no exclude rule"
    )
    assert rules.explain("x/private/a.csv").startswith("excluded: 'x/private/a.csv' fully matches")
    assert "'.*/private/.*'" in rules.explain("x/private/a.csv")
    assert rules.explain("a.dat") == (
        "excluded: 'a.dat' matches none of the include globs or regexes"
    )


@pytest.mark.parametrize(
    ("field_name", "pattern", "message"),
    [
        ("include_regex", "x(", "invalid include_regex regex 'x('"),
        ("exclude_regex", "[a", "invalid exclude_regex regex '[a'"),
        ("exclude_regex", "", "empty pattern"),
        ("include", "**.csv", "'**' must be a whole path segment"),
        ("include", "data/", "trailing '/'"),
        ("exclude", "[ab", "unclosed '['"),
        ("exclude", r"raw\*.csv", "backslash is not allowed"),
        ("exclude", "a//b", "segment"),
        ("exclude", "a/../b", "segment"),
        ("exclude", "", "empty pattern"),
        ("exclude", "[z-a]", "bad character range"),
    ],
)
def test_invalid_patterns_fail_at_construction(field_name: str, pattern: str, message: str) -> None:
    with pytest.raises(ValueError, match="invalid") as info:
        FileFilter(**{field_name: (pattern,)})  # type: ignore[arg-type]
    assert message in str(info.value)


def test_a_single_string_is_refused_not_split_into_characters() -> None:
    with pytest.raises(TypeError, match="tuple of patterns"):
        FileFilter(include="*.csv")  # type: ignore[arg-type]


def test_lists_are_frozen_into_tuples() -> None:
    rules = FileFilter(include=["*.csv"])  # type: ignore[arg-type]
    assert rules.include == ("*.csv",)
    assert hash(rules) == hash(FileFilter(include=("*.csv",)))
    assert rules == FileFilter(include=("*.csv",))


def test_relpath_must_be_relative_and_non_empty() -> None:
    with pytest.raises(ValueError, match="relative"):
        FileFilter().matches("/etc/passwd")
    with pytest.raises(ValueError, match="empty"):
        FileFilter().explain("")


def test_glob_to_regex_is_exposed_for_docs_and_debugging() -> None:
    assert glob_to_regex("a/**/b.txt") == r"a/(?:[^/]+/)*b\.txt"


_NAME_CHARS = st.sampled_from(list("ab.xy-_*?"))
_NAMES = st.text(alphabet=st.sampled_from(list("ab.xy-_")), min_size=1, max_size=8)


@given(
    pattern=st.text(alphabet=_NAME_CHARS, min_size=1, max_size=6).filter(lambda p: "**" not in p),
    dirs=st.lists(_NAMES, max_size=3),
    name=_NAMES,
)
def test_name_patterns_agree_with_fnmatch_on_the_file_name(
    pattern: str, dirs: list[str], name: str
) -> None:
    path = "/".join([*dirs, name])
    rules = FileFilter(include=(pattern,), use_default_excludes=False)
    assert rules.matches(path) == fnmatch.fnmatchcase(name, pattern)


_PATTERNS = st.sampled_from(
    ["*.log", "log*", "**/log/**", "a/*", "*", "?.x", "[ab]*", "*.tmp", "b/**/x"]
)
_REGEXES = st.sampled_from([r".*\.log", "log", r"a/.*", r"(x|y)/\1", r"(?i).*LOG"])


@given(
    include=st.lists(_PATTERNS, max_size=2),
    exclude=st.lists(_PATTERNS, max_size=2),
    include_regex=st.lists(_REGEXES, max_size=2),
    exclude_regex=st.lists(_REGEXES, max_size=2),
    defaults=st.booleans(),
    parts=st.lists(st.sampled_from(["a", "b", "log", "x", "y", "c.log", "z.tmp"]), min_size=1),
)
def test_fast_match_agrees_with_explained_decision(
    include: list[str],
    exclude: list[str],
    include_regex: list[str],
    exclude_regex: list[str],
    defaults: bool,
    parts: list[str],
) -> None:
    rules = FileFilter(
        include=tuple(include),
        exclude=tuple(exclude),
        include_regex=tuple(include_regex),
        exclude_regex=tuple(exclude_regex),
        use_default_excludes=defaults,
    )
    path = "/".join(parts)
    assert rules.matches(path) == rules.decide(path).included
