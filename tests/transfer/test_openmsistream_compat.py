"""OpenMSIStream 1.8 compatibility, against the real programs and the embedded broker.

The real ``openmsistream`` from PyPI runs from its own venv (``bench/openmsistream_venv.py``
creates it once; ``scripts/bootstrap --with-test-tools`` does so for CI). Its programs are
child processes in their own session, stopped by PID (``q`` on stdin first, which is how
OpenMSIStream programs are meant to stop). Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from bench.openmsistream_baseline import stop_with_q, write_config
from bench.openmsistream_venv import ensure_openmsistream_python
from msi_prefect.errors import MsiError
from msi_prefect.transfer.formats import WireFormat
from msi_prefect.transfer.kafka import KafkaConnection
from msi_prefect.transfer.openmsistream_format import omsi_key
from msi_prefect.transfer.producer import FileProducer, ProducerSettings, UploadOutcome
from msi_prefect.transfer.progress import ProgressStore
from msi_prefect.transfer.reassembler import (
    FileEvent,
    FileEventKind,
    Reassembler,
    ReassemblerSettings,
)
from msi_prefect.transfer.registry import Registry
from msi_prefect.transfer.stopping import StopConditions
from msi_prefect.transfer.wire import RejectReason
from tests.conftest import TEST_SESSION_TIMEOUT_MS, RunningStack

pytestmark = [pytest.mark.stack, pytest.mark.timeout(180)]

UPLOAD_DIRECTORY = "openmsistream.data_file_io.actor.data_file_upload_directory"
DOWNLOAD_DIRECTORY = "openmsistream.data_file_io.actor.data_file_download_directory"
UPLOAD_FILE = "openmsistream.data_file_io.entity.upload_data_file"
OMSI_CHUNK = 16 * 1024
WAIT_S = 60.0


@pytest.fixture(scope="session")
def omsi_python() -> Path:
    """The interpreter of the OpenMSIStream venv (created on first use)."""
    return ensure_openmsistream_python(quiet=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _make_files(root: Path) -> dict[str, bytes]:
    """Files of several sizes, some multi-chunk, some in subdirectories."""
    files = {
        "top.bin": os.urandom(OMSI_CHUNK // 2),
        "run7/exact.bin": os.urandom(OMSI_CHUNK * 2),
        "run7/deep/multi chunk.dat": os.urandom(OMSI_CHUNK * 5 + 123),
        "run7/deep/tiny.txt": b"x",
    }
    for rel, data in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return files


class _Program:
    """One OpenMSIStream program as a child process in its own session."""

    def __init__(self, python: Path, module: str, args: list[str], log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(python), "-m", module, *args],
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=log.parent,
                start_new_session=True,
            )

    def stop(self) -> None:
        stop_with_q(self.proc, grace=20.0)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@pytest.fixture
def programs() -> Iterator[list[_Program]]:
    """Programs a test starts; all stopped by PID at the end."""
    started: list[_Program] = []
    yield started
    for program in started:
        program.stop()


class _Rebuilder:
    """Our reassembler in a thread, with its events collected."""

    def __init__(self, settings: ReassemblerSettings, bootstrap: str) -> None:
        self.events: list[FileEvent] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.reassembler = Reassembler(
            KafkaConnection(bootstrap_servers=bootstrap), settings, on_event=self.events.append
        )
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.reassembler.run(self.stop, StopConditions(idle_timeout_s=WAIT_S))
        except BaseException as exc:
            self.error = exc

    def join(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()

    def rebuilt(self) -> dict[str, FileEvent]:
        return {
            e.relpath: e
            for e in self.events
            if e.kind is FileEventKind.RECONSTRUCTED and e.relpath is not None
        }


def _settings(
    topic: str, dest: Path, group: str, session_timeout_ms: int = TEST_SESSION_TIMEOUT_MS
) -> ReassemblerSettings:
    return ReassemblerSettings(
        topic=topic,
        destination=str(dest),
        group_id=group,
        session_timeout_ms=session_timeout_ms,
        wire_format=WireFormat.OPENMSISTREAM,
    )


def _partitions_of(bootstrap: str, topic: str, key_prefix: bytes) -> set[int]:
    """The partitions holding messages whose key starts with ``key_prefix``."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "unused", "enable.auto.commit": False}
    )
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in range(4)])
        found: set[int] = set()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            batch = consumer.consume(500, timeout=2)
            if not batch:
                break
            found |= {
                m.partition()
                for m in batch
                if not m.error() and (m.key() or b"").startswith(key_prefix)
            }
        return found
    finally:
        consumer.close()


