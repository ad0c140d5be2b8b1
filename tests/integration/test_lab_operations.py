"""Running it in a lab, on a whole stack: the notices `up --notify-url` sets up, and
`msi-prefect files` ("where is my file?").

One stack for both (a whole stack costs a minute to start on 2 cores). A real HTTP
receiver on loopback gets the notices; each kind must arrive once, name its file and its
run in the UI, and show no secret of the stack.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import httpx
import pytest

from msi_prefect.stack.config import BACKUP_BUCKET
from msi_prefect.stack.embedded_blocks import TOPIC
from msi_prefect.stack.processes import live_flow_runs
from msi_prefect.transfer.wire import ChunkHeader, encode_chunk_headers, message_key
from tests.stack_helpers import (
    API_TIMEOUT_S,
    UserStack,
    cli,
    kill9,
    transfer_run_ids,
    user_stack,
    wait_until_done,
)

pytestmark = [pytest.mark.stack, pytest.mark.own_stack]

NOTICE_TIMEOUT_S = 120.0
DONE_TIMEOUT_S = 240.0
POLL_S = 1.0
# After the last notice: time for a duplicate to show up, if one were sent.
SETTLE_S = 10.0
DROPPED = {"alpha.dat": b"alpha from the microscope " * 400, "run7/beta.dat": b"beta " * 3000}
FORGED_PATH = "forged/bad.dat"
GHOST_PATH = "ghost/never-rebuilt.dat"


class NoticeReceiver:
    """A webhook on 127.0.0.1 that keeps every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.notices: list[dict[str, Any]] = []
        self.raw: list[str] = []
        lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                with lock:
                    receiver.raw.append(body)
                    receiver.notices.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """The webhook's URL."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def __enter__(self) -> NoticeReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def with_subject(self, start: str) -> list[dict[str, Any]]:
        """The notices whose subject starts with ``start``."""
        return [n for n in list(self.notices) if str(n.get("subject", "")).startswith(start)]

    def wait_for(self, start: str, timeout_s: float = NOTICE_TIMEOUT_S) -> dict[str, Any]:
        """The first notice whose subject starts with ``start`` (waits for it)."""
        deadline = time.monotonic() + timeout_s
        while not self.with_subject(start):
            assert time.monotonic() < deadline, f"no notice {start!r}: {self.notices}"
            time.sleep(POLL_S)
        return self.with_subject(start)[0]


@pytest.fixture(scope="module")
def receiver() -> Iterator[NoticeReceiver]:
    with NoticeReceiver() as running:
        yield running


@pytest.fixture(scope="module")
def lab_stack(
    tmp_path_factory: pytest.TempPathFactory, receiver: NoticeReceiver
) -> Iterator[UserStack]:
    """A whole stack started with ``--notify-url``, and two files dropped and done."""
    with user_stack(tmp_path_factory.mktemp("lab"), "--notify-url", receiver.url) as stack:
        for name, data in DROPPED.items():
            (stack.inbox / name).parent.mkdir(parents=True, exist_ok=True)
            (stack.inbox / name).write_bytes(data)
        done, _ = wait_until_done(stack.api, 0.0, lambda: set(DROPPED), DONE_TIMEOUT_S)
        assert done, "the dropped files were not all backed up, described and analysed"
        yield stack


def _files_json(stack: UserStack, *args: str) -> dict[str, Any]:
    result = cli(stack.state_dir, "files", "--json", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def _poll(check: Callable[[], bool], what: str, timeout_s: float = NOTICE_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(POLL_S * 2)


@pytest.mark.timeout(900)
def test_files_shows_every_step_of_each_dropped_file(lab_stack: UserStack) -> None:
    def all_runs_final() -> bool:
        report = _files_json(lab_stack)
        runs = [
            record["run"]
            for history in report["files"]
            for generation in history["generations"]
            for step, record in generation["steps"].items()
            if step in ("backup", "metadata", "analysis")
        ]
        return bool(runs) and all(run["state"] == "COMPLETED" for run in runs)

    _poll(all_runs_final, "the downstream runs did not all complete")
    report = _files_json(lab_stack)
    assert report["format"] == 1 and report["truncated"] is False
    # The watcher's registry was read: both files sent, none left behind.
    assert report["registry"] == str(lab_stack.root / ".msi-producer-registry.sqlite")
    assert report["not_sent"] == []
    files = {history["path"]: history for history in report["files"]}
    assert set(files) == set(DROPPED)
    for path, history in files.items():
        assert history["topic"] == TOPIC
        (generation,) = history["generations"]
        assert generation["generation"] == 1
        assert generation["reached"] == "analysis" and generation["waiting_for"] == []
        steps = generation["steps"]
        assert set(steps) == {"sent", "rebuilt", "backup", "metadata", "analysis"}
        digest = hashlib.sha256(DROPPED[path]).hexdigest()
        assert steps["sent"]["details"]["sha256"] == digest
        assert steps["sent"]["run"]["name"].startswith("watch ")
        assert steps["rebuilt"]["details"]["url"].endswith(path)
        assert steps["rebuilt"]["details"]["size"] == len(DROPPED[path])
        backup_url = steps["backup"]["details"]["backup_url"]
        assert backup_url.startswith(f"s3://{BACKUP_BUCKET}/") and backup_url.endswith(path)
        assert steps["backup"]["details"]["sha256"] == digest
        assert steps["metadata"]["details"]["metadata_topic"] == f"{TOPIC}.metadata"
        assert steps["analysis"]["details"]["analysis"]
        for step in ("backup", "metadata", "analysis"):
            run = steps[step]["run"]
            assert run["state"] == "COMPLETED", (path, step, run)
            assert run["ui_url"].endswith(f"/runs/flow-run/{run['id']}")
            assert path in run["name"] or "files" in run["name"]
        assert steps["sent"]["at"] <= steps["rebuilt"]["at"] <= steps["backup"]["at"]

    # A pattern narrows the list; the text form names the steps too.
    assert [h["path"] for h in _files_json(lab_stack, "run7/*")["files"]] == ["run7/beta.dat"]
    text = cli(lab_stack.state_dir, "files", "alpha.*")
    assert text.returncode == 0, text.stderr
    for word in ("alpha.dat", "generation 1: reached analysis", "backup", "s3://"):
        assert word in text.stdout, word


def test_each_file_has_its_history_artifact_and_status_counts_it(lab_stack: UserStack) -> None:
    report = _files_json(lab_stack)
    keys = {history["path"]: history["artifact_key"] for history in report["files"]}
    assert set(keys) == set(DROPPED)
    way = [(1, step) for step in ("sent", "rebuilt", "backup", "metadata", "analysis")]

    seen: dict[str, Any] = {}

    def histories_complete() -> bool:
        for key in keys.values():
            latest = httpx.get(f"{lab_stack.api}/artifacts/{key}/latest", timeout=API_TIMEOUT_S)
            seen[key] = latest.status_code
            if latest.status_code != 200:
                return False
            rows = json.loads(latest.json()["data"])
            seen[key] = [(row["generation"], row["step"]) for row in rows]
            if seen[key] != way:
                return False
        return True

    # Backup, metadata and analysis each add their row, at the same time.
    try:
        _poll(histories_complete, "a history artifact lacks a step")
    except AssertionError:
        warnings = httpx.post(
            f"{lab_stack.api}/logs/filter",
            json={"logs": {"level": {"ge_": 30}}, "limit": 50},
            timeout=API_TIMEOUT_S,
        ).json()
        said = [log["message"] for log in warnings if "history" in log["message"]]
        raise AssertionError(f"history artifacts incomplete: {seen}; warnings: {said}") from None
    found = httpx.post(
        f"{lab_stack.api}/artifacts/filter",
        json={"artifacts": {"key": {"like_": "beta-dat"}}},
        timeout=API_TIMEOUT_S,
    ).json()
    assert keys["run7/beta.dat"] in {artifact["key"] for artifact in found}

    def transfer_status() -> dict[str, Any]:
        status = cli(lab_stack.state_dir, "status", "--json")
        assert status.returncode == 0, status.stdout + status.stderr
        (transfer,) = json.loads(status.stdout)["transfers"]
        return cast(dict[str, Any], transfer)

    # The group commits its offsets after each batch: the topic is drained soon after.
    _poll(lambda: transfer_status()["messages_on_topic"] == 0, "messages left on the topic")
    transfer = transfer_status()
    assert transfer["topic"] == TOPIC
    assert transfer["producer"]["sent_last_hour"] >= len(DROPPED)
    assert transfer["consumer"]["rebuilt_last_hour"] >= len(DROPPED)
    assert transfer["consumer"]["last_rebuilt"]["path"] in DROPPED
    assert transfer["producer"]["waiting_in_folder"] == 0
    assert transfer["downstream"]["runs_pending"] is not None
    assert transfer["notes"] == []


def _forge_rejected_file(stack: UserStack) -> None:
    """Send a one-chunk file whose SHA-256 is wrong: reconstruct-files rejects it."""
    from confluent_kafka import Producer

    data = b"not what the digest says"
    header = ChunkHeader.for_chunk(
        relpath=FORGED_PATH,
        size=len(data),
        chunk_size=1024 * 1024,
        index=0,
        mtime_ns=time.time_ns(),
        producer_id="test-forger",
        generation=1,
        sha256="0" * 64,
    )
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{stack.ports['broker']}"})
    producer.produce(
        TOPIC, key=message_key(header.file_id), value=data, headers=encode_chunk_headers(header)
    )
    assert producer.flush(30) == 0


def _start_failing_run(stack: UserStack) -> None:
    """A run of analyze-file for a file that is not there: it fails (no retry helps)."""
    with httpx.Client(base_url=stack.api, timeout=API_TIMEOUT_S) as client:
        deployment = client.get("/deployments/name/analyze-file/analyze-file").json()
        created = client.post(
            f"/deployments/{deployment['id']}/create_flow_run",
            json={
                "parameters": {
                    "topic": TOPIC,
                    "file_id": "0" * 32,
                    "generation": 3,
                    "path": GHOST_PATH,
                    "url": (stack.received / GHOST_PATH).as_uri(),
                    "size": 10,
                    "sha256": "1" * 64,
                }
            },
        )
        assert created.status_code == 201, created.text


def _lose_a_backup_and_audit(stack: UserStack) -> None:
    """Delete alpha.dat's backup (every version) and run the audit now."""
    s3 = stack.s3()
    versions = s3.list_object_versions(Bucket=BACKUP_BUCKET).get("Versions", [])
    for version in versions:
        if version["Key"].endswith("alpha.dat"):
            s3.delete_object(
                Bucket=BACKUP_BUCKET, Key=version["Key"], VersionId=version["VersionId"]
            )
    with httpx.Client(base_url=stack.api, timeout=API_TIMEOUT_S) as client:
        deployment = client.get("/deployments/name/audit-backups/audit-backups").json()
        # alpha.dat was delivered moments ago: no grace, or the audit would wait for it.
        created = client.post(
            f"/deployments/{deployment['id']}/create_flow_run",
            json={"parameters": {"grace_minutes": 0}},
        )
        assert created.status_code == 201, created.text


