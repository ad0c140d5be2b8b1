"""Flow ``audit-backups``: check every delivered file's backup (scheduled).

Missing or wrong backups are announced with ``msi.backup.missing``; the backup
deployment's trigger re-runs them.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from msi_prefect.prefect_layer.backup.audit import (
    DEFAULT_MAX_MISSING_EVENTS,
    audit_backups,
    progress_store_path,
)
from msi_prefect.prefect_layer.backup.storage import BackupStorage
from msi_prefect.prefect_layer.flow_inputs import load_block


@flow(
    name="audit-backups",
    flow_run_name="audit backups of {destination}",
    description="Check the backup of every file a destination received; re-trigger the "
    "missing and wrong ones.",
)
def audit_backups_flow(
    destination: str,
    topic: str | None = None,
    backup_block: str = "embedded",
    max_missing_events: int = DEFAULT_MAX_MISSING_EVENTS,
) -> dict[str, int]:
    """Audit the backups of one destination directory.

    Args:
        destination: Absolute directory the reconstruct flow delivers files to.
        topic: Only files of this topic; all topics when empty.
        backup_block: Name of the ``MSI Backup Storage`` block to check.
        max_missing_events: At most this many ``msi.backup.missing`` events per audit.

    Returns:
        Files per status (``ok``, ``missing``, ``wrong-size``, ``wrong-hash``,
        ``unreadable``), ``checked``, ``events_emitted`` and ``events_skipped``.
    """
    root = Path(destination)
    progress_store_path(root)  # a wrong destination fails the run before any work
    storage = load_block(BackupStorage, backup_block)
    report = audit_backups(root, storage, topic or None, str(flow_run.id or ""), max_missing_events)
    return report.as_dict()
