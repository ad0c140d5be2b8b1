"""Retention: the prune decision (unit); the prune-source flow on the real S3 store and server."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from msi_prefect.prefect_layer.events import EventName
from msi_prefect.prefect_layer.prune import (
    Action,
    BackupCheck,
    BackupEvent,
    DiskIdentity,
    Need,
    PruneEvidence,
    Reason,
    Verdict,
    decide,
)
from msi_prefect.prefect_layer.transfers.settings import TransferSettings
from msi_prefect.transfer import CopyStatus, FileRecord, FileState, Registry, registry_beside
from msi_prefect.transfer.registry import FileIdentity
from msi_prefect.transfer.wire import file_id_for
from tests.flow_helpers import (
    BUCKET,
    SavedBackupStorage,
    delete_block,
    file_params,
    load_flow,
    read_artifacts,
    read_events,
    unique_name,
)

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
RETENTION_DAYS = 7.0
SHA = "a" * 64
OTHER_SHA = "b" * 64
DISK = DiskIdentity(size=100, mtime_ns=1_000, inode=42)
URL = "s3://msi-backup/lab/run1/a.tif"

# --------------------------------------------------------------------------- decide (unit)


def sent_record(generation: int = 2, state: FileState = FileState.SENT) -> FileRecord:
    return FileRecord(
        topic="lab.raw",
        relpath="run1/a.tif",
        identity=FileIdentity(size=DISK.size, mtime_ns=DISK.mtime_ns, inode=DISK.inode),
        sha256=SHA if state is FileState.SENT else None,
        generation=generation,
        state=state,
        reason=None if state is FileState.SENT else "the file changed while it was being read",
        updated_at=(NOW - timedelta(days=30)).timestamp(),
    )


def backed_up(generation: int = 2, days_ago: float = 10, sha256: str = SHA) -> BackupEvent:
    return BackupEvent(generation, sha256, NOW - timedelta(days=days_ago), URL)


OK_CHECK = BackupCheck(CopyStatus.OK, modified_at=NOW - timedelta(days=10), url=URL)


def evidence(**changes: Any) -> PruneEvidence:
    """Everything a deletion needs; each test spoils one part."""
    full = PruneEvidence(
        relpath="run1/a.tif",
        sent=sent_record(),
        on_disk=DISK,
        backup_event=backed_up(),
        backup_check=OK_CHECK,
        content_sha256=SHA,
    )
    return replace(full, **changes)


def verdict_of(item: PruneEvidence) -> Verdict:
    result = decide(item, RETENTION_DAYS, NOW)
    assert isinstance(result, Verdict), result
    return result


def test_a_sent_unchanged_verified_old_enough_file_is_deleted() -> None:
    result = verdict_of(evidence())

    assert result.action is Action.DELETE
    assert result.reason is Reason.VERIFIED
    assert "generation 2" in result.detail and "10.00 days ago" in result.detail


@pytest.mark.parametrize(
    ("changes", "reason", "words"),
    [
        ({"sent": None}, Reason.NEVER_SENT, "never sent"),
        ({"sent": sent_record(state=FileState.PENDING)}, Reason.NOT_SENT, "is pending"),
        ({"sent": sent_record(state=FileState.FAILED)}, Reason.NOT_SENT, "is failed"),
        ({"on_disk": replace(DISK, size=101)}, Reason.CHANGED_SINCE_SENT, "differ"),
        ({"on_disk": replace(DISK, mtime_ns=2_000)}, Reason.CHANGED_SINCE_SENT, "differ"),
        ({"on_disk": replace(DISK, inode=43)}, Reason.CHANGED_SINCE_SENT, "differ"),
        ({"content_sha256": OTHER_SHA}, Reason.CHANGED_SINCE_SENT, "not " + SHA),
        ({"content_sha256": ""}, Reason.CHANGED_SINCE_SENT, "cannot be read"),
        (
            {"backup_event": backed_up(generation=1)},
            Reason.NEWEST_NOT_BACKED_UP,
            "newest backup announced is of generation 1",
        ),
        ({"backup_event": backed_up(generation=3)}, Reason.BACKUP_MISMATCH, "generation 3"),
        ({"backup_event": backed_up(sha256=OTHER_SHA)}, Reason.BACKUP_MISMATCH, OTHER_SHA),
        ({"backup_event": backed_up(days_ago=6.5)}, Reason.TOO_RECENT, "6.50 days ago"),
        (
            {"backup_check": BackupCheck(CopyStatus.MISSING, url=URL)},
            Reason.BACKUP_MISSING,
            "no backup at " + URL,
        ),
        (
            {"backup_check": BackupCheck(CopyStatus.WRONG_HASH, url=URL)},
            Reason.BACKUP_MISMATCH,
            "wrong-hash",
        ),
        (
            {"backup_check": BackupCheck(CopyStatus.WRONG_SIZE, url=URL)},
            Reason.BACKUP_MISMATCH,
            "wrong-size",
        ),
        (
            {"backup_check": BackupCheck(None, error="connection refused")},
            Reason.BACKUP_UNVERIFIABLE,
            "connection refused",
        ),
    ],
)
def test_each_refusal_keeps_the_file_and_says_why(
    changes: dict[str, Any], reason: Reason, words: str
) -> None:
    result = verdict_of(evidence(**changes))

    assert result.action is Action.KEEP
    assert result.reason is reason
    assert words in result.detail


def test_without_the_event_the_backup_objects_time_counts() -> None:
    young = BackupCheck(CopyStatus.OK, modified_at=NOW - timedelta(days=2), url=URL)
    timeless = BackupCheck(CopyStatus.OK, url=URL)

    assert verdict_of(evidence(backup_event=None)).action is Action.DELETE
    assert verdict_of(evidence(backup_event=None, backup_check=young)).reason is Reason.TOO_RECENT
    assert (
        verdict_of(evidence(backup_event=None, backup_check=timeless)).reason
        is Reason.BACKUP_UNVERIFIABLE
    )
    mismatch = verdict_of(
        evidence(backup_event=None, backup_check=BackupCheck(CopyStatus.WRONG_HASH, url=URL))
    )
    assert "not backed up yet" in mismatch.detail


def test_costly_evidence_is_asked_for_only_when_the_cheap_checks_pass() -> None:
    assert decide(evidence(backup_check=None, content_sha256=None), 7, NOW) is Need.BACKUP_CHECK
    assert decide(evidence(content_sha256=None), 7, NOW) is Need.CONTENT_HASH
    # A file backed up too recently (by its event) needs neither the store nor a read.
    young = evidence(backup_event=backed_up(days_ago=1), backup_check=None, content_sha256=None)
    assert verdict_of(young).reason is Reason.TOO_RECENT
    # A failed store check is final: the content is not read.
    down = evidence(backup_check=BackupCheck(None, error="timeout"), content_sha256=None)
    assert verdict_of(down).reason is Reason.BACKUP_UNVERIFIABLE


def test_zero_days_deletes_as_soon_as_verified() -> None:
    just_now = evidence(backup_event=backed_up(days_ago=0))

    assert decide(just_now, 0, NOW) == Verdict(
        Action.DELETE, Reason.VERIFIED, verdict_of(evidence()).detail.replace("10.00", "0.00")
    )


def test_retention_is_off_by_default_and_validated() -> None:
    assert TransferSettings(topic="lab.raw").retention_days is None
    assert TransferSettings(topic="lab.raw", retention_days=7).retention_days == 7
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="retention_days"):
            TransferSettings(topic="lab.raw", retention_days=bad)


def test_the_default_registry_is_the_watch_flows(tmp_path: Path) -> None:
    assert registry_beside(tmp_path / "inbox") == tmp_path / ".msi-producer-registry.sqlite"


# --------------------------------------------------------------------------- flow (stack)


def save_transfer_settings(retention_days: float | None) -> tuple[str, str]:
    """Save a transfer settings block on a topic of its own; (block name, topic)."""
    name = unique_name("transfer")
    topic = f"prune-{name}"
    TransferSettings(topic=topic, retention_days=retention_days).save(name)
    return name, topic


@pytest.fixture
def transfer_block(prefect_api: str) -> Iterator[tuple[str, str]]:
    name, topic = save_transfer_settings(retention_days=0)
    yield name, topic
    delete_block(TransferSettings, name)


class Instrument:
    """A watched folder and its producer registry, written as watch-directory does."""

    def __init__(self, root: Path, topic: str) -> None:
        self.inbox = root / "inbox"
        self.inbox.mkdir()
        self.topic = topic
        self.registry = registry_beside(self.inbox)

    def path(self, relpath: str) -> Path:
        return self.inbox.joinpath(*relpath.split("/"))

    def send(self, relpath: str, data: bytes) -> int:
        """Write the file and record it SENT; returns its generation."""
        path = self.path(relpath)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        info = os.stat(path)
        with Registry(self.registry) as registry:
            claim = registry.begin(self.topic, relpath, info.st_size, info.st_mtime_ns,
                                   info.st_ino)  # fmt: skip
            assert claim is not None
            registry.mark_sent(
                self.topic, relpath, claim.generation, hashlib.sha256(data).hexdigest()
            )
        return claim.generation


def back_up(tmp_path: Path, storage: str, topic: str, relpath: str, data: bytes, generation: int
            ) -> None:  # fmt: skip
    """What the consumer side does: rebuild the file, run the real backup-file flow."""
    params = file_params(tmp_path / "received", relpath, data, topic, generation)
    state = load_flow("flows/backup_file.py:backup_file_flow")(
        **params, backup_block=storage, return_state=True
    )
    assert state.is_completed(), state.message


@pytest.mark.stack
def test_prune_refuses_each_unsafe_file_and_deletes_the_verified_one(
    backup_storage: SavedBackupStorage, transfer_block: tuple[str, str], tmp_path: Path
) -> None:
    block, topic = transfer_block
    instrument = Instrument(tmp_path, topic)
    files = {
        "run1/gone.tif": b"G" * 300,
        "run1/changed.tif": b"C" * 300,
        "run1/newer.tif": b"N" * 300,
        "run1/missing.tif": b"M" * 300,
        "run1/corrupt.tif": b"X" * 300,
    }
    for relpath, data in files.items():
        generation = instrument.send(relpath, data)
        back_up(tmp_path, backup_storage.name, topic, relpath, data, generation)
    assert len(read_events(EventName.BACKED_UP, f"msi.file.{topic}.*", count=len(files))) == 5
    # Changed since it was sent (the registry still has the version sent).
    with open(instrument.path("run1/changed.tif"), "ab") as appended:
        appended.write(b"more")
    # A newer generation sent, its backup not made yet.
    assert instrument.send("run1/newer.tif", b"n" * 310) == 2
    # The backup object gone, and one with the same size but other bytes.
    client = backup_storage.s3_client
    client.delete_object(Bucket=BUCKET, Key=backup_storage.key("run1/missing.tif"))
    client.put_object(Bucket=BUCKET, Key=backup_storage.key("run1/corrupt.tif"), Body=b"Y" * 300)
    instrument.path("notes.txt").write_text("never sent")
    prune = load_flow("flows/prune_source.py:prune_source_flow")
    expected = {
        "verified": 1,
        "changed-since-sent": 1,
        "newest-generation-not-backed-up": 1,
        "backup-missing": 1,
        "backup-mismatch": 1,
        "never-sent": 1,
    }

    dry = prune(
        directory=str(instrument.inbox), dry_run=True, transfer_block=block,
        backup_block=backup_storage.name, return_state=True,
    )  # fmt: skip

    assert dry.is_completed(), dry.message
    counts = dry.result()
    assert {reason: n for reason, n in counts.items() if n and reason in expected} == expected
    assert counts["deleted"] == 0
    assert all(instrument.path(relpath).exists() for relpath in files)
    (dry_table,) = read_artifacts("prune-source", dry.state_details.flow_run_id)
    assert '"would delete"' in dry_table.data and '"run1/gone.tif"' in dry_table.data

    real = prune(
        directory=str(instrument.inbox), transfer_block=block, backup_block=backup_storage.name,
        return_state=True,
    )  # fmt: skip

    assert real.is_completed(), real.message
    assert real.result()["deleted"] == 1
    assert real.result()["freed_bytes"] == 300
    assert not instrument.path("run1/gone.tif").exists()
    kept = [relpath for relpath in files if relpath != "run1/gone.tif"]
    assert all(instrument.path(relpath).exists() for relpath in kept)
    assert backup_storage.object("run1/gone.tif") == files["run1/gone.tif"]  # backup untouched
    (event,) = read_events(EventName.PRUNED, f"msi.file.{topic}.{file_id_for('run1/gone.tif')}")
    assert event.payload["generation"] == 1
    assert event.payload["sha256"] == hashlib.sha256(files["run1/gone.tif"]).hexdigest()
    assert event.payload["source"] == str(instrument.path("run1/gone.tif"))
    assert event.resource["msi.path"] == "run1/gone.tif"
    related = {r["prefect.resource.role"]: r["prefect.resource.id"] for r in event.related}
    assert related["flow-run"] == f"prefect.flow-run.{real.state_details.flow_run_id}"
    (table,) = read_artifacts("prune-source", real.state_details.flow_run_id)
    assert '"deleted"' in table.data and '"newest-generation-not-backed-up"' in table.data
    assert len(read_events(EventName.PRUNED, f"msi.file.{topic}.*", timeout_s=2)) == 1


@pytest.mark.stack
def test_prune_keeps_files_while_the_store_is_unreachable_and_does_nothing_when_off(
    prefect_api: str, transfer_block: tuple[str, str], tmp_path: Path
) -> None:
    from pydantic import SecretStr

    from msi_prefect.prefect_layer.backup.storage import BackupStorage
    from msi_prefect.stack.processes import find_free_ports

    block, topic = transfer_block
    instrument = Instrument(tmp_path, topic)
    instrument.send("a.tif", b"A" * 100)
    (closed_port,) = find_free_ports(1)  # nothing listens there
    unreachable = unique_name("backup-down")
    BackupStorage(
        url=f"s3://{BUCKET}/nowhere", endpoint_url=f"http://127.0.0.1:{closed_port}",
        access_key_id="key", secret_access_key=SecretStr("secret"), region="us-east-1",
    ).save(unreachable)  # fmt: skip
    off_block, _ = save_transfer_settings(retention_days=None)
    prune = load_flow("flows/prune_source.py:prune_source_flow")
    try:
        down = prune(
            directory=str(instrument.inbox), transfer_block=block, backup_block=unreachable,
            return_state=True,
        )  # fmt: skip
        off = prune(directory=str(instrument.inbox), transfer_block=off_block,
                    backup_block=unreachable)  # fmt: skip
    finally:
        delete_block(BackupStorage, unreachable)
        delete_block(TransferSettings, off_block)

    assert down.is_failed()
    assert "1 backup(s) could not be checked" in str(down.result(raise_on_failure=False))
    assert instrument.path("a.tif").exists()
    (table,) = read_artifacts("prune-source", down.state_details.flow_run_id)
    assert '"backup-unverifiable"' in table.data
    assert off == {}
    assert instrument.path("a.tif").exists()


@pytest.mark.stack
def test_cli_dry_run_lists_then_prune_deletes_a_file_backed_up_without_an_event(
    backup_storage: SavedBackupStorage,
    transfer_block: tuple[str, str],
    prefect_api: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from msi_prefect.cli.main import main
    from msi_prefect.prefect_layer.backup.storage import BackupStorage
    from msi_prefect.prefect_layer.flow_inputs import load_block

    block, topic = transfer_block
    instrument = Instrument(tmp_path, topic)
    data = b"old run, its backed-up event long gone from the server" * 10
    instrument.send("old/a.tif", data)
    instrument.send("young/b.tif", b"B" * 10)
    # A backup the server has no event of (Prefect keeps events 7 days): the object counts.
    sink = load_block(BackupStorage, backup_storage.name).sink()
    path = instrument.path("old/a.tif")
    sink.store_copy(path, PurePosixPath("old/a.tif"), len(data), hashlib.sha256(data).hexdigest())
    common = ["prune-source", "--directory", str(instrument.inbox), "--api-url", prefect_api,
              "--transfer-block", block, "--backup-block", backup_storage.name]  # fmt: skip

    assert main([*common, "--dry-run", "--retention-days", "0", "--json"]) == 0

    listing = json.loads(capsys.readouterr().out)
    assert listing["dry_run"] is True
    actions = {row["path"]: (row["action"], row["reason"]) for row in listing["files"]}
    assert actions == {
        "old/a.tif": ("would delete", "verified"),
        "young/b.tif": ("kept", "backup-missing"),
    }
    assert path.exists()
    # The block's own rule (0 days here); without --dry-run the file goes.
    assert main(common) == 0
    out = capsys.readouterr().out
    assert "deleted       old/a.tif" in out
    assert "kept: 1 backup-missing" in out
    assert not path.exists()
    assert instrument.path("young/b.tif").exists()
    assert len(read_events(EventName.PRUNED, f"msi.file.{topic}.{file_id_for('old/a.tif')}")) == 1
    # A day's rule keeps the object written seconds ago.
    instrument.send("old/c.tif", b"C" * 10)
    sink.store_copy(instrument.path("old/c.tif"), PurePosixPath("old/c.tif"), 10,
                    hashlib.sha256(b"C" * 10).hexdigest())  # fmt: skip
    assert main([*common, "--dry-run", "--retention-days", "1"]) == 0
    assert "kept          old/c.tif  (too-recent: backup written 0.00 days ago)" in (
        capsys.readouterr().out
    )


@pytest.mark.stack
def test_a_store_that_fails_three_times_in_a_row_is_not_tried_for_the_rest(
    prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from msi_prefect.prefect_layer import prune
    from msi_prefect.prefect_layer.backup.storage import BackupStorage

    instrument = Instrument(tmp_path, f"prune-{unique_name('down')}")
    for index in range(5):
        instrument.send(f"f{index}.tif", bytes([index]) * 10)
    tries: list[str] = []

    def store_down(sink: Any, storage: Any, relpath: str, sent: Any) -> BackupCheck:
        tries.append(relpath)  # the real store's timeouts are the test above's
        return BackupCheck(None, error="connection refused")

    monkeypatch.setattr(prune, "_check_backup", store_down)
    storage = BackupStorage(url=f"s3://{BUCKET}/unused", endpoint_url="http://127.0.0.1:9")

    items = list(
        prune.plan_prune(instrument.inbox, instrument.registry, instrument.topic, 0, storage)
    )

    assert tries == ["f0.tif", "f1.tif", "f2.tif"]
    assert [item.verdict.reason for item in items] == [Reason.BACKUP_UNVERIFIABLE] * 5
    assert "not tried, the store is down: connection refused" in items[4].verdict.detail
