"""The backup-file flow, and the validation of the parameters every per-file flow gets."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from msi_prefect.prefect_layer.event_outbox import (
    downstream_outbox_path,
    event_outbox,
    unconfirmed_outbox,
)
from msi_prefect.prefect_layer.events import EventName
from msi_prefect.prefect_layer.flow_inputs import FileChangedError, FileInputError, RebuiltFile
from msi_prefect.transfer.wire import file_id_for
from tests.flow_helpers import (
    SavedBackupStorage,
    file_params,
    flow_run_name,
    load_flow,
    read_events,
)

RELPATH = "run1/frame 0001.tif"

# --------------------------------------------------------------------------- parameters (unit)


@pytest.fixture
def params(tmp_path: Path) -> dict[str, Any]:
    return file_params(tmp_path / "dest", RELPATH, b"pixels" * 100, "lab.raw")


def test_valid_parameters_name_the_file(params: dict[str, Any], tmp_path: Path) -> None:
    file = RebuiltFile.from_parameters(**params)

    assert file.destination == tmp_path / "dest"
    assert file.local_path == tmp_path / "dest" / "run1" / "frame 0001.tif"
    assert file.path.as_posix() == RELPATH
    file.check_unchanged(hash_content=True)
    assert file.facts(extra=1).extra == {"extra": 1}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"url": "ftp://host/run1/frame%200001.tif"}, "only file:// URLs of files rebuilt"),
        ({"url": "s3://bucket/run1/frame%200001.tif"}, "does not end with path"),
        ({"url": "s3://key:secret@bucket/run1/frame 0001.tif"}, "no credentials"),
        ({"url": "s3://bucket/x/../run1/frame 0001.tif"}, "'..' segment"),
        ({"url": "s3://bucket/run1/frame 0001.tif?versionId=1"}, "query or fragment"),
        ({"url": "/dest/run1/frame 0001.tif"}, "plain path"),
        ({"url": "file://otherhost/dest/run1/frame%200001.tif"}, "names host"),
        ({"url": "file:///somewhere/else.tif"}, "does not end with path"),
        ({"url": "file:///dest/../run1/frame%200001.tif"}, "'..' segment"),
        ({"path": "../run1/frame 0001.tif"}, "'..' segment"),
        ({"path": "/etc/passwd"}, "absolute"),
        ({"file_id": "0" * 32}, "is not the id of path"),
        ({"file_id": "not-an-id"}, "32 lower-case hex"),
        ({"sha256": "abc"}, "64 hex digits"),
        ({"size": -1}, "size must be"),
        ({"generation": -2}, "generation must be"),
        ({"topic": "bad topic!"}, "may only contain"),
        ({"topic": ""}, "not a Kafka topic name"),
    ],
)
def test_bad_parameters_are_refused_clearly(
    params: dict[str, Any], change: dict[str, Any], message: str
) -> None:
    with pytest.raises(FileInputError, match=message):
        RebuiltFile.from_parameters(**{**params, **change})


def test_symlink_inside_the_destination_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    params = file_params(outside, "secret.txt", b"secret", "lab.raw")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "link").symlink_to(outside)
    link_params = {
        **params,
        "path": "link/secret.txt",
        "file_id": file_id_for("link/secret.txt"),
        "url": (dest / "link" / "secret.txt").as_uri(),
    }
    with pytest.raises(FileInputError, match="outside the destination"):
        RebuiltFile.from_parameters(**link_params)


def test_changed_file_is_reported(params: dict[str, Any]) -> None:
    file = RebuiltFile.from_parameters(**params)
    file.local_path.write_bytes(b"P" + file.local_path.read_bytes()[1:])
    with pytest.raises(FileChangedError, match="changed since it was rebuilt: its SHA-256"):
        file.check_unchanged(hash_content=True)
    file.check_unchanged(hash_content=False)  # same size

    file.local_path.write_bytes(b"short")
    with pytest.raises(FileChangedError, match="now has 5 bytes"):
        file.check_unchanged(hash_content=False)
    file.local_path.unlink()
    with pytest.raises(FileChangedError, match=r"is not at .*: it was moved or deleted"):
        file.check_unchanged()


# --------------------------------------------------------------------------- flow (stack)


@pytest.mark.stack
def test_backup_flow_copies_verifies_and_announces(
    backup_storage: SavedBackupStorage, topic: str, tmp_path: Path
) -> None:
    data = b"\x00\x01 detector frame " * 5000
    params = file_params(tmp_path / "dest", RELPATH, data, topic)
    backup_file_flow = load_flow("flows/backup_file.py:backup_file_flow")

    state = backup_file_flow(**params, backup_block=backup_storage.name, return_state=True)

    assert state.is_completed(), state.message
    result = state.result()
    assert result.backup_url == f"s3://msi-backup/{backup_storage.key(RELPATH)}"
    assert backup_storage.object(RELPATH) == data
    head = backup_storage.s3_client.head_object(
        Bucket="msi-backup", Key=backup_storage.key(RELPATH)
    )
    assert head["Metadata"] == {"msi-sha256": hashlib.sha256(data).hexdigest()}
    assert (tmp_path / "dest" / "run1" / "frame 0001.tif").read_bytes() == data  # source kept
    assert flow_run_name(state.state_details.flow_run_id) == f"backup {RELPATH}"

    events = read_events(EventName.BACKED_UP, f"msi.file.{topic}.{params['file_id']}")
    assert len(events) == 1
    payload = events[0].payload
    assert payload["backup_url"] == result.backup_url
    assert {key: payload[key] for key in params} == params
    assert events[0].resource["msi.path"] == RELPATH
    # Through the host's durable outbox: posted at once, waiting there for its confirmation;
    # linked to its run as Prefect's own events are.
    related = {r["prefect.resource.role"]: r["prefect.resource.id"] for r in events[0].related}
    assert related["flow-run"] == f"prefect.flow-run.{state.state_details.flow_run_id}"
    assert related["task-run"].startswith("prefect.task-run.")
    with (
        event_outbox(downstream_outbox_path()) as queued,
        unconfirmed_outbox(downstream_outbox_path()) as unconfirmed,
    ):
        assert queued.count() == 0
        posted = [record["event"]["id"] for _, record in unconfirmed.oldest(1000)]
        assert str(events[0].id) in posted


@pytest.mark.stack
def test_backup_flow_refuses_a_file_that_changed(
    backup_storage: SavedBackupStorage, tmp_path: Path
) -> None:
    params = file_params(tmp_path / "dest", "a.bin", b"rebuilt content", "lab.raw")
    (tmp_path / "dest" / "a.bin").write_bytes(b"REBUILT CONTENT")  # same size, new bytes
    backup_file_flow = load_flow("flows/backup_file.py:backup_file_flow")

    state = backup_file_flow(**params, backup_block=backup_storage.name, return_state=True)

    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, FileChangedError)
    assert "a.bin changed since it was rebuilt: its SHA-256 is now" in str(error)
    assert backup_storage.object("a.bin") is None  # nothing stored, and no retries waited


@pytest.mark.stack
def test_backup_flow_names_a_missing_block(prefect_api: str, tmp_path: Path) -> None:
    params = file_params(tmp_path / "dest", "a.bin", b"x", "lab.raw")
    backup_file_flow = load_flow("flows/backup_file.py:backup_file_flow")

    state = backup_file_flow(**params, backup_block="no-such-block-here", return_state=True)

    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "no MSI Backup Storage block named 'no-such-block-here'" in message
