"""The long-running flows, in-process against the real broker and Prefect server.

A folder is watched (`watch-directory`), its files are rebuilt (`reconstruct-files`), and
every file is announced by an event with a deterministic id that the server keeps once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.settings import get_current_settings

from msi_prefect.prefect_layer.dispatch.batcher import (
    RUNS_PER_BATCH_RUN,
    DownstreamRunCounts,
    PrefectRunCounter,
)
from msi_prefect.prefect_layer.event_outbox import PrefectEventPoster, event_body
from msi_prefect.prefect_layer.events import DownstreamDispatch, EventName, FileFacts, file_event
from msi_prefect.prefect_layer.transfers.kafka_cluster import KafkaCluster
from msi_prefect.prefect_layer.transfers.settings import TransferSettings
from msi_prefect.prefect_layer.transfers.streaming import RunCounts
from msi_prefect.transfer.producer import FileProducer, ProducerSettings
from msi_prefect.transfer.registry import Registry
from msi_prefect.transfer.wire import file_id_for
from tests.conftest import RunningStack
from tests.flow_helpers import delete_block, load_flow, read_events, unique_name

pytestmark = pytest.mark.stack

FILES = {"run1/a.tif": 70_000, "run1/b.csv": 10, "c.json": 0}


@contextlib.contextmanager
def saved_blocks(kafka_stack: RunningStack, **transfer: Any) -> Iterator[tuple[str, str]]:
    """Save a Kafka cluster block for the stack and transfer settings; delete them after."""
    kafka_name, transfer_name = unique_name("kafka"), unique_name("transfer")
    KafkaCluster(bootstrap_servers=kafka_stack.bootstrap_servers).save(kafka_name)
    TransferSettings(**transfer).save(transfer_name)
    try:
        yield kafka_name, transfer_name
    finally:
        delete_block(KafkaCluster, kafka_name)
        delete_block(TransferSettings, transfer_name)


def rebuild(dest: Path, blocks: tuple[str, str], files: int, **extra: Any) -> dict[str, int]:
    """Run the reconstruct-files flow until `files` files are done (or 60 s idle)."""
    kafka_name, transfer_name = blocks
    flow = load_flow("flows/reconstruct_files.py:reconstruct_files_flow")
    counts: dict[str, int] = flow(
        destination=str(dest),
        kafka_block=kafka_name,
        transfer_block=transfer_name,
        stop_after_files=files,
        idle_timeout_s=60,
        **extra,
    )
    return counts


@pytest.fixture
def blocks(prefect_api: str, kafka_stack: RunningStack, topic: str) -> Iterator[tuple[str, str]]:
    """A Kafka cluster block for the stack and transfer settings for the test's topic."""
    with saved_blocks(
        kafka_stack,
        topic=topic,
        stability_window_s=0.5,
        upload_existing=True,
        consumer_group=f"flows-{topic}",
    ) as names:
        yield names


def test_watch_then_rebuild_announces_every_file_once(
    blocks: tuple[str, str], topic: str, tmp_path: Path
) -> None:
    kafka_name, transfer_name = blocks
    source, dest = tmp_path / "instrument", tmp_path / "dest"
    digests = {}
    for relpath, size in FILES.items():
        path = source / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
        digests[relpath] = hashlib.sha256(path.read_bytes()).hexdigest()

    watch = load_flow("flows/watch_directory.py:watch_directory_flow")
    sent = watch(
        directory=str(source),
        kafka_block=kafka_name,
        transfer_block=transfer_name,
        registry_path=str(tmp_path / "registry.sqlite"),
        stop_after_files=len(FILES),
        idle_timeout_s=60,
    )
    assert sent == {"sent": len(FILES)}

    counts = rebuild(dest, blocks, len(FILES))
    assert counts["reconstructed"] == len(FILES)
    assert counts["rejected"] == 0
    for relpath, digest in digests.items():
        assert hashlib.sha256((dest / relpath).read_bytes()).hexdigest() == digest

    file_id = file_id_for("run1/a.tif")
    resource = f"msi.file.{topic}.{file_id}"
    uploaded = read_events(EventName.UPLOADED, resource)
    rebuilt = read_events(EventName.RECONSTRUCTED, resource)
    assert len(uploaded) == 1 and len(rebuilt) == 1
    payload = rebuilt[0].payload
    assert payload["path"] == "run1/a.tif"
    assert payload["sha256"] == digests["run1/a.tif"]
    assert payload["url"] == (dest / "run1" / "a.tif").as_uri()
    assert rebuilt[0].related[0]["prefect.resource.id"] == f"msi.topic.{topic}"
    # The progress artifact, published from a thread of its own, belongs to the flow run.
    artifacts = httpx.post(
        f"{os.environ['PREFECT_API_URL']}/artifacts/filter",
        json={"artifacts": {"key": {"any_": ["reconstruct-files"]}}},
        timeout=30,
    ).json()
    assert artifacts and all(artifact["flow_run_id"] for artifact in artifacts)


