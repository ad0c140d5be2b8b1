"""The backup audit: statuses of each delivered file, events that re-trigger, the flow."""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from msi_prefect.prefect_layer.backup.audit import (
    AuditStatus,
    audit_destination,
    progress_store_path,
)
from msi_prefect.prefect_layer.events import EventName
from msi_prefect.prefect_layer.flow_inputs import FileInputError, load_block
from msi_prefect.transfer.progress import ChunkReceipt, ProgressStore
from msi_prefect.transfer.sinks import CopyStatus, LocalDirectorySink, SinkError
from msi_prefect.transfer.wire import ChunkHeader, file_id_for
from tests.flow_helpers import (
    SavedBackupStorage,
    load_flow,
    read_artifacts,
    read_events,
)

CHUNK_SIZE = 64
EVENT_PARAMS = ("topic", "file_id", "generation", "path", "url", "size", "sha256")


def deliver(
    destination: Path,
    topic: str,
    relpath: str,
    data: bytes,
    generation: int = 1,
    work_dir: Path | None = None,
) -> None:
    """Put a file in the destination and record it as COMPLETE, as the reassembler does."""
    target = destination.joinpath(*relpath.split("/"))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    sha256 = hashlib.sha256(data).hexdigest()
    state = work_dir or destination / ".msi-state"
    state.mkdir(parents=True, exist_ok=True)
    with ProgressStore(state / "progress.sqlite") as store:
        header = ChunkHeader.for_chunk(
            relpath=relpath,
            size=len(data),
            chunk_size=CHUNK_SIZE,
            index=0,
            mtime_ns=1,
            producer_id="test",
            generation=generation,
        )
        store.open_file(topic, header, destination / ".msi-staging" / "x")
        store.record_chunks(
            ChunkReceipt(topic, header.file_id, generation, index, sha256)
            for index in range(header.count)
        )
        store.mark_complete(topic, header.file_id, generation)


@pytest.fixture
def destination(tmp_path: Path) -> Path:
    return tmp_path / "dest"


# --------------------------------------------------------------------------- unit


def test_progress_store_path_refuses_wrong_destinations(tmp_path: Path) -> None:
    with pytest.raises(FileInputError, match="is relative"):
        progress_store_path(Path("relative/dest"))
    with pytest.raises(FileInputError, match="is not a directory"):
        progress_store_path(tmp_path / "missing")
    with pytest.raises(FileInputError, match=r"has no \.msi-state/progress\.sqlite"):
        progress_store_path(tmp_path)
    assert not (tmp_path / ".msi-state").exists()  # nothing created by looking


def test_audit_destination_tells_each_status(destination: Path, tmp_path: Path) -> None:
    files = {"ok.bin": b"fine", "gone.bin": b"lost", "short.bin": b"cut off", "bad.bin": b"flip"}
    for relpath, data in files.items():
        deliver(destination, "lab.raw", relpath, data)
    deliver(destination, "other.topic", "other.bin", b"other topic")
    backup = LocalDirectorySink(tmp_path / "backup")
    for relpath, data in files.items():
        backup.store_copy(
            destination / relpath,
            PurePosixPath(relpath),
            len(data),
            hashlib.sha256(data).hexdigest(),
        )
    (tmp_path / "backup" / "gone.bin").unlink()
    (tmp_path / "backup" / "short.bin").write_bytes(b"cut")
    (tmp_path / "backup" / "bad.bin").write_bytes(b"FLIP")

    entries = list(audit_destination(destination, backup, "lab.raw", grace_minutes=0))

    assert {entry.file.relpath: entry.status for entry in entries} == {
        "bad.bin": AuditStatus.WRONG_HASH,
        "gone.bin": AuditStatus.MISSING,
        "ok.bin": AuditStatus.OK,
        "short.bin": AuditStatus.WRONG_SIZE,
    }
    assert entries[0].url == (destination / "bad.bin").as_uri()
    everything = list(audit_destination(destination, backup, grace_minutes=0))
    assert [entry.file.relpath for entry in everything][-1] == "short.bin"
    assert len(everything) == len(files) + 1
    # Within the grace period (the default), a backup not right yet may still be on its
    # way: recent, not a problem; a good backup is good at once.
    recent = {entry.file.relpath: entry.status for entry in audit_destination(destination, backup)}
    assert recent == {
        "bad.bin": AuditStatus.RECENT,
        "gone.bin": AuditStatus.RECENT,
        "ok.bin": AuditStatus.OK,
        "other.bin": AuditStatus.RECENT,
        "short.bin": AuditStatus.RECENT,
    }


