"""`msi-prefect status`'s transfer lines: what each source says, and a source that is down.

The whole-stack test sends files through the real broker and Prefect server (the session's
stack, flows run in-process) and reads the status at each stage; `msi-prefect files`
shows the file the watcher excluded, with its reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from msi_prefect.stack.config import StackConfig, free_port_map
from msi_prefect.stack.transfer_status import (
    DEFAULT_CONSUMER_GROUP,
    DEFAULT_TOPIC,
    transfer_status,
)
from msi_prefect.transfer import registry_beside
from tests.conftest import RunningStack
from tests.flow_helpers import delete_block, load_flow, unique_name

SENT = {"run1/a.dat": b"a" * 1000, "run1/b.dat": b"b" * 2000, "c.dat": b"c"}
EXCLUDED = "instrument.log"


def test_the_fallback_names_are_the_embedded_blocks() -> None:
    from msi_prefect.prefect_layer.transfers.settings import (
        DEFAULT_CONSUMER_GROUP as SETTINGS_GROUP,
    )
    from msi_prefect.stack.embedded_blocks import TOPIC

    assert (DEFAULT_TOPIC, DEFAULT_CONSUMER_GROUP) == (TOPIC, SETTINGS_GROUP)


def test_sources_that_are_down_leave_notes_not_a_failed_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from msi_prefect.cli.stack import _print_transfer

    config = StackConfig(
        ports=free_port_map(),  # nothing listens there
        watch_dir=str(tmp_path / "inbox"),
        destination_dir=str(tmp_path / "received"),
    )
    status = transfer_status(config)
    assert status.topic == DEFAULT_TOPIC
    assert status.producer.sent_last_hour is None and status.messages_on_topic is None
    assert status.downstream.runs_pending is None
    notes = "\n".join(status.notes)
    for source in ("transfer settings:", "producer:", "consumer:", "broker:", "downstream runs:"):
        assert source in notes
    _print_transfer(status)
    text = capsys.readouterr().out
    assert "last hour     sent ?, rebuilt ?, rejected ?" in text
    assert "note: downstream runs: the Prefect API did not answer" in text


@pytest.fixture
def transfer_blocks(prefect_api: str, kafka_stack: RunningStack, topic: str) -> Iterator[str]:
    """Kafka and transfer settings blocks for the test's topic; yields the block name."""
    from msi_prefect.prefect_layer.transfers.kafka_cluster import KafkaCluster
    from msi_prefect.prefect_layer.transfers.settings import TransferSettings

    name = unique_name("status")
    KafkaCluster(bootstrap_servers=kafka_stack.bootstrap_servers).save(name)
    TransferSettings(
        topic=topic,
        consumer_group=f"status-{topic}",
        stability_window_s=0.5,
        upload_existing=True,
        exclude=["*.log"],
        downstream_dispatch="per-file",
    ).save(name)
    try:
        yield name
    finally:
        delete_block(KafkaCluster, name)
        delete_block(TransferSettings, name)


