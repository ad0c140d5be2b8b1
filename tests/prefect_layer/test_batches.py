"""Batch flows: every file of a batch gets its own task run and event; bad entries fail alone."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
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
from msi_prefect.prefect_layer.transfers.kafka_cluster import KafkaCluster
from msi_prefect.prefect_layer.transfers.settings import MAX_BATCH_FILES
from tests.conftest import RunningStack
from tests.flow_helpers import (
    SavedBackupStorage,
    delete_block,
    file_params,
    flow_run_name,
    load_flow,
    read_events,
    saved_backup_storage,
    unique_name,
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


@pytest.fixture
def backup_storage(prefect_api: str, prefect_stack: RunningStack) -> Iterator[SavedBackupStorage]:
    yield from saved_backup_storage(prefect_stack.s3_env())


@pytest.mark.stack
def test_backup_batch_backs_up_every_good_file_and_names_the_bad_one(
    backup_storage: SavedBackupStorage,
    topic: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
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
        file_params(dest, "run/a.tif", b"frame a" * 100, topic),
        file_params(dest, "run/b.tif", b"frame b" * 100, topic),
    ]
    bad = {**file_params(dest, "run/c.tif", b"frame c", topic), "url": "s3://elsewhere/c.tif"}
    backup_batch_flow = load_flow("flows/backup_batch.py:backup_batch_flow")

    state = backup_batch_flow(
        files=[good[0], bad, good[1]], backup_block=backup_storage.name, return_state=True
    )

    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, BatchFailedError)
    assert str(error).startswith("Backups: 1 of 3 files failed: run/c.tif: invalid entry")
    assert backup_storage.object("run/a.tif") == b"frame a" * 100
    assert backup_storage.object("run/b.tif") == b"frame b" * 100
    assert backup_storage.object("run/c.tif") is None
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_name(flow_run_id) == "backup 3 files: run/a.tif, ..."
    assert _task_run_names(flow_run_id, 2) == ["backup run/a.tif", "backup run/b.tif"]
    for params in good:
        events = read_events(EventName.BACKED_UP, f"msi.file.{topic}.{params['file_id']}")
        assert [event.payload["path"] for event in events] == [params["path"]]
    assert gathered == [EventName.BACKED_UP.value] * len(good)


@pytest.mark.stack
def test_metadata_and_analysis_batches_record_every_file(
    prefect_api: str, prefect_stack: RunningStack, topic: str, tmp_path: Path
) -> None:
    from confluent_kafka.admin import AdminClient

    from msi_prefect.prefect_layer.metadata_tasks import metadata_topic

    dest = tmp_path / "dest"
    files = [
        file_params(dest, "x.csv", b"a,b\n1,2\n", topic),
        file_params(dest, "y.json", b'{"k": 1}', topic),
    ]
    kafka_name = unique_name("kafka")
    KafkaCluster(bootstrap_servers=prefect_stack.bootstrap_servers).save(kafka_name)
    try:
        metadata_batch = load_flow("flows/extract_metadata_batch.py:extract_metadata_batch_flow")
        state = metadata_batch(files=files, kafka_block=kafka_name, return_state=True)
        assert state.is_completed(), state.message
        assert [r.outcome.value for r in state.result()] == ["done", "done"]
        assert _task_run_names(state.state_details.flow_run_id, 4) == [
            "extract metadata of x.csv",
            "extract metadata of y.json",
            "publish metadata of x.csv",
            "publish metadata of y.json",
        ]
    finally:
        delete_block(KafkaCluster, kafka_name)
        admin = AdminClient({"bootstrap.servers": prefect_stack.bootstrap_servers})
        if metadata_topic(topic) in admin.list_topics(timeout=10).topics:
            for future in admin.delete_topics([metadata_topic(topic)]).values():
                future.result(timeout=30)

    analyze_batch = load_flow("flows/analyze_batch.py:analyze_batch_flow")
    state = analyze_batch(files=files, return_state=True)
    assert state.is_completed(), state.message
    assert _task_run_names(state.state_details.flow_run_id, 2) == [
        "analyze x.csv",
        "analyze y.json",
    ]
    for params in files:
        for name in (EventName.METADATA_EXTRACTED, EventName.ANALYZED):
            events = read_events(name, f"msi.file.{topic}.{params['file_id']}")
            assert len(events) == 1, name