def test_progress_artifact_does_not_hold_up_the_transfer(monkeypatch: pytest.MonkeyPatch) -> None:
    """While the server is away, Prefect's client retries for a minute: not in our thread."""
    import prefect.artifacts

    published: list[str] = []

    def slow(markdown: str, key: str) -> None:
        time.sleep(1.5)
        published.append(markdown)

    monkeypatch.setattr(prefect.artifacts, "create_markdown_artifact", slow)
    counts = RunCounts("Rebuilding", "reconstruct-files")
    started = time.monotonic()
    counts.add("reconstructed", "a.dat")  # due: published in the background
    counts._published_at = 0.0  # due again while the first is still under way: skipped
    counts.add("reconstructed", "b.dat")
    assert time.monotonic() - started < 1.0
    counts.publish()  # the end of a run waits for its last publication
    assert len(published) == 2 and "| reconstructed | 2 |" in published[-1]


def test_upload_flow_sends_once_and_names_what_it_cannot_send(
    blocks: tuple[str, str], topic: str, tmp_path: Path
) -> None:
    kafka_name, transfer_name = blocks
    folder = tmp_path / "run7"
    (folder / "raw").mkdir(parents=True)
    (folder / "raw" / "a.tif").write_bytes(os.urandom(3000))
    (folder / "notes.txt").write_text("sample 7")
    upload = load_flow("flows/upload_file.py:upload_file_flow")
    args = {"kafka_block": kafka_name, "transfer_block": transfer_name}

    assert upload(paths=[str(folder)], **args) == {"sent": 2}
    assert upload(paths=[str(folder)], **args) == {"already-sent": 2}  # the registry remembers
    resource = f"msi.file.{topic}.{file_id_for('run7/raw/a.tif')}"
    assert len(read_events(EventName.UPLOADED, resource)) == 1

    state = upload(paths=[str(tmp_path / "nowhere")], **args, return_state=True)
    assert state.is_failed()
    assert "no such file or folder" in str(state.result(raise_on_failure=False))


def test_batch_dispatch_announces_every_file_in_exactly_one_batch(
    prefect_api: str, kafka_stack: RunningStack, topic: str, tmp_path: Path
) -> None:
    with saved_blocks(
        kafka_stack,
        topic=topic,
        consumer_group=f"batch-{topic}",
        downstream_dispatch=DownstreamDispatch.BATCH,
        batch_max_files=2,
        batch_max_wait_s=1.0,
    ) as (kafka_name, transfer_name):
        connection = KafkaCluster(bootstrap_servers=kafka_stack.bootstrap_servers).to_connection()
        source, dest = tmp_path / "instrument", tmp_path / "dest"
        source.mkdir()
        for relpath in FILES:
            (source / relpath.replace("/", "_")).write_bytes(relpath.encode())
        with Registry(tmp_path / "registry.sqlite") as registry:
            producer = FileProducer(connection, ProducerSettings(topic=topic), registry)
            for path in sorted(source.iterdir()):
                producer.submit(path, path.name)
            producer.flush()

        counts = rebuild(dest, (kafka_name, transfer_name), len(FILES))
        assert counts["reconstructed"] == len(FILES)

    batches = read_events(
        EventName.BATCH_READY, f"msi.batch.{topic}.*", until_found=lambda found: sum(
            len(event.payload["files"]) for event in found
        ) >= len(FILES),
    )  # fmt: skip
    sizes = sorted(len(event.payload["files"]) for event in batches)
    assert sizes == [1, 2]  # one full batch, then the rest when the run ended
    announced = sorted(entry["path"] for event in batches for entry in event.payload["files"])
    assert announced == sorted(relpath.replace("/", "_") for relpath in FILES)
    for event in batches:
        assert event.resource["msi.dispatch"] == "batch"
        for entry in event.payload["files"]:
            assert entry["url"] == (dest / entry["path"]).as_uri()
    # The per-file events are still there, labelled so the per-file triggers skip them.
    resource = f"msi.file.{topic}.{file_id_for('c.json')}"
    rebuilt = read_events(EventName.RECONSTRUCTED, resource)
    assert [event.resource["msi.dispatch"] for event in rebuilt] == ["batch"]


