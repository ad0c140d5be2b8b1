"""End-to-end encryption of wire-format messages with KafkaCrypto.

The broker sees only ciphertext: a producer with a :class:`CryptoCodec` *seals* every
message. The chunk's own wire-format headers (path, sizes, mtime, sha256 ...) and its bytes
are packed into one envelope (:func:`pack_envelope`) that is encrypted with KafkaCrypto's
value serializer; the Kafka message keeps its key (the file id, so partitioning is
unchanged) and only three clear headers: ``msi.v``, ``msi.kind = sealed`` and ``msi.fid``.
A consumer with a codec decrypts the envelope and hands the original headers and value to
:func:`~msi_prefect.transfer.wire.decode_message`, so every wire-format rule still applies.

Key management is all KafkaCrypto's: each process opens its node (``<node>.config``,
``<node>.crypto``, ``<node>.seed``, made by :func:`provision_node`) and a background thread
exchanges keys through the ``<root>.keys``, ``<root>.reqs`` and ``<root>.subs`` topics. Our
own confluent-kafka producer and consumer move the data; KafkaCrypto's wrapped clients are
used only for its key-exchange topics.

``docs/wire-format.md`` (section "Encrypted transfer") describes the format.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import struct
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from msi_prefect.errors import MsiError
from msi_prefect.transfer.crypto_settings import DEFAULT_KEY_WAIT_S, NodeRole
from msi_prefect.transfer.kafka import KafkaConnection, ensure_topic
from msi_prefect.transfer.wire import (
    FORMAT_VERSION,
    HeaderName,
    KafkaHeaderList,
    KafkaHeaders,
    MessageKind,
    RejectReason,
    WireFormatError,
)

logger = logging.getLogger(__name__)

#: How often a waiting consumer retries the decryption while keys are exchanged.
KEY_RETRY_INTERVAL_S = 0.2
#: Lifetime of a provisioned node's signed chain (KafkaCrypto's own default: 10 years).
CHAIN_LIFETIME_S = 316_224_000
#: KafkaCrypto's topics for trust management; its key consumer reads partition 0 of each.
MGMT_TOPICS = ("chains", "allowlist", "denylist")
#: Suffixes of the per-root key-exchange topics.
KEY_TOPIC_SUFFIXES = (".keys", ".reqs", ".subs")
#: First bytes of a decrypted envelope; anything else is refused.
ENVELOPE_MAGIC = b"MSE1"
_NODE_ID_RE = re.compile(r"[A-Za-z0-9._-]+")
_MIN_ROT_PASSWORD = 12
_MIN_PROVISIONING_PASSWORD = 6
# KafkaCrypto's signing key type 1 is Ed25519 (type 4 adds SLH-DSA, needing pyspx).
_KEYTYPE_ED25519 = 1


_USAGES: dict[NodeRole, list[str]] = {
    NodeRole.PRODUCER: ["key-encrypt"],
    NodeRole.CONSUMER: ["key-encrypt-request", "key-encrypt-subscribe"],
    NodeRole.PRODCON: ["key-encrypt", "key-encrypt-request", "key-encrypt-subscribe"],
}


# --- node files and provisioning -----------------------------------------------------------


@dataclass(frozen=True)
class NodeFiles:
    """Where one KafkaCrypto node's files are.

    Attributes:
        config_dir: Directory holding them.
        node_id: The node's id; names the files.
    """

    config_dir: Path
    node_id: str

    def __post_init__(self) -> None:
        if not _NODE_ID_RE.fullmatch(self.node_id) or self.node_id in (".", ".."):
            raise MsiError(
                f"node id {self.node_id!r} must be letters, digits, '.', '_' and '-' only"
            )

    @classmethod
    def from_config_path(cls, config: Path) -> NodeFiles:
        """The node whose ``<node>.config`` file is ``config`` (``.config`` may be left off)."""
        name = config.name.removesuffix(".config")
        return cls(config.parent, name)

    @property
    def config(self) -> Path:
        """The node's configuration (KafkaCryptoStore) file."""
        return self.config_dir / f"{self.node_id}.config"

    @property
    def crypto(self) -> Path:
        """The node's long-term private keys."""
        return self.config_dir / f"{self.node_id}.crypto"

    @property
    def seed(self) -> Path:
        """The node's key ratchet."""
        return self.config_dir / f"{self.node_id}.seed"

    def is_provisioned(self) -> bool:
        """Whether the three files exist."""
        return self.config.is_file() and self.crypto.is_file() and self.seed.is_file()


