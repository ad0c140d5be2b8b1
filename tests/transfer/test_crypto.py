"""End-to-end encryption with KafkaCrypto: unit tests of the pure parts, and round trips
through the real broker (the broker must only ever see ciphertext)."""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import SecretStr

from msi_prefect.transfer.crypto import (
    CryptoCodec,
    NodeFiles,
    NodeRole,
    ProvisioningSecrets,
    pack_envelope,
    provision_node,
    sealed_headers,
    unpack_envelope,
)
from msi_prefect.transfer.kafka import KafkaConnection
from msi_prefect.transfer.producer import FileProducer, ProducerSettings, UploadOutcome
from msi_prefect.transfer.reassembler import (
    FileEvent,
    FileEventKind,
    Reassembler,
    ReassemblerSettings,
)
from msi_prefect.transfer.registry import Registry
from msi_prefect.transfer.stopping import StopConditions
from msi_prefect.transfer.wire import RejectReason, WireFormatError, decode_message
from tests.conftest import TEST_SESSION_TIMEOUT_MS, RunningStack
from tests.flow_helpers import REPO
from tests.transfer_helpers import staging_leftovers

CHUNK = 64 * 1024
MARKER = b"MSI-PLAINTEXT-MARKER-7f3a"
SECRETS = ProvisioningSecrets(
    rot_password=SecretStr("root-of-trust-pw-1234"),
    provisioning_password=SecretStr("provision-pw-5678"),
)
OTHER_SECRETS = ProvisioningSecrets(
    rot_password=SecretStr("another-root-pw-9999"),
    provisioning_password=SecretStr("another-prov-pw"),
)


# ------------------------------------------------------------------------------ unit tests


def test_envelope_round_trip() -> None:
    headers = [("msi.v", b"1.0"), ("msi.path", b"run 7/scan.tif"), ("x", b"")]
    envelope = pack_envelope(headers, b"chunk-bytes")
    got_headers, value = unpack_envelope(envelope)
    assert got_headers == headers
    assert bytes(value) == b"chunk-bytes"


@pytest.mark.parametrize("garbage", [b"", b"MSE1", b"XXXX\x00\x00", b"MSE1\x00\x01\x00\x09ab"])
def test_malformed_envelope_is_undecryptable(garbage: bytes) -> None:
    with pytest.raises(WireFormatError) as caught:
        unpack_envelope(garbage)
    assert caught.value.reason is RejectReason.UNDECRYPTABLE


def test_plain_consumer_refuses_sealed_message() -> None:
    fid = b"0" * 32
    with pytest.raises(WireFormatError) as caught:
        decode_message(fid, b"\x01ciphertext", sealed_headers(fid))
    assert caught.value.reason is RejectReason.ENCRYPTED


def test_weak_passwords_are_refused() -> None:
    from msi_prefect.errors import MsiError

    with pytest.raises(MsiError):
        ProvisioningSecrets(SecretStr("short"), SecretStr("provision-pw"))


def test_provisioning_writes_the_node_files_without_secrets(tmp_path: Path) -> None:
    files = provision_node(NodeFiles(tmp_path, "lab-producer"), NodeRole.PRODUCER, SECRETS)
    assert files.is_provisioned()
    config = files.config.read_text()
    assert "auto_offset_reset : earliest" in config or "auto_offset_reset: earliest" in config
    for secret in (SECRETS.rot_password, SECRETS.provisioning_password):
        value = secret.get_secret_value().encode()
        for path in (files.config, files.crypto, files.seed):
            assert value not in path.read_bytes()
    crypto_before = files.crypto.read_bytes()
    provision_node(files, NodeRole.PRODUCER, SECRETS)  # re-provisioning keeps the keys
    assert files.crypto.read_bytes() == crypto_before


class FakeNode:
    """Stands in for a KafkaCrypto node: 'encrypts' by prefixing, or never has the key."""

    def __init__(self, has_key: bool = True, possible: bool = True) -> None:
        self.has_key = has_key
        self.possible = possible
        self.attempts = 0

    def encrypt(self, topic: str, plaintext: bytes) -> bytes:
        return b"\x01" + plaintext

    def try_decrypt(self, topic: str, ciphertext: bytes) -> tuple[bytes | None, bool]:
        self.attempts += 1
        return (ciphertext[1:] if self.has_key else None), self.possible

    def close(self) -> None:
        pass


