"""Flow ``analyze-file``: run a user's analysis (``package.module:function``) on one file.

Its trigger renders the parameters from a ``msi.file.reconstructed`` event payload.
"""

from __future__ import annotations

from prefect import flow

from msi_prefect.prefect_layer.analysis import (
    DEFAULT_ANALYSIS,
    AnalysisResult,
    analyze_file,
    load_callable,
)
from msi_prefect.prefect_layer.flow_inputs import RebuiltFile


@flow(
    name="analyze-file",
    flow_run_name="analyze {path}",
    description="Run an analysis callable on one rebuilt file and record its result.",
)
def analyze_file_flow(
    topic: str,
    file_id: str,
    generation: int,
    path: str,
    url: str,
    size: int,
    sha256: str,
    analysis: str = DEFAULT_ANALYSIS,
) -> AnalysisResult:
    """Analyse the file an event announced.

    Args:
        topic: Kafka topic the file came through.
        file_id: File id (uuid5 of the path).
        generation: File generation.
        path: Relative POSIX path below the destination.
        url: ``file://`` URL of the rebuilt file.
        size: Size in bytes.
        sha256: Hex SHA-256 of the content.
        analysis: The analysis callable, ``package.module:function``, installed where the
            flow runs; it gets ``(path: Path, metadata: dict)`` and returns JSON values.
    """
    file = RebuiltFile.from_parameters(
        topic=topic,
        file_id=file_id,
        generation=generation,
        path=path,
        url=url,
        size=size,
        sha256=sha256,
    )
    load_callable(analysis)  # a bad name fails the run before any work
    return analyze_file(file, analysis)
