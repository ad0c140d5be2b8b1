"""Running the per-file tasks over the files of one ``msi.files.batch-ready`` event.

The batch deployment of ``prefect.yaml`` (``process-batch``) gets the event's ``files``
list (each entry the parameters a per-file flow would get). Every entry is validated on
its own: a bad entry fails only its own file. Each valid file gets its own task runs,
named after the file, so the UI keeps a record per file; the per-file tasks emit their
per-file events as usual, posted together (``event_outbox.GatheredEventPoster``). The
files' history artifacts are written together (one version per file, the reads shared:
``file_history.file_history_batch``).
The run ends Failed, naming the files, if any file failed, after all the others are done.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run
from prefect.states import State

from msi_prefect.errors import MsiError
from msi_prefect.prefect_layer.event_outbox import gathered_downstream_events
from msi_prefect.prefect_layer.file_history import file_history_batch
from msi_prefect.prefect_layer.flow_inputs import FileInputError, RebuiltFile
from msi_prefect.prefect_layer.transfers.settings import MAX_BATCH_FILES

# Failures named in the error message; the artifact lists every file.
MAX_NAMED_FAILURES = 10


class FileOutcome(StrEnum):
    """What happened to one file of a batch."""

    DONE = "done"
    INVALID = "invalid entry"
    FAILED = "failed"


@dataclass(frozen=True)
class BatchEntryResult:
    """The outcome of one file of a batch."""

    path: str
    outcome: FileOutcome
    detail: str = ""


class BatchFailedError(MsiError):
    """Some files of a batch failed; the others were done."""


def check_batch_size(files: Any) -> list[Any]:
    """Refuse a ``files`` parameter that is not a list of 1..MAX_BATCH_FILES entries.

    Raises:
        FileInputError: It is not a list, is empty, or is too long.
    """
    if not isinstance(files, list):
        raise FileInputError(f"files must be a list of file entries, got {type(files).__name__}")
    if not 1 <= len(files) <= MAX_BATCH_FILES:
        raise FileInputError(f"a batch holds 1 to {MAX_BATCH_FILES} files, got {len(files)}")
    return files


def rebuilt_file_of(entry: Any) -> RebuiltFile:
    """Validate one entry of a batch into a :class:`RebuiltFile`.

    Raises:
        FileInputError: The entry is not a mapping, lacks a key, or a value is bad.
    """
    return RebuiltFile.from_entry(entry)


def batch_run_name(verb: str) -> Callable[[], str]:
    """A ``flow_run_name`` callable: e.g. ``backup 12 files: raw/a.tif, ...``."""

    def name() -> str:
        files = flow_run.parameters.get("files")
        if not isinstance(files, list) or not files:
            return f"{verb} a batch"
        first = files[0].get("path", "?") if isinstance(files[0], Mapping) else "?"
        more = ", ..." if len(files) > 1 else ""
        return f"{verb} {len(files)} file{'s' if len(files) != 1 else ''}: {first}{more}"

    return name


def run_per_file(
    title: str,
    files: Any,
    work: Callable[[RebuiltFile], State[Any]],
) -> list[BatchEntryResult]:
    """Run ``work`` for every valid file of a batch, one file after the other.

    Args:
        title: What the batch does, for the log and the artifact (e.g. ``Backups``).
        files: The ``files`` parameter of the batch flow.
        work: Runs the task run(s) of one file (``return_state=True``) and returns the
            final state of its last one.

    Returns:
        One result per entry, in order.

    Raises:
        FileInputError: ``files`` is not a list of 1..MAX_BATCH_FILES entries.
        BatchFailedError: At least one file failed or was invalid (after all were tried).
    """
    logger = get_run_logger()
    entries = check_batch_size(files)
    final: list[BatchEntryResult] = []
    # The files' history rows are written together, not one file at a time, and so are
    # their events posted (the events first when the batch ends: they say a file is done).
    with file_history_batch() as history, gathered_downstream_events():
        for index, entry in enumerate(entries):
            path = str(entry.get("path", "?")) if isinstance(entry, Mapping) else "?"
            try:
                rebuilt = rebuilt_file_of(entry)
            except FileInputError as exc:
                logger.error("Skipping batch entry %d (%s): %s", index, path, exc)
                final.append(BatchEntryResult(path, FileOutcome.INVALID, str(exc)))
                continue
            state = work(rebuilt)
            if state.is_completed():
                final.append(BatchEntryResult(path, FileOutcome.DONE))
            else:
                final.append(BatchEntryResult(path, FileOutcome.FAILED, state.message or ""))
            history.flush_if_full()
    failed = [result for result in final if result.outcome is not FileOutcome.DONE]
    create_table_artifact(
        table=[
            {"file": result.path, "outcome": result.outcome.value, "detail": result.detail}
            for result in final
        ],
        description=f"{title}: {len(final) - len(failed)} of {len(final)} files done",
    )
    if failed:
        named = "; ".join(f"{r.path}: {r.outcome.value}" for r in failed[:MAX_NAMED_FAILURES])
        extra = (
            f" (and {len(failed) - MAX_NAMED_FAILURES} more)"
            if len(failed) > MAX_NAMED_FAILURES
            else ""
        )
        raise BatchFailedError(
            f"{title}: {len(failed)} of {len(final)} files failed: {named}{extra}"
        )
    logger.info("%s: all %d files done", title, len(final))
    return final