def _codec(node: FakeNode, key_wait_s: float = 0.3) -> CryptoCodec:
    return CryptoCodec(node, key_wait_s=key_wait_s)  # type: ignore[arg-type]


def _sealed_chunk(codec: CryptoCodec) -> tuple[bytes, bytes, list[tuple[str, bytes | None]]]:
    from msi_prefect.transfer.wire import ChunkHeader, encode_chunk_headers, message_key

    header = ChunkHeader.for_chunk(
        relpath="secret/name.txt", size=5, chunk_size=CHUNK, index=0, mtime_ns=1,
        producer_id="p", generation=1, sha256=hashlib.sha256(b"hello").hexdigest(),
    )  # fmt: skip
    key = message_key(header.file_id)
    value, headers = codec.seal("t", key, b"hello", encode_chunk_headers(header))
    return key, value, headers


def test_sealed_message_round_trips_through_the_decoder() -> None:
    codec = _codec(FakeNode())
    key, value, headers = _sealed_chunk(codec)
    assert [name for name, _ in headers] == ["msi.v", "msi.kind", "msi.fid"]
    inner_value, inner_headers = codec.unseal("t", key, value, headers)
    decoded = decode_message(key, inner_value, inner_headers)
    assert decoded.header.relpath == "secret/name.txt"  # type: ignore[union-attr]
    assert bytes(decoded.data) == b"hello"  # type: ignore[union-attr]


def test_encrypted_consumer_refuses_clear_messages() -> None:
    codec = _codec(FakeNode())
    with pytest.raises(WireFormatError) as caught:
        codec.unseal("t", b"k", b"v", [("msi.v", b"1.0"), ("msi.kind", b"chunk")])
    assert caught.value.reason is RejectReason.NOT_ENCRYPTED


def test_clear_file_id_must_match_the_encrypted_one() -> None:
    codec = _codec(FakeNode())
    key, value, _ = _sealed_chunk(codec)
    with pytest.raises(WireFormatError) as caught:
        codec.unseal("t", key, value, sealed_headers(b"f" * 32))
    assert caught.value.reason is RejectReason.KEY_MISMATCH


def test_missing_key_is_waited_for_once_then_rejected_at_once() -> None:
    import time

    sender = _codec(FakeNode())
    key, value, headers = _sealed_chunk(sender)
    codec = _codec(FakeNode(has_key=False), key_wait_s=0.5)
    started = time.monotonic()
    with pytest.raises(WireFormatError) as caught:
        codec.unseal("t", key, value, headers)
    assert caught.value.reason is RejectReason.KEY_MISSING
    assert time.monotonic() - started >= 0.5
    started = time.monotonic()
    with pytest.raises(WireFormatError):
        codec.unseal("t", key, value, headers)
    assert time.monotonic() - started < 0.2


def test_value_that_is_no_ciphertext_is_undecryptable() -> None:
    codec = _codec(FakeNode(has_key=False, possible=False))
    with pytest.raises(WireFormatError) as caught:
        codec.unseal("t", b"k", b"garbage", sealed_headers(b"k"))
    assert caught.value.reason is RejectReason.UNDECRYPTABLE


def test_unprovisioned_node_is_refused_before_connecting(tmp_path: Path) -> None:
    from msi_prefect.errors import MsiError
    from msi_prefect.transfer.crypto import CryptoNode

    with pytest.raises(MsiError, match="not provisioned"):
        CryptoNode(NodeFiles(tmp_path, "nobody"), KafkaConnection(bootstrap_servers="x:1"))


