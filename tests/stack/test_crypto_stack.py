"""`msi-prefect up --encrypted`: the deployed transfers encrypt end to end."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from msi_prefect.stack.config import free_port_map
from tests.conftest import TEST_SESSION_TIMEOUT_MS
from tests.stack_helpers import cli

# `up`, a file and `down`: about a minute on a quiet machine, many on a shared one.
pytestmark = [pytest.mark.stack, pytest.mark.own_stack, pytest.mark.timeout(600)]

ARRIVAL_TIMEOUT_S = 180
MARKER = b"MSI-STACK-PLAINTEXT-MARKER-51c2"


def _raw_topic(bootstrap: str, topic: str) -> list[bytes]:
    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"raw-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "session.timeout.ms": TEST_SESSION_TIMEOUT_MS,
        }
    )
    consumer.subscribe([topic])
    blobs: list[bytes] = []
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline and not blobs:
            for message in consumer.consume(100, timeout=0.5):
                if not message.error():
                    blobs += [message.key() or b"", message.value() or b""]
                    blobs += [value or b"" for _, value in message.headers() or []]
    finally:
        consumer.close()
    return blobs


def test_up_encrypted_deploys_encrypted_transfers(tmp_path: Path) -> None:
    ports = free_port_map()
    port_args = [arg for name, port in ports.items() for arg in ("--port", f"{name}={port}")]
    state_dir = tmp_path / "state"
    try:
        up = cli(state_dir, "up", "--storage", "memory", "--encrypted", *port_args)
        assert up.returncode == 0, up.stdout + up.stderr
        crypto = state_dir / "crypto"
        for node in ("embedded-producer", "embedded-consumer"):
            assert (crypto / f"{node}.config").is_file()
        secret = json.loads((crypto / "secrets.json").read_text())["rot_password"]

        name = f"scan-{MARKER.decode()}.dat"
        payload = MARKER * 500
        (tmp_path / "inbox" / name).write_bytes(payload)
        arrived = tmp_path / "received" / name
        deadline = time.monotonic() + ARRIVAL_TIMEOUT_S
        while not arrived.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert arrived.read_bytes() == payload

        blobs = _raw_topic(f"127.0.0.1:{ports['broker']}", "lab-files")
        assert blobs, "nothing read back from the topic"
        assert not [blob for blob in blobs if MARKER in blob]
        for log in (state_dir / "logs").glob("*.log"):
            assert secret not in log.read_text(errors="replace"), log.name
    finally:
        down = cli(state_dir, "down")
    assert down.returncode == 0, down.stderr