@pytest.mark.stack
def test_status_counts_the_files_sent_waiting_and_rebuilt(
    prefect_stack: RunningStack, transfer_blocks: str, topic: str, tmp_path: Path
) -> None:
    inbox, received = tmp_path / "inbox", tmp_path / "received"
    for relpath, data in {**SENT, EXCLUDED: b"log line\n"}.items():
        (inbox / relpath).parent.mkdir(parents=True, exist_ok=True)
        (inbox / relpath).write_bytes(data)
    received.mkdir()
    config = prefect_stack.config.model_copy(
        update={"watch_dir": str(inbox), "destination_dir": str(received)}
    )

    before = transfer_status(config, block_name=transfer_blocks)
    assert before.topic == topic and before.consumer_group == f"status-{topic}"
    assert before.producer.sent_last_hour is None  # no registry yet: a note says so
    assert any("no registry" in note for note in before.notes)

    watch = load_flow("flows/watch_directory.py:watch_directory_flow")
    sent = watch(
        directory=str(inbox),
        kafka_block=transfer_blocks,
        transfer_block=transfer_blocks,
        stop_after_files=len(SENT),
        idle_timeout_s=60,
    )
    assert sent == {"sent": len(SENT)}
    (inbox / "late.dat").write_bytes(b"dropped after the watcher stopped")

    on_topic = transfer_status(config, block_name=transfer_blocks)
    assert on_topic.producer.sent_last_hour == len(SENT)
    assert on_topic.producer.last_sent is not None
    assert on_topic.producer.last_sent.path in SENT
    assert on_topic.producer.waiting_in_folder == 1  # late.dat; the log is excluded
    assert on_topic.producer.skipped == 1
    # One message per small file, none consumed by the group yet.
    assert on_topic.messages_on_topic == len(SENT)
    assert on_topic.consumer.rebuilt_last_hour is None  # nothing received yet

    rebuild = load_flow("flows/reconstruct_files.py:reconstruct_files_flow")
    counts = rebuild(
        destination=str(received),
        kafka_block=transfer_blocks,
        transfer_block=transfer_blocks,
        stop_after_files=len(SENT),
        idle_timeout_s=60,
    )
    assert counts["reconstructed"] == len(SENT)

    after = transfer_status(config, block_name=transfer_blocks)
    assert after.consumer.rebuilt_last_hour == len(SENT)
    assert after.consumer.rejected_last_hour == 0 and after.consumer.receiving == 0
    assert after.consumer.last_rebuilt is not None
    assert after.consumer.last_rebuilt.path in SENT
    assert after.messages_on_topic == 0  # the group committed past every file
    assert after.downstream.files_waiting_for_batch == 0
    runs = after.downstream
    assert None not in (runs.runs_scheduled, runs.runs_pending, runs.runs_running)
    assert after.notes == []
    # An hour later the same files are no longer "last hour".
    later = transfer_status(config, now=time.time() + 7200, block_name=transfer_blocks)
    assert later.producer.sent_last_hour == 0 and later.consumer.rebuilt_last_hour == 0

    # `msi-prefect files` names the excluded file and the rule.
    listed = subprocess.run(
        [
            sys.executable, "-m", "msi_prefect.cli", "files", EXCLUDED, "--json",
            "--registry", str(registry_beside(inbox)), "--api-url", config.prefect_api_url,
        ],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    skipped = json.loads(listed.stdout)["skipped"]
    assert [(s["path"], s["topic"], s["reason"]) for s in skipped] == [
        (EXCLUDED, topic, "excluded")
    ]
    assert "exclude glob '*.log'" in skipped[0]["detail"]


def test_status_of_a_stopped_stack_shows_the_transfer_with_notes(tmp_path: Path) -> None:
    from msi_prefect.stack.config import StateDir
    from tests.stack_helpers import cli

    state = StateDir(tmp_path / ".msi")
    state.ensure_writable()
    state.save_config(
        StackConfig(
            ports=free_port_map(),
            watch_dir=str(tmp_path / "inbox"),
            destination_dir=str(tmp_path / "received"),
        )
    )
    result = cli(state.root, "status", "--json")
    assert result.returncode == 1, result.stderr  # every part is stopped
    data = json.loads(result.stdout)
    assert {"components", "healthy", "state_dir"} <= set(data)  # the keys it always had
    (transfer,) = data["transfers"]
    assert transfer["topic"] == DEFAULT_TOPIC and transfer["watch_dir"] == str(tmp_path / "inbox")
    assert transfer["producer"]["sent_last_hour"] is None
    assert transfer["messages_on_topic"] is None
    # Parts found stopped are not asked (no timeouts), and say so.
    assert "broker: stopped; no consumer lag" in transfer["notes"]
    assert any("the Prefect server is stopped" in note for note in transfer["notes"])
