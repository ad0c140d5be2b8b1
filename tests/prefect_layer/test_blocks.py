"""Prefect blocks: Prefect's standard block suite, validation, mapping onto the transfer
core, secrets, and save/load/register against the embedded stack's real Prefect server."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any

import pytest
from prefect.blocks.core import Block
from prefect.testing.standard_test_suites import BlockStandardTestSuite
from pydantic import SecretStr, ValidationError

from msi_prefect.prefect_layer.backup.storage import BackupStorage
from msi_prefect.prefect_layer.blocks import BLOCK_TYPES
from msi_prefect.prefect_layer.transfers.crypto import KafkaCryptoSettings
from msi_prefect.prefect_layer.transfers.kafka_cluster import KafkaCluster
from msi_prefect.prefect_layer.transfers.settings import MAX_CHUNK_SIZE, TransferSettings
from msi_prefect.stack.config import BACKUP_BUCKET
from msi_prefect.transfer.filters import FileFilter
from msi_prefect.transfer.kafka import Compression, KafkaConnection, SecurityProtocol
from msi_prefect.transfer.producer import ProducerSettings
from msi_prefect.transfer.sinks import FsspecSink, LocalDirectorySink
from msi_prefect.transfer.wire import DEFAULT_CHUNK_SIZE
from tests.conftest import RunningStack
from tests.flow_helpers import REPO

SCRIPT = REPO / "blocks" / "create_embedded_blocks.py"
SECRET = "s3cr3t-Value-that-must-not-leak"


def load_script() -> ModuleType:
    """blocks/create_embedded_blocks.py as a module (blocks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("create_embedded_blocks", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def error_text(excinfo: pytest.ExceptionInfo[ValidationError]) -> str:
    return str(excinfo.value)


# --------------------------------------------------------------------------- Prefect's suite


class TestBlockStandards(BlockStandardTestSuite):
    """Prefect's own checks: description, docs URL, field descriptions, code example."""

    @pytest.fixture(params=BLOCK_TYPES, ids=lambda block: block.__name__)
    def block(self, request: pytest.FixtureRequest) -> type[Block]:
        return request.param

    def test_has_a_valid_image(self, block: type[Block]) -> None:
        # The suite downloads the logo; these blocks set none (optional) and tests run offline.
        assert block._logo_url is None
        pytest.skip("no _logo_url set (optional); the suite's check downloads the image")


def test_block_type_names_and_slugs() -> None:
    assert {b.get_block_type_name(): b.get_block_type_slug() for b in BLOCK_TYPES} == {
        "MSI Kafka Cluster": "msi-kafka-cluster",
        "MSI Transfer Settings": "msi-transfer-settings",
        "MSI KafkaCrypto": "msi-kafkacrypto",
        "MSI Backup Storage": "msi-backup-storage",
    }


def test_every_field_appears_in_the_block_schema() -> None:
    for block in BLOCK_TYPES:
        schema = block.model_json_schema()
        assert set(block.model_fields) <= set(schema["properties"]), block.__name__


# --------------------------------------------------------------------------- KafkaCluster


@pytest.mark.parametrize(
    "servers",
    [
        "127.0.0.1:9092",
        "broker1:9092,broker2:9093",
        "pkc-abc12.europe-west1.gcp.confluent.cloud:9092",
        "[::1]:9092",
        "kafka_0.internal:19092",
    ],
)
def test_bootstrap_servers_accepted(servers: str) -> None:
    assert KafkaCluster(bootstrap_servers=servers).bootstrap_servers == servers


def test_bootstrap_servers_spaces_around_commas_are_dropped() -> None:
    cluster = KafkaCluster(bootstrap_servers=" a:1 , b:2 ")
    assert cluster.bootstrap_servers == "a:1,b:2"


@pytest.mark.parametrize(
    ("servers", "reason"),
    [
        ("", "an entry is empty"),
        ("broker", "has no port"),
        ("broker:", "is not a number"),
        (":9092", "has no port"),
        ("broker:abc", "is not a number"),
        ("broker:0", "outside 1-65535"),
        ("broker:70000", "outside 1-65535"),
        ("PLAINTEXT://broker:9092", "has a scheme"),
        ("a:1,,b:2", "an entry is empty"),
        ("a:1,", "an entry is empty"),
        ("bad host:9092", "contains ' '; separate brokers with ','"),
        ("broker1:9092;broker2:9092", "contains ';'; separate brokers with ','"),
        ("bro$ker:9092", "has host 'bro$ker', which is not a host name"),
        ("-broker:9092", "not a host name"),
    ],
)
def test_bad_bootstrap_servers_are_refused_clearly(servers: str, reason: str) -> None:
    with pytest.raises(ValidationError) as excinfo:
        KafkaCluster(bootstrap_servers=servers)
    text = error_text(excinfo)
    assert "bootstrap_servers must be a comma-separated list of host:port" in text
    assert reason in text


def test_sasl_settings_need_a_sasl_protocol() -> None:
    with pytest.raises(ValidationError) as excinfo:
        KafkaCluster(bootstrap_servers="b:9092", sasl_username="key", sasl_password="secret")
    text = error_text(excinfo)
    assert "sasl_username, sasl_password set but security_protocol is PLAINTEXT" in text
    assert SECRET not in text


def test_blank_text_fields_from_the_ui_mean_unset() -> None:
    cluster = KafkaCluster(bootstrap_servers="b:9092", sasl_mechanism="", ssl_ca_location=" ")
    assert cluster.sasl_mechanism is None
    assert cluster.ssl_ca_location is None
    assert "ssl.ca.location" not in cluster.to_connection().client_config()


def confluent_cluster() -> KafkaCluster:
    return KafkaCluster(
        bootstrap_servers="pkc-abc12.europe-west1.gcp.confluent.cloud:9092",
        security_protocol="SASL_SSL",
        sasl_mechanism="PLAIN",
        sasl_username="API_KEY",
        sasl_password=SECRET,
        ssl_ca_location="/etc/ssl/certs/ca-certificates.crt",
        extra={"client.id": "lab-3", "socket.keepalive.enable": True},
    )


def test_to_connection_maps_every_field() -> None:
    cluster = confluent_cluster()
    connection = cluster.to_connection()
    assert isinstance(connection, KafkaConnection)
    assert connection.security_protocol is SecurityProtocol.SASL_SSL
    assert connection.sasl_password is not None
    assert connection.sasl_password.get_secret_value() == SECRET
    config = connection.client_config()
    assert config["bootstrap.servers"] == cluster.bootstrap_servers
    assert config["security.protocol"] == "SASL_SSL"
    assert config["sasl.mechanism"] == "PLAIN"
    assert config["sasl.username"] == "API_KEY"
    assert config["sasl.password"] == SECRET
    assert config["ssl.ca.location"] == "/etc/ssl/certs/ca-certificates.crt"
    assert config["client.id"] == "lab-3"
    assert config["socket.keepalive.enable"] is True


def test_to_connection_round_trip() -> None:
    cluster = confluent_cluster()
    again = KafkaCluster.from_connection(cluster.to_connection())
    assert again == cluster
    assert again.to_connection() == cluster.to_connection()


def test_to_connection_extra_is_a_copy() -> None:
    cluster = confluent_cluster()
    cluster.to_connection().extra["client.id"] = "changed"
    assert cluster.extra["client.id"] == "lab-3"


# --------------------------------------------------------------------------- TransferSettings


@pytest.mark.parametrize("topic", ["lab-files", "a", "Lab.Files_2-x", "t" * 249])
def test_topic_accepted(topic: str) -> None:
    assert TransferSettings(topic=topic).topic == topic


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("", "the topic name is empty"),
        ("t" * 250, "has 250 characters; Kafka allows at most 249"),
        ("lab files", "contains ' '"),
        ("lab/files", "contains '/'"),
        ("lab:files*", "contains '*:'"),
        ("dünn", "contains 'ü'"),
        ("..", "is not a valid topic name"),
    ],
)
def test_bad_topic_is_refused_clearly(topic: str, reason: str) -> None:
    with pytest.raises(ValidationError) as excinfo:
        TransferSettings(topic=topic)
    assert reason in error_text(excinfo)


