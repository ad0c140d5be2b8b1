"""Flow ``audit-backups``: check every delivered file's backup (scheduled).

Missing or wrong backups are announced with ``msi.backup.missing``; the backup
deployment's trigger re-runs them. Files delivered in the last ``grace_minutes`` are
counted as ``recent`` instead: their backup runs may still be queued.
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from msi_prefect.prefect_layer.backup.audit import (
    DEFAULT_GRACE_MINUTES,
    DEFAULT_MAX_MISSING_EVENTS,
    audit_backups,
    progress_store_path,
)
from msi_prefect.prefect_layer.backup.storage import BackupStorage
from msi_prefect.prefect_layer.flow_inputs import FileInputError, load_block


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
    work_dir: str | None = None,
    grace_minutes: float = DEFAULT_GRACE_MINUTES,
) -> dict[str, int]:
    """Audit the backups of the files one rebuilder delivered.

    Args:
        destination: Where the reconstruct flow delivers files: an absolute directory, or
            a URL such as s3://bucket/prefix.
        topic: Only files of this topic; all topics when empty.
        backup_block: Name of the ``MSI Backup Storage`` block to check.
        max_missing_events: At most this many ``msi.backup.missing`` events per audit.
        work_dir: The reconstruct flow's work_dir, where its progress store is; required
            for a URL destination (and for a folder whose rebuilder was given one).
        grace_minutes: Files delivered less than this many minutes ago whose backup is not
            there yet are counted as ``recent``, not re-triggered (0: re-trigger them too).

    Returns:
        Files per status (``ok``, ``missing``, ``wrong-size``, ``wrong-hash``,
        ``unreadable``, ``recent``), ``checked``, ``events_emitted`` and ``events_skipped``.
    """
    # A wrong destination, work_dir or grace fails the run before any work.
    if not grace_minutes >= 0:
        raise FileInputError(f"grace_minutes must be 0 or more, not {grace_minutes}")
    progress_store_path(destination, work_dir or None)
    storage = load_block(BackupStorage, backup_block)
    report = audit_backups(
        destination,
        storage,
        topic or None,
        str(flow_run.id or ""),
        max_missing_events,
        work_dir or None,
        grace_minutes,
    )
    return report.as_dict()