def test_an_s3_destination_is_audited_from_its_rebuilders_work_dir(tmp_path: Path) -> None:
    # The rebuilder of s3://lab/rebuilt kept its progress store in its work_dir; the
    # objects themselves are not needed: the audit checks the backups.
    work_dir = tmp_path / "storage-2" / "rebuild"
    files = {"run/ok.bin": b"fine", "run/gone.bin": b"lost"}
    backup = LocalDirectorySink(tmp_path / "backup")
    for relpath, data in files.items():
        deliver(tmp_path / "objects", "lab.raw", relpath, data, work_dir=work_dir)
    data = files["run/ok.bin"]
    backup.store_copy(tmp_path / "objects" / "run" / "ok.bin", PurePosixPath("run/ok.bin"),
                      len(data), hashlib.sha256(data).hexdigest())  # fmt: skip

    entries = list(
        audit_destination("s3://lab/rebuilt", backup, work_dir=work_dir, grace_minutes=0)
    )

    assert {entry.file.relpath: (entry.status, entry.url) for entry in entries} == {
        "run/gone.bin": (AuditStatus.MISSING, "s3://lab/rebuilt/run/gone.bin"),
        "run/ok.bin": (AuditStatus.OK, "s3://lab/rebuilt/run/ok.bin"),
    }
    assert progress_store_path("s3://lab/rebuilt", str(work_dir)) == work_dir / "progress.sqlite"
    # Without the work_dir, or with a wrong one, the audit says which setting is missing.
    with pytest.raises(FileInputError, match=r"s3://lab/rebuilt is not a folder.*give work_dir"):
        progress_store_path("s3://lab/rebuilt")
    with pytest.raises(FileInputError, match=r"work_dir .* has no progress\.sqlite"):
        progress_store_path("s3://lab/rebuilt", tmp_path)
    with pytest.raises(FileInputError, match="work_dir 'rel' is relative"):
        progress_store_path("s3://lab/rebuilt", "rel")


def test_audit_destination_marks_unreadable_backups(destination: Path) -> None:
    deliver(destination, "lab.raw", "a.bin", b"a")

    class BrokenSink(LocalDirectorySink):
        def check(self, relpath: PurePosixPath, size: int, sha256: str) -> CopyStatus:
            raise SinkError("Cannot check s3://x/a.bin: connection refused")

    (entry,) = audit_destination(destination, BrokenSink(destination / "unused"))

    assert entry.status is AuditStatus.UNREADABLE
    assert "connection refused" in entry.detail


# --------------------------------------------------------------------------- flow (stack)


def payload_params(event: Any) -> dict[str, Any]:
    return {key: event.payload[key] for key in EVENT_PARAMS}


@pytest.mark.stack
def test_audit_finds_missing_backups_and_the_backup_flow_repairs_them(
    backup_storage: SavedBackupStorage, destination: Path, tmp_path: Path
) -> None:
    from msi_prefect.prefect_layer.backup.storage import BackupStorage

    topic = f"audit-{backup_storage.name}"
    files = {"run/a.bin": b"A" * 300, "run/b.bin": b"B" * 200, "run/c.bin": b"C" * 100}
    sink = load_block(BackupStorage, backup_storage.name).sink()
    for relpath, data in files.items():
        deliver(destination, topic, relpath, data)
        sink.store_copy(
            destination / relpath,
            PurePosixPath(relpath),
            len(data),
            hashlib.sha256(data).hexdigest(),
        )
    client = backup_storage.s3_client
    client.delete_object(Bucket="msi-backup", Key=backup_storage.key("run/b.bin"))
    client.put_object(Bucket="msi-backup", Key=backup_storage.key("run/c.bin"), Body=b"C" * 99)
    audit_backups_flow = load_flow("flows/audit_backups.py:audit_backups_flow")
    backup_file_flow = load_flow("flows/backup_file.py:backup_file_flow")

    within_grace = audit_backups_flow(
        destination=str(destination), backup_block=backup_storage.name
    )
    assert within_grace["recent"] == 2
    assert within_grace["events_emitted"] == 0
    wrong_grace = audit_backups_flow(
        destination=str(destination),
        backup_block=backup_storage.name,
        grace_minutes=-1,
        return_state=True,
    )
    assert wrong_grace.is_failed()
    assert "grace_minutes must be 0 or more" in (wrong_grace.message or "")

    state = audit_backups_flow(
        destination=str(destination),
        backup_block=backup_storage.name,
        grace_minutes=0,
        return_state=True,
    )

    assert state.is_completed(), state.message
    counts = state.result()
    assert counts["ok"] == 1
    assert counts["missing"] == 1
    assert counts["wrong-size"] == 1
    assert counts["checked"] == 3
    assert counts["events_emitted"] == 2
    audit_run = state.state_details.flow_run_id
    (artifact,) = read_artifacts("audit-backups", audit_run)
    assert artifact.type == "table"
    assert '"missing"' in artifact.data and '"run/b.bin"' in artifact.data

    missing = {}
    for relpath in ("run/b.bin", "run/c.bin"):
        events = read_events(EventName.BACKUP_MISSING, f"msi.file.{topic}.{file_id_for(relpath)}")
        assert len(events) == 1, relpath
        assert events[0].payload["audit_run_id"] == str(audit_run)
        missing[relpath] = payload_params(events[0])
    assert missing["run/b.bin"]["url"] == (destination / "run" / "b.bin").as_uri()
    assert missing["run/c.bin"]["size"] == 100

    # The backup deployment's trigger would start these runs from the events' payloads.
    for params in missing.values():
        repair = backup_file_flow(**params, backup_block=backup_storage.name, return_state=True)
        assert repair.is_completed(), repair.message
    assert backup_storage.object("run/b.bin") == files["run/b.bin"]

    again = audit_backups_flow(
        destination=str(destination), topic=topic, backup_block=backup_storage.name
    )
    assert again["ok"] == 3
    assert again["events_emitted"] == 0


@pytest.mark.stack
def test_audit_flow_refuses_a_destination_without_progress(
    prefect_api: str, tmp_path: Path
) -> None:
    audit_backups_flow = load_flow("flows/audit_backups.py:audit_backups_flow")

    state = audit_backups_flow(destination=str(tmp_path), return_state=True)

    assert state.is_failed()
    assert "has no .msi-state/progress.sqlite" in str(state.result(raise_on_failure=False))