def _wait_for(condition: object, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_openmsistream_uploaders_to_our_reconstruct(
    kafka_stack: RunningStack,
    topic: str,
    tmp_path: Path,
    omsi_python: Path,
    programs: list[_Program],
) -> None:
    """UploadDataFile and DataFileUploadDirectory -> reconstruct --format openmsistream."""
    config = write_config(tmp_path / "omsi.config", kafka_stack.bootstrap_servers)
    upload_dir = tmp_path / "upload"
    files = _make_files(upload_dir)
    single = tmp_path / "single" / "lone file.bin"
    single.parent.mkdir()
    single.write_bytes(os.urandom(OMSI_CHUNK * 3 + 7))
    expected = {**files, single.name: single.read_bytes()}
    dest = tmp_path / "dest"

    uploader = _Program(
        omsi_python,
        UPLOAD_FILE,
        [str(single), "--config", str(config), "--topic_name", topic,
         "--chunk_size", str(OMSI_CHUNK)],
        tmp_path / "upload-file.out",
    )  # fmt: skip
    programs.append(uploader)
    assert uploader.proc.wait(timeout=90) == 0, uploader.tail()
    directory = _Program(
        omsi_python,
        UPLOAD_DIRECTORY,
        [str(upload_dir), "--config", str(config), "--topic_name", topic,
         "--upload_existing", "--chunk_size", str(OMSI_CHUNK)],
        tmp_path / "upload-directory.out",
    )  # fmt: skip
    programs.append(directory)

    rebuilder = _Rebuilder(_settings(topic, dest, "omsi-in"), kafka_stack.bootstrap_servers)
    try:
        _wait_for(lambda: set(expected) <= set(rebuilder.rebuilt()), "every file rebuilt")
    finally:
        rebuilder.join()
    assert rebuilder.error is None
    for rel, data in expected.items():
        assert (dest / rel).read_bytes() == data, rel
        event = rebuilder.rebuilt()[rel]
        assert event.size == len(data)
        assert event.sha256 == hashlib.sha256(data).hexdigest()
        assert event.generation == 1 and event.file_id and event.url
    assert not [e for e in rebuilder.events if e.kind is FileEventKind.REJECTED]
    # The progress store records completed files like native ones (size and SHA-256).
    # Why one consumer per group: OpenMSIStream spread this file's chunks over partitions.
    spread = _partitions_of(kafka_stack.bootstrap_servers, topic, b"run7_deep_multi chunk.dat_")
    assert len(spread) > 1, spread
    store = ProgressStore(dest / ".msi-state" / "progress.sqlite")
    try:
        rows = {row.relpath: row for row in store.completed(topic)}
    finally:
        store.close()
    for rel, data in expected.items():
        assert (rows[rel].size, rows[rel].sha256) == (len(data), hashlib.sha256(data).hexdigest())


def test_our_upload_to_openmsistream_download_directory(
    kafka_stack: RunningStack,
    topic: str,
    tmp_path: Path,
    omsi_python: Path,
    programs: list[_Program],
) -> None:
    """upload --format openmsistream -> DataFileDownloadDirectory rebuilds byte-identical."""
    src = tmp_path / "src"
    files = _make_files(src)
    (src / "run7" / "empty.dat").write_bytes(b"")  # OpenMSIStream itself never sends one
    files["run7/empty.dat"] = b""
    connection = KafkaConnection(bootstrap_servers=kafka_stack.bootstrap_servers)
    settings = ProducerSettings(
        topic=topic, chunk_size=OMSI_CHUNK, wire_format=WireFormat.OPENMSISTREAM
    )
    with Registry(tmp_path / "registry.sqlite") as registry:
        producer = FileProducer(connection, settings, registry)
        results = producer.upload_all(sorted((src / rel, rel) for rel in files))
    assert {r.outcome for r in results} == {UploadOutcome.SENT}
    assert all(r.sha256 == hashlib.sha256(files[r.relpath]).hexdigest() for r in results)

    config = write_config(tmp_path / "omsi.config", kafka_stack.bootstrap_servers)
    dest = tmp_path / "omsi-dest"
    dest.mkdir()
    downloader = _Program(
        omsi_python,
        DOWNLOAD_DIRECTORY,
        [str(dest), "--config", str(config), "--topic_name", topic,
         "--consumer_group_id", f"omsi-out-{topic}"],
        tmp_path / "download.out",
    )  # fmt: skip
    programs.append(downloader)

    def all_rebuilt() -> bool:
        return all(
            (dest / rel).is_file() and (dest / rel).read_bytes() == data
            for rel, data in files.items()
        )

    try:
        _wait_for(all_rebuilt, "DataFileDownloadDirectory to rebuild every file")
    except AssertionError:
        raise AssertionError(downloader.tail()) from None
    log = downloader.tail()
    assert "hash mismatch" not in log.lower(), log


def _produce(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes]]) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap})
    for key, value in messages:
        producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0


