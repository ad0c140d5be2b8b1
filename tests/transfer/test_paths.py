"""Tests of path safety: untrusted relative paths and symlinks inside the destination."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import pytest

from msi_prefect.transfer.paths import (
    MAX_PATH_BYTES,
    MAX_SEGMENT_BYTES,
    PathProblem,
    UnsafePathError,
    relative_posix,
    resolve_inside,
    validate_relative_path,
)


@pytest.mark.parametrize(
    "raw",
    [
        "a.txt",
        "run 1/image 001.tif",
        "ünï/cödé.tif",
        "a;b.csv",
        'it\'s "q".txt',
        "deep/er/and/deeper/file",
        "CON",  # Windows device names are plain names on POSIX (documented)
        "nul.txt",
        "scan 12:30:00.h5",  # colons inside a segment are common in instrument names
        "trailing dot.",
        ".hidden",
        "..hidden",
        "...",
        "sub/.msi-state",  # reserved only as the first segment
        "x" * MAX_SEGMENT_BYTES,
    ],
)
def test_safe_paths_are_accepted_unchanged(raw: str) -> None:
    assert validate_relative_path(raw) == PurePosixPath(raw)
    assert validate_relative_path(raw).as_posix() == raw


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("", PathProblem.EMPTY),
        ("../x", PathProblem.PARENT_SEGMENT),
        ("a/../../x", PathProblem.PARENT_SEGMENT),
        ("a/..", PathProblem.PARENT_SEGMENT),
        ("..", PathProblem.PARENT_SEGMENT),
        ("/etc/passwd", PathProblem.ABSOLUTE),
        ("/", PathProblem.ABSOLUTE),
        ("C:\\x", PathProblem.DRIVE_LETTER),
        ("c:/x", PathProblem.DRIVE_LETTER),
        ("C:", PathProblem.DRIVE_LETTER),
        ("a/D:evil", PathProblem.DRIVE_LETTER),
        ("\\\\server\\share", PathProblem.UNC),
        ("//server/share", PathProblem.UNC),
        ("a\\b", PathProblem.BACKSLASH),
        ("..\\x", PathProblem.BACKSLASH),
        ("a\x00b", PathProblem.CONTROL_CHARACTER),
        ("line\nbreak.txt", PathProblem.CONTROL_CHARACTER),
        ("tab\there", PathProblem.CONTROL_CHARACTER),
        ("del\x7f", PathProblem.CONTROL_CHARACTER),
        ("./a", PathProblem.DOT_SEGMENT),
        ("a/.", PathProblem.DOT_SEGMENT),
        ("a//b", PathProblem.EMPTY_SEGMENT),
        ("a/", PathProblem.EMPTY_SEGMENT),
        (".msi-staging/x", PathProblem.RESERVED_NAME),
        (".msi-state", PathProblem.RESERVED_NAME),
        (".MSI-State/db", PathProblem.RESERVED_NAME),
        ("x" * (MAX_SEGMENT_BYTES + 1), PathProblem.SEGMENT_TOO_LONG),
        ("ü" * 128, PathProblem.SEGMENT_TOO_LONG),  # 128 chars but 256 UTF-8 bytes
        ("/".join(["d" * 200] * 21), PathProblem.TOO_LONG),
        ("é" * (MAX_PATH_BYTES // 2 + 1), PathProblem.TOO_LONG),
        ("bad\udcffsurrogate", PathProblem.NOT_UTF8),
    ],
)
def test_unsafe_paths_are_refused_with_a_reason(raw: str, problem: PathProblem) -> None:
    with pytest.raises(UnsafePathError) as info:
        validate_relative_path(raw)
    assert info.value.problem is problem
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith("Unsafe path ")


def test_error_message_truncates_huge_paths() -> None:
    with pytest.raises(UnsafePathError) as info:
        validate_relative_path("a" * 100_000)
    assert len(str(info.value)) < 400


# --- resolve_inside ---


def test_resolve_inside_joins_under_root(tmp_path: Path) -> None:
    rel = validate_relative_path("new/dir/file.bin")
    assert resolve_inside(tmp_path, rel) == tmp_path / "new" / "dir" / "file.bin"
    (tmp_path / "existing").mkdir()
    rel = validate_relative_path("existing/file.bin")
    assert resolve_inside(tmp_path, rel) == tmp_path / "existing" / "file.bin"


def test_symlinked_directory_pointing_outside_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "dest"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / "escape")
    with pytest.raises(UnsafePathError) as info:
        resolve_inside(root, validate_relative_path("escape/passwd"))
    assert info.value.problem is PathProblem.SYMLINK
    assert not (outside / "passwd").exists()


def test_symlinked_file_is_refused(tmp_path: Path) -> None:
    # Writing through a link to a file outside would overwrite that file.
    (tmp_path / "dest").mkdir()
    target = tmp_path / "victim.txt"
    target.write_text("keep me")
    os.symlink(target, tmp_path / "dest" / "data.txt")
    with pytest.raises(UnsafePathError) as info:
        resolve_inside(tmp_path / "dest", validate_relative_path("data.txt"))
    assert info.value.problem is PathProblem.SYMLINK


def test_symlink_pointing_inside_is_refused_too(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "alias")
    with pytest.raises(UnsafePathError):
        resolve_inside(tmp_path, validate_relative_path("alias/file"))


def test_dangling_symlink_is_refused(tmp_path: Path) -> None:
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    with pytest.raises(UnsafePathError):
        resolve_inside(tmp_path, validate_relative_path("dangling"))


def test_root_may_itself_be_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "real-root").mkdir()
    os.symlink(tmp_path / "real-root", tmp_path / "root-link")
    result = resolve_inside(tmp_path / "root-link", validate_relative_path("a/b.txt"))
    assert result == tmp_path / "root-link" / "a" / "b.txt"


@pytest.mark.parametrize("rel", [PurePosixPath("/etc/passwd"), PurePosixPath("../x")])
def test_resolve_inside_revalidates_hand_built_paths(tmp_path: Path, rel: PurePosixPath) -> None:
    with pytest.raises(UnsafePathError):
        resolve_inside(tmp_path, rel)


# --- relative_posix ---


def test_relative_posix_of_a_watched_file(tmp_path: Path) -> None:
    file = tmp_path / "run 1" / "ünï.tif"
    assert relative_posix(tmp_path, file) == "run 1/ünï.tif"
    assert relative_posix(tmp_path, tmp_path / "a;b.csv") == "a;b.csv"


def test_relative_posix_refuses_files_outside_the_root(tmp_path: Path) -> None:
    with pytest.raises(UnsafePathError) as info:
        relative_posix(tmp_path / "watched", tmp_path / "elsewhere" / "x.txt")
    assert info.value.problem is PathProblem.OUTSIDE_ROOT
    with pytest.raises(UnsafePathError) as info:
        relative_posix(tmp_path, tmp_path)
    assert info.value.problem is PathProblem.EMPTY


def test_relative_posix_refuses_names_consumers_would_refuse(tmp_path: Path) -> None:
    with pytest.raises(UnsafePathError) as info:
        relative_posix(tmp_path, tmp_path / "line\nbreak.txt")
    assert info.value.problem is PathProblem.CONTROL_CHARACTER
    with pytest.raises(UnsafePathError) as info:
        relative_posix(tmp_path, tmp_path / "back\\slash.txt")
    assert info.value.problem is PathProblem.BACKSLASH
