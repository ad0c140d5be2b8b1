"""The stack's PostgreSQL choice: settings, validation, process specs, and the server itself.

Everything but the last test runs without a server. The last one creates a real cluster
with Debian's programs, starts it by PID, asks it whether it is ready and stops it again
(seconds), and is skipped where the programs are missing.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
from pathlib import Path

import pytest

from bench.file_rate import server_queue_notes
from msi_prefect.cli import main
from msi_prefect.errors import MsiError
from msi_prefect.stack import postgres
from msi_prefect.stack.components import build_spec, prefect_env
from msi_prefect.stack.config import (
    CONFIG_FILE,
    CREDENTIALS_FILE,
    DATABASE_PASSWORD_KEY,
    Component,
    PrefectDatabase,
    StackConfig,
    StateDir,
    free_port_map,
)
from msi_prefect.stack.manager import Health, StackManager
from msi_prefect.stack.processes import ManagedProcess, find_free_ports, port_is_free
from msi_prefect.stack.queue_probe import UNKNOWN_SUBSCRIBER, subscriber_name

ON_POSTGRES = StackConfig(database=PrefectDatabase.POSTGRESQL)
PROGRAMS_MISSING = bool(postgres.locate_programs().missing())
# initdb, the database and a server start: a few seconds, more on a busy machine.
SERVER_START_S = 60


def test_sqlite_is_the_default_and_runs_no_postgres() -> None:
    config = StackConfig()
    assert config.database is PrefectDatabase.SQLITE
    assert Component.POSTGRES not in config.components
    assert config.components == (
        Component.S3,
        Component.BROKER,
        Component.PREFECT,
        Component.WORKER,
    )


def test_postgresql_starts_before_the_prefect_server() -> None:
    assert ON_POSTGRES.components == (
        Component.S3,
        Component.BROKER,
        Component.POSTGRES,
        Component.PREFECT,
        Component.WORKER,
    )


def test_the_choice_is_kept_in_stack_json(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.ensure_writable()
    state.save_config(ON_POSTGRES)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["database"] == "postgresql"
    loaded = state.load_config()
    assert loaded is not None and loaded.database is PrefectDatabase.POSTGRESQL


def test_an_unknown_database_in_stack_json_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"database": "mysql"}))
    with pytest.raises(MsiError, match=r"damaged(.|\n)*Input should be 'sqlite' or 'postgresql'"):
        StateDir(tmp_path).load_config()


def test_up_refuses_an_unknown_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--state-dir", str(tmp_path), "up", "--database", "mysql"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'mysql' (choose from 'sqlite', 'postgresql')" in (
        capsys.readouterr().err
    )


def test_missing_programs_are_a_clear_error_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(postgres.POSTGRES_BIN_DIR_ENV, str(tmp_path / "no-postgres"))
    state_dir = tmp_path / "state"
    ports = [arg for name, port in free_port_map().items() for arg in ("--port", f"{name}={port}")]
    status = main(["--state-dir", str(state_dir), "up", "--database", "postgresql", *ports])
    error = capsys.readouterr().err
    assert status == 1
    assert "needs PostgreSQL's server programs (initdb, postgres, pg_isready" in error
    assert "apt-get install postgresql-15" in error
    assert not list((state_dir / "run").glob("*.pid")), "nothing was started"


def test_postgres_is_started_only_for_a_postgresql_stack(tmp_path: Path) -> None:
    on_sqlite = StackManager(StateDir(tmp_path), StackConfig())
    with pytest.raises(MsiError, match="database is SQLite; it has no PostgreSQL"):
        on_sqlite.wanted_components([Component.POSTGRES])
    assert on_sqlite.wanted_components([Component.PREFECT]) == [Component.PREFECT]
    on_postgres = StackManager(StateDir(tmp_path), ON_POSTGRES)
    # The server brings its database along.
    assert on_postgres.wanted_components([Component.PREFECT, Component.S3]) == [
        Component.S3,
        Component.POSTGRES,
        Component.PREFECT,
    ]
    assert on_postgres.wanted_components(None) == list(ON_POSTGRES.components)


def test_status_lists_postgres_only_for_a_postgresql_stack(tmp_path: Path) -> None:
    on_sqlite = StackManager(StateDir(tmp_path / "a"), StackConfig()).status()
    assert on_sqlite.database == "sqlite"
    assert "postgres" not in [row.name for row in on_sqlite.components]
    on_postgres = StackManager(StateDir(tmp_path / "b"), ON_POSTGRES).status()
    assert on_postgres.database == "postgresql"
    row = next(row for row in on_postgres.components if row.name == "postgres")
    assert row.health is Health.STOPPED
    assert row.address == f"postgresql://127.0.0.1:{ON_POSTGRES.ports['postgres']}/prefect"


def test_the_password_is_generated_once_and_kept_private(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    s3_before = state.credentials()
    password = state.database_password()
    assert len(password.get_secret_value()) >= 24
    assert state.database_password() == password
    path = tmp_path / CREDENTIALS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())[DATABASE_PASSWORD_KEY] == password.get_secret_value()
    assert state.credentials() == s3_before


def test_server_spec_binds_loopback_only_without_a_unix_socket(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    spec = build_spec(Component.POSTGRES, ON_POSTGRES, state)
    port = ON_POSTGRES.ports["postgres"]
    assert spec.ports == {"postgres": port}
    assert "listen_addresses=127.0.0.1" in spec.argv
    assert f"port={port}" in spec.argv
    assert "unix_socket_directories=" in spec.argv
    assert spec.argv[spec.argv.index("-D") + 1] == str(tmp_path / "postgres" / "data")
    assert spec.stop_signal is signal.SIGINT
    # PostgreSQL refuses root: as root it runs unprivileged in a user namespace.
    assert bool(spec.launcher) is (os.geteuid() == 0)


def test_only_the_prefect_server_knows_the_database_url(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    password = state.database_password().get_secret_value()
    server = build_spec(Component.PREFECT, ON_POSTGRES, state)
    url = server.env["PREFECT_API_DATABASE_CONNECTION_URL"]
    port = ON_POSTGRES.ports["postgres"]
    assert url == f"postgresql+asyncpg://msi:{password}@127.0.0.1:{port}/prefect"
    worker = build_spec(Component.WORKER, ON_POSTGRES, state)
    assert all(password not in value for value in worker.env.values())
    client_env = StackManager(state, ON_POSTGRES).client_env()
    assert all(password not in value for value in client_env.values())
    # SQLite stays as it was: the file under the state dir.
    sqlite_url = prefect_env(StackConfig(), state)["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert sqlite_url == f"sqlite+aiosqlite:///{tmp_path / 'prefect' / 'prefect.db'}"


def test_queue_probe_names_the_subscriber_by_its_server_module() -> None:
    def make_frame(module: str, back: object) -> object:
        return type("Frame", (), {"f_globals": {"__name__": module}, "f_back": back})()

    service = make_frame("prefect.server.events.services.event_persister", None)
    messaging = make_frame("prefect.server.utilities.messaging.memory", service)
    assert subscriber_name(messaging) == "event_persister"
    assert subscriber_name(make_frame("asyncio.events", None)) == UNKNOWN_SUBSCRIBER


def test_benchmark_reads_dropped_events_and_queue_depths(tmp_path: Path) -> None:
    log = tmp_path / "prefect.log"
    log.write_text(
        "msi-queue-depths 1.0 events/event_persister=10+0 events/triggers=0+0\n"
        "12:00:01 WARNING Subscription queue is full, dropping message for topic='events'\n"
        "msi-queue-depths 3.0 events/event_persister=9999+1 events/triggers=2+0\n"
    )
    assert server_queue_notes(log) == {
        "server_dropped_messages": 1,
        "deepest_server_queues": {"events/event_persister": 10000, "events/triggers": 2},
    }


@pytest.mark.skipif(PROGRAMS_MISSING, reason="PostgreSQL's server programs are not installed")
@pytest.mark.timeout(SERVER_START_S * 3)
def test_a_real_cluster_is_created_once_served_on_loopback_and_stopped_by_pid(
    tmp_path: Path,
) -> None:
    state = StateDir(tmp_path / "state")
    state.ensure_writable()
    (port,) = find_free_ports(1)
    config = StackConfig(
        database=PrefectDatabase.POSTGRESQL, ports={**free_port_map(), "postgres": port}
    )
    assert postgres.ensure_cluster(state) is True
    assert postgres.ensure_cluster(state) is False, "created once"
    assert not (postgres.component_dir(state) / postgres.PASSWORD_FILE).exists()
    process = ManagedProcess(build_spec(Component.POSTGRES, config, state), state.run_dir,
                             state.log_dir)  # fmt: skip
    try:
        pid = process.start()
        process.wait_healthy(lambda: postgres.postgres_healthy(config), SERVER_START_S)
        record = process.read_pid()
        assert record is not None and record.pid == pid
        # The PID is the server's own (unshare execs it), so `stop` reaches it.
        assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"postgres")
    finally:
        assert process.stop()
    assert port_is_free(port)
    assert not process.pid_file.exists()


def test_a_lock_file_a_killed_server_left_is_removed_and_a_live_one_kept(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    lock = postgres.data_dir(state) / postgres.POSTMASTER_PID_FILE
    assert not postgres.remove_stale_lock(state)  # no cluster yet: nothing to do
    lock.parent.mkdir(parents=True)
    # The PID of a server that has ended (and been reaped), as after a power cut.
    ended = subprocess.Popen(["true"])
    ended.wait()
    dead_pid = ended.pid
    lock.write_text(f"{dead_pid}\n{postgres.data_dir(state)}\n")
    assert postgres.remove_stale_lock(state)
    assert not lock.exists()
    # A server that still runs keeps its lock (PostgreSQL itself then says so).
    lock.write_text(f"{os.getpid()}\n{postgres.data_dir(state)}\n")
    assert not postgres.remove_stale_lock(state)
    assert lock.exists()
