"""Path safety for relative paths that arrive from untrusted messages.

A consumer writes each rebuilt file at ``destination / relpath`` where ``relpath`` comes from
a Kafka header anybody with produce rights can set. :func:`validate_relative_path` accepts
only plain relative POSIX paths, and :func:`resolve_inside` makes sure the joined path cannot
leave the destination through a symlink.

Deliberately allowed (documented so nobody "fixes" them by accident):

* Windows reserved device names (``CON``, ``NUL``, ``COM1`` ...) and segments ending in a dot
  or space: they are ordinary names on POSIX, where the consumers run. A Windows consumer
  would need an extra check of its own.
* Colons inside a segment (``run 12:30:00.h5``): common in instrument file names. Only a
  segment that *starts* like a drive (``C:``) is refused, because Windows would treat it as
  a new root.
* Any Unicode, kept exactly as sent: no normalisation, so the file id computed from the
  path is the one the producer computed.
"""

from __future__ import annotations

import enum
import functools
import os
import re
import stat
from pathlib import Path, PurePosixPath

from msi_prefect.errors import TransferError
from msi_prefect.transfer.layout import RESERVED_TOP_LEVEL_NAMES

#: Longest accepted path, in UTF-8 bytes (Linux ``PATH_MAX``).
MAX_PATH_BYTES = 4096
#: Longest accepted path segment, in UTF-8 bytes (``NAME_MAX`` on common filesystems).
MAX_SEGMENT_BYTES = 255
# Paths whose validation is remembered: a file's path is checked by the decoder and again by
# resolve_inside when it is delivered. At most 1024 x MAX_PATH_BYTES = 4 MiB; refusals are
# never cached.
_VALIDATED_PATHS_CACHED = 1024

# C0 controls and DEL: they break terminals, logs and some filesystems.
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
# "C:" at the start of a segment makes Windows treat the rest as a drive path.
_DRIVE_PREFIX = re.compile(r"^[A-Za-z]:")


class PathProblem(enum.StrEnum):
    """Why a relative path was refused."""

    EMPTY = "empty"
    NOT_UTF8 = "not-utf8"
    TOO_LONG = "too-long"
    SEGMENT_TOO_LONG = "segment-too-long"
    CONTROL_CHARACTER = "control-character"
    BACKSLASH = "backslash"
    UNC = "unc"
    ABSOLUTE = "absolute"
    DRIVE_LETTER = "drive-letter"
    EMPTY_SEGMENT = "empty-segment"
    DOT_SEGMENT = "dot-segment"
    PARENT_SEGMENT = "parent-segment"
    RESERVED_NAME = "reserved-name"
    SYMLINK = "symlink"
    OUTSIDE_ROOT = "outside-root"


class UnsafePathError(TransferError, ValueError):
    """A relative path that must not be used to write inside a destination directory.

    Attributes:
        path: The offending path, as received (may be truncated for display).
        problem: Machine-readable reason.
        detail: Human explanation.
    """

    def __init__(self, path: str, problem: PathProblem, detail: str) -> None:
        self.path = path
        self.problem = problem
        self.detail = detail
        shown = path if len(path) <= 200 else path[:200] + "..."
        super().__init__(f"Unsafe path {shown!r}: {detail}.")


def validate_relative_path(raw: str) -> PurePosixPath:
    """Check an untrusted relative POSIX path and return it as a ``PurePosixPath``.

    See :func:`check_relative_path` for the rules.

    Raises:
        UnsafePathError: If the path is unsafe.
    """
    return PurePosixPath(check_relative_path(raw))


@functools.lru_cache(maxsize=_VALIDATED_PATHS_CACHED)
def check_relative_path(raw: str) -> str:
    """Check an untrusted relative POSIX path; return it unchanged.

    The raw string is checked, not a normalised form: ``PurePosixPath`` silently turns
    ``a//b`` into ``a/b`` and ``./a`` into ``a``, and such spellings are refused so that one
    file has exactly one accepted name.

    Args:
        raw: The path as it arrived, with ``/`` separators.

    Returns:
        ``raw`` (no ``PurePosixPath`` is built: this runs for every file received).

    Raises:
        UnsafePathError: If the path is empty, too long, absolute, contains ``..``, ``.`` or
            empty segments, control characters, backslashes, a drive prefix, or starts with
            one of our reserved state directory names.
    """
    if not raw:
        raise UnsafePathError(raw, PathProblem.EMPTY, "the path is empty")
    # Cheap length guard before any per-character work on a possibly huge string.
    if len(raw) > MAX_PATH_BYTES:
        raise UnsafePathError(
            raw, PathProblem.TOO_LONG, f"the path is longer than {MAX_PATH_BYTES} bytes"
        )
    try:
        encoded = raw.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePathError(
            raw, PathProblem.NOT_UTF8, "the path cannot be encoded as UTF-8"
        ) from None
    if len(encoded) > MAX_PATH_BYTES:
        raise UnsafePathError(
            raw, PathProblem.TOO_LONG, f"the path is longer than {MAX_PATH_BYTES} bytes"
        )
    if _CONTROL_CHARS.search(raw):
        raise UnsafePathError(
            raw, PathProblem.CONTROL_CHARACTER, "the path contains a control character or NUL"
        )
    if raw.startswith(("//", "\\\\")):
        raise UnsafePathError(raw, PathProblem.UNC, "the path looks like a network (UNC) path")
    if _DRIVE_PREFIX.match(raw):
        raise UnsafePathError(
            raw, PathProblem.DRIVE_LETTER, "the path starts with a Windows drive letter"
        )
    if "\\" in raw:
        raise UnsafePathError(
            raw, PathProblem.BACKSLASH, "the path contains a backslash; use '/' separators"
        )
    if raw.startswith("/"):
        raise UnsafePathError(raw, PathProblem.ABSOLUTE, "the path is absolute")

    segments = raw.split("/")
    for segment in segments:
        _check_segment(raw, segment)
    if segments[0].casefold() in RESERVED_TOP_LEVEL_NAMES:
        # casefold: on case-insensitive filesystems ".MSI-STATE" is the same directory.
        raise UnsafePathError(
            raw,
            PathProblem.RESERVED_NAME,
            f"the first segment {segments[0]!r} is reserved for msi_prefect's own state",
        )
    return raw


