"""Batch flows: every file of a batch gets its own task run and event; bad entries fail alone."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from msi_prefect.prefect_layer.dispatch.batches import (
    BatchFailedError,
    check_batch_size,
    rebuilt_file_of,
)
from msi_prefect.prefect_layer.event_outbox import GatheredEventPoster
from msi_prefect.prefect_layer.events import EventName
from msi_prefect.prefect_layer.flow_inputs import FileInputError
from msi_prefect.prefect_layer.transfers.settings import MAX_BATCH_FILES
from tests.flow_helpers import (
    SavedBackupStorage,
    file_params,
    flow_run_name,
    load_flow,
    read_artifacts,
    read_events,
)

# --------------------------------------------------------------------------- entries (unit)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ("not a list", "files must be a list of file entries, got str"),
        ([], f"a batch holds 1 to {MAX_BATCH_FILES} files, got 0"),
        ([{}] * (MAX_BATCH_FILES + 1), f"got {MAX_BATCH_FILES + 1}"),
    ],
)
def test_a_bad_files_parameter_is_refused(files: Any, message: str) -> None:
    with pytest.raises(FileInputError, match=message):
        check_batch_size(files)


def test_each_entry_is_validated_like_per_file_parameters(tmp_path: Path) -> None:
    params = file_params(tmp_path / "dest", "run/a.bin", b"abc", "lab.raw")
    assert rebuilt_file_of(params).local_path == tmp_path / "dest" / "run" / "a.bin"
    with pytest.raises(FileInputError, match="must be an object, got list"):
        rebuilt_file_of([1, 2])
    with pytest.raises(FileInputError, match="lacks url, sha256"):
        rebuilt_file_of({key: v for key, v in params.items() if key not in ("sha256", "url")})
    with pytest.raises(FileInputError, match=re.escape("..")):
        rebuilt_file_of({**params, "path": "../run/a.bin"})


# --------------------------------------------------------------------------- flows (stack)

# How long a test waits for task runs to be recorded.
TASK_RECORD_WAIT_S = 15.0


def _task_run_names(flow_run_id: Any, expected: int) -> list[str]:
    """The task runs' names, once `expected` are recorded (the server records task-run
    states in batches, a second apart), or what is there after TASK_RECORD_WAIT_S."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + TASK_RECORD_WAIT_S
    while True:
        with get_client(sync_client=True) as client:
            task_runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
        if len(task_runs) >= expected or time.monotonic() > deadline:
            return sorted(run.name for run in task_runs)
        time.sleep(0.5)


def mime_and_hash(path: Path, metadata: dict[str, Any]) -> dict[str, Any]:
    """An analysis that shows what metadata it was given."""
    return {"mime_type": metadata["mime_type"], "sha256": metadata["sha256"]}


@pytest.mark.stack
def test_process_batch_does_every_step_of_every_good_file_and_names_the_failures(
    backup_storage: SavedBackupStorage,
    kafka_block: str,
    metadata_topic_cleanup: str,
    topic: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from msi_prefect.prefect_layer.file_history import file_history_key

    # The files' events go through the batch's gathered poster, not a post each.
    gathered: list[str] = []
    gather = GatheredEventPoster.add
    monkeypatch.setattr(
        GatheredEventPoster,
        "add",
        lambda poster, spec, related: (
            gathered.append(spec.name.value),
            gather(poster, spec, related),
        ),
    )
    dest = tmp_path / "dest"
    good = [
        file_params(dest, "run/a.csv", b"a,b\n1,2\n", topic),
        file_params(dest, "run/b.json", b'{"k": 1}', topic),
    ]
    invalid = {**file_params(dest, "run/c.tif", b"frame c", topic), "url": "s3://elsewhere/c.tif"}
    # Its metadata cannot be published (the topic is too long for the suffix); its backup
    # and analysis are still done.
    long_topic = "t" * 245
    unpublishable = file_params(dest, "run/d.txt", b"notes", long_topic)
    process_batch = load_flow("flows/process_batch.py:process_batch_flow")

    state = process_batch(
        files=[good[0], invalid, unpublishable, good[1]],
        backup_block=backup_storage.name,
        kafka_block=kafka_block,
        analysis="tests.prefect_layer.test_batches:mime_and_hash",
        return_state=True,
    )

    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, BatchFailedError)
    assert str(error).startswith(
        "Processing: 2 of 4 files failed: run/c.tif: invalid entry; run/d.txt: failed"
    )
    for params in [*good, unpublishable]:
        assert backup_storage.object(params["path"]) == (dest / params["path"]).read_bytes()
    assert backup_storage.object("run/c.tif") is None
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_name(flow_run_id) == "process 4 files: run/a.csv, ..."
    processed = ("run/a.csv", "run/b.json", "run/d.txt")
    task_runs = ("backup", "extract and publish metadata of", "analyze")
    assert _task_run_names(flow_run_id, 9) == sorted(
        f"{task_run} {path}" for task_run in task_runs for path in processed
    )
    steps = [EventName.BACKED_UP, EventName.METADATA_EXTRACTED, EventName.ANALYZED]
    for params in good:
        resource = f"msi.file.{topic}.{params['file_id']}"
        for name in steps:
            events = read_events(name, resource)
            assert [event.payload["path"] for event in events] == [params["path"]], name
        # The analysis got the metadata the run extracted.
        (analyzed,) = read_events(EventName.ANALYZED, resource)
        assert analyzed.payload["result"]["sha256"] == params["sha256"]
        # One version of the file's history holds its three steps.
        versions = read_artifacts(file_history_key(topic, params["path"]), flow_run_id)
        assert len(versions) == 1
        rows = json.loads(versions[0].data)
        assert {row["step"] for row in rows} == {"backup", "metadata", "analysis"}
    assert sorted(gathered) == sorted(
        [EventName.BACKED_UP.value, EventName.ANALYZED.value] * 3
        + [EventName.METADATA_EXTRACTED.value] * 2
    )