def _value(subdir: str, filename: str, content: bytes, **changes: object) -> bytes:
    """An OpenMSIStream value of a one-chunk file, with some items changed."""
    items: dict[str, object] = {
        "filename": filename,
        "file_hash": hashlib.sha512(content).digest(),
        "chunk_hash": hashlib.sha512(content).digest(),
        "offset": 0,
        "index": 1,
        "count": 1,
        "subdir": subdir,
        "append": "",
        "data": content,
        "mtime": 1.0,
    }
    items.update(changes)
    return msgpack.packb(list(items.values()), use_bin_type=True)


def test_hostile_openmsistream_messages_are_rejected(
    kafka_stack: RunningStack, topic: str, tmp_path: Path
) -> None:
    """Crafted messages are rejected with reasons; nothing lands outside the destination."""
    good = b"good data"
    messages: list[tuple[bytes | None, bytes]] = [
        (omsi_key("../..", "evil", 1, 1).encode(), _value("../..", "evil", b"x")),
        (omsi_key("", "/etc/passwd", 1, 1).encode(), _value("", "/etc/passwd", b"x")),
        (b"k", b"\xc1 not msgpack"),
        (omsi_key("", "mismatch", 1, 1).encode(), _value("", "mismatch", b"x", data=b"y")),
        (b"wrong key", _value("", "wrongkey", b"x")),
        (omsi_key("", "lying", 1, 1).encode(), _value("", "lying", b"x", file_hash=b"0" * 64)),
        (omsi_key("ok", "good.bin", 1, 1).encode(), _value("ok", "good.bin", good)),
    ]
    _produce(kafka_stack.bootstrap_servers, topic, messages)
    outside = tmp_path / "evil"
    dest = tmp_path / "a" / "b" / "dest"
    dest.mkdir(parents=True)
    events: list[FileEvent] = []
    reassembler = Reassembler(
        KafkaConnection(bootstrap_servers=kafka_stack.bootstrap_servers),
        _settings(topic, dest, "omsi-hostile"),
        on_event=events.append,
    )
    reassembler.run(conditions=StopConditions(stop_after_files=len(messages), idle_timeout_s=30))
    codes = sorted(e.reason_code or "" for e in events if e.kind is FileEventKind.REJECTED)
    assert codes == sorted(
        [
            RejectReason.UNSAFE_PATH.value,
            RejectReason.UNSAFE_PATH.value,
            RejectReason.MALFORMED_MESSAGE.value,
            RejectReason.CHUNK_HASH_MISMATCH.value,
            RejectReason.KEY_MISMATCH.value,
            "verification-failed",  # the whole file does not match its claimed SHA-512
        ]
    )
    assert (dest / "ok" / "good.bin").read_bytes() == good
    assert not outside.exists()
    assert not (tmp_path / "a" / "evil").exists()
    assert not (dest / "lying").exists()
    written = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}
    assert {p for p in written if not p.startswith(".msi-")} == {"ok/good.bin"}


