"""Event specs for file outcomes: names, resources, payloads and deterministic ids."""

from __future__ import annotations

from msi_prefect.prefect_layer.events import EventName, from_reassembler, from_upload
from msi_prefect.transfer.producer import UploadOutcome, UploadResult
from msi_prefect.transfer.reassembler import FileEvent, FileEventKind


def _rebuilt(generation: int = 1) -> FileEvent:
    return FileEvent(
        kind=FileEventKind.RECONSTRUCTED,
        topic="lab",
        relpath="run1/image.tif",
        file_id="ab" * 16,
        generation=generation,
        size=1234,
        sha256="cd" * 32,
        url="file:///data/run1/image.tif",
    )


def test_reconstructed_event_names_the_file_and_its_topic() -> None:
    spec = from_reassembler(_rebuilt())
    assert spec.name is EventName.RECONSTRUCTED
    assert spec.resource["prefect.resource.id"] == f"msi.file.lab.{'ab' * 16}"
    assert spec.resource["msi.path"] == "run1/image.tif"
    assert spec.resource["msi.size"] == "1234"
    assert spec.resource["msi.sha256"] == "cd" * 32
    assert spec.resource["msi.url"] == "file:///data/run1/image.tif"
    assert spec.related == [
        {"prefect.resource.id": "msi.topic.lab", "prefect.resource.role": "topic"}
    ]
    assert spec.payload["path"] == "run1/image.tif"
    assert spec.payload["generation"] == 1


def test_event_ids_repeat_for_a_replay_and_differ_between_generations() -> None:
    assert from_reassembler(_rebuilt()).event_id == from_reassembler(_rebuilt()).event_id
    assert from_reassembler(_rebuilt(1)).event_id != from_reassembler(_rebuilt(2)).event_id


def test_rejected_messages_without_a_trusted_file_id_are_told_apart_by_offset() -> None:
    def rejected(offset: int) -> FileEvent:
        return FileEvent(
            kind=FileEventKind.REJECTED,
            topic="lab",
            relpath="../../etc/passwd",
            reason="unsafe path",
            reason_code="unsafe-path",
            partition=0,
            offset=offset,
        )

    first, second = from_reassembler(rejected(5)), from_reassembler(rejected(6))
    assert first.name is EventName.REJECTED
    assert first.payload["reason_code"] == "unsafe-path"
    assert first.event_id != second.event_id
    assert first.event_id == from_reassembler(rejected(5)).event_id


def test_uploaded_event_only_for_sent_files() -> None:
    sent = UploadResult(
        "a.txt", UploadOutcome.SENT, size=3, generation=2, sha256="ef" * 32, file_id="12" * 16
    )
    spec = from_upload("lab", sent)
    assert spec is not None and spec.name is EventName.UPLOADED
    assert spec.resource["msi.generation"] == "2"
    assert from_upload("lab", UploadResult("a.txt", UploadOutcome.ALREADY_SENT)) is None


PER_FILE_FLOWS = (
    "flows/backup_file.py:backup_file_flow",
    "flows/extract_metadata.py:extract_metadata_flow",
    "flows/analyze_file.py:analyze_file_flow",
)


def test_the_rebuilt_file_contract_is_one_list_of_fields() -> None:
    import inspect

    import yaml

    from msi_prefect.prefect_layer.events import (
        REBUILT_FILE_FIELDS,
        FileFacts,
        batch_event,
        facts_of,
    )
    from tests.flow_helpers import REPO, load_flow

    facts = facts_of(from_reassembler(_rebuilt()))
    assert tuple(facts.parameters()) == REBUILT_FILE_FIELDS
    assert FileFacts.from_parameters(facts.parameters()) == facts
    (entry,) = batch_event("lab", [facts]).payload["files"]
    assert tuple(entry) == REBUILT_FILE_FIELDS
    # prefect.yaml renders the per-file flows' parameters from the event payload.
    project = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert tuple(project["definitions"]["file_parameters"]) == REBUILT_FILE_FIELDS
    for entrypoint in PER_FILE_FLOWS:
        parameters = inspect.signature(load_flow(entrypoint).fn).parameters
        assert tuple(parameters)[: len(REBUILT_FILE_FIELDS)] == REBUILT_FILE_FIELDS, entrypoint