def test_embedded_nodes_and_blocks_of_an_encrypted_stack(tmp_path: Path) -> None:
    import importlib.util
    import stat

    from msi_prefect.stack.crypto import CONSUMER_NODE, PRODUCER_NODE, provision_embedded_nodes

    directory = provision_embedded_nodes(tmp_path, environ={})
    for node in (PRODUCER_NODE, CONSUMER_NODE):
        assert NodeFiles(directory, node).is_provisioned()
    secrets_file = directory / "secrets.json"
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
    before = secrets_file.read_text()
    provision_embedded_nodes(tmp_path, environ={})  # idempotent: same secrets, same nodes
    assert secrets_file.read_text() == before

    script = REPO / "blocks" / "create_embedded_blocks.py"
    spec = importlib.util.spec_from_file_location("create_embedded_blocks", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.build_crypto_blocks({}) == {}
    blocks = module.build_crypto_blocks({"MSI_CRYPTO_DIR": str(directory)})
    assert set(blocks) == {PRODUCER_NODE, CONSUMER_NODE}
    for block in blocks.values():
        assert block.provisioning_password is None and block.rot_password is None
        assert block.node_files().is_provisioned()


# ------------------------------------------------------------------------ broker round trips


@dataclass(frozen=True)
class Nodes:
    """Provisioned node files for the session."""

    producer: NodeFiles
    consumer: NodeFiles
    stranger: NodeFiles  # provisioned with other passwords: not part of the deployment


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Nodes:
    directory = tmp_path_factory.mktemp("crypto-nodes")
    return Nodes(
        producer=provision_node(NodeFiles(directory, "prod"), NodeRole.PRODUCER, SECRETS),
        consumer=provision_node(NodeFiles(directory, "cons"), NodeRole.CONSUMER, SECRETS),
        stranger=provision_node(NodeFiles(directory, "stranger"), NodeRole.CONSUMER, OTHER_SECRETS),
    )


def _connection(stack: RunningStack) -> KafkaConnection:
    return KafkaConnection(bootstrap_servers=stack.bootstrap_servers)


@pytest.fixture
def producer_codec(kafka_stack: RunningStack, nodes: Nodes, topic: str) -> Iterator[CryptoCodec]:
    """The producer's node, open for the whole test so it answers key requests."""
    codec = CryptoCodec.open(nodes.producer.config, _connection(kafka_stack), topics=[topic])
    try:
        yield codec
    finally:
        codec.close()


def _write_files(root: Path, sizes: dict[str, int]) -> dict[str, str]:
    digests = {}
    for relpath, size in sizes.items():
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        block = MARKER + b"." * 100
        data = (block * (size // len(block) + 1))[:size]
        path.write_bytes(data)
        digests[relpath] = hashlib.sha256(data).hexdigest()
    return digests


def _send(stack: RunningStack, topic: str, codec: CryptoCodec, src: Path, registry: Path) -> None:
    relpaths = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    with Registry(registry) as reg:
        producer = FileProducer(
            _connection(stack), ProducerSettings(topic=topic, chunk_size=CHUNK), reg, codec=codec
        )
        results = producer.upload_all([(src / rel, rel) for rel in relpaths])
    assert {r.outcome for r in results} == {UploadOutcome.SENT}


def _rebuild(
    stack: RunningStack,
    topic: str,
    dest: Path,
    codec: CryptoCodec | None,
    files: int,
    idle_timeout_s: float = 30,
) -> list[FileEvent]:
    events: list[FileEvent] = []
    settings = ReassemblerSettings(
        topic=topic,
        destination=str(dest),
        group_id=f"g-{uuid.uuid4().hex[:8]}",
        session_timeout_ms=TEST_SESSION_TIMEOUT_MS,
    )
    reassembler = Reassembler(_connection(stack), settings, events.append, codec=codec)
    reassembler.run(
        threading.Event(), StopConditions(stop_after_files=files, idle_timeout_s=idle_timeout_s)
    )
    return events


def _tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file() and not p.relative_to(root).as_posix().startswith(".msi-")
    }


def _raw_messages(stack: RunningStack, topic: str, expected: int) -> list[bytes]:
    """Every key, value and header of the topic as plain bytes, read with a plain consumer."""
    import time

    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": stack.bootstrap_servers,
            "group.id": f"raw-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "session.timeout.ms": TEST_SESSION_TIMEOUT_MS,
        }
    )
    consumer.subscribe([topic])
    blobs: list[bytes] = []
    messages = 0
    deadline = time.monotonic() + 30
    try:
        while messages < expected and time.monotonic() < deadline:
            for message in consumer.consume(100, timeout=0.5):
                if message.error():
                    continue
                messages += 1
                blobs += [message.key() or b"", message.value() or b""]
                for name, value in message.headers() or []:
                    blobs += [name.encode(), value or b""]
    finally:
        consumer.close()
    assert messages >= expected
    return blobs