def _crash_the_watcher(stack: UserStack) -> None:
    """SIGKILL the watch-directory run's processes (its launcher and the forked child)."""
    with httpx.Client(base_url=stack.api, timeout=API_TIMEOUT_S) as client:
        runs = client.post(
            "/flow_runs/filter",
            json={
                "flow_runs": {"id": {"any_": list(transfer_run_ids(stack.api))}},
                "deployments": {"name": {"any_": ["watch-directory"]}},
            },
        ).json()
    (watch_run,) = runs
    launchers = {p.pid for p in live_flow_runs(stack.api) if p.flow_run_id == watch_run["id"]}
    assert launchers, "the watcher runs in a process of its own"
    pipes = set()
    for pid in launchers:
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/1")
            if link.startswith("pipe:"):
                pipes.add(link)
    children = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) not in launchers:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry.name}/fd/1") in pipes:
                    children.add(int(entry.name))
    kill9(launchers | children)


@pytest.mark.timeout(600)
def test_each_kind_of_notice_arrives_once_naming_its_file(
    lab_stack: UserStack, receiver: NoticeReceiver
) -> None:
    _forge_rejected_file(lab_stack)
    rejected = receiver.wait_for("msi-prefect: file rejected: ")
    assert FORGED_PATH in rejected["subject"]
    for fact in (f"path: {FORGED_PATH}", f"topic: {TOPIC}", "generation: 1", "rejected ("):
        assert fact in rejected["body"], (fact, rejected["body"])
    assert "/runs/flow-run/" in rejected["body"]

    _start_failing_run(lab_stack)
    failed = receiver.wait_for("msi-prefect: analyze-file failed: ")
    for fact in (f"path: {GHOST_PATH}", f"topic: {TOPIC}", "generation: 3", "/runs/flow-run/"):
        assert fact in failed["body"], (fact, failed["body"])

    _lose_a_backup_and_audit(lab_stack)
    missing = receiver.wait_for("msi-prefect: backup missing: alpha.dat")
    for fact in ("path: alpha.dat", f"topic: {TOPIC}", "generation: 1", "/runs/flow-run/"):
        assert fact in missing["body"], (fact, missing["body"])

    _crash_the_watcher(lab_stack)
    crashed = receiver.wait_for("msi-prefect: transfer watch-directory crashed")
    assert str(lab_stack.inbox) in crashed["body"]
    assert "/runs/flow-run/" in crashed["body"]

    # `files` shows the rejection with its reason, and the missing backup.
    forged = _files_json(lab_stack, "forged/*")["files"]
    assert forged[0]["generations"][0]["reached"] == "rejected"
    assert forged[0]["generations"][0]["steps"]["rejected"]["details"]["reason"]

    time.sleep(SETTLE_S)
    kinds = (
        "msi-prefect: file rejected: ",
        "msi-prefect: analyze-file failed: ",
        "msi-prefect: backup missing: ",
        "msi-prefect: transfer ",
    )
    assert {kind: len(receiver.with_subject(kind)) for kind in kinds} == dict.fromkeys(kinds, 1)
    # The stack's secrets are in no notice (the S3 secret key; the webhook URL is fine).
    secret = json.loads((lab_stack.state_dir / "credentials.json").read_text())
    assert secret["secret_access_key"]
    assert not [raw for raw in receiver.raw if secret["secret_access_key"] in raw]
    # Nothing rendered wrong: no template error or Python repr in a notice.
    assert not [raw for raw in receiver.raw if "Undefined" in raw or "Traceback" in raw]

    # `up` again without the option: the block it saved is remembered, and the same four
    # automations are updated, not added (and the crashed watcher is started again).
    lab_stack.up()
    said = (lab_stack.root / "cli.log").read_text()
    assert "notifications: 4 automations send to custom-webhook/msi-notify" in said
    with httpx.Client(base_url=lab_stack.api, timeout=API_TIMEOUT_S) as client:
        every_automation = client.post("/automations/filter", json={}).json()
        block = client.get("/block_types/slug/custom-webhook/block_documents/name/msi-notify")
    # (Prefect keeps the deployments' triggers as automations too; every `up` applies the
    # stack's own `msi: crash unresponsive runs`, which sends nothing.)
    automations = [a for a in every_automation if a["name"].startswith("msi: ")]
    assert sorted(a["name"] for a in automations) == [
        "msi: backup missing",
        "msi: crash unresponsive runs",
        "msi: downstream run failed",
        "msi: file rejected",
        "msi: transfer stopped",
    ]
    block_ids = {
        action["block_document_id"]
        for a in automations
        for action in a["actions"]
        if action["type"] == "send-notification"
    }
    assert block_ids == {block.json()["id"]}
    assert len(transfer_run_ids(lab_stack.api)) == 2
