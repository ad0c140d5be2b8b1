"""Authentication and TLS towards the broker, as the KafkaCluster block configures them.

Tansu 0.6.0 (the embedded broker) cannot yet be the far end of either:

* SASL: `tansu broker --authentication` refuses every unauthenticated request, and its
  storage engine (dynostore, for both s3:// and memory://) acknowledges
  AlterUserScramCredentials (`tansu user create`) without keeping the user: describing
  the user returns nothing and a login answers `unknown-user`.
  `test_tansu_keeps_scram_users` records this (strict xfail: it starts failing the day
  Tansu keeps users, so the stack can then grow an `--auth` option).
* TLS: `tansu broker --cert C --key K` is refused by its argument parser ("'--cert'
  cannot be used with '--key'"), and either flag alone leaves the listener in plain text
  (`test_tansu_serves_tls`, strict xfail).

So the client side is proved against what exists: a Tansu broker with
`--authentication` (where every login is refused, so any password is a wrong one), and
Tansu behind a TLS-terminating proxy with a self-signed certificate for 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import logging
import select
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from msi_prefect.errors import MsiError
from msi_prefect.prefect_layer.transfers.kafka_cluster import KafkaCluster
from msi_prefect.stack.components import tansu_binary
from msi_prefect.stack.processes import LOOPBACK, find_free_ports, port_is_listening
from msi_prefect.transfer.kafka import SecurityProtocol, ensure_topic, wait_for_brokers
from msi_prefect.transfer.producer import FileProducer, ProducerSettings, UploadOutcome
from msi_prefect.transfer.reassembler import Reassembler, ReassemblerSettings
from msi_prefect.transfer.registry import Registry
from msi_prefect.transfer.stopping import StopConditions
from tests.conftest import TEST_SESSION_TIMEOUT_MS

WRONG_PASSWORD = "wrong-password-3f9c1e77"
# A refused login or handshake must surface well before librdkafka's own timeouts.
FAIL_FAST_S = 10.0
START_S = 15.0


# --- processes and certificates -------------------------------------------------------


@contextlib.contextmanager
def _tansu(log: Path, *flags: str, advertise: int | None = None) -> Iterator[int]:
    """A Tansu broker (memory storage) on a free loopback port; killed by PID afterwards."""
    port = find_free_ports(1)[0]
    url = f"tcp://{LOOPBACK}:{port}"
    advertised = f"tcp://{LOOPBACK}:{advertise or port}"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url",
             advertised, "--storage-engine", "memory://tansu/", *flags],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + START_S
        while not port_is_listening(port) and proc.poll() is None:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, LOOPBACK)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.IPv4Address(LOOPBACK))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / f"{name}.crt", folder / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    return cert_file, key_file


class TlsProxy:
    """Terminates TLS on a loopback port and forwards the plain bytes to a broker."""

    def __init__(self, port: int, upstream: int, cert: Path, key: Path) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.upstream = upstream
        self.server = socket.create_server((LOOPBACK, port))
        self.server.settimeout(0.2)
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.accepting = threading.Thread(target=self._accept, daemon=True)
        self.accepting.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(client,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _serve(self, raw: socket.socket) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            raw.settimeout(10)
            client = self.context.wrap_socket(raw, server_side=True)
            client.setblocking(False)
            with client, socket.create_connection((LOOPBACK, self.upstream)) as broker:
                broker.setblocking(False)
                while not self.stopping.is_set():
                    ready, _, _ = select.select([client, broker], [], [], 0.2)
                    # Data already decrypted inside the SSL object is not seen by select.
                    if client in ready or client.pending():
                        try:
                            data = client.recv(65536)
                        except ssl.SSLWantReadError:
                            data = None
                        if data == b"":
                            return
                        if data:
                            broker.sendall(data)
                    if broker in ready:
                        data = broker.recv(65536)
                        if not data:
                            return
                        _send_all(client, data)
        raw.close()

    def close(self) -> None:
        self.stopping.set()
        self.server.close()
        self.accepting.join(5)
        for thread in self.threads:
            thread.join(5)


def _send_all(sock: ssl.SSLSocket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except (ssl.SSLWantWriteError, BlockingIOError):
            select.select([], [sock], [], 1)
            continue
        view = view[sent:]


@pytest.fixture(scope="module")
def auth_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A Tansu broker that requires SASL authentication."""
    log = tmp_path_factory.mktemp("auth-broker") / "tansu.log"
    with _tansu(log, "--authentication") as port:
        yield port


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """Tansu behind a TLS proxy: yields the TLS port and the CA (self-signed) certificate."""
    folder = tmp_path_factory.mktemp("tls-broker")
    cert, key = _self_signed(folder, "broker")
    tls_port = find_free_ports(1)[0]
    with _tansu(folder / "tansu.log", advertise=tls_port) as plain_port:
        proxy = TlsProxy(tls_port, plain_port, cert, key)
        try:
            yield tls_port, cert
        finally:
            proxy.close()


# --- authentication --------------------------------------------------------------------