def test_transfer_defaults() -> None:
    settings = TransferSettings(topic="lab-files")
    assert settings.chunk_size == DEFAULT_CHUNK_SIZE
    assert settings.compression is Compression.NONE
    assert settings.include == [] and settings.exclude == []
    assert settings.stability_window_s == 2.0
    assert settings.upload_existing is False
    assert settings.max_file_size == 1024**4
    assert settings.consumer_group == "msi-reassembler"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("chunk_size", 0),
        ("chunk_size", -1),
        ("chunk_size", MAX_CHUNK_SIZE + 1),
        ("stability_window_s", 0),
        ("max_file_size", 0),
        ("consumer_group", ""),
        ("consumer_group", "  "),
        ("compression", "brotli"),
    ],
)
def test_bad_transfer_numbers_are_refused(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as excinfo:
        TransferSettings(topic="t", **{field: value})
    assert field in error_text(excinfo)


def test_largest_chunk_is_accepted() -> None:
    settings = TransferSettings(topic="t", chunk_size=MAX_CHUNK_SIZE)
    assert settings.producer_settings().chunk_size == MAX_CHUNK_SIZE


@pytest.mark.parametrize(
    ("field", "pattern", "reason"),
    [
        ("include", "raw\\*.csv", "backslash is not allowed"),
        ("exclude", "**.csv", "'**' must be a whole path segment"),
        ("include", "data/", "trailing '/'"),
        ("exclude", "[abc", "unclosed '['"),
        ("include", "", "empty pattern"),
        ("exclude", "a/../b", "'..'"),
    ],
)
def test_bad_glob_is_refused_clearly(field: str, pattern: str, reason: str) -> None:
    with pytest.raises(ValidationError) as excinfo:
        TransferSettings(topic="t", **{field: ["*.tif", pattern]})
    text = error_text(excinfo)
    assert f"invalid {field} glob {pattern!r}" in text
    assert reason in text


def test_producer_settings() -> None:
    settings = TransferSettings(topic="lab-files", chunk_size=256 * 1024, compression="zstd")
    producer = settings.producer_settings()
    assert isinstance(producer, ProducerSettings)
    assert producer.topic == "lab-files"
    assert producer.chunk_size == 256 * 1024
    assert producer.compression is Compression.ZSTD
    assert producer.inflight_limit >= producer.chunk_size


def test_file_filter() -> None:
    settings = TransferSettings(topic="t", include=["*.tif", "raw/**"], exclude=["**/LOGS/**"])
    file_filter = settings.file_filter()
    assert isinstance(file_filter, FileFilter)
    assert file_filter.include == ("*.tif", "raw/**")
    assert file_filter.matches("run1/frame.tif")
    assert file_filter.matches("raw/x/y.bin")
    assert not file_filter.matches("notes.txt")
    assert not file_filter.matches("raw/LOGS/a.tif")
    # Built-in excludes stay on: our own staging files are never uploaded.
    assert not file_filter.matches("frame.tif.part")


# --------------------------------------------------------------------------- KafkaCryptoSettings


def test_kafkacrypto_defaults_and_blank_password() -> None:
    settings = KafkaCryptoSettings(
        node_id="lab-3.producer", config_dir="/etc/msi/crypto", provisioning_password=""
    )
    assert settings.key_wait_timeout_s == 30.0
    assert settings.provisioning_password is None


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"node_id": "", "config_dir": "/c"}, "node_id '' must be a non-empty name"),
        ({"node_id": "lab 3", "config_dir": "/c"}, "node_id 'lab 3' must be"),
        ({"node_id": "../x", "config_dir": "/c"}, "node_id '../x' must be"),
        ({"node_id": "..", "config_dir": "/c"}, "node_id '..' must be"),
        ({"node_id": "n", "config_dir": " "}, "config_dir is empty"),
        ({"node_id": "n", "config_dir": "/c", "key_wait_timeout_s": 0}, "key_wait_timeout_s"),
    ],
)
def test_bad_kafkacrypto_settings_are_refused(fields: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValidationError) as excinfo:
        KafkaCryptoSettings(**fields)
    assert reason in error_text(excinfo)