@dataclass(frozen=True)
class ProvisioningSecrets:
    """The two passwords every node of one deployment is provisioned with.

    Attributes:
        rot_password: Derives the root-of-trust key (12+ characters).
        provisioning_password: Derives the provisioner keys that sign each node (6+).
    """

    rot_password: SecretStr
    provisioning_password: SecretStr

    def __post_init__(self) -> None:
        if len(self.rot_password.get_secret_value()) < _MIN_ROT_PASSWORD:
            raise MsiError(f"the root-of-trust password needs {_MIN_ROT_PASSWORD}+ characters")
        if len(self.provisioning_password.get_secret_value()) < _MIN_PROVISIONING_PASSWORD:
            raise MsiError(
                f"the provisioning password needs {_MIN_PROVISIONING_PASSWORD}+ characters"
            )


def provision_node(
    files: NodeFiles,
    role: NodeRole,
    secrets: ProvisioningSecrets,
    topics: Sequence[str] | None = None,
) -> NodeFiles:
    """Provision one KafkaCrypto node non-interactively (what its ``simple-provision`` asks).

    Creates ``<node>.seed`` and ``<node>.crypto`` if missing (re-provisioning keeps the
    node's keys) and writes ``<node>.config``: the node's chain signed by the provisioner
    key of its role, the root of trust, absolute paths to the key files, and
    ``auto_offset_reset: earliest`` for KafkaCrypto's key consumer. Nodes provisioned
    with the same two passwords trust each other.

    Args:
        files: Where the node's files go.
        role: What the node may do.
        secrets: Root-of-trust and provisioning passwords (never logged).
        topics: Topics the node may use (their roots count); None allows every topic.

    Returns:
        ``files``.
    """
    import msgpack
    from pysodium import randombytes

    with _quiet_kafkacrypto():
        from kafkacrypto import KafkaCryptoStore
        from kafkacrypto.cryptokey import CryptoKey
        from kafkacrypto.provisioners import PasswordProvisioner, PasswordROT
        from kafkacrypto.ratchet import Ratchet
        from kafkacrypto.utils import msgpack_default_pack

    def pack(value: Any) -> bytes:
        return bytes(msgpack.packb(value, default=msgpack_default_pack, use_bin_type=True))

    files.config_dir.mkdir(parents=True, exist_ok=True)
    roots = ["^.*$"] if not topics else sorted({topic.split(".", 1)[0] for topic in topics})
    # KafkaCrypto prints the derivation parameters and public keys; keep stdout clean.
    with contextlib.redirect_stdout(io.StringIO()), _quiet_kafkacrypto():
        rot = PasswordROT(secrets.rot_password.get_secret_value(), _KEYTYPE_ED25519)
        provisioner = PasswordProvisioner(
            secrets.provisioning_password.get_secret_value(), rot._pk, _KEYTYPE_ED25519
        )
        msg_rot = pack([0, b"\x90", rot._pk])
        role_key = role.value
        usages = _USAGES[role]
        signed_provisioner = rot._sk.crypto_sign(
            pack([0, pack([["usages", usages]]), provisioner._pk[role_key]])
        )
        if not files.seed.exists():
            files.seed.write_bytes(pack([0, randombytes(Ratchet.SECRETSIZE)]))
            files.seed.chmod(0o600)
        cryptokey = CryptoKey(str(files.crypto), keytypes=[_KEYTYPE_ED25519])
        files.crypto.chmod(0o600)
        index = next(
            i
            for i in range(cryptokey.get_num_spk())
            if cryptokey.get_spk(i).same_type(_KEYTYPE_ED25519)
        )
        poison = pack([["usages", usages], ["topics", roots], ["pathlen", 1]])
        signed_node = provisioner._sk[role_key].crypto_sign(
            pack([time.time() + CHAIN_LIFETIME_S, poison, cryptokey.get_spk(index)])
        )
        chain = pack([signed_provisioner, signed_node])
        store = KafkaCryptoStore(str(files.config), files.node_id, conf_global_logger=False)
        try:
            store.store_value("maxage", CHAIN_LIFETIME_S, section="crypto")
            store.store_value(f"chain{index}", chain, section="chains")
            store.store_value(f"rot{index}", msg_rot, section="allowlist")
            store.store_value("temporary", None, section="allowlist")
            store.store_value("cryptokey", f"file#{files.crypto.resolve()}")
            store.store_value("ratchet", f"file#{files.seed.resolve()}")
            store.store_value("mgmt_long_keyindex", True)
            # Our process waits for keys itself (CryptoCodec); KafkaCrypto's deserializer
            # must not block for its default 10 s on every first message of a key.
            store.store_value("DESER_INITIAL_WAIT_INTERVALS", 1)
            store.store_value("security_protocol", "PLAINTEXT", section="kafka")
            store.store_value("ssl_cafile", "", section="kafka")
            store.store_value("auto_offset_reset", "earliest", section="kafka-crypto-consumer")
        finally:
            store.close()
    files.config.chmod(0o600)
    logger.info(
        "provisioned KafkaCrypto %s node %r in %s", role.value, files.node_id, files.config_dir
    )
    return files


