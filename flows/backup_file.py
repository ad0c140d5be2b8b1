"""Flow ``backup-file``: back up one rebuilt file, verified (started by an event trigger).

Its trigger renders the parameters from a ``msi.file.reconstructed`` or
``msi.backup.missing`` event payload.
"""

from __future__ import annotations

from prefect import flow

from msi_prefect.prefect_layer.backup.storage import BackupStorage
from msi_prefect.prefect_layer.backup.tasks import BackupResult, backup_file
from msi_prefect.prefect_layer.flow_inputs import RebuiltFile, load_block


@flow(
    name="backup-file",
    flow_run_name="backup {path}",
    description="Copy one rebuilt file to the backup storage and verify the copy.",
)
def backup_file_flow(
    topic: str,
    file_id: str,
    generation: int,
    path: str,
    url: str,
    size: int,
    sha256: str,
    backup_block: str = "embedded",
    trigger_event_id: str | None = None,
) -> BackupResult:
    """Back up the file an event announced.

    Args:
        topic: Kafka topic the file came through.
        file_id: File id (uuid5 of the path).
        generation: File generation.
        path: Relative POSIX path below the destination.
        url: ``file://`` URL of the rebuilt file.
        size: Size in bytes.
        sha256: Hex SHA-256 of the content.
        backup_block: Name of the ``MSI Backup Storage`` block to copy to.
        trigger_event_id: Id of the triggering event (``{{ event.id }}``); makes the
            ``msi.file.backed-up`` event of a repair distinct from the first backup's.
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
    storage = load_block(BackupStorage, backup_block)
    dedup_key = f"{file.file_id}@{trigger_event_id}" if trigger_event_id else None
    return backup_file(file, storage, dedup_key)