# --------------------------------------------------------------------------- BackupStorage


@pytest.mark.parametrize(
    "url",
    ["s3://msi-backup/backups", "s3://bucket", "/data/backups", "~/backups", "file:///data/b"],
)
def test_backup_url_accepted(url: str) -> None:
    assert BackupStorage(url=url).url == url


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("", "url is empty"),
        ("backups/here", "is relative; give an absolute directory"),
        ("nosuchproto://bucket/x", "unknown protocol 'nosuchproto'"),
        ("s3://", "names no bucket"),
        ("s3:///prefix", "names no bucket"),
        ("s3://AKIA:secret@bucket/x", "must not contain credentials"),
        ("file://otherhost/data", "names host 'otherhost'"),
    ],
)
def test_bad_backup_url_is_refused_clearly(url: str, reason: str) -> None:
    with pytest.raises(ValidationError) as excinfo:
        BackupStorage(url=url)
    assert reason in error_text(excinfo)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"endpoint_url": "127.0.0.1:8333"}, "must be an http:// or https:// URL"),
        ({"endpoint_url": "ftp://host"}, "must be an http:// or https:// URL"),
        ({"endpoint_url": "http://u:p@host"}, "must not contain credentials"),
        ({"access_key_id": "AKIA"}, "access_key_id is set but secret_access_key is not"),
        ({"secret_access_key": SECRET}, "secret_access_key is set but access_key_id is not"),
    ],
)
def test_bad_s3_options_are_refused_clearly(fields: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValidationError) as excinfo:
        BackupStorage(url="s3://b/p", **fields)
    text = error_text(excinfo)
    assert reason in text
    assert SECRET not in text


