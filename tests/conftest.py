"""Shared fixtures: the real embedded stack (started once per session on free ports)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

# A Prefect call that misses the test server's address must fail, not start a temporary
# server of its own (a process no test would stop). Set before Prefect is first imported.
os.environ["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] = "false"

from msi_prefect.stack.components import Component, s3_env
from msi_prefect.stack.config import DEFAULT_PORTS, BrokerStorage, StackConfig, StateDir
from msi_prefect.stack.manager import StackManager
from msi_prefect.stack.processes import find_free_ports

CHAOS_ENV = "MSI_CHAOS"
# Tansu lets a consumer join a group in about half of session.timeout.ms; keep it short.
TEST_SESSION_TIMEOUT_MS = 6000
TEST_STORAGE_ENV = "MSI_TEST_BROKER_STORAGE"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the long fault-injection runs unless asked for (``-m chaos`` or MSI_CHAOS=1)."""
    markexpr = config.getoption("markexpr", default="") or ""
    if "chaos" in markexpr or os.environ.get(CHAOS_ENV) == "1":
        return
    skip = pytest.mark.skip(
        reason=f"long fault-injection run: opt in with -m chaos or {CHAOS_ENV}=1"
    )
    for item in items:
        if "chaos" in item.keywords:
            item.add_marker(skip)


def free_port_map() -> dict[str, int]:
    """A free loopback port for every server of the stack."""
    return dict(zip(DEFAULT_PORTS, find_free_ports(len(DEFAULT_PORTS)), strict=True))


@dataclass(frozen=True)
class RunningStack:
    """Handles a test needs to talk to the session's stack."""

    manager: StackManager

    @property
    def config(self) -> StackConfig:
        """The stack's settings (ports, storage)."""
        return self.manager.config

    @property
    def bootstrap_servers(self) -> str:
        """Kafka bootstrap address."""
        return self.config.bootstrap_servers

    def s3_env(self) -> dict[str, str]:
        """S3 endpoint and credentials as environment variables."""
        return s3_env(self.config, self.manager.state.credentials())


@pytest.fixture(scope="session")
def stack_manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackManager]:
    """A stack manager on a private state dir and free ports; stops all it started."""
    storage = BrokerStorage(os.environ.get(TEST_STORAGE_ENV, BrokerStorage.S3.value))
    state = StateDir(tmp_path_factory.mktemp("stack-state"))
    manager = StackManager(state, StackConfig(ports=free_port_map(), broker_storage=storage))
    try:
        yield manager
    finally:
        manager.down()


@pytest.fixture(scope="session")
def kafka_stack(stack_manager: StackManager) -> RunningStack:
    """The real S3 store and Kafka-API broker."""
    stack_manager.up([Component.S3, Component.BROKER])
    return RunningStack(stack_manager)


@pytest.fixture(scope="session")
def prefect_stack(stack_manager: StackManager) -> Iterator[RunningStack]:
    """The broker, the S3 store and a real Prefect server, with clients pointed at it."""
    stack_manager.up([Component.S3, Component.BROKER, Component.PREFECT])
    env = stack_manager.client_env()
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield RunningStack(stack_manager)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def prefect_api(prefect_stack: RunningStack) -> Iterator[str]:
    """Point in-process Prefect clients at the stack's server; yields the API URL.

    Prefect reads its settings once at import, so changing ``os.environ`` (as
    ``prefect_stack`` does, for child processes) is not enough for this process.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api_url = prefect_stack.config.prefect_api_url
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        yield api_url


@pytest.fixture
def topic(kafka_stack: RunningStack) -> Iterator[str]:
    """A fresh topic with 4 partitions, deleted after the test (Tansu keeps data otherwise)."""
    from confluent_kafka.admin import AdminClient, NewTopic

    name = f"test-{uuid.uuid4().hex[:12]}"
    admin = AdminClient({"bootstrap.servers": kafka_stack.bootstrap_servers})
    for future in admin.create_topics(
        [NewTopic(name, num_partitions=4, replication_factor=1)]
    ).values():
        future.result(timeout=30)
    try:
        yield name
    finally:
        for future in admin.delete_topics([name]).values():
            future.result(timeout=30)
