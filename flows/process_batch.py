"""Flow ``process-batch``: back up, describe and analyse every file of one batch.

Its trigger renders ``files`` from a ``msi.files.batch-ready`` event payload (batch and
adaptive dispatch). Each file gets the task runs a per-file dispatch would give it, named
after it: ``backup``, ``extract and publish metadata of`` and ``analyze``, and its own
``msi.file.*`` events. One run does the three steps, not a run per step: a flow run costs
the server and the worker far more than a task run (its trigger, its states, its
process), and a file's three history rows become one version of its history artifact.
The analysis takes the metadata just extracted instead of reading the file again, and
the backup runs in a thread of the run beside them.

A step that fails for a file does not stop that file's other steps, nor the other files;
the run ends Failed naming the files. A run whose process dies (an analysis that crashes
the interpreter) is started again with the same files by ``rerun-crashed``: a backup
already made is found and kept, the metadata and the analysis are made again.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import flow
from prefect.states import State

from msi_prefect.prefect_layer.analysis import DEFAULT_ANALYSIS, analyze_file, load_callable
from msi_prefect.prefect_layer.backup.storage import BackupStorage
from msi_prefect.prefect_layer.backup.tasks import backup_file
from msi_prefect.prefect_layer.dispatch.batches import (
    BatchEntryResult,
    batch_run_name,
    check_batch_size,
    run_per_file,
)
from msi_prefect.prefect_layer.flow_inputs import RebuiltFile, load_block
from msi_prefect.prefect_layer.metadata_tasks import extract_file_metadata
from msi_prefect.prefect_layer.transfers.kafka_cluster import KafkaCluster


@flow(
    name="process-batch",
    flow_run_name=batch_run_name("process"),
    description="Back up every file of a batch (each copy verified), publish its metadata "
    "to <topic>.metadata and show it as artifacts, and run the analysis on it.",
)
def process_batch_flow(
    files: list[dict[str, Any]],
    backup_block: str = "embedded",
    kafka_block: str = "embedded",
    analysis: str = DEFAULT_ANALYSIS,
    announced_at: datetime | None = None,
) -> list[BatchEntryResult]:
    """Back up, describe and analyse the files a batch event announced.

    Args:
        files: One entry per file: ``topic``, ``file_id``, ``generation``, ``path``,
            ``url``, ``size`` and ``sha256``, as a per-file run takes them.
        backup_block: Name of the ``MSI Backup Storage`` block to copy to; the preview
            pictures of image-like files are stored there too.
        kafka_block: Name of the ``MSI Kafka Cluster`` block of the broker the metadata
            goes to.
        analysis: The analysis callable, ``package.module:function``, installed where the
            flow runs; it gets ``(path: Path, metadata: dict)`` and returns JSON values.
        announced_at: When the batch event occurred (the trigger renders it): every file
            of the batch was rebuilt before, so one unchanged since is not hashed again.
    """
    check_batch_size(files)
    load_callable(analysis)  # a bad name fails the run before any work
    storage = load_block(BackupStorage, backup_block)
    kafka = load_block(KafkaCluster, kafka_block)

    def process(file: RebuiltFile) -> State[Any]:
        # The copy goes in a thread of its own: its waits on the store overlap the
        # metadata's and the analysis's work.
        backup = backup_file.submit(file, storage)
        # Previews go beside the backups. A topic too long for the metadata suffix fails
        # the metadata task of its files, not the batch.
        described = extract_file_metadata(file, kafka, storage, announced_at, return_state=True)
        metadata = described.result().metadata if described.is_completed() else None
        # Without the extracted metadata (its task failed) the analysis extracts its own.
        analysed = analyze_file(file, analysis, metadata=metadata, return_state=True)
        backup.wait()
        steps = (backup.state, described, analysed)
        failed = [state for state in steps if not state.is_completed()]
        return failed[0] if failed else analysed

    return run_per_file("Processing", files, process)
