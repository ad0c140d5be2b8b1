"""Back up one rebuilt file to the backup storage, verified, and announce it.

The ``backup-file`` deployment runs :func:`backup_file` for every ``msi.file.reconstructed``
event, and again for every ``msi.backup.missing`` event of the backup audit. The task

1. checks that the rebuilt file is still the one the event announced (a regular file of
   that size and SHA-256; one read of the file), so a file rewritten since it was rebuilt
   never replaces a good backup;
2. copies it with :meth:`~msi_prefect.transfer.sinks.Sink.store_copy` (streamed; the copy is
   verified and removed if wrong; the rebuilt file stays where it is);
3. emits ``msi.file.backed-up`` with the backup's URL, through the host's durable outbox
   of downstream events (:func:`~msi_prefect.prefect_layer.event_outbox.emit_downstream_event`).

An unreachable or failing store is retried (:data:`BACKUP_RETRY_DELAYS_S`); a bad parameter
or a changed file is not, since retrying cannot fix it.

Example:
    Back up a file from a flow of your own:
    ```python
    from prefect import flow

    from msi_prefect.prefect_layer.backup.tasks import backup_file
    from msi_prefect.prefect_layer.backup.storage import BackupStorage
    from msi_prefect.prefect_layer.flow_inputs import RebuiltFile

    @flow
    def my_backup(url: str, path: str, file_id: str, size: int, sha256: str) -> None:
        file = RebuiltFile.from_parameters(
            topic="lab-files", file_id=file_id, generation=1, path=path, url=url,
            size=size, sha256=sha256,
        )
        backup_file(file, BackupStorage.load("BLOCK_NAME"))
    ```
"""

from __future__ import annotations

from dataclasses import dataclass

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from msi_prefect.prefect_layer.backup.storage import BackupStorage
from msi_prefect.prefect_layer.event_outbox import emit_downstream_event
from msi_prefect.prefect_layer.events import EventName, file_event
from msi_prefect.prefect_layer.file_history import record_file_step
from msi_prefect.prefect_layer.flow_inputs import RebuiltFile, retry_unless_input_error
from msi_prefect.transfer import ChecksumMismatchError, CopyStatus

__all__ = ["BACKUP_RETRIES", "BACKUP_RETRY_DELAYS_S", "BackupResult", "backup_file"]

#: Retries of a failed backup (store unreachable, upload or verification failed).
BACKUP_RETRIES = 3
#: Seconds to wait before each retry: long enough for a short store outage to pass.
BACKUP_RETRY_DELAYS_S: list[float] = [10.0, 30.0, 60.0]


@dataclass(frozen=True)
class BackupResult:
    """A verified backup copy.

    Attributes:
        relpath: Relative POSIX path of the file.
        source_url: ``file://`` URL of the rebuilt file that was copied.
        backup_url: URL of the copy (no credentials).
        size: Size in bytes.
        sha256: Hex SHA-256 of the copy, verified after writing.
    """

    relpath: str
    source_url: str
    backup_url: str
    size: int
    sha256: str


@task(
    name="backup-file",
    task_run_name="backup {file.path}",
    retries=BACKUP_RETRIES,
    retry_delay_seconds=BACKUP_RETRY_DELAYS_S,
    retry_condition_fn=retry_unless_input_error,
    cache_policy=NO_CACHE,
)
def backup_file(
    file: RebuiltFile, storage: BackupStorage, dedup_key: str | None = None
) -> BackupResult:
    """Copy a rebuilt file to the backup storage, verify the copy, emit ``msi.file.backed-up``.

    Args:
        file: The rebuilt file, validated from the event parameters.
        storage: Where backups go.
        dedup_key: What makes the emitted event unique besides its file and generation
            (e.g. the id of the triggering event, so a repair after an audit is announced
            again); the file id by default.

    Returns:
        Where the copy is.

    Raises:
        FileChangedError: The rebuilt file is gone or no longer matches the event (no retry).
        SinkError: The copy could not be stored or verified (retried).
    """
    logger = get_run_logger()
    file.check_unchanged(hash_content=False)
    sink = storage.sink()
    logger.info("Backing up %s (%d bytes) to %s", file.path, file.size, sink.describe())
    if sink.check(file.path, file.size, file.sha256) is CopyStatus.OK:
        # A re-run (a crashed batch run, a repair, a user's re-run): the verified copy is
        # kept, not written again.
        backup_url = sink.url_of(file.path)
        logger.info("%s is backed up already at %s (same size and SHA-256)", file.path,
                    backup_url)  # fmt: skip
    else:
        try:
            # One read of the file: the copy is hashed as it is written and checked against
            # the event's SHA-256 before it is kept.
            result = sink.store_copy(file.local_path, file.path, file.size, file.sha256)
        except ChecksumMismatchError:
            # Only now hash the source, to tell a file changed since it was rebuilt (no
            # retry) from a copy that went wrong on the way (retried).
            file.check_unchanged(hash_content=True)
            raise
        sink.flush()
        backup_url = result.url
        logger.info("Backed up %s to %s (SHA-256 verified)", file.path, backup_url)
    facts = file.facts(backup_url=backup_url, backup=sink.describe())
    # Durable: the server may die with an event in memory (msi_prefect.prefect_layer.event_outbox).
    event = file_event(EventName.BACKED_UP, facts, dedup_key)
    emit_downstream_event(event)
    record_file_step(event)
    return BackupResult(
        relpath=file.path.as_posix(),
        source_url=file.url,
        backup_url=backup_url,
        size=file.size,
        sha256=file.sha256,
    )