def test_s3_options_on_a_local_url_are_refused() -> None:
    with pytest.raises(ValidationError) as excinfo:
        BackupStorage(url="/data/backups", endpoint_url="http://127.0.0.1:8333", region="x")
    assert "endpoint_url, region only apply to s3:// URLs" in error_text(excinfo)


def s3_backup() -> BackupStorage:
    return BackupStorage(
        url="s3://msi-backup/backups",
        endpoint_url="http://127.0.0.1:8333",
        access_key_id="AKIAEXAMPLE",
        secret_access_key=SECRET,
        region="us-east-1",
    )


def test_storage_options_for_s3() -> None:
    assert s3_backup().storage_options() == {
        "key": "AKIAEXAMPLE",
        "secret": SECRET,
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:8333", "region_name": "us-east-1"},
    }


def test_storage_options_without_credentials_use_the_default_chain() -> None:
    assert BackupStorage(url="s3://bucket/p").storage_options() == {}
    assert BackupStorage(url="s3://bucket/p", region="eu-west-1").storage_options() == {
        "client_kwargs": {"region_name": "eu-west-1"}
    }


def test_local_backup_sink(tmp_path: Path) -> None:
    storage = BackupStorage(url=str(tmp_path / "backups"))
    assert storage.storage_options() == {}
    sink = storage.sink()
    assert isinstance(sink, LocalDirectorySink)
    assert sink.root == tmp_path / "backups"


def test_s3_backup_sink_hides_the_secret() -> None:
    sink = s3_backup().sink()
    assert isinstance(sink, FsspecSink)
    assert SECRET not in repr(sink)
    assert SECRET not in sink.describe()


# --------------------------------------------------------------------------- secrets