def test_an_event_emitted_twice_is_kept_once(prefect_api: str, topic: str) -> None:
    """The claim behind deterministic ids: a replay starts no downstream work twice."""
    facts = FileFacts(topic=topic, file_id=file_id_for("x.bin"), path="x.bin", generation=1)
    spec = file_event(EventName.RECONSTRUCTED, facts)
    spec.emit()
    spec.emit()
    resource = f"msi.file.{topic}.{facts.file_id}"
    first = read_events(EventName.RECONSTRUCTED, resource)
    assert [event.id for event in first] == [spec.event_id]
    # The server stores events in batches, one flush per interval: a second copy, sent just
    # after the first, would be stored by the next flush. Wait two of them for it.
    flush_s = get_current_settings().server.services.event_persister.flush_interval
    again = read_events(EventName.RECONSTRUCTED, resource, count=2, timeout_s=2 * flush_s)
    assert [event.id for event in again] == [spec.event_id]


def test_the_server_tells_which_posted_events_it_stored(prefect_api: str, topic: str) -> None:
    """What the event outbox's confirmation asks: stored ids are named, unknown ones not."""
    facts = FileFacts(topic=topic, file_id=file_id_for("y.bin"), path="y.bin", generation=1)
    spec = file_event(EventName.RECONSTRUCTED, facts)
    poster = PrefectEventPoster()
    never_posted = str(uuid.uuid4())
    try:
        poster([event_body(spec, [])])
        deadline = time.monotonic() + 15
        stored: set[str] = set()
        while str(spec.event_id) not in stored and time.monotonic() < deadline:
            time.sleep(0.5)
            stored = poster.stored([str(spec.event_id), never_posted])
    finally:
        poster.close()
    assert stored == {str(spec.event_id)}


def test_the_adaptive_gate_counts_the_downstream_runs_waiting_to_start(prefect_api: str) -> None:
    """What adaptive dispatch reads from the server: runs of the file flows, by state, a
    running batch run counted as the three per-file runs it does the work of."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Running, Scheduled

    @flow(name="process-batch")
    def batch_stand_in() -> None:
        """Named like the batch flow; never run."""

    @flow(name="backup-file")
    def per_file_stand_in() -> None:
        """Named like a per-file flow; never run."""

    counter = PrefectRunCounter()
    created = []
    try:
        before = counter()
        with get_client(sync_client=True) as client:
            for stand_in, state in [
                (batch_stand_in, Scheduled()),
                (batch_stand_in, Running()),
                (per_file_stand_in, Running()),
            ]:
                created.append(client.create_flow_run(stand_in, state=state).id)
        after = counter()
    finally:
        with get_client(sync_client=True) as client:
            for run_id in created:
                client.delete_flow_run(run_id)
        counter.close()
    assert after == DownstreamRunCounts(
        waiting=before.waiting + 1, running=before.running + RUNS_PER_BATCH_RUN + 1
    )


def test_openmsistream_format_through_the_flows(
    prefect_api: str, kafka_stack: RunningStack, topic: str, tmp_path: Path
) -> None:
    """The block's wire_format drives watch-directory; reconstruct-files takes it as a
    parameter; the rebuilt files are announced like native ones."""
    from msi_prefect.transfer.openmsistream_format import omsi_file_id

    with saved_blocks(
        kafka_stack,
        topic=topic,
        stability_window_s=0.5,
        upload_existing=True,
        consumer_group=f"flows-omsi-{topic}",
        wire_format="openmsistream",
    ) as (kafka_name, transfer_name):
        source, dest = tmp_path / "instrument", tmp_path / "dest"
        data = os.urandom(300_000)
        (source / "run1").mkdir(parents=True)
        (source / "run1" / "a.tif").write_bytes(data)
        watch = load_flow("flows/watch_directory.py:watch_directory_flow")
        sent = watch(
            directory=str(source),
            kafka_block=kafka_name,
            transfer_block=transfer_name,
            registry_path=str(tmp_path / "registry.sqlite"),
            stop_after_files=1,
            idle_timeout_s=60,
        )
        assert sent == {"sent": 1}
        counts = rebuild(dest, (kafka_name, transfer_name), 1, wire_format="openmsistream")
        assert counts["reconstructed"] == 1 and counts["rejected"] == 0
        assert (dest / "run1" / "a.tif").read_bytes() == data
        file_id = omsi_file_id("run1/a.tif", hashlib.sha512(data).hexdigest())
        resource = f"msi.file.{topic}.{file_id}"
        assert len(read_events(EventName.UPLOADED, resource)) == 1
        rebuilt = read_events(EventName.RECONSTRUCTED, resource)
        assert len(rebuilt) == 1
        assert rebuilt[0].payload["sha256"] == hashlib.sha256(data).hexdigest()
        assert rebuilt[0].payload["size"] == len(data)