@contextlib.contextmanager
def _quiet_kafkacrypto() -> Any:
    """Silence KafkaCrypto's chatty warnings (version hash, key-file notices)."""
    kc_logger = logging.getLogger("kafkacrypto")
    level = kc_logger.level
    kc_logger.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            yield
        finally:
            kc_logger.setLevel(level)


# --- the envelope -------------------------------------------------------------------------


def pack_envelope(headers: KafkaHeaderList, value: bytes | memoryview) -> bytes:
    """Pack a message's headers and value into the plaintext that gets encrypted.

    Layout: ``MSE1``, a 2-byte big-endian header count, then per header a 2-byte name
    length, the UTF-8 name, a 4-byte value length and the value, then the message value.

    Args:
        headers: The wire-format headers (values bytes; None is not allowed).
        value: The message value.

    Returns:
        The envelope bytes.
    """
    parts = [ENVELOPE_MAGIC, struct.pack(">H", len(headers))]
    for name, raw in headers:
        name_bytes = name.encode("utf-8")
        data = raw.encode("utf-8") if isinstance(raw, str) else (raw or b"")
        parts += [
            struct.pack(">H", len(name_bytes)),
            name_bytes,
            struct.pack(">I", len(data)),
            data,
        ]
    parts.append(bytes(value))
    return b"".join(parts)


def unpack_envelope(envelope: bytes) -> tuple[KafkaHeaderList, memoryview]:
    """Inverse of :func:`pack_envelope`.

    Raises:
        WireFormatError: ``undecryptable`` if the plaintext is not an envelope.
    """
    view = memoryview(envelope)
    try:
        if bytes(view[:4]) != ENVELOPE_MAGIC:
            raise ValueError("no envelope marker")
        (count,) = struct.unpack_from(">H", view, 4)
        pos = 6
        headers: KafkaHeaderList = []
        for _ in range(count):
            (name_len,) = struct.unpack_from(">H", view, pos)
            pos += 2
            name = bytes(view[pos : pos + name_len]).decode("utf-8")
            pos += name_len
            (value_len,) = struct.unpack_from(">I", view, pos)
            pos += 4
            if pos + value_len > len(view):
                raise ValueError("header value runs past the end")
            headers.append((name, bytes(view[pos : pos + value_len])))
            pos += value_len
    except (ValueError, struct.error, UnicodeDecodeError) as exc:
        raise WireFormatError(
            RejectReason.UNDECRYPTABLE, f"the decrypted envelope is malformed ({exc})"
        ) from None
    return headers, view[pos:]


def _header(headers: KafkaHeaders | None, name: str) -> bytes | None:
    items = headers.items() if isinstance(headers, dict) else (headers or [])
    for key, value in items:
        if key == name:
            return value.encode("utf-8") if isinstance(value, str) else value
    return None


def sealed_headers(file_id: bytes) -> KafkaHeaderList:
    """The only headers a sealed message carries in clear."""
    return [
        (HeaderName.VERSION.value, FORMAT_VERSION.encode("ascii")),
        (HeaderName.KIND.value, MessageKind.SEALED.value.encode("ascii")),
        (HeaderName.FILE_ID.value, file_id),
    ]


def _key_index(ciphertext: bytes) -> bytes:
    """Which KafkaCrypto key encrypted a message (its key index), to pace the key wait.

    KafkaCrypto's format is ``0x01`` + msgpack ``[key index, salt, box]``; with long key
    indices the index is a msgpack bin8. Anything else counts as one unknown index.
    """
    if len(ciphertext) > 4 and ciphertext[1] == 0x93 and ciphertext[2] == 0xC4:
        return bytes(ciphertext[4 : 4 + ciphertext[3]])
    return b""


# --- the node and the codec ----------------------------------------------------------------