def blocks_with_secrets() -> list[Block]:
    return [
        confluent_cluster(),
        KafkaCryptoSettings(node_id="n", config_dir="/c", provisioning_password=SECRET),
        s3_backup(),
    ]


@pytest.mark.parametrize("block", blocks_with_secrets(), ids=lambda b: type(b).__name__)
def test_secrets_absent_from_repr_str_and_json(block: Block) -> None:
    shown = [
        repr(block),
        str(block),
        f"{block}",
        block.model_dump_json(),
        json.dumps(block.model_dump(mode="json")),
        repr(block.model_dump()),
    ]
    for text in shown:
        assert SECRET not in text
        assert "**********" in text


def test_secret_fields_are_secret_in_the_block_schema() -> None:
    secret_fields = {b.__name__: b.model_json_schema()["secret_fields"] for b in BLOCK_TYPES}
    assert secret_fields == {
        "KafkaCluster": ["sasl_password"],
        "TransferSettings": [],
        "KafkaCryptoSettings": ["provisioning_password", "rot_password"],
        "BackupStorage": ["secret_access_key"],
    }


# --------------------------------------------------------------------------- real Prefect server


def unique_name() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def sample_blocks() -> list[tuple[Block, str, str]]:
    """(block, secret field, secret value); TransferSettings has no secret."""
    return [
        (confluent_cluster(), "sasl_password", SECRET),
        (
            KafkaCryptoSettings(
                node_id="lab-3", config_dir="/etc/msi/crypto", provisioning_password=SECRET
            ),
            "provisioning_password",
            SECRET,
        ),
        (s3_backup(), "secret_access_key", SECRET),
    ]


@pytest.mark.stack
def test_register_types_with_the_server(prefect_api: str) -> None:
    from prefect.client.orchestration import get_client

    for block in BLOCK_TYPES:
        block.register_type_and_schema()
    with get_client(sync_client=True) as client:
        assert str(client.api_url).rstrip("/") == prefect_api.rstrip("/")
        for block in BLOCK_TYPES:
            block_type = client.read_block_type_by_slug(block.get_block_type_slug())
            assert block_type.name == block.get_block_type_name()
            assert block_type.documentation_url is not None
            assert block_type.code_example and f"{block.__name__}.load" in block_type.code_example


@pytest.mark.stack
@pytest.mark.parametrize(
    ("index", "block_class"),
    [(0, KafkaCluster), (1, KafkaCryptoSettings), (2, BackupStorage)],
    ids=lambda value: value.__name__ if isinstance(value, type) else str(value),
)
def test_save_load_round_trip_keeps_the_secret(
    prefect_api: str, index: int, block_class: type[Block]
) -> None:
    block, secret_field, secret = sample_blocks()[index]
    assert isinstance(block, block_class)
    name = unique_name()
    block.save(name, overwrite=True)
    try:
        loaded = block_class.load(name)
        assert loaded == block
        loaded_secret = getattr(loaded, secret_field)
        assert isinstance(loaded_secret, SecretStr)
        assert loaded_secret.get_secret_value() == secret
        # Overwrite keeps the name and replaces the values.
        changed = block.model_copy(update={secret_field: SecretStr("rotated")})
        changed.save(name, overwrite=True)
        reloaded = getattr(block_class.load(name), secret_field)
        assert reloaded.get_secret_value() == "rotated"
    finally:
        block_class.delete(name)
    with pytest.raises(ValueError, match="Unable to find block document"):
        block_class.load(name)


@pytest.mark.stack
def test_save_load_transfer_settings_and_use_them(prefect_api: str) -> None:
    settings = TransferSettings(
        topic="lab-files",
        chunk_size=512 * 1024,
        compression="lz4",
        include=["*.tif"],
        exclude=["**/LOGS/**"],
        upload_existing=True,
    )
    name = unique_name()
    settings.save(name)
    try:
        loaded = TransferSettings.load(name)
        assert loaded == settings
        assert loaded.producer_settings().compression is Compression.LZ4
        assert loaded.file_filter().matches("a/b.tif")
        assert not loaded.file_filter().matches("a/LOGS/b.tif")
    finally:
        TransferSettings.delete(name)


