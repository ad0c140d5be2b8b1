"""Metadata and preview of 4 GiB instrument files: peak memory and time (issue 16, item 5).

Makes a 4 GiB uint16 TIFF stack (1024 frames of 2048 x 1024, written through tifffile's
memory map, so the disk holds only what was written) and a 4 GiB NeXus/HDF5 file of the
same shape, then runs each step in a fresh Python process and reports its wall time and
peak RSS (``ru_maxrss``, which includes the interpreter and the libraries):

* **headers**: ``extract_metadata(path, known_sha256=...)``, what the extraction itself
  costs (the rebuilt file's hash is already known);
* **flow**: ``extract_metadata(path)`` as the ``extract-metadata`` flow calls it today,
  SHA-256 and MD5 of every byte included;
* **preview**: ``render_preview(path, out)``, the middle frame, strided;
* **imports**: the same process doing nothing but import the metadata package and its
  libraries, the floor of the RSS figures.

Usage::

    .venv/bin/python -m bench.metadata_large_files [--dir /tmp] [--rounds 1]

Prints a Markdown table for bench/RESULTS.md. The files are deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

FRAMES, ROWS, COLUMNS = 1024, 2048, 1024
BRIGHT = 1000
#: What each step runs in its child process; ``{path}`` and ``{out}`` are filled in.
STEPS: dict[str, str] = {
    "imports": ("import msi_prefect.metadata, numpy, tifffile, h5py, PIL.Image, rsciio  # noqa\n"),
    "headers": (
        "from msi_prefect.metadata import extract_metadata\n"
        "meta = extract_metadata({path!r}, known_sha256='0' * 64)\n"
        "assert not meta.warnings, meta.warnings\n"
    ),
    "flow": (
        "from msi_prefect.metadata import extract_metadata\n"
        "meta = extract_metadata({path!r})\n"
        "assert not meta.warnings, meta.warnings\n"
    ),
    "preview": (
        "from msi_prefect.metadata.preview import render_preview\n"
        "render_preview({path!r}, {out!r})\n"
    ),
}
REPORT = (
    "import json, resource, time\n"
    "print(json.dumps({'seconds': time.perf_counter() - started,\n"
    "    'max_rss_kib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))\n"
)
BYTES_PER_KIB = 1024  # ru_maxrss is in KiB on Linux
BYTES_PER_MB = 10**6


@dataclass(frozen=True)
class Measurement:
    """One step on one file in one child process."""

    seconds: float
    max_rss_mb: float


def make_tiff(path: Path) -> None:
    """A 4 GiB stack whose middle frame is half bright (the rest is never written)."""
    import numpy as np
    import tifffile

    stack = tifffile.memmap(path, shape=(FRAMES, ROWS, COLUMNS), dtype=np.uint16)
    stack[FRAMES // 2, :, : COLUMNS // 2] = BRIGHT
    stack.flush()
    del stack


def make_nexus(path: Path) -> None:
    """A 4 GiB NeXus file: NXentry/NXdata with the same stack as its default signal."""
    import h5py
    import numpy as np

    with h5py.File(path, "w") as h5:
        h5.attrs["default"] = "entry"
        entry = h5.create_group("entry")
        entry.attrs.update(NX_class="NXentry", default="data")
        data = entry.create_group("data")
        data.attrs.update(NX_class="NXdata", signal="frames", axes=["z", "y", "x"])
        frames = data.create_dataset("frames", shape=(FRAMES, ROWS, COLUMNS), dtype=np.uint16)
        frame = np.zeros((ROWS, COLUMNS), dtype=np.uint16)
        frame[:, : COLUMNS // 2] = BRIGHT
        frames[FRAMES // 2] = frame


def measure(step: str, path: Path, out: Path) -> Measurement:
    """Run ``step`` on ``path`` in a fresh interpreter; its time and peak RSS."""
    code = (
        "import time\nstarted = time.perf_counter()\n"
        + STEPS[step].format(path=str(path), out=str(out))
        + REPORT
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return Measurement(report["seconds"], report["max_rss_kib"] * BYTES_PER_KIB / BYTES_PER_MB)


def main() -> None:
    """Make the files, measure every step, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="where the 4 GiB files go")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        files = {"TIFF stack": Path(folder) / "stack.tif", "NeXus": Path(folder) / "stack.nxs"}
        make_tiff(files["TIFF stack"])
        make_nexus(files["NeXus"])
        print("| file | step | seconds (median) | peak RSS (MB, max) |")
        print("| --- | --- | --- | --- |")
        for label, path in files.items():
            size_gib = path.stat().st_size / 1024**3
            for step in STEPS:
                runs = [
                    measure(step, path, Path(folder) / "preview.png") for _ in range(args.rounds)
                ]
                seconds = statistics.median(run.seconds for run in runs)
                rss = max(run.max_rss_mb for run in runs)
                print(f"| {label} ({size_gib:.1f} GiB) | {step} | {seconds:.2f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