@pytest.mark.stack
def test_encrypted_round_trip_is_byte_identical_and_broker_sees_only_ciphertext(
    kafka_stack: RunningStack,
    nodes: Nodes,
    topic: str,
    producer_codec: CryptoCodec,
    tmp_path: Path,
) -> None:
    sizes = {
        "empty.dat": 0,
        "tiny.txt": 10,
        f"run-{MARKER.decode()}/one-chunk.bin": CHUNK,
        "nested/dir/big.bin": 5 * CHUNK + 123,
        "nested/medium.h5": 2 * CHUNK - 1,
    }
    src, dest = tmp_path / "src", tmp_path / "dest"
    expected = _write_files(src, sizes)
    _send(kafka_stack, topic, producer_codec, src, tmp_path / "registry.sqlite")

    consumer = CryptoCodec.open(
        nodes.consumer.config, _connection(kafka_stack), key_wait_s=30, topics=[topic]
    )
    try:
        events = _rebuild(kafka_stack, topic, dest, consumer, files=len(sizes))
    finally:
        consumer.close()
    assert [e for e in events if e.kind is FileEventKind.REJECTED] == []
    assert _tree(dest) == expected

    chunk_count = sum(max(1, -(-size // CHUNK)) for size in sizes.values())
    blobs = _raw_messages(kafka_stack, topic, chunk_count)
    assert not [blob for blob in blobs if MARKER in blob]
    assert not [blob for blob in blobs if b"nested" in blob or b"medium.h5" in blob]


@pytest.mark.stack
def test_consumers_without_the_keys_reject_and_write_nothing(
    kafka_stack: RunningStack,
    nodes: Nodes,
    topic: str,
    producer_codec: CryptoCodec,
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    _write_files(src, {"a.txt": 1000, "b.bin": CHUNK + 5})
    _send(kafka_stack, topic, producer_codec, src, tmp_path / "registry.sqlite")

    # A plain consumer: every message is refused as encrypted. Two files (the rejected
    # chunks of one file count as one rejected file).
    plain_dest = tmp_path / "plain"
    events = _rebuild(kafka_stack, topic, plain_dest, None, files=2)
    assert {e.reason_code for e in events} == {RejectReason.ENCRYPTED.value}
    assert _tree(plain_dest) == {}

    # A node of another deployment (other passwords): its key request is refused, so the
    # messages are rejected as key-missing after the key wait, with the file id in the event.
    stranger = CryptoCodec.open(
        nodes.stranger.config, _connection(kafka_stack), key_wait_s=4, topics=[topic]
    )
    stranger_dest = tmp_path / "stranger"
    try:
        events = _rebuild(kafka_stack, topic, stranger_dest, stranger, files=2)
    finally:
        stranger.close()
    assert {e.kind for e in events} == {FileEventKind.REJECTED}
    assert {e.reason_code for e in events} == {RejectReason.KEY_MISSING.value}
    assert all(e.file_id for e in events)
    assert _tree(stranger_dest) == {}
    assert not staging_leftovers(stranger_dest)


@pytest.mark.stack
def test_cli_provision_upload_and_reconstruct_encrypted(
    kafka_stack: RunningStack, topic: str, tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "MSI_CRYPTO_ROT_PASSWORD": SECRETS.rot_password.get_secret_value(),
        "MSI_CRYPTO_PROVISIONING_PASSWORD": SECRETS.provisioning_password.get_secret_value(),
    }
    cli = [sys.executable, "-m", "msi_prefect.cli", "--state-dir", str(tmp_path / "state")]
    nodes = tmp_path / "nodes"
    for node, role in (("lab", "producer"), ("store", "consumer")):
        done = subprocess.run(
            [*cli, "crypto", "provision", "--config-dir", str(nodes), "--node", node,
             "--role", role, "--topic", topic],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert SECRETS.rot_password.get_secret_value() not in done.stdout + done.stderr
    src, dest = tmp_path / "src", tmp_path / "dest"
    expected = _write_files(src, {"one.txt": 3000, "two/three.bin": 3 * CHUNK})
    common = ["--topic", topic, "--bootstrap", kafka_stack.bootstrap_servers]
    rebuild = subprocess.Popen(
        [*cli, "reconstruct", str(dest), *common, "--crypto-config", str(nodes / "store"),
         "--stop-after-files", "2", "--idle-timeout", "60",
         "--session-timeout-ms", str(TEST_SESSION_TIMEOUT_MS)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        upload = subprocess.run(
            [*cli, "upload", str(src), "--root", str(src), *common, "--no-progress",
             "--crypto-config", str(nodes / "lab.config"), "--key-linger", "10"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert upload.returncode == 0, upload.stdout + upload.stderr
        output, _ = rebuild.communicate(timeout=90)
    finally:
        if rebuild.poll() is None:
            rebuild.kill()
            rebuild.wait()
    assert rebuild.returncode == 0, output
    assert _tree(dest) == expected
