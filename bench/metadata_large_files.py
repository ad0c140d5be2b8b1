"""Metadata and preview of 4 GiB instrument files: peak memory and time (issue 16, item 5).

Makes three 4 GiB files of one uint16 stack (1024 frames of 2048 x 1024) whose middle
frame is half bright: a TIFF (written through tifffile's memory map), a NeXus/HDF5 file,
and a Gatan DM4 file (:mod:`bench.dm4_writer`). The TIFF and DM4 files are sparse: the
disk holds only what was written. Each step then runs in a fresh Python process, which
reports its wall time and peak RSS (``ru_maxrss``, interpreter and libraries included):

* **imports**: import the metadata package and its libraries, nothing else: the floor
  of the RSS figures;
* **headers**: ``extract_metadata(path, known_sha256=...)``, the extraction itself;
* **flow**: what the ``extract-metadata`` task does for a file unchanged since its event
  (:func:`~msi_prefect.prefect_layer.metadata_tasks.describe_rebuilt_file` with the
  event's time): checks size and change time, trusts the verified SHA-256, reads headers.
  Prefect and the task module are imported before the clock starts (a flow run has them
  loaded when its task starts), and their memory counts in the peak RSS;
* **flow, file touched**: the same task when the file cannot be shown unchanged (no event
  time, as in a manual run): it hashes every byte (SHA-256) and compares;
* **preview**: ``render_preview(path, out)``, the middle frame, strided.

Every step checks its result (the shape read, the SHA-256, no warnings), so a figure is
never that of a step that failed early.

Usage::

    .venv/bin/python -m bench.metadata_large_files [--dir /tmp] [--rounds 1] [--frames N]

Prints a Markdown table for bench/RESULTS.md. The files are deleted afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

FRAMES, ROWS, COLUMNS = 1024, 2048, 1024
BRIGHT = 1000
HASH_BLOCK = 8 * 1024 * 1024
TOPIC = "bench.raw"
#: The modules a flow run has loaded before its task starts (Prefect, the task module).
FLOW_IMPORTS = (
    "from datetime import datetime\n"
    "from msi_prefect.prefect_layer.flow_inputs import RebuiltFile\n"
    "from msi_prefect.prefect_layer import metadata_tasks as tasks\n"
)


@dataclass(frozen=True)
class Step:
    """What one step runs in its child process: untimed ``setup``, then the timed ``code``.

    Filled in: ``path``, ``out``, ``shape``, ``params`` (the rebuilt-file event's
    parameters) and ``announced_at`` (the event's time).
    """

    code: str
    setup: str = ""


STEPS: dict[str, Step] = {
    "imports": Step(
        "import msi_prefect.metadata, numpy, tifffile, h5py, PIL.Image, rsciio  # noqa\n"
    ),
    "headers": Step(
        "from msi_prefect.metadata import extract_metadata\n"
        "meta = extract_metadata({path!r}, known_sha256={params[sha256]!r})\n"
        "assert not meta.warnings, meta.warnings\n"
        "assert meta.normalized['shape'] == {shape!r}, meta.normalized['shape']\n"
    ),
    "flow": Step(
        "file = RebuiltFile.from_parameters(**{params!r})\n"
        "announced_at = datetime.fromisoformat({announced_at!r})\n"
        "assert tasks.unchanged_since_announced(file, announced_at)\n"
        "meta = tasks.describe_rebuilt_file(file, announced_at)\n"
        "assert not meta.warnings, meta.warnings\n"
        "assert meta.normalized['shape'] == {shape!r}, meta.normalized['shape']\n",
        setup=FLOW_IMPORTS,
    ),
    "flow, file touched": Step(
        "file = RebuiltFile.from_parameters(**{params!r})\n"
        "meta = tasks.describe_rebuilt_file(file, None)  # hashed: raises if it differs\n"
        "assert not meta.warnings, meta.warnings\n",
        setup=FLOW_IMPORTS,
    ),
    "preview": Step(
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
BYTES_PER_GIB = 1024**3


@dataclass(frozen=True)
class Measurement:
    """One step on one file in one child process."""

    seconds: float
    max_rss_mb: float


def make_tiff(path: Path, frames: int) -> None:
    """A stack whose middle frame is half bright (the rest is never written)."""
    import numpy as np
    import tifffile

    stack = tifffile.memmap(path, shape=(frames, ROWS, COLUMNS), dtype=np.uint16)
    stack[frames // 2, :, : COLUMNS // 2] = BRIGHT
    stack.flush()
    del stack


def make_nexus(path: Path, frames: int) -> None:
    """A NeXus file: NXentry/NXdata with the same stack as its default signal."""
    import h5py
    import numpy as np

    with h5py.File(path, "w") as h5:
        h5.attrs["default"] = "entry"
        entry = h5.create_group("entry")
        entry.attrs.update(NX_class="NXentry", default="data")
        data = entry.create_group("data")
        data.attrs.update(NX_class="NXdata", signal="frames", axes=["z", "y", "x"])
        stack = data.create_dataset("frames", shape=(frames, ROWS, COLUMNS), dtype=np.uint16)
        frame = np.zeros((ROWS, COLUMNS), dtype=np.uint16)
        frame[:, : COLUMNS // 2] = BRIGHT
        stack[frames // 2] = frame


def make_dm4(path: Path, frames: int) -> None:
    """A DigitalMicrograph 4 file of the same stack (a thumbnail and the stack)."""
    from bench.dm4_writer import StackSpec, write_dm4_stack

    write_dm4_stack(path, StackSpec(frames=frames, rows=ROWS, columns=COLUMNS, bright=BRIGHT))


def sha256_of(path: Path) -> str:
    """The file's SHA-256, as the reassembler verified it when it rebuilt the file."""
    digest = hashlib.sha256()
    buffer = bytearray(HASH_BLOCK)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(memoryview(buffer)[:n])
    return digest.hexdigest()


def event_parameters(path: Path) -> dict[str, object]:
    """The ``msi.file.reconstructed`` parameters of ``path`` (rebuilt into its folder)."""
    from msi_prefect.transfer import file_id_for

    return {
        "topic": TOPIC,
        "file_id": file_id_for(path.name),
        "generation": 1,
        "path": path.name,
        "url": path.as_uri(),
        "size": path.stat().st_size,
        "sha256": sha256_of(path),
    }


def measure(step: str, fields: dict[str, object]) -> Measurement:
    """Run ``step`` in a fresh interpreter; its time and peak RSS."""
    code = (
        STEPS[step].setup.format(**fields)
        + "import time\nstarted = time.perf_counter()\n"
        + STEPS[step].code.format(**fields)
        + REPORT
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"step {step!r} failed:\n{result.stderr[-3000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return Measurement(report["seconds"], report["max_rss_kib"] * BYTES_PER_KIB / BYTES_PER_MB)


def main() -> None:
    """Make the files, measure every step, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="where the 4 GiB files go")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--frames", type=int, default=FRAMES, help="frames (4 GiB: 1024)")
    args = parser.parse_args()
    makers = {"TIFF stack": make_tiff, "NeXus": make_nexus, "DM4 stack": make_dm4}
    suffixes = {"TIFF stack": "tif", "NeXus": "nxs", "DM4 stack": "dm4"}
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        print("| file | step | seconds (median) | peak RSS (MB, max) | on disk (MiB) |")
        print("| --- | --- | --- | --- | --- |")
        for label, make in makers.items():
            path = Path(folder) / f"stack.{suffixes[label]}"
            make(path, args.frames)
            params = event_parameters(path)
            # The event follows the rename into place, so it is later than the file's ctime.
            announced_at = datetime.now(UTC).isoformat()
            fields = {
                "path": str(path),
                "out": str(Path(folder) / "preview.png"),
                "shape": [args.frames, ROWS, COLUMNS],
                "params": params,
                "announced_at": announced_at,
            }
            size_gib = path.stat().st_size / BYTES_PER_GIB
            on_disk_mib = path.stat().st_blocks * 512 / 1024**2
            for step in STEPS:
                runs = [measure(step, fields) for _ in range(args.rounds)]
                seconds = statistics.median(run.seconds for run in runs)
                rss = max(run.max_rss_mb for run in runs)
                print(
                    f"| {label} ({size_gib:.1f} GiB) | {step} | {seconds:.2f} | {rss:.0f} "
                    f"| {on_disk_mib:.0f} |",
                    flush=True,
                )
            path.unlink()  # one 4 GiB file at a time


if __name__ == "__main__":
    main()
