"""Which files an upload sends: the files named, and every file below a named folder.

Shared by ``msi-prefect upload`` and the ``upload-file`` flow, so both send the same files
under the same relative paths.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from msi_prefect.errors import MsiError
from msi_prefect.transfer.paths import UnsafePathError, relative_posix


def iter_upload_files(paths: list[Path], root: Path | None) -> Iterator[tuple[Path, str]]:
    """(file, relative POSIX path) for every file named or inside a named folder.

    Raises:
        MsiError: a path does not exist, or lies outside --root.
    """
    for path in paths:
        if not path.exists():
            raise MsiError(f"no such file or folder: {path}")
        base = root if root is not None else path.parent
        candidates = _files_below(path) if path.is_dir() else [path]
        for file in candidates:
            try:
                yield file, relative_posix(base, file)
            except (UnsafePathError, ValueError) as exc:
                raise MsiError(f"cannot send {file}: {exc}") from exc


def _files_below(folder: Path) -> list[Path]:
    """Regular files (or links to them) below ``folder``, sorted by path components.

    Like ``rglob("*")`` filtered by ``is_file()``, and so not entering linked folders, but
    from the directory entries' types: no ``stat`` per file.
    """
    found: list[str] = []
    folders = [os.fspath(folder)]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
                elif entry.is_file():
                    found.append(entry.path)
    found.sort(key=lambda name: name.split(os.sep))
    return [Path(name) for name in found]