class CryptoNode:
    """One open KafkaCrypto node: its key-exchange thread and its (de)serializers.

    The node answers other nodes' key requests while it is open, so a producer's node must
    stay open until consumers have their keys (KafkaCrypto's design).

    Args:
        files: The provisioned node.
        connection: The Kafka cluster (overrides the node file's own Kafka settings, so
            credentials stay out of the node's config file).
    """

    def __init__(self, files: NodeFiles, connection: KafkaConnection) -> None:
        if not files.is_provisioned():
            raise MsiError(
                f"KafkaCrypto node {files.node_id!r} is not provisioned in {files.config_dir}; "
                "run `msi-prefect crypto provision` first"
            )
        with _quiet_kafkacrypto():
            from kafkacrypto import KafkaConsumer, KafkaCrypto, KafkaCryptoStore, KafkaProducer

            self.files = files
            self._connection = connection
            self._store = KafkaCryptoStore(str(files.config), conf_global_logger=False)
            overlay = {
                key: value
                for key, value in connection.client_config().items()
                if key not in ("logger", "log_level")
            }
            producer_config = self._store.get_kafka_config("producer", extra="crypto")
            producer_config.update(overlay)
            consumer_config = self._store.get_kafka_config("consumer", extra="crypto")
            consumer_config.update(overlay)
            consumer_config["auto.offset.reset"] = "earliest"
            self._ensured: set[str] = set()
            self._ensure_mgmt_topics()
            self._crypto = KafkaCrypto(
                None,
                KafkaProducer(**producer_config),
                KafkaConsumer(**consumer_config),
                self._store,
            )
        self._serializer = self._crypto.getValueSerializer()
        self._deserializer = self._crypto.getValueDeserializer()
        self._closed = False

    def _ensure_mgmt_topics(self) -> None:
        for name in MGMT_TOPICS:
            self._ensure(name)

    def _ensure(self, name: str) -> None:
        if name not in self._ensured:
            ensure_topic(self._connection, name, partitions=1)
            self._ensured.add(name)

    def prepare_topic(self, topic: str) -> None:
        """Create the key-exchange topics of ``topic``'s root, so no key message is lost."""
        root = topic.split(".", 1)[0]
        for suffix in KEY_TOPIC_SUFFIXES:
            self._ensure(root + suffix)

    def encrypt(self, topic: str, plaintext: bytes) -> bytes:
        """Encrypt one message value for ``topic``.

        Raises:
            MsiError: KafkaCrypto could not encrypt it (the node may not be allowed to
                produce to this topic).
        """
        try:
            result = self._serializer.serialize(topic, plaintext)
        except Exception as exc:  # KafkaCrypto raises bare errors for unusable keys
            raise MsiError(f"KafkaCrypto could not encrypt for topic {topic!r}: {exc}") from exc
        if not isinstance(result, bytes | bytearray):
            raise MsiError(f"KafkaCrypto could not encrypt for topic {topic!r}")
        return bytes(result)

    def try_decrypt(self, topic: str, ciphertext: bytes) -> tuple[bytes | None, bool]:
        """Try to decrypt one value now.

        Returns:
            ``(plaintext, possible)``: the plaintext, or None with ``possible`` telling
            whether it may become decryptable once a key arrives.
        """
        message = self._deserializer.deserialize(topic, ciphertext)
        if message.isCleartext(retry=False):
            return bytes(message.getMessage(retry=False)), True
        return None, bool(message.isPossiblyDecryptable())

    def close(self) -> None:
        """Stop the key-exchange thread and close KafkaCrypto's clients."""
        if not self._closed:
            self._closed = True
            with _quiet_kafkacrypto(), contextlib.suppress(Exception):
                self._crypto.close()