def test_wrong_password_is_refused_fast_with_a_clear_error(
    auth_broker: int, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = KafkaCluster(
        bootstrap_servers=f"{LOOPBACK}:{auth_broker}",
        security_protocol=SecurityProtocol.SASL_PLAINTEXT,
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="microscope",
        sasl_password=WRONG_PASSWORD,
    )
    caplog.set_level(logging.DEBUG)
    started = time.monotonic()
    with pytest.raises(MsiError) as refused:
        ensure_topic(cluster.to_connection(), "lab-files")
    assert time.monotonic() - started < FAIL_FAST_S
    message = str(refused.value)
    assert "authentication" in message and "'microscope'" in message, message
    # The password is nowhere: not in the error, its cause, the logs, or the block's repr.
    for text in (message, repr(refused.value.__cause__), caplog.text, repr(cluster)):
        assert WRONG_PASSWORD not in text


def test_plaintext_client_on_an_authenticating_broker_is_not_served(auth_broker: int) -> None:
    """Without SASL, nothing is served: the broker answers no metadata at all."""
    cluster = KafkaCluster(bootstrap_servers=f"{LOOPBACK}:{auth_broker}")
    with pytest.raises(MsiError, match="cannot reach"):
        wait_for_brokers(cluster.to_connection(), timeout_s=3)


@pytest.mark.xfail(
    strict=True, reason="Tansu 0.6.0 acknowledges AlterUserScramCredentials but keeps no user"
)
def test_tansu_keeps_scram_users(tmp_path: Path) -> None:
    from confluent_kafka.admin import (
        AdminClient,
        ScramCredentialInfo,
        ScramMechanism,
        UserScramCredentialUpsertion,
    )

    with _tansu(tmp_path / "tansu.log") as port:
        admin = AdminClient({"bootstrap.servers": f"{LOOPBACK}:{port}"})
        try:
            upsert = UserScramCredentialUpsertion(
                "microscope",
                ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192),
                b"pw-1234567",
            )
            for future in admin.alter_user_scram_credentials([upsert]).values():
                future.result(timeout=15)  # acknowledged...
            described = admin.describe_user_scram_credentials(["microscope"])
            assert described["microscope"].result(timeout=15).scram_credential_infos  # ...not kept
        finally:
            # The expected failure's traceback keeps this frame: without this, the client
            # would outlive the broker and log reconnect attempts until the session ends.
            del admin


@pytest.mark.xfail(strict=True, reason="Tansu 0.6.0 refuses --cert with --key")
def test_tansu_serves_tls(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path, "broker")
    with _tansu(tmp_path / "tansu.log", "--cert", str(cert), "--key", str(key)) as port:
        cluster = KafkaCluster(
            bootstrap_servers=f"{LOOPBACK}:{port}",
            security_protocol=SecurityProtocol.SSL,
            ssl_ca_location=str(cert),
        )
        wait_for_brokers(cluster.to_connection(), timeout_s=5)


# --- TLS ---------------------------------------------------------------------------------


def test_files_travel_over_tls_with_the_block_settings(
    tls_broker: tuple[int, Path], tmp_path: Path
) -> None:
    port, ca = tls_broker
    cluster = KafkaCluster(
        bootstrap_servers=f"{LOOPBACK}:{port}",
        security_protocol=SecurityProtocol.SSL,
        ssl_ca_location=str(ca),
    )
    connection = cluster.to_connection()
    topic = "tls-files"
    ensure_topic(connection, topic)
    src = tmp_path / "src"
    src.mkdir()
    (src / "spectrum.dat").write_bytes(b"over tls " * 50_000)
    with Registry(tmp_path / "reg.sqlite") as registry:
        producer = FileProducer(connection, ProducerSettings(topic=topic), registry)
        results = producer.upload_all([(src / "spectrum.dat", "spectrum.dat")])
    assert [r.outcome for r in results] == [UploadOutcome.SENT]
    settings = ReassemblerSettings(
        topic=topic,
        destination=str(tmp_path / "dest"),
        group_id="tls-group",
        session_timeout_ms=TEST_SESSION_TIMEOUT_MS,
    )
    reassembler = Reassembler(connection, settings, lambda event: None)
    reassembler.run(threading.Event(), StopConditions(stop_after_files=1, idle_timeout_s=60))
    assert (tmp_path / "dest" / "spectrum.dat").read_bytes() == b"over tls " * 50_000


def test_untrusted_certificate_is_refused_fast_with_a_clear_error(
    tls_broker: tuple[int, Path], tmp_path: Path
) -> None:
    port, _ = tls_broker
    other_ca, _ = _self_signed(tmp_path, "someone-else")
    cluster = KafkaCluster(
        bootstrap_servers=f"{LOOPBACK}:{port}",
        security_protocol=SecurityProtocol.SSL,
        ssl_ca_location=str(other_ca),
    )
    started = time.monotonic()
    with pytest.raises(MsiError, match="TLS handshake") as refused:
        ensure_topic(cluster.to_connection(), "lab-files")
    assert time.monotonic() - started < FAIL_FAST_S
    assert "ssl_ca_location" in str(refused.value)