def _check_segment(raw: str, segment: str) -> None:
    """Refuse one path segment that is empty, ``.``, ``..``, drive-like or too long."""
    if segment == "":
        raise UnsafePathError(
            raw, PathProblem.EMPTY_SEGMENT, "the path has an empty segment ('//' or trailing '/')"
        )
    if segment == ".":
        raise UnsafePathError(raw, PathProblem.DOT_SEGMENT, "the path has a '.' segment")
    if segment == "..":
        raise UnsafePathError(raw, PathProblem.PARENT_SEGMENT, "the path has a '..' segment")
    if _DRIVE_PREFIX.match(segment):
        raise UnsafePathError(
            raw, PathProblem.DRIVE_LETTER, f"the segment {segment!r} starts like a drive letter"
        )
    if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
        raise UnsafePathError(
            raw,
            PathProblem.SEGMENT_TOO_LONG,
            f"a segment is longer than {MAX_SEGMENT_BYTES} bytes",
        )


def resolve_inside(root: Path, rel: PurePosixPath) -> Path:
    """Join a validated relative path to a destination root, refusing symlinks on the way.

    Every component that already exists below ``root`` is checked with ``lstat``; any
    symlink is refused, wherever it points (the simplest rule that cannot be tricked by
    chains of links). Components that do not exist yet are fine: the caller creates them.
    With no ``.``/``..`` segments and no symlink below ``root``, the result cannot resolve
    outside ``root``.
    ``root`` itself may be a symlink (e.g. ``/data -> /mnt/data``).

    The check is only as fresh as the moment it runs: callers creating files should do so
    right after, below a root nobody hostile can write to.

    Args:
        root: Destination directory.
        rel: A relative path, normally from :func:`validate_relative_path` (validated again
            here, so a hand-built ``PurePosixPath('/etc')`` cannot slip through).

    Returns:
        ``root`` joined with ``rel``.

    Raises:
        UnsafePathError: If ``rel`` is unsafe, a component below ``root`` is a symlink, or
            the result resolves outside ``root``.
    """
    raw = check_relative_path(rel.as_posix())
    # Plain strings, not Path objects: this runs for every delivered file. lstat() of
    # root/a follows a symlinked root and looks at "a" itself, which is the rule above.
    parts = raw.split("/")  # validated: no empty, '.' or '..' segments
    current = os.fspath(root)
    for depth, part in enumerate(parts, start=1):
        current = os.path.join(current, part)
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            break  # nothing below a missing component can be a symlink yet
        if stat.S_ISLNK(mode):
            inside = "/".join(parts[:depth])
            raise UnsafePathError(
                raw, PathProblem.SYMLINK, f"{inside!r} inside the destination is a symlink"
            )
    # No realpath() of the result is needed: the path has no '.' or '..' segments and no
    # existing component below the root is a symlink, so it cannot resolve elsewhere.
    return Path(os.path.join(root, raw))


def relative_posix(root: Path, file: Path) -> str:
    """Return the relative POSIX path of a file below a watched directory.

    Used on the producer side. The result is validated with :func:`validate_relative_path`
    so the producer never sends a path that consumers would refuse (for example a POSIX
    file name containing a backslash or a newline).

    Args:
        root: The watched directory.
        file: A file below ``root``.

    Returns:
        The path of ``file`` relative to ``root``, with ``/`` separators.

    Raises:
        UnsafePathError: If ``file`` is not below ``root`` or its relative path is unsafe.
    """
    # Strings, not Path.relative_to: an upload of many small files calls this for each.
    root_abs = os.path.abspath(root)
    file_abs = os.path.abspath(file)
    if file_abs == root_abs:
        raise UnsafePathError(str(file), PathProblem.EMPTY, "the file is the watched directory")
    prefix = root_abs if root_abs.endswith(os.sep) else root_abs + os.sep
    if not file_abs.startswith(prefix):
        raise UnsafePathError(
            str(file), PathProblem.OUTSIDE_ROOT, f"the file is not below {str(root)!r}"
        )
    posix = file_abs[len(prefix) :].replace(os.sep, "/")
    return check_relative_path(posix)
