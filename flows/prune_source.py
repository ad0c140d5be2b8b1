"""Flow ``prune-source``: free the instrument's disk once files are safely backed up (scheduled).

Off unless the transfer settings block sets ``retention_days`` (or a run passes it): then
the run looks at nothing and deletes nothing. See
:mod:`msi_prefect.prefect_layer.prune` for what it refuses to delete.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from msi_prefect.prefect_layer.backup.storage import BackupStorage
from msi_prefect.prefect_layer.flow_inputs import FileInputError, load_block
from msi_prefect.prefect_layer.prune import PruneReport, prune_source
from msi_prefect.prefect_layer.transfers.settings import TransferSettings
from msi_prefect.transfer import registry_beside


@flow(
    name="prune-source",
    flow_run_name="prune {directory}",
    description="Delete files from the watched folder once their backup is verified and old "
    "enough (opt-in: retention_days on the transfer settings block).",
)
def prune_source_flow(
    directory: str,
    dry_run: bool = False,
    retention_days: float | None = None,
    transfer_block: str = "embedded",
    backup_block: str = "embedded",
    registry_path: str | None = None,
) -> dict[str, int]:
    """Prune one watched folder.

    Args:
        directory: The folder watch-directory watches (absolute).
        dry_run: List what would be deleted and what is kept, and why; delete nothing.
        retention_days: Days after its backup a file may go; empty: the transfer settings
            block's ``retention_days`` (empty there too: retention is off, nothing is done).
        transfer_block: Name of the MSI Transfer Settings block (topic, retention).
        backup_block: Name of the MSI Backup Storage block the backups are in.
        registry_path: The folder's producer registry; default: beside the folder, where
            watch-directory keeps it.

    Returns:
        Files per reason (``verified`` for the deleted or deletable ones), ``deleted`` and
        ``freed_bytes``; empty when retention is off.
    """
    folder = Path(directory)
    if not folder.is_absolute():
        raise FileInputError(f"directory {directory!r} is relative; give the watched folder")
    if retention_days is not None and retention_days < 0:
        raise FileInputError(f"retention_days must be 0 or more, not {retention_days}")
    settings = load_block(TransferSettings, transfer_block)
    days = retention_days if retention_days is not None else settings.retention_days
    if days is None:
        get_run_logger().info(
            "Retention is off (retention_days is empty on the transfer settings block %r): "
            "nothing is deleted",
            transfer_block,
        )
        return {}
    report: PruneReport = prune_source(
        folder,
        Path(registry_path) if registry_path else registry_beside(folder),
        settings.topic,
        days,
        load_block(BackupStorage, backup_block),
        dry_run,
    )
    return report.as_dict()