def test_second_consumer_in_the_group_is_refused(
    kafka_stack: RunningStack, topic: str, tmp_path: Path
) -> None:
    """One reassembler per group for this format: a lasting second member is refused loudly."""
    bootstrap = kafka_stack.bootstrap_servers
    session_ms = 3000  # short: the refusal comes after twice the session timeout plus 5 s
    first = _Rebuilder(_settings(topic, tmp_path / "one", "omsi-pair", session_ms), bootstrap)
    time.sleep(session_ms / 1000)  # let the first own every partition
    second = _Rebuilder(_settings(topic, tmp_path / "two", "omsi-pair", session_ms), bootstrap)
    try:
        _wait_for(
            lambda: first.error is not None or second.error is not None,
            "a reassembler to refuse a partial assignment",
            timeout=45,
        )
    finally:
        first.join()
        second.join()
    errors = [r.error for r in (first, second) if r.error is not None]
    assert errors and all(isinstance(e, MsiError) for e in errors)
    assert "one reassembler must read all 4 partitions" in str(errors[0])


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "msi_prefect.cli", *args]


def test_cli_upload_and_reconstruct_in_openmsistream_format(
    kafka_stack: RunningStack, topic: str, tmp_path: Path
) -> None:
    """The --format option of both commands; the same content sent twice is rebuilt once."""
    src = tmp_path / "src"
    files = _make_files(src)
    connect = ["--topic", topic, "--bootstrap", kafka_stack.bootstrap_servers]
    for attempt in ("first", "again"):  # a fresh registry re-sends everything
        subprocess.run(
            _cli("upload", str(src), "--root", str(src), *connect, "--format", "openmsistream",
                 "--chunk-size", str(OMSI_CHUNK), "--registry", str(tmp_path / f"{attempt}.db"),
                 "--no-progress"),
            check=True, timeout=120, capture_output=True,
        )  # fmt: skip
    dest = tmp_path / "dest"
    done = subprocess.run(
        _cli("reconstruct", str(dest), *connect, "--format", "openmsistream",
             "--group", f"cli-{topic}", "--session-timeout-ms", str(TEST_SESSION_TIMEOUT_MS),
             "--idle-timeout", "5"),
        check=True, timeout=120, capture_output=True, text=True,
    )  # fmt: skip
    assert done.stdout.count("reconstructed ") == len(files), done.stdout
    assert f"{len(files)} reconstructed, 0 rejected" in done.stdout
    for rel, data in files.items():
        assert (dest / rel).read_bytes() == data


def test_a_restart_right_after_a_crash_is_not_refused(
    kafka_stack: RunningStack, topic: str, tmp_path: Path
) -> None:
    """A reassembler started right after one was killed (which did not leave the group)
    rebuilds the next file. Tansu drops the dead member at the next rebalance; a broker that
    keeps it until its session times out gives the new one part of the partitions meanwhile,
    which the grace period covers (tested without a broker in test_openmsistream_format)."""
    bootstrap = kafka_stack.bootstrap_servers
    connect = ["--topic", topic, "--bootstrap", bootstrap]
    options = [
        *connect, "--format", "openmsistream", "--group", f"crash-{topic}",
        "--session-timeout-ms", str(TEST_SESSION_TIMEOUT_MS),
    ]  # fmt: skip
    src = tmp_path / "src"
    src.mkdir()
    sizes = {"first.bin": OMSI_CHUNK * 3, "second.bin": OMSI_CHUNK * 5 + 1}
    for name, size in sizes.items():
        (src / name).write_bytes(os.urandom(size))
    settings = ProducerSettings(
        topic=topic, chunk_size=OMSI_CHUNK, wire_format=WireFormat.OPENMSISTREAM
    )

    def send(name: str) -> None:
        with Registry(tmp_path / "registry.sqlite") as registry:
            producer = FileProducer(
                KafkaConnection(bootstrap_servers=bootstrap), settings, registry
            )
            producer.upload_all([(src / name, name)])

    dest = tmp_path / "dest"
    send("first.bin")
    victim = subprocess.Popen(
        _cli("reconstruct", str(dest), *options), stdout=subprocess.DEVNULL, start_new_session=True
    )
    try:
        _wait_for(lambda: (dest / "first.bin").is_file(), "the first file")
    finally:
        victim.kill()  # by PID, like a crash: it does not leave the group
        victim.wait(timeout=30)
    send("second.bin")
    survivor = subprocess.run(
        _cli("reconstruct", str(dest), *options, "--stop-after-files", "1", "--idle-timeout", "45"),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert survivor.returncode == 0, survivor.stderr[-2000:]
    assert "reconstructed second.bin" in survivor.stdout
    assert (dest / "second.bin").read_bytes() == (src / "second.bin").read_bytes()