class CryptoCodec:
    """Seals messages on the producer side and opens them on the consumer side.

    Passed to :class:`~msi_prefect.transfer.producer.FileProducer` and
    :class:`~msi_prefect.transfer.reassembler.Reassembler` as ``codec``.

    A consumer that meets a message whose key has not arrived retries for up to
    ``key_wait_s`` (once per key: further messages of a key given up on are rejected at
    once, until that key does arrive), then rejects the message as ``key-missing``.

    Args:
        node: The open KafkaCrypto node (the codec closes it).
        key_wait_s: How long a consumer waits for a missing key.
    """

    def __init__(self, node: CryptoNode, key_wait_s: float = DEFAULT_KEY_WAIT_S) -> None:
        if key_wait_s < 0:
            raise MsiError(f"key wait must be >= 0 seconds, got {key_wait_s}")
        self.node = node
        self.key_wait_s = key_wait_s
        self._given_up: set[bytes] = set()

    @classmethod
    def open(
        cls,
        config: Path,
        connection: KafkaConnection,
        key_wait_s: float = DEFAULT_KEY_WAIT_S,
        topics: Sequence[str] = (),
    ) -> CryptoCodec:
        """Open the node whose config file is ``config`` (``DIR/NODE`` or ``DIR/NODE.config``).

        Args:
            config: The node's config file.
            connection: The Kafka cluster.
            key_wait_s: How long a consumer waits for a missing key.
            topics: Data topics whose key-exchange topics are created now.
        """
        return cls.for_node(NodeFiles.from_config_path(config), connection, key_wait_s, topics)

    @classmethod
    def for_node(
        cls,
        files: NodeFiles,
        connection: KafkaConnection,
        key_wait_s: float = DEFAULT_KEY_WAIT_S,
        topics: Sequence[str] = (),
    ) -> CryptoCodec:
        """Open a provisioned node (see :meth:`open`); the caller closes the codec."""
        codec = cls(CryptoNode(files, connection), key_wait_s)
        try:
            for topic in topics:
                codec.prepare_topic(topic)
        except BaseException:
            codec.close()
            raise
        return codec

    def prepare_topic(self, topic: str) -> None:
        """Create ``topic``'s key-exchange topics."""
        self.node.prepare_topic(topic)

    def seal(
        self, topic: str, key: bytes, value: bytes | memoryview, headers: KafkaHeaderList
    ) -> tuple[bytes, KafkaHeaderList]:
        """Encrypt a wire-format message; returns the sealed value and clear headers."""
        ciphertext = self.node.encrypt(topic, pack_envelope(headers, value))
        return ciphertext, sealed_headers(key)

    def unseal(
        self, topic: str, key: object, value: object, headers: KafkaHeaders | None
    ) -> tuple[bytes | memoryview, KafkaHeaderList]:
        """Decrypt a sealed message into the wire-format value and headers it carries.

        Raises:
            WireFormatError: ``not-encrypted`` for a clear message, ``undecryptable`` for
                one that can never be decrypted, ``key-missing`` when its key did not
                arrive within the key wait.
        """
        kind = _header(headers, HeaderName.KIND.value)
        if kind != MessageKind.SEALED.value.encode("ascii"):
            if _header(headers, HeaderName.VERSION.value) is None:
                raise WireFormatError(RejectReason.NOT_MSI, "there is no msi.v header")
            raise WireFormatError(
                RejectReason.NOT_ENCRYPTED,
                "this consumer reads encrypted transfers only, but the message is in clear",
            )
        if not isinstance(value, bytes | bytearray) or not value:
            raise WireFormatError(RejectReason.UNDECRYPTABLE, "the sealed message has no value")
        ciphertext = bytes(value)
        plaintext = self._decrypt(topic, ciphertext)
        inner_headers, inner_value = unpack_envelope(plaintext)
        inner_fid = _header(inner_headers, HeaderName.FILE_ID.value)
        if inner_fid != _header(headers, HeaderName.FILE_ID.value):
            raise WireFormatError(
                RejectReason.KEY_MISMATCH,
                "the clear msi.fid does not match the encrypted one",
            )
        return inner_value, inner_headers

    def _decrypt(self, topic: str, ciphertext: bytes) -> bytes:
        key_index = _key_index(ciphertext)
        plaintext, possible = self.node.try_decrypt(topic, ciphertext)
        if plaintext is not None:
            self._given_up.discard(key_index)
            return plaintext
        if not possible:
            raise WireFormatError(
                RejectReason.UNDECRYPTABLE, "the value is not a KafkaCrypto message"
            )
        if key_index not in self._given_up:
            deadline = time.monotonic() + self.key_wait_s
            logger.info(
                "waiting up to %.0f s for the key of an encrypted message on %s",
                self.key_wait_s,
                topic,
            )
            while time.monotonic() < deadline:
                time.sleep(min(KEY_RETRY_INTERVAL_S, max(0.0, deadline - time.monotonic())))
                plaintext, _ = self.node.try_decrypt(topic, ciphertext)
                if plaintext is not None:
                    return plaintext
            self._given_up.add(key_index)
        raise WireFormatError(
            RejectReason.KEY_MISSING,
            f"no key to decrypt it arrived within {self.key_wait_s:g} s (is a producer node "
            "of this deployment running, and is this node provisioned for the topic?)",
        )

    def close(self) -> None:
        """Close the node."""
        self.node.close()