@pytest.mark.stack
def test_prefect_block_register_cli(prefect_stack: RunningStack) -> None:
    prefect = Path(sys.executable).parent / "prefect"
    env = {**os.environ, "PREFECT_API_URL": prefect_stack.config.prefect_api_url}
    result = subprocess.run(
        [str(prefect), "block", "register", "-m", "msi_prefect.prefect_layer.blocks"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for block in BLOCK_TYPES:
        assert block.get_block_type_name() in result.stdout


@pytest.mark.stack
def test_create_embedded_blocks_script(
    prefect_api: str, prefect_stack: RunningStack, tmp_path: Path
) -> None:
    config = prefect_stack.config
    status = {
        "prefect_api_url": config.prefect_api_url,
        "bootstrap_servers": config.bootstrap_servers,
        "s3_endpoint": config.s3_endpoint,
        "backup_bucket": BACKUP_BUCKET,
    }
    env = {**os.environ, **prefect_stack.s3_env()}
    env.pop("PREFECT_API_URL", None)  # the status names the server
    result = subprocess.run(
        [sys.executable, str(SCRIPT)],
        input=json.dumps(status),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split("\n")[:3] == [
        "saved msi-kafka-cluster/embedded",
        "saved msi-transfer-settings/embedded",
        "saved msi-backup-storage/embedded",
    ]
    assert prefect_stack.s3_env()["AWS_SECRET_ACCESS_KEY"] not in result.stdout + result.stderr
    try:
        cluster = KafkaCluster.load("embedded")
        assert cluster.bootstrap_servers == config.bootstrap_servers
        assert TransferSettings.load("embedded").topic == "lab-files"
        backup = BackupStorage.load("embedded")
        assert backup.url == f"s3://{BACKUP_BUCKET}/backups"
        assert backup.endpoint_url == config.s3_endpoint
        # The saved storage really reaches the embedded S3 store.
        check_backup_sink_round_trip(backup, tmp_path / "staged.dat")
    finally:
        for block in (KafkaCluster, TransferSettings, BackupStorage):
            block.delete("embedded")


def check_backup_sink_round_trip(backup: BackupStorage, staging: Path) -> None:
    staging.write_bytes(b"backup me\n" * 1000)
    data = staging.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    relpath = PurePosixPath(f"test-blocks/{uuid.uuid4().hex}.dat")
    sink = backup.sink()
    result = sink.deliver(staging, relpath, len(data), sha256)
    assert result.sha256 == sha256
    assert sink.exists(relpath, len(data), sha256)


def test_create_embedded_blocks_needs_credentials() -> None:
    module = load_script()
    status = {"bootstrap_servers": "127.0.0.1:9092", "s3_endpoint": "http://h:1"}
    status["backup_bucket"] = "b"
    with pytest.raises(Exception, match=r"AWS_ACCESS_KEY_ID is missing from the environment"):
        module.build_embedded_blocks(status, environ={})
    with pytest.raises(Exception, match=r"no Prefect API URL"):
        module.create_embedded_blocks(status, environ={})


def test_create_embedded_blocks_builds_the_documented_blocks() -> None:
    module = load_script()
    status = {
        "bootstrap_servers": "127.0.0.1:19092",
        "s3_endpoint": "http://127.0.0.1:18333",
        "backup_bucket": "msi-backup",
    }
    env = {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "r"}
    cluster, transfer, backup = module.build_embedded_blocks(status, environ=env)
    assert cluster.bootstrap_servers == "127.0.0.1:19092"
    assert transfer.topic == "lab-files"
    assert backup.storage_options() == {
        "key": "id",
        "secret": SECRET,
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:18333", "region_name": "r"},
    }
    assert backup.url == "s3://msi-backup/backups"
