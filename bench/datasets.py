"""Reproducible benchmark data sets: N files of S bytes of seeded pseudo-random content.

Every file's bytes depend only on the data set name and the file's index, so a data set made
twice (or on two machines) is byte-identical, and a file can be regenerated on its own. Random
content does not compress, so compression in any pipeline cannot flatter its figures. Files are
written in blocks, never held whole in memory (``huge`` is 4 GiB).

Usage::

    python -m bench.datasets large /tmp/bench-scratch/data/large
    python -m bench.datasets --list
    python -m bench.datasets custom DIR --files 3 --size 10MiB

Making a data set into a directory that already holds it only writes files that are missing or
have the wrong size.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import random
import re
import sys
import time
from pathlib import Path

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

WRITE_BLOCK = 4 * MIB
"""Bytes generated and written per step."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Shape of a data set.

    Attributes:
        name: Data set name; also the seed and the file name prefix.
        files: Number of files.
        size: Bytes per file.
        subdirs: Spread files over this many subdirectories (``0`` puts them all in the root).
    """

    name: str
    files: int
    size: int
    subdirs: int = 0

    @property
    def total_bytes(self) -> int:
        """Bytes in the whole data set."""
        return self.files * self.size

    def relative_path(self, index: int) -> Path:
        """Return the relative path of file number ``index``.

        Args:
            index: File index, ``0 <= index < files``.

        Returns:
            The path relative to the data set directory.
        """
        fname = f"{self.name}_{index:06d}.bin"
        if self.subdirs:
            return Path(f"d{index % self.subdirs:03d}") / fname
        return Path(fname)


PRESETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("large", 8, 64 * MIB),
        DatasetSpec("small2k", 2_000, 8 * KIB),
        DatasetSpec("small10k", 10_000, 8 * KIB),
        DatasetSpec("huge", 1, 4 * GIB),
        # Reduced sizes for development runs on a shared machine.
        DatasetSpec("large4x32m", 4, 32 * MIB),
        DatasetSpec("small500", 500, 8 * KIB),
        # Files in subdirectories, to check that relative paths survive the trip.
        DatasetSpec("nested", 60, 256 * KIB, subdirs=6),
    )
}
"""Named data sets. ``large``, ``small2k``, ``small10k`` and ``huge`` are the benchmark sizes."""


def _seed(name: str, index: int) -> int:
    """Return the generator seed of one file, derived from data set name and index."""
    digest = hashlib.sha256(f"msi-bench/{name}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def write_file(path: Path, size: int, seed: int) -> None:
    """Write ``size`` seeded pseudo-random bytes to ``path``, block by block.

    Args:
        path: File to (over)write; parent directories are created.
        size: Number of bytes.
        seed: Generator seed; equal seeds give equal bytes.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    tmp = path.with_name(path.name + ".part")
    with tmp.open("wb") as handle:
        left = size
        while left > 0:
            step = min(left, WRITE_BLOCK)
            handle.write(rng.randbytes(step))
            left -= step
    tmp.replace(path)


def make_dataset(spec: DatasetSpec, directory: Path, *, quiet: bool = True) -> list[Path]:
    """Create (or complete) a data set in ``directory``.

    Files that already exist with the right size are kept as they are.

    Args:
        spec: What to make.
        directory: Target directory; created if needed.
        quiet: Suppress progress output.

    Returns:
        Paths of all files of the data set.
    """
    directory.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    started = time.monotonic()
    written = 0
    for index in range(spec.files):
        path = directory / spec.relative_path(index)
        paths.append(path)
        if path.is_file() and path.stat().st_size == spec.size:
            continue
        write_file(path, spec.size, _seed(spec.name, index))
        written += 1
        if not quiet and (written % 500 == 0 or spec.size >= 64 * MIB):
            print(f"  {written} files written ({path.name})", file=sys.stderr)
    if not quiet:
        took = time.monotonic() - started
        print(
            f"{spec.name}: {spec.files} x {spec.size} B in {directory}"
            f" ({written} written, {took:.1f} s)",
            file=sys.stderr,
        )
    return paths


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMG]i?B?|B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse a byte size such as ``8192``, ``8KiB``, ``64MiB`` or ``4G`` (binary units).

    Args:
        text: The size.

    Returns:
        Bytes.

    Raises:
        ValueError: If the text is not a size.
    """
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r}")
    unit = (match.group(2) or "B")[0].upper()
    factor = {"B": 1, "K": KIB, "M": MIB, "G": GIB}[unit]
    return int(match.group(1)) * factor


def main(argv: list[str] | None = None) -> int:
    """Command line entry point.

    Args:
        argv: Arguments (``sys.argv[1:]`` when ``None``).

    Returns:
        Process exit code.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", nargs="?", help=f"preset ({', '.join(PRESETS)}) or 'custom'")
    parser.add_argument("directory", nargs="?", type=Path, help="where to write the files")
    parser.add_argument("--files", type=int, help="number of files (custom)")
    parser.add_argument("--size", type=parse_size, help="bytes per file, e.g. 8KiB (custom)")
    parser.add_argument("--subdirs", type=int, default=0, help="subdirectories (custom)")
    parser.add_argument("--list", action="store_true", help="list the presets and exit")
    args = parser.parse_args(argv)
    if args.list:
        for spec in PRESETS.values():
            print(f"{spec.name:12s} {spec.files:>6d} x {spec.size:>11d} B = {spec.total_bytes} B")
        return 0
    if not args.name or args.directory is None:
        parser.error("NAME and DIR are required")
    if args.name in PRESETS:
        spec = PRESETS[args.name]
    elif args.files and args.size is not None:
        spec = DatasetSpec(args.name, args.files, args.size, args.subdirs)
    else:
        parser.error(f"unknown preset {args.name!r}; give --files and --size for a custom set")
    make_dataset(spec, args.directory, quiet=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
