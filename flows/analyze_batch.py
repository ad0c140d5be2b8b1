"""Flow ``analyze-batch``: run the analysis on every file of one batch (batch dispatch).

Its trigger renders ``files`` from a ``msi.files.batch-ready`` event payload; each file
gets an ``analyze <path>`` task run and its own ``msi.file.analyzed`` event.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from msi_prefect.prefect_layer.analysis import DEFAULT_ANALYSIS, analyze_file, load_callable
from msi_prefect.prefect_layer.dispatch.batches import (
    BatchEntryResult,
    batch_run_name,
    check_batch_size,
    run_per_file,
)


@flow(
    name="analyze-batch",
    flow_run_name=batch_run_name("analyze"),
    description="Run an analysis callable on every file of a batch and record the results.",
)
def analyze_batch_flow(
    files: list[dict[str, Any]], analysis: str = DEFAULT_ANALYSIS
) -> list[BatchEntryResult]:
    """Analyze the files a batch event announced.

    Args:
        files: One entry per file: ``topic``, ``file_id``, ``generation``, ``path``,
            ``url``, ``size`` and ``sha256``, as a per-file ``analyze-file`` run takes them.
        analysis: The analysis callable, ``package.module:function``, installed where the
            flow runs; it gets ``(path: Path, metadata: dict)`` and returns JSON values.
    """
    check_batch_size(files)
    load_callable(analysis)  # a bad name fails the run before any work
    return run_per_file(
        "Analyses", files, lambda file: analyze_file(file, analysis, return_state=True)
    )
