"""Flow ``backup-batch``: back up every file of one batch (batch dispatch).

Its trigger renders ``files`` from a ``msi.files.batch-ready`` event payload; each file
gets a ``backup <path>`` task run and its own ``msi.file.backed-up`` event.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from msi_prefect.prefect_layer.backup.storage import BackupStorage
from msi_prefect.prefect_layer.backup.tasks import backup_file
from msi_prefect.prefect_layer.dispatch.batches import (
    BatchEntryResult,
    batch_run_name,
    check_batch_size,
    run_per_file,
)
from msi_prefect.prefect_layer.flow_inputs import load_block


@flow(
    name="backup-batch",
    flow_run_name=batch_run_name("backup"),
    description="Copy every file of a batch to the backup storage and verify each copy.",
)
def backup_batch_flow(
    files: list[dict[str, Any]], backup_block: str = "embedded"
) -> list[BatchEntryResult]:
    """Back up the files a batch event announced.

    Args:
        files: One entry per file: ``topic``, ``file_id``, ``generation``, ``path``,
            ``url``, ``size`` and ``sha256``, as a per-file ``backup-file`` run takes them.
        backup_block: Name of the ``MSI Backup Storage`` block to copy to.
    """
    check_batch_size(files)
    storage = load_block(BackupStorage, backup_block)
    return run_per_file(
        "Backups", files, lambda file: backup_file(file, storage, return_state=True)
    )
