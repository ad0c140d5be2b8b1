"""The per-file history artifact: its key, its rows, and a step writing it on the stack."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from msi_prefect.prefect_layer.events import EventName, FileFacts, file_event
from msi_prefect.prefect_layer.file_history import (
    MAX_SLUG_CHARS,
    HistoryRow,
    _write,
    file_history_key,
    merge_rows,
    rows_from_events,
)
from msi_prefect.transfer.wire import file_id_for
from tests.flow_helpers import read_events

PREFECT_KEY = re.compile(r"[a-z0-9-]+")


def test_key_is_a_readable_slug_of_the_path_and_valid_for_prefect() -> None:
    key = file_history_key("lab-files", "Run7/Sample_01.TIF")
    assert PREFECT_KEY.fullmatch(key)
    assert key.startswith("file-run7-sample-01-tif-")
    # Stable: the same file always gets the same key.
    assert key == file_history_key("lab-files", "Run7/Sample_01.TIF")


def test_files_whose_slugs_are_alike_never_share_a_key() -> None:
    keys = {
        file_history_key("lab", "a b.tif"),
        file_history_key("lab", "a_b.tif"),
        file_history_key("lab", "A-B.TIF"),
        file_history_key("other", "a b.tif"),
    }
    assert len(keys) == 4


def test_a_long_or_unusual_path_keeps_its_file_name_and_stays_valid() -> None:
    long_path = "/".join(["very-deep-folder"] * 20) + "/frame_0001.tif"
    key = file_history_key("lab", long_path)
    assert PREFECT_KEY.fullmatch(key) and key.endswith(
        f"frame-0001-tif-{file_history_key('lab', long_path)[-10:]}"
    )
    assert len(key) <= len("file-") + MAX_SLUG_CHARS + 1 + 10
    odd = file_history_key("lab", "données/日本語.dat")
    assert PREFECT_KEY.fullmatch(odd) and "--" not in odd


def _event(name: EventName, generation: int, at: str, run: str, **extra: object) -> dict:
    facts = FileFacts(
        topic="lab", file_id="f" * 32, path="a.tif", generation=generation, extra=dict(extra)
    )
    spec = file_event(name, facts)
    return {
        "event": name.value,
        "occurred": at,
        "payload": spec.payload,
        "related": [{"prefect.resource.role": "flow-run", "prefect.resource.name": run}],
    }


def test_rows_merge_by_generation_and_step_keeping_the_newest() -> None:
    events = [
        _event(EventName.RECONSTRUCTED, 1, "2026-01-01T00:00:02Z", "rebuild", url="file:///a"),
        _event(EventName.UPLOADED, 1, "2026-01-01T00:00:01Z", "watch", sha256="ab"),
        _event(EventName.UPLOADED, 2, "2026-01-01T00:01:00Z", "watch"),
    ]
    from_events = rows_from_events(events)
    backup = HistoryRow(1, "backup", "2026-01-01T00:00:03Z", "backup a.tif", "backup_url s3://b")
    again = HistoryRow(1, "backup", "2026-01-01T00:05:00Z", "backup a.tif", "backup_url s3://c")
    rows = merge_rows([backup], from_events, [again], from_events)
    assert [(r.generation, r.step) for r in rows] == [
        (1, "sent"),
        (1, "rebuilt"),
        (1, "backup"),
        (2, "sent"),
    ]
    assert rows[0].run == "watch" and rows[0].details == "sha256 ab"
    assert rows[1].details == "url file:///a"
    assert rows[2].details == "backup_url s3://c"  # the re-run's row


# --------------------------------------------------------------------------- stack


@pytest.mark.stack
def test_a_backup_writes_the_files_history_found_by_its_key(
    prefect_api: str, topic: str, tmp_path: Path
) -> None:
    from prefect import flow

    from msi_prefect.prefect_layer.backup.storage import BackupStorage
    from msi_prefect.prefect_layer.backup.tasks import backup_file
    from msi_prefect.prefect_layer.event_outbox import emit_downstream_event
    from msi_prefect.prefect_layer.flow_inputs import RebuiltFile

    relpath = "run9/Sample 01.tif"
    data = b"frame " * 1000
    dest = tmp_path / "dest"
    (dest / "run9").mkdir(parents=True)
    (dest / relpath).write_bytes(data)
    facts = FileFacts(
        topic=topic,
        file_id=file_id_for(relpath),
        path=relpath,
        generation=1,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        url=(dest / relpath).as_uri(),
    )
    # The transfer's own events, as the watcher and the reassembler emit them.
    emit_downstream_event(file_event(EventName.UPLOADED, facts))
    emit_downstream_event(file_event(EventName.RECONSTRUCTED, facts))
    resource = f"msi.file.{topic}.{facts.file_id}"
    assert read_events(EventName.RECONSTRUCTED, resource) and read_events(
        EventName.UPLOADED, resource
    )

    @flow(name="history-test")
    def back_up() -> None:
        file = RebuiltFile.from_parameters(**facts.parameters())
        backup_file(file, BackupStorage(url=(tmp_path / "backup").as_uri()))

    back_up()
    key = file_history_key(topic, relpath)
    found = httpx.post(
        f"{prefect_api}/artifacts/filter",
        json={"artifacts": {"key": {"like_": "sample-01"}}},
        timeout=30,
    ).json()
    assert key in {artifact["key"] for artifact in found}
    latest = httpx.get(f"{prefect_api}/artifacts/{key}/latest", timeout=30).json()
    assert latest["type"] == "table" and latest["flow_run_id"]
    rows = json.loads(latest["data"])
    assert [(row["generation"], row["step"]) for row in rows] == [
        (1, "sent"),
        (1, "rebuilt"),
        (1, "backup"),
    ]
    assert rows[2]["details"].startswith("backup_url file://")
    assert rows[2]["run"] == f"backup {relpath}"


def test_rejections_are_written_from_a_bounded_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from msi_prefect.prefect_layer import file_history

    release = threading.Event()
    written: list[str] = []

    def slow_record(spec: object, run_name: str | None = None) -> bool:
        release.wait(10)
        written.append(str(spec.payload["path"]))
        return True

    monkeypatch.setattr(file_history, "record_file_step", slow_record)
    writer = file_history.RejectionHistoryWriter(max_queued=1)

    def rejected(path: str) -> object:
        facts = FileFacts(topic="lab", file_id="f" * 32, path=path, generation=1)
        return file_event(EventName.REJECTED, facts)

    writer.submit(file_event(EventName.UPLOADED, FileFacts("lab", "f" * 32, "sent.dat", 1)))
    writer.submit(rejected(""))  # a message rejected before it named a file: no row
    for index in range(3):
        writer.submit(rejected(f"bad{index}.dat"))
    assert writer.dropped >= 1  # the writer holds one, the queue one: the rest are dropped
    release.set()
    writer.close()
    assert writer.written == len(written) == 3 - writer.dropped
    assert all(path.startswith("bad") for path in written)


# --------------------------------------------------------------- concurrent writers


class _InMemoryHistories:
    """The artifact calls of the history against versions kept as the server keeps them;
    ``before_first_write`` runs another writer between this one's read and its write."""

    def __init__(self) -> None:
        self.stored: list[dict[str, str]] = []  # oldest first
        self.before_first_write: list[Callable[[], None]] = []

    def latest(self, key: str) -> dict[str, str] | None:
        versions = self.versions(key)
        return versions[0] if versions else None

    def versions(self, key: str) -> list[dict[str, str]]:
        return [version for version in reversed(self.stored) if version["key"] == key]

    def create_table(self, key: str, rows: list[HistoryRow], description: str) -> str:
        while self.before_first_write:
            self.before_first_write.pop()()
        data = json.dumps([asdict(row) for row in rows])
        self.stored.append({"key": key, "id": str(len(self.stored)), "data": data})
        return self.stored[-1]["id"]

    def file_events(self, topic: str, file_id: str) -> list[dict[str, str]]:
        return []


def _row(step: str, second: int) -> HistoryRow:
    return HistoryRow(
        generation=1, step=step, at=f"2026-12-05T10:00:0{second}+00:00", run=step, details=""
    )


def test_a_step_written_between_anothers_read_and_write_is_not_lost() -> None:
    """Metadata writes while analysis is between its read and its write: analysis's version
    lacks the metadata row, and only a look after the write (at every version) repairs it."""
    server = _InMemoryHistories()
    api = cast(Any, server)
    file = ("lab.raw", "run1/a.tif", "ab" * 16)
    _write(api, *file, _row("rebuilt", 1))
    server.before_first_write.append(lambda: _write(api, *file, _row("metadata", 2)))

    _write(api, *file, _row("analysis", 3))

    latest = server.latest(file_history_key("lab.raw", "run1/a.tif"))
    assert latest is not None
    steps = [row["step"] for row in json.loads(latest["data"])]
    assert sorted(steps) == ["analysis", "metadata", "rebuilt"]
