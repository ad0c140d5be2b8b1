"""Side-by-side benchmark: msi_prefect, a raw confluent-kafka pipeline and OpenMSIStream 1.8.

All three run in one invocation, on the same data sets and the same Tansu broker (memory
storage, 127.0.0.1 only), interleaved round by round so that machine noise hits each
alike. Each figure is the median of the rounds; ratios are of medians. Every run is
verified byte-for-byte (SHA-256) against the source.

OpenMSIStream needs its own virtualenv (its pins clash with ours); the harness creates it
at bench/.venv-openmsistream on first use (`pip install openmsistream`), or uses
$MSI_BENCH_OMSI_PYTHON.

Usage::

    .venv/bin/python -m bench.compare --sets small2k large --rounds 3
    .venv/bin/python -m bench.compare --sets large --pipelines msi --chunk-sizes 262144 1048576
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import BENCH_DIR, BenchResult, MemoryBroker, unique_suffix
from bench.datasets import PRESETS, make_dataset
from bench.msi_runner import run_msi
from bench.openmsistream_baseline import OMSI_PYTHON_ENV, PipelineStalled, run_openmsistream
from bench.openmsistream_venv import ensure_openmsistream_python
from bench.raw_pipeline import run_raw

Runner = Callable[..., BenchResult]
PIPELINES: dict[str, Runner] = {
    "msi": run_msi,
    "raw": run_raw,
    "omsi": run_openmsistream,
}


def ensure_openmsistream() -> None:
    """Point $MSI_BENCH_OMSI_PYTHON at an interpreter with openmsistream, creating one."""
    os.environ[OMSI_PYTHON_ENV] = str(ensure_openmsistream_python())


def run_round(
    pipeline: str, bootstrap: str, src: Path, destinations: Path, **options: Any
) -> BenchResult:
    """One verified run of one pipeline into a fresh destination under ``destinations``.

    The destination is kept: the caller removes them all after the data set's last round.
    Removing thousands of files just before a round slows that round's file creation down
    (ext4 passes over recently freed inodes when it allocates new ones).
    """
    dst = destinations / f"dst-{pipeline}-{unique_suffix()}"
    topic = f"bench-{pipeline}-{unique_suffix()}"
    return PIPELINES[pipeline](bootstrap, src, dst, topic, **options)


def median_of(results: list[BenchResult], field: str) -> float:
    """Median of one numeric field over rounds."""
    return float(statistics.median(getattr(r, field) for r in results))


def markdown_table(
    data_set: str,
    by_pipeline: dict[str, list[BenchResult]],
    stalled: dict[str, int] | None = None,
) -> str:
    """A results table: medians per pipeline and the ratios of msi to the others.

    Args:
        data_set: Name of the data set.
        by_pipeline: The verified rounds of each series.
        stalled: Rounds per series that stalled (not in the medians).
    """
    stalled = stalled or {}
    lines = [
        f"### {data_set}",
        "",
        "| pipeline | rounds | median s | MB/s | files/s | peak RSS MB (send + receive) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, results in by_pipeline.items():
        failed = f" (+{stalled[label]} stalled)" if stalled.get(label) else ""
        if not results:
            lines.append(f"| {label} | 0{failed} | n/a | n/a | n/a | n/a |")
            continue
        rss = statistics.median(r.peak_rss_mb or 0 for r in results)
        shown = results[0].name if label in PIPELINES else label
        lines.append(
            f"| {shown} | {len(results)}{failed} | {median_of(results, 'seconds'):.2f} | "
            f"{median_of(results, 'mb_per_s'):.1f} | {median_of(results, 'files_per_s'):.1f} | "
            f"{rss:.0f} |"
        )
    if by_pipeline.get("msi"):
        ours = median_of(by_pipeline["msi"], "seconds")
        for other in ("raw", "omsi"):
            if by_pipeline.get(other):
                ratio = median_of(by_pipeline[other], "seconds") / ours
                lines.append(f"\nmsi-prefect speed / {other}: **{ratio:.2f}x** (ratio of medians)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print JSON lines plus markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", nargs="+", default=["small2k", "large"], choices=PRESETS)
    parser.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=PIPELINES)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument(
        "--chunk-sizes", type=int, nargs="+", help="msi only: one series per chunk size"
    )
    parser.add_argument("--data-dir", type=Path, default=BENCH_DIR / "data")
    parser.add_argument("--json", type=Path, help="append every result as a JSON line")
    args = parser.parse_args(argv)

    if "omsi" in args.pipelines:
        ensure_openmsistream()
    scratch = Path(tempfile.mkdtemp(prefix="msi-bench-"))
    print(f"# bench.compare {' '.join(argv or sys.argv[1:])}  ({time.ctime()})", flush=True)
    try:
        with MemoryBroker(log_dir=scratch) as broker:
            for data_set in args.sets:
                src = args.data_dir / data_set
                make_dataset(PRESETS[data_set], src)
                series: list[tuple[str, dict[str, Any]]] = [
                    (name, {"partitions": args.partitions}) for name in args.pipelines
                ]
                if args.chunk_sizes:
                    series = [
                        (f"msi@{size}", {"partitions": args.partitions, "chunk_size": size})
                        for size in args.chunk_sizes
                    ]
                by_series: dict[str, list[BenchResult]] = {label: [] for label, _ in series}
                stalled: dict[str, int] = {}
                destinations = scratch / f"{data_set}-destinations"
                destinations.mkdir()
                for _ in range(args.rounds):
                    for label, options in series:
                        pipeline = label.split("@")[0]
                        try:
                            result = run_round(
                                pipeline, broker.bootstrap, src, destinations, **options
                            )
                        except PipelineStalled as exc:
                            # A baseline's own fault: reported, left out of the medians.
                            stalled[label] = stalled.get(label, 0) + 1
                            failure = {"set": data_set, "series": label, "stalled": str(exc)}
                            print(json.dumps(failure), flush=True)
                            continue
                        if not result.ok:
                            raise SystemExit(f"{label} did not verify: {result.mismatched[:5]}")
                        by_series[label].append(result)
                        record = {"set": data_set, "series": label, **result.to_dict()}
                        print(json.dumps(record), flush=True)
                        if args.json:
                            with args.json.open("a") as out:
                                out.write(json.dumps(record) + "\n")
                print(markdown_table(data_set, by_series, stalled), flush=True)
                shutil.rmtree(destinations, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
