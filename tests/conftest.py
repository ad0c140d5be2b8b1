"""Shared fixtures and test planning for the whole suite.

The real embedded stack (started once per session and test worker, on free ports), the
opt-in chaos runs, and which tests share a pytest-xdist worker.
"""

from __future__ import annotations

import atexit
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

# A Prefect call that misses the test server's address must fail, not start a temporary
# server of its own (a process no test would stop). Set before Prefect is first imported.
os.environ["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] = "false"
# `msi-prefect up` makes its stack's profile the active one in Prefect's profiles file
# (msi_prefect/stack/profile.py): the tests' stacks use a file of their own, never the
# user's ~/.prefect/profiles.toml. Children (`msi-prefect up` in a subprocess) inherit it.
os.environ["PREFECT_PROFILES_PATH"] = os.path.join(
    tempfile.mkdtemp(prefix="msi-test-prefect-profiles-"), "profiles.toml"
)

from msi_prefect.stack import processes
from msi_prefect.stack.components import Component, s3_env
from msi_prefect.stack.config import BrokerStorage, StackConfig, StateDir, free_port_map
from msi_prefect.stack.manager import StackManager

atexit.register(shutil.rmtree, os.path.dirname(os.environ["PREFECT_PROFILES_PATH"]), True)

CHAOS_ENV = "MSI_CHAOS"


def _pick_ports_apart_from_the_other_workers() -> None:
    """Give this xdist worker a share of the free ports of its own (``PORT_SHARE``).

    The workers start stacks at the same moments; two that picked the same free port
    before either bound it failed to start (a port collision between two test stacks).
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker.startswith("gw") and worker[2:].isdigit() and workers > 1:
        processes.PORT_SHARE = (int(worker[2:]) % workers, workers)


_pick_ports_apart_from_the_other_workers()
# Tansu lets a consumer join a group in about half of session.timeout.ms; keep it short.
TEST_SESSION_TIMEOUT_MS = 6000
TEST_STORAGE_ENV = "MSI_TEST_BROKER_STORAGE"
# The xdist groups (see _worker_group): a whole-stack test (prefix and test id, or module
# path for the tests of one module-scoped stack), the opt-in chaos runs, and the tests
# that need the session's Prefect server.
OWN_STACK_GROUP_PREFIX = "own-stack:"
CHAOS_GROUP = "chaos"
PREFECT_SERVER_GROUP = "prefect-server"
#: Seconds each whole-stack group takes on a quiet 2-core machine (from ``--durations``,
#: both workers busy). Only the order matters: the longest go out first, so the
#: workers each start a long one and the short ones fill in after.
OWN_STACK_SECONDS = {
    # 185 s at 86c3796; three of its four `up`s now skip the deploy (about 12 s each).
    # 139 s beside the PostgreSQL test (load 3-4) once its power cut moved there, its two
    # outage backups waited side by side and each look at the UI started one browser.
    "tests/stack/test_stack.py::test_up_twice_status_and_down_leave_nothing_behind": 125,
    # The power cut, then a kill -9 of the server alone (one module stack).
    "tests/integration/test_stack_faults.py": 130,
    "tests/stack/test_postgres_stack.py::"
    "test_the_stack_on_postgresql_carries_a_file_through_and_recovers": 85,
    "tests/integration/test_lab_operations.py": 75,
    "tests/stack/test_crypto_stack.py::test_up_encrypted_deploys_encrypted_transfers": 55,
    # Estimates at a low load from their authors' runs (load 5-12: 148 s and 127 s).
    "tests/stack/test_install.py": 90,  # the wheel, `up` from the install, then `init`
    # With the storage host's audit run (issue 18): 58 s at load 3, 128 s at load 7.
    "tests/integration/test_hosts.py::"
    "test_three_hosts_rebuild_on_storage_and_process_on_a_compute_host_that_sees_no_disk": 90,
}
# A group not in the table yet: as long as a stack's start, a file and its `down`.
NEW_OWN_STACK_SECONDS = 60


def pytest_itemcollected(item: pytest.Item) -> None:
    """Give each test its pytest-xdist group as it is collected (see :func:`_worker_group`).

    Here rather than in ``pytest_collection_modifyitems``: pytest-xdist reads the groups
    into the test ids in its own ``pytest_collection_modifyitems``.
    """
    group = _worker_group(item)
    if group is not None and item.config.pluginmanager.has_plugin("xdist"):
        item.add_marker(pytest.mark.xdist_group(group))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the opt-in chaos runs unless asked for; run the longest tests first.

    pytest-xdist hands out the groups in this order (``--no-loadscope-reorder`` in
    pyproject.toml): the chaos runs when asked for (the longest by far), the whole-stack
    tests, longest first, then the session Prefect server's group, then the rest. Without
    workers (-n 0) too: the longest tests first, the quick ones fill in after.
    """
    chaos_asked = _chaos_asked(config)
    if not chaos_asked:
        skip = pytest.mark.skip(
            reason=f"long fault-injection run: opt in with -m chaos or {CHAOS_ENV}=1"
        )
        for item in items:
            if "chaos" in item.keywords:
                item.add_marker(skip)
    items.sort(key=lambda item: _start_order(item, chaos_asked))


def _chaos_asked(config: pytest.Config) -> bool:
    """Whether the long fault-injection runs were asked for (``-m chaos`` or MSI_CHAOS=1)."""
    markexpr = config.getoption("markexpr", default="") or ""
    return "chaos" in markexpr or os.environ.get(CHAOS_ENV) == "1"


def _start_order(item: pytest.Item, chaos_asked: bool) -> tuple[int, float]:
    """Sort key: the chaos runs (if asked for), the whole-stack groups (longest first), the
    Prefect server's group, the rest (skipped chaos runs among them, in their place)."""
    group = _worker_group(item) or ""
    if group == CHAOS_GROUP and chaos_asked:
        return 0, -math.inf
    if group.startswith(OWN_STACK_GROUP_PREFIX):
        key = group.removeprefix(OWN_STACK_GROUP_PREFIX)
        return 0, -OWN_STACK_SECONDS.get(key, NEW_OWN_STACK_SECONDS)
    if group == PREFECT_SERVER_GROUP:
        return 1, 0.0
    return 2, 0.0


def _worker_group(item: pytest.Item) -> str | None:
    """Which tests must share a pytest-xdist worker (``--dist loadgroup``), or None.

    * A test that starts a whole stack of its own (marked ``own_stack``) is a group of its
      own, and so are the tests of one module that share a module-scoped stack. They go
      out longest first (:func:`_start_order`), so each of the three workers runs one such
      stack at a time: at most three at once, each on its own free ports and folders.
    * The opt-in chaos runs form one group: one at a time, as they measure recovery.
    * Tests that share a module-scoped fixture run on one worker, so it is built once.
    * Tests that need the session's Prefect server (``prefect_stack``) run on one worker:
      a second server would cost its start and its services' CPU for the whole run.

    Every other test goes to whichever worker is free. Each worker starts the session's
    broker and S3 store (``kafka_stack``) only if one of its tests asks for them.
    """
    if "chaos" in item.keywords:
        return CHAOS_GROUP
    if "own_stack" in item.keywords:
        test_id = item.nodeid.split("@")[0]
        shared = test_id.split("::")[0] if _uses_module_fixture(item) else test_id
        return OWN_STACK_GROUP_PREFIX + shared
    if _uses_module_fixture(item):
        return item.nodeid.split("::")[0]
    if "prefect_stack" in getattr(item, "fixturenames", ()):
        return PREFECT_SERVER_GROUP
    return None


def _uses_module_fixture(item: pytest.Item) -> bool:
    """Whether the test needs a fixture that lives as long as its module."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    return any(
        definition.scope == "module"
        for definitions in info.name2fixturedefs.values()
        for definition in definitions
    )


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
