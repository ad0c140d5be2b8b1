"""``msi-prefect inspect FILE... [--json] [--preview OUT.png]``: metadata without Prefect.

A lab checks what the system will record for its instrument's files before it deploys
anything: the same :func:`~msi_prefect.metadata.extract_metadata` the ``extract-metadata``
flow runs, and with ``--json`` the very bytes the flow publishes to ``<topic>.metadata``
(:meth:`~msi_prefect.metadata.FileMetadata.to_json_bytes`), one record per line. With
``--preview`` it also writes the picture the UI would show. No server, broker or Prefect
is needed; the metadata package is imported only when the command runs, so the other
subcommands start as fast as before.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

from msi_prefect.errors import MsiError

if TYPE_CHECKING:
    from msi_prefect.metadata import FileMetadata

EXIT_OK = 0
#: Width of the label column of the text summary (the longest label, "field of view").
LABEL_WIDTH = 14


class InspectError(MsiError):
    """A FILE or OUT argument that cannot be used; the message says why."""


def check_readable_file(path: Path) -> None:
    """Refuse a missing path, a directory, a non-regular file or one this user cannot read.

    Raises:
        InspectError: With a message that names the path and the problem.
    """
    if not path.exists():
        raise InspectError(f"{path}: no such file")
    if path.is_dir():
        raise InspectError(f"{path}: is a directory; name the files in it (e.g. {path}/*)")
    if not path.is_file():
        raise InspectError(f"{path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise InspectError(f"{path}: permission denied")


def check_preview_target(out: Path, files: list[Path]) -> None:
    """The preview goes to one PNG file in an existing folder, for one FILE.

    Raises:
        InspectError: Several FILEs, a target that is not ``.png``, a missing folder.
    """
    if len(files) != 1:
        raise InspectError(f"--preview writes one picture: name one FILE, not {len(files)}")
    if out.suffix.lower() != ".png":
        raise InspectError(f"--preview {out}: the picture is a PNG; name it *.png")
    if out.is_dir():
        raise InspectError(f"--preview {out}: is a directory")
    if not out.parent.is_dir():
        raise InspectError(f"--preview {out}: folder {out.parent} does not exist")


def reported_path(path: Path) -> str:
    """The relative path the record names: as typed when relative, else the file name.

    The flow reports a file's path relative to the destination folder; a path typed
    relative to where ``inspect`` runs is the closest equivalent.
    """
    if path.is_absolute() or ".." in PurePath(path).parts:
        return path.name
    return path.as_posix()


def describe(meta: FileMetadata) -> str:
    """A plain-text summary for a terminal: the generic facts, the normalised facts, notes."""
    from msi_prefect.metadata.rendering import human_size, normalized_rows

    rows = [
        ("size", f"{human_size(meta.size)} ({meta.size:,} bytes)"),
        ("type", meta.mime_type),
        ("sha256", meta.sha256),
        ("extractor", f"{meta.extractor} {meta.extractor_version}"),
        *((label.lower(), value) for label, value in normalized_rows(meta.normalized)),
        *(("warning", warning) for warning in meta.warnings),
    ]
    body = [f"  {label:<{LABEL_WIDTH}} {value}" for label, value in rows]
    return "\n".join([meta.relpath, *body])


def _inspect(args: argparse.Namespace) -> int:
    files: list[Path] = args.files
    for path in files:
        check_readable_file(path)
    if args.preview is not None:
        check_preview_target(args.preview, files)

    from msi_prefect.metadata import extract_metadata

    for index, path in enumerate(files):
        try:
            meta = extract_metadata(path, reported_path(path))
        except (OSError, ValueError) as exc:
            raise InspectError(f"{path}: cannot read: {exc}") from exc
        if args.json:
            sys.stdout.buffer.write(meta.to_json_bytes() + b"\n")
            sys.stdout.flush()
        else:
            print(("\n" if index else "") + describe(meta))
    if args.preview is not None:
        write_preview(files[0], args.preview, quiet=args.json)
    return EXIT_OK


def write_preview(path: Path, out: Path, *, quiet: bool) -> None:
    """Render the preview of ``path`` to ``out``; say where it went unless ``quiet``.

    Raises:
        InspectError: The file has nothing to show, or ``out`` cannot be written.
    """
    from msi_prefect.metadata.preview import PreviewError, render_preview

    try:
        preview = render_preview(path, out)
    except PreviewError as exc:
        raise InspectError(f"{path}: no preview: {exc}") from exc
    except OSError as exc:
        raise InspectError(f"--preview {out}: cannot write: {exc}") from exc
    if not quiet:  # --json keeps stdout to the records alone
        print(f"\npreview: {out} ({preview.kind}, {preview.width} x {preview.height} px)")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``inspect`` to the CLI."""
    parser = subparsers.add_parser(
        "inspect",
        help="show the metadata the system would record for files (no Prefect needed)",
        description="Extract the metadata of each FILE as the extract-metadata flow does, "
        "without Prefect, a broker or a server: the instrument, acquisition time, shape, "
        "pixel size, beam energy ... and the format's own metadata.",
    )
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE", help="files to inspect")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print each file's record exactly as the metadata topic receives it, one JSON "
        "object per line",
    )
    parser.add_argument(
        "--preview",
        type=Path,
        metavar="OUT.png",
        help="also write a preview picture of the (one) FILE to OUT.png",
    )
    parser.set_defaults(handler=_inspect)
