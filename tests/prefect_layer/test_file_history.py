"""The per-file history artifact: its key, its rows, and a step writing it on the stack."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from msi_prefect.prefect_layer.events import EventName, FileFacts, file_event
from msi_prefect.prefect_layer.file_history import (
    FILES_PER_EVENTS_QUERY,
    MAX_SLUG_CHARS,
    VERSIONS_PER_FILE,
    HistoryRow,
    PendingStep,
    file_history_batch,
    file_history_key,
    merge_rows,
    record_file_step,
    rows_from_events,
    write_histories,
    write_steps,
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


def _rebuilt_and_announced(topic: str, dest: Path, relpath: str) -> FileFacts:
    """A rebuilt file in ``dest``, with its sent and rebuilt events on the server, as the
    watcher and the reassembler emit them."""
    from msi_prefect.prefect_layer.event_outbox import emit_downstream_event

    data = f"frame of {relpath} ".encode() * 1000
    (dest / relpath).parent.mkdir(parents=True, exist_ok=True)
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
    emit_downstream_event(file_event(EventName.UPLOADED, facts))
    emit_downstream_event(file_event(EventName.RECONSTRUCTED, facts))
    resource = f"msi.file.{topic}.{facts.file_id}"
    assert read_events(EventName.RECONSTRUCTED, resource) and read_events(
        EventName.UPLOADED, resource
    )
    return facts


def _latest_rows(prefect_api: str, key: str) -> tuple[dict[str, Any], list[tuple[int, str]]]:
    latest = httpx.get(f"{prefect_api}/artifacts/{key}/latest", timeout=30).json()
    assert latest["type"] == "table" and latest["flow_run_id"]
    rows = json.loads(latest["data"])
    return latest, [(row["generation"], row["step"]) for row in rows]


@pytest.mark.stack
def test_a_backup_writes_the_files_history_found_by_its_key(
    prefect_api: str, topic: str, tmp_path: Path
) -> None:
    from prefect import flow

    from msi_prefect.prefect_layer.backup.storage import BackupStorage
    from msi_prefect.prefect_layer.backup.tasks import backup_file
    from msi_prefect.prefect_layer.flow_inputs import RebuiltFile

    relpath = "run9/Sample 01.tif"
    facts = _rebuilt_and_announced(topic, tmp_path / "dest", relpath)

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
    latest, steps = _latest_rows(prefect_api, key)
    assert steps == [(1, "sent"), (1, "rebuilt"), (1, "backup")]
    rows = json.loads(latest["data"])
    assert rows[2]["details"].startswith("backup_url file://")
    assert rows[2]["run"] == f"backup {relpath}"


@pytest.mark.stack
def test_a_batch_run_writes_each_files_history_once_with_shared_reads(
    prefect_api: str, topic: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch backup of 3 files: each file's history gets its rows in one version,
    attached to the file's own task run: 3 writes, the reads shared (latest versions
    before and after, newest versions, transfer events)."""
    from prefect import flow

    from msi_prefect.prefect_layer import file_history
    from msi_prefect.prefect_layer.backup.storage import BackupStorage
    from msi_prefect.prefect_layer.backup.tasks import backup_file
    from msi_prefect.prefect_layer.dispatch.batches import run_per_file

    paths = ["batch7/a.tif", "batch7/b.tif", "batch7/c.tif"]
    entries = [
        _rebuilt_and_announced(topic, tmp_path / "dest", path).parameters() for path in paths
    ]
    calls: Counter[str] = Counter()
    real_post = file_history._HistoryApi.post

    def counted(api: Any, path: str, body: dict[str, Any]) -> Any:
        calls[path] += 1
        return real_post(api, path, body)

    monkeypatch.setattr(file_history._HistoryApi, "post", counted)
    storage = BackupStorage(url=(tmp_path / "backup").as_uri())

    @flow(name="history-batch-test")
    def back_up_batch() -> None:
        run_per_file("Backups", entries, lambda f: backup_file(f, storage, return_state=True))

    back_up_batch()
    assert calls == Counter(
        {"/artifacts/latest/filter": 2, "/events/filter": 1, "/artifacts/": 3,
         "/artifacts/filter": 1}
    )  # fmt: skip
    task_runs = set()
    for path in paths:
        latest, steps = _latest_rows(prefect_api, file_history_key(topic, path))
        assert steps == [(1, "sent"), (1, "rebuilt"), (1, "backup")]
        assert json.loads(latest["data"])[2]["run"] == f"backup {path}"
        task_runs.add(latest["task_run_id"])
    assert None not in task_runs and len(task_runs) == len(paths)


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
    """The calls of the history against versions kept as the server keeps them, counted.

    A version gets its creation stamp when its write begins and is committed (becomes the
    UI's latest) when it ends. ``before_next_write`` runs other writers between a writer's
    read and its write; ``during_next_write`` between the stamp and the commit, as a
    server serving several requests at once (PostgreSQL) may.
    """

    def __init__(self, events: list[dict[str, Any]] | None = None) -> None:
        self.committed: list[dict[str, Any]] = []  # in commit order
        self.events = events or []
        self.before_next_write: list[Callable[[], None]] = []
        self.during_next_write: list[Callable[[], None]] = []
        self.calls: Counter[str] = Counter()
        self._stamp = 0

    def latest_of(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        """Artifact collections, as the API returns them: the latest version's id is
        ``latest_id``, ``id`` is the collection's."""
        self.calls["latest"] += 1
        latest = {v["key"]: v for v in self.committed if v["key"] in keys}  # last one wins
        return {
            key: {"key": key, "id": f"collection-{key}", "latest_id": v["id"], "data": v["data"]}
            for key, v in latest.items()
        }

    def versions_of(self, keys: list[str]) -> dict[str, list[dict[str, Any]]]:
        self.calls["versions"] += 1
        newest_first = sorted(self.committed, key=lambda v: v["created"], reverse=True)
        found: dict[str, list[dict[str, Any]]] = {}
        for version in newest_first[: VERSIONS_PER_FILE * len(keys)]:
            if version["key"] in keys:
                found.setdefault(version["key"], []).append(version)
        return found

    def transfer_events(self, resource_ids: list[str]) -> list[dict[str, Any]]:
        self.calls["events"] += 1
        assert len(resource_ids) <= FILES_PER_EVENTS_QUERY
        return [e for e in self.events if e["resource"]["prefect.resource.id"] in resource_ids]

    def create_table(
        self, key: str, rows: list[HistoryRow], description: str, *run_ids: str | None
    ) -> str:
        while self.before_next_write:
            self.before_next_write.pop()()
        self.calls["writes"] += 1
        self._stamp += 1
        version = {"key": key, "id": f"v{self._stamp}", "created": self._stamp,
                   "data": json.dumps([asdict(row) for row in rows])}  # fmt: skip
        while self.during_next_write:
            self.during_next_write.pop()()
        self.committed.append(version)
        return str(version["id"])

    def shown(self, key: str) -> list[str]:
        """The steps of the version the UI shows (the last committed)."""
        latest = self.latest_of([key]).get(key)
        assert latest is not None
        return sorted(row["step"] for row in json.loads(latest["data"]))


FILE = ("lab.raw", "run1/a.tif")


def _step(step: str, second: int, path: str = FILE[1]) -> PendingStep:
    return PendingStep(
        key=file_history_key(FILE[0], path),
        topic=FILE[0],
        path=path,
        file_id=file_id_for(path),
        row=HistoryRow(1, step, f"2026-12-05T10:00:0{second}+00:00", step, ""),
    )


def _transfer_events(path: str) -> list[dict[str, Any]]:
    facts = FileFacts(topic=FILE[0], file_id=file_id_for(path), path=path, generation=1)
    return [
        {
            "event": name.value,
            "occurred": "2026-12-05T09:59:00+00:00",
            "payload": file_event(name, facts).payload,
            "resource": {"prefect.resource.id": f"msi.file.{FILE[0]}.{facts.file_id}"},
        }
        for name in (EventName.UPLOADED, EventName.RECONSTRUCTED)
    ]


def test_a_step_written_between_anothers_read_and_write_is_not_lost() -> None:
    """Metadata writes while analysis is between its read and its write: analysis's version
    lacks the metadata row, and only its look after the write repairs it."""
    server = _InMemoryHistories()
    api = cast(Any, server)
    write_histories(api, [_step("rebuilt", 1)])
    server.before_next_write.append(lambda: write_histories(api, [_step("metadata", 2)]))

    write_histories(api, [_step("analysis", 3)])

    assert server.shown(_step("rebuilt", 1).key) == ["analysis", "metadata", "rebuilt"]


def test_the_version_committed_last_is_complete_though_stamped_older() -> None:
    """On PostgreSQL a write stamped earlier can commit later: the UI then shows analysis's
    version, stamped before metadata's, and it must still get metadata's row."""
    server = _InMemoryHistories()
    api = cast(Any, server)
    write_histories(api, [_step("rebuilt", 1)])
    # Analysis's version is stamped, then metadata reads, writes and looks, then
    # analysis's version commits, last.
    server.during_next_write.append(lambda: write_histories(api, [_step("metadata", 2)]))

    write_histories(api, [_step("analysis", 3)])

    assert [v["id"] for v in server.committed] == ["v1", "v3", "v2", "v4"]  # analysis again
    assert server.shown(_step("rebuilt", 1).key) == ["analysis", "metadata", "rebuilt"]


def test_a_step_with_a_version_committed_after_its_own_writes_once() -> None:
    """Backup writes, metadata reads that version, writes and looks before backup looks:
    the UI shows metadata's version, whose writer looked after backup's write, so backup
    does not write again (nor read the versions)."""
    server = _InMemoryHistories()
    api = cast(Any, server)
    write_histories(api, [_step("rebuilt", 1)])
    server.calls.clear()
    real = {name: getattr(server, name) for name in ("latest_of", "versions_of")}

    def metadata_before(name: str) -> Callable[[list[str]], Any]:
        def call(keys: list[str]) -> Any:
            if server.calls["writes"] == 1:  # backup wrote: this is its look
                for method_name, method in real.items():
                    setattr(server, method_name, method)
                write_histories(api, [_step("metadata", 3)])
            return real[name](keys)

        return call

    for name in real:
        setattr(server, name, metadata_before(name))
    write_histories(api, [_step("backup", 2)])

    assert server.calls["writes"] == 2  # backup, metadata: no repair
    assert server.shown(_step("rebuilt", 1).key) == ["backup", "metadata", "rebuilt"]


def test_of_two_steps_that_read_and_wrote_at_once_only_the_last_writes_again() -> None:
    """Metadata and analysis batch runs flush the same files at once: both read, both
    write, then both look. Only the writer whose version the UI shows repairs a file."""
    paths = [f"run1/f{index}.tif" for index in range(3)]
    server = _InMemoryHistories()
    api = cast(Any, server)
    write_histories(api, [_step("rebuilt", 1, path) for path in paths])
    server.calls.clear()
    together = threading.Barrier(2, timeout=10)
    phase = threading.local()  # per writer: "read" until its first write, then "wrote"
    real = {name: getattr(server, name) for name in ("latest_of", "versions_of", "create_table")}

    def read(name: str) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            now = getattr(phase, "now", "read")
            if now == "wrote":  # its look: after both wrote, before either writes again
                phase.now = "looked"
                together.wait()
            found = real[name](*args)
            if now in ("read", "wrote"):  # its read: before either writes
                phase.now = "reading" if now == "read" else "looked"
                together.wait()
            return found

        return call

    def write(*args: Any) -> str:
        if getattr(phase, "now", "read") in ("read", "reading"):
            phase.now = "wrote"
        return str(real["create_table"](*args))

    server.latest_of = read("latest_of")  # type: ignore[method-assign]
    server.versions_of = read("versions_of")  # type: ignore[method-assign]
    server.create_table = write  # type: ignore[method-assign]
    writers = [
        threading.Thread(
            target=write_histories, args=(api, [_step(step, second, p) for p in paths])
        )
        for step, second in (("metadata", 2), ("analysis", 3))
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(10)
    for name, method in real.items():
        setattr(server, name, method)

    assert server.calls["writes"] == 2 * len(paths) + len(paths)  # one repair per file
    for path in paths:
        shown = server.shown(file_history_key(FILE[0], path))
        assert shown == ["analysis", "metadata", "rebuilt"]


def test_a_batch_writes_each_file_once_and_shares_its_reads() -> None:
    """30 files of a batch run: one version each; the reads are per 25 files (latest,
    look) and per 16 files lacking their transfer rows (events), not per file."""
    paths = [f"run1/f{index:02d}.tif" for index in range(30)]
    server = _InMemoryHistories([e for path in paths for e in _transfer_events(path)])

    write_histories(cast(Any, server), [_step("backup", 1, path) for path in paths])

    assert server.calls == Counter(writes=30, latest=4, versions=2, events=3)
    for path in paths:
        assert server.shown(file_history_key(FILE[0], path)) == ["backup", "rebuilt", "sent"]


def test_a_batch_runs_rows_are_held_and_written_at_its_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from msi_prefect.prefect_layer import file_history

    server = _InMemoryHistories(_transfer_events(FILE[1]))
    monkeypatch.setattr(file_history, "_API", server)
    server.lock = threading.Lock()  # type: ignore[attr-defined]
    server.paused_until = 0.0  # type: ignore[attr-defined]
    facts = FileFacts(topic=FILE[0], file_id=file_id_for(FILE[1]), path=FILE[1], generation=1)

    with file_history_batch() as batch:
        assert record_file_step(file_event(EventName.BACKED_UP, facts))
        assert server.calls["writes"] == 0  # held
    assert batch.written == 1 and server.calls["writes"] == 1
    # Outside a batch: written at once.
    assert record_file_step(file_event(EventName.ANALYZED, facts))
    assert server.calls["writes"] == 2
    assert server.shown(file_history_key(*FILE)) == ["analysis", "backup", "rebuilt", "sent"]


def test_a_failed_write_never_fails_the_step_and_pauses_the_history(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from msi_prefect.prefect_layer import file_history

    server = _InMemoryHistories()

    def away(keys: list[str]) -> dict[str, Any]:
        raise httpx.ConnectError("refused")

    server.latest_of = away  # type: ignore[method-assign]
    server.lock = threading.Lock()  # type: ignore[attr-defined]
    server.paused_until = 0.0  # type: ignore[attr-defined]
    monkeypatch.setattr(file_history, "_API", server)

    assert not write_steps([_step("backup", 1)])
    assert server.paused_until > time.monotonic()  # type: ignore[attr-defined]
    assert not write_steps([_step("metadata", 2)])  # paused: no call
    assert server.calls["writes"] == 0
