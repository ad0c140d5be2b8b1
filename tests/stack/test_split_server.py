"""The Prefect server split over two processes: `up --server-layout split`.

The API in one process (`prefect server start --no-services`), its services (event
persister, triggers, actions, task-run recorder...) in another, their messages through a
Redis server of the stack's own, on the stack's PostgreSQL. Most tests run without a
server; the last one starts PostgreSQL, Redis, the API and the services (no broker, S3 or
worker) and checks that an event posted
to the API is stored by the other process, also across a restart of that process (about a
minute).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from msi_prefect.errors import MsiError
from msi_prefect.stack import postgres
from msi_prefect.stack.components import (
    API_WORKERS_ENV,
    MIGRATE_ON_START_ENV,
    REDIS_MESSAGING,
    api_workers,
    build_spec,
    migrate_once_for_several_api_processes,
    redis_binary,
    server_layout_env,
)
from msi_prefect.stack.config import (
    Component,
    PrefectDatabase,
    ServerLayout,
    StackConfig,
    StateDir,
    free_port_map,
)
from msi_prefect.stack.manager import StackManager
from msi_prefect.stack.processes import port_is_free
from tests.listening import not_on_loopback
from tests.stack_helpers import cli, pid_alive

SPLIT = StackConfig(server_layout=ServerLayout.SPLIT, database=PrefectDatabase.POSTGRESQL)
REDIS_MISSING = not Path(redis_binary()).is_file()
POSTGRES_MISSING = bool(postgres.locate_programs().missing())
# An event posted to the API is stored within a second or two on a quiet machine.
STORED_TIMEOUT_S = 60
# How long an event must stay unstored while the services process is down.
NOT_STORED_FOR_S = 5


def test_one_process_is_the_default_and_runs_no_redis() -> None:
    config = StackConfig()
    assert config.server_layout is ServerLayout.ONE_PROCESS
    assert Component.REDIS not in config.components
    assert Component.PREFECT_SERVICES not in config.components
    assert server_layout_env(config) == {}


def test_split_runs_redis_before_the_api_and_the_services_after_it() -> None:
    assert SPLIT.components == (
        Component.S3,
        Component.BROKER,
        Component.POSTGRES,
        Component.REDIS,
        Component.PREFECT,
        Component.PREFECT_SERVICES,
        Component.WORKER,
    )


def test_split_on_sqlite_is_refused_with_a_clear_error() -> None:
    with pytest.raises(ValidationError, match="--database postgresql"):
        StackConfig(server_layout=ServerLayout.SPLIT)


def test_split_specs_share_one_redis_bus_on_loopback(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    config = SPLIT.model_copy(update={"ports": free_port_map()})
    api = build_spec(Component.PREFECT, config, state)
    services = build_spec(Component.PREFECT_SERVICES, config, state)
    redis = build_spec(Component.REDIS, config, state)
    assert "--no-services" in api.argv
    assert list(services.argv[-3:]) == ["server", "services", "start"]
    assert services.ports == {}  # the services process listens on nothing
    for spec in (api, services):
        assert spec.env["PREFECT_MESSAGING_BROKER"] == REDIS_MESSAGING
        assert spec.env["PREFECT_REDIS_MESSAGING_URL"] == config.redis_url
    assert redis.argv[redis.argv.index("--bind") + 1] == "127.0.0.1"
    assert redis.argv[redis.argv.index("--port") + 1] == str(config.ports["redis"])
    one = build_spec(
        Component.PREFECT, config.model_copy(update={"server_layout": "one-process"}), state
    )
    assert "--no-services" not in one.argv
    assert "PREFECT_MESSAGING_BROKER" not in one.env


def test_the_split_api_runs_as_many_processes_as_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = StateDir(tmp_path)
    config = SPLIT.model_copy(update={"ports": free_port_map()})
    monkeypatch.delenv(API_WORKERS_ENV, raising=False)
    assert "--workers" not in build_spec(Component.PREFECT, config, state).argv
    monkeypatch.setenv(API_WORKERS_ENV, "2")
    api = build_spec(Component.PREFECT, config, state).argv
    assert api[api.index("--workers") + 1] == "2"
    one = config.model_copy(update={"server_layout": "one-process", "database": "sqlite"})
    assert "--workers" not in build_spec(Component.PREFECT, one, state).argv


def test_several_api_processes_find_the_database_migrated_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Set, then removed: the monkeypatch then restores it (the function sets it itself).
    monkeypatch.setenv(MIGRATE_ON_START_ENV, "true")
    monkeypatch.delenv(MIGRATE_ON_START_ENV)
    upgrades: list[str] = []
    one = ["server", "start", "--host", "127.0.0.1", "--no-services"]
    assert not migrate_once_for_several_api_processes(one, lambda: upgrades.append("up"))
    assert not migrate_once_for_several_api_processes([*one, "--workers", "1"], lambda: None)
    assert upgrades == [] and MIGRATE_ON_START_ENV not in os.environ
    several = [*one, "--workers", "2"]
    assert migrate_once_for_several_api_processes(several, lambda: upgrades.append("up"))
    assert upgrades == ["up"]
    assert os.environ[MIGRATE_ON_START_ENV] == "false"  # uvicorn's processes inherit it


@pytest.mark.parametrize("raw", ["0", "two", "-1", "9"])
def test_a_bad_number_of_api_processes_is_refused_with_its_value(raw: str) -> None:
    with pytest.raises(MsiError, match=f"{API_WORKERS_ENV} must be .*{raw!r}"):
        api_workers({API_WORKERS_ENV: raw})


def test_a_one_process_stack_refuses_to_start_redis(tmp_path: Path) -> None:
    manager = StackManager(StateDir(tmp_path), StackConfig())
    with pytest.raises(MsiError, match="--server-layout split"):
        manager.wanted_components([Component.REDIS])


def test_the_split_layout_brings_redis_and_the_services_with_the_server(tmp_path: Path) -> None:
    manager = StackManager(StateDir(tmp_path), SPLIT)
    assert manager.wanted_components([Component.PREFECT]) == [
        Component.POSTGRES,
        Component.REDIS,
        Component.PREFECT,
        Component.PREFECT_SERVICES,
    ]
    assert manager.wanted_components([Component.BROKER]) == [Component.BROKER]


def _post_event(api: str, name: str) -> str:
    event_id = str(uuid.uuid4())
    event = {
        "id": event_id,
        "occurred": datetime.now(UTC).isoformat(),
        "event": name,
        "resource": {"prefect.resource.id": f"msi.test.{event_id}"},
    }
    response = httpx.post(f"{api}/events", json=[event], timeout=30)
    response.raise_for_status()
    return event_id


def _stored(api: str, event_id: str, since: float) -> bool:
    body = {
        "filter": {
            "occurred": {"since": datetime.fromtimestamp(since - 60, UTC).isoformat()},
            "id": {"id": [event_id]},
        },
        "limit": 10,
    }
    response = httpx.post(f"{api}/events/filter", json=body, timeout=30)
    response.raise_for_status()
    return any(event["id"] == event_id for event in response.json()["events"])


def _wait_stored(api: str, event_id: str, since: float, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _stored(api, event_id, since):
            return True
        time.sleep(0.5)
    return False


@pytest.mark.stack
@pytest.mark.skipif(REDIS_MISSING, reason="Debian's redis-server is not installed")
@pytest.mark.skipif(POSTGRES_MISSING, reason="PostgreSQL's server programs are not installed")
@pytest.mark.timeout(600)
def test_the_services_process_stores_the_apis_events_and_resumes_after_a_restart(
    tmp_path: Path,
) -> None:
    ports = free_port_map()
    port_args = [arg for name, port in ports.items() for arg in ("--port", f"{name}={port}")]
    state_dir = tmp_path / "state"
    up = ["up", "--only", "prefect", "--server-layout", "split", "--database", "postgresql"]
    up += port_args
    result = cli(state_dir, *up)
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        report = json.loads(cli(state_dir, "status", "--json").stdout)
        assert report["server_layout"] == "split"
        rows = {row["name"]: row for row in report["components"]}
        parts = ("postgres", "redis", "prefect", "prefect-services")
        assert all(rows[name]["health"] == "healthy" for name in parts), rows
        pids = {name: rows[name]["pid"] for name in parts}
        assert not_on_loopback(set(pids.values())) == []
        api = f"http://127.0.0.1:{ports['prefect']}/api"

        since = time.time()
        first = _post_event(api, "msi.test.split")
        assert _wait_stored(api, first, since, STORED_TIMEOUT_S)

        # The events are stored by the services process: without it they wait in Redis...
        manager = StackManager.open(StateDir(state_dir))
        assert manager.process(Component.PREFECT_SERVICES).stop()
        waiting = _post_event(api, "msi.test.split")
        time.sleep(NOT_STORED_FOR_S)
        assert not _stored(api, waiting, since)
        # ... and are stored once it is back.
        restarted = cli(state_dir, "up", "--only", "prefect-services")
        assert restarted.returncode == 0, restarted.stdout + restarted.stderr
        assert _wait_stored(api, waiting, since, STORED_TIMEOUT_S)
        pids["prefect-services"] = manager.process(Component.PREFECT_SERVICES).read_pid().pid  # type: ignore[union-attr]
    finally:
        down = cli(state_dir, "down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert not [name for name, pid in pids.items() if pid_alive(pid)]
    assert port_is_free(ports["redis"])
