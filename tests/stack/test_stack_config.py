"""Unit tests of the stack's settings, process tracking and CLI errors (no servers)."""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from msi_prefect.cli import main
from msi_prefect.errors import MsiError
from msi_prefect.stack.components import LEASE_STORAGE, Component, build_spec
from msi_prefect.stack.config import (
    DEFAULT_PORTS,
    StackConfig,
    StateDir,
    parse_port_overrides,
)
from msi_prefect.stack.processes import (
    ManagedProcess,
    ProcessSpec,
    ProcessState,
    find_free_ports,
    port_is_free,
)
from msi_prefect.warm_start import WORKER_TYPE


def test_port_overrides_parse_and_reject_bad_items() -> None:
    assert parse_port_overrides(["broker=19092", "prefect=14200"]) == {
        "broker": 19092,
        "prefect": 14200,
    }
    with pytest.raises(MsiError, match="NAME=NUMBER"):
        parse_port_overrides(["broker:19092"])
    with pytest.raises(MsiError, match="unknown port name 'kafka'"):
        parse_port_overrides(["kafka=9092"])


def test_config_rejects_clashing_and_out_of_range_ports() -> None:
    with pytest.raises(ValueError, match="same port"):
        StackConfig(ports={"broker": 4200})  # prefect keeps its default 4200
    with pytest.raises(ValueError, match="outside"):
        StackConfig(ports={"broker": 70000})
    config = StackConfig(ports={"broker": 19092})
    assert config.ports["prefect"] == DEFAULT_PORTS["prefect"]
    assert config.bootstrap_servers == "127.0.0.1:19092"


def test_state_dir_that_is_not_writable_gives_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(MsiError, match="not writable"):
        StateDir(blocker / "state").ensure_writable()


def test_credentials_are_generated_once_and_private(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.ensure_writable()
    first = state.credentials()
    second = state.credentials()
    assert first.access_key_id == second.access_key_id
    assert (tmp_path / "credentials.json").stat().st_mode & 0o077 == 0
    assert first.secret_access_key.get_secret_value() not in repr(first)


def test_config_round_trips_through_the_state_dir(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.ensure_writable()
    assert state.load_config() is None
    config = StackConfig(ports={"broker": 19999})
    state.save_config(config)
    assert state.load_config() == config
    (tmp_path / "stack.json").write_text("{not json")
    with pytest.raises(MsiError, match="damaged"):
        state.load_config()


def _sleeper_spec(tmp_path: Path, ports: dict[str, int] | None = None) -> ProcessSpec:
    return ProcessSpec(
        name="sleeper",
        argv=[sys.executable, "-c", "import time; time.sleep(60)"],
        env={},
        ports=ports or {},
        cwd=tmp_path,
    )


def test_managed_process_starts_once_and_stops_by_pid(tmp_path: Path) -> None:
    process = ManagedProcess(_sleeper_spec(tmp_path), tmp_path, tmp_path)
    pid = process.start()
    try:
        assert process.state() is ProcessState.RUNNING
        assert process.start() == pid  # a second start finds the first
    finally:
        assert process.stop(timeout_s=5)
    assert process.state() is ProcessState.STOPPED
    assert not process.stop()


def test_process_ignoring_sigterm_is_killed_after_the_timeout(tmp_path: Path) -> None:
    stubborn = ProcessSpec(
        name="stubborn",
        argv=[
            sys.executable,
            "-c",
            "import signal, time, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
            "print('ready', flush=True); time.sleep(60)",
        ],
        env={},
        ports={},
        cwd=tmp_path,
    )
    process = ManagedProcess(stubborn, tmp_path, tmp_path)
    pid = process.start()
    process.wait_healthy(lambda: "ready" in process.log_file.read_text(), timeout_s=10)
    assert process.stop(timeout_s=0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_stale_pid_file_is_not_taken_for_a_running_process(tmp_path: Path) -> None:
    process = ManagedProcess(_sleeper_spec(tmp_path), tmp_path, tmp_path)
    # PID 1 is alive but is not our sleeper.
    process.pid_file.write_text(
        json.dumps({"pid": 1, "executable": "/no/such/sleeper", "started_at": 0})
    )
    assert process.state() is ProcessState.STALE


def test_port_in_use_is_reported_before_starting(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert not port_is_free(port)
        process = ManagedProcess(_sleeper_spec(tmp_path, {"broker": port}), tmp_path, tmp_path)
        with pytest.raises(MsiError, match=rf"port {port} \(broker\).*already in use"):
            process.start()
    assert process.state() is ProcessState.STOPPED


def test_missing_binary_is_reported(tmp_path: Path) -> None:
    spec = ProcessSpec(name="broker", argv=["/no/such/tansu"], env={}, ports={}, cwd=tmp_path)
    with pytest.raises(MsiError, match="executable not found: /no/such/tansu"):
        ManagedProcess(spec, tmp_path, tmp_path).start()


def test_cli_unknown_subcommand_exits_non_zero() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "msi_prefect.cli", "frobnicate"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "invalid choice: 'frobnicate'" in result.stderr


def test_cli_up_with_missing_broker_binary_fails_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MSI_TANSU_BIN", str(tmp_path / "missing-tansu"))
    port = find_free_ports(1)[0]
    status = main(
        [
            "--state-dir",
            str(tmp_path / "state"),
            "up",
            "--only",
            "broker",
            "--port",
            f"broker={port}",
        ]
    )
    assert status == 1
    assert "executable not found" in capsys.readouterr().err


def test_cli_up_with_unwritable_state_dir_fails_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["--state-dir", str(blocker / "state"), "up"]) == 1
    assert "not writable" in capsys.readouterr().err


def test_cli_status_of_a_stack_that_never_ran(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--state-dir", str(tmp_path), "status", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert {c["health"] for c in report["components"]} == {"stopped"}
    assert report["healthy"] is False


def test_every_server_is_pinned_to_loopback_and_prefect_keeps_leases_on_disk(
    tmp_path: Path,
) -> None:
    config, state = StackConfig(), StateDir(tmp_path)
    broker = build_spec(Component.BROKER, config, state).argv
    assert broker[broker.index("--listener-url") + 1] == f"tcp://127.0.0.1:{config.ports['broker']}"
    s3 = build_spec(Component.S3, config, state).argv
    assert "-ip.bind=127.0.0.1" in s3 and "-ip=127.0.0.1" in s3
    prefect = build_spec(Component.PREFECT, config, state)
    assert prefect.argv[prefect.argv.index("--host") + 1] == "127.0.0.1"
    # A server restart must not forget the long-running runs' concurrency leases.
    assert prefect.env["PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"] == LEASE_STORAGE
    assert hasattr(importlib.import_module(LEASE_STORAGE), "ConcurrencyLeaseStorage")


def test_the_server_alone_gets_few_malloc_arenas_unless_told_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    config, state = StackConfig(), StateDir(tmp_path)
    assert build_spec(Component.PREFECT, config, state).env["MALLOC_ARENA_MAX"] == "2"
    assert "MALLOC_ARENA_MAX" not in build_spec(Component.WORKER, config, state).env
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    assert build_spec(Component.PREFECT, config, state).env["MALLOC_ARENA_MAX"] == "8"


def test_the_worker_is_woken_polls_every_second_and_skips_the_version_check_unless_told_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PREFECT_WORKER_QUERY_SECONDS", raising=False)
    monkeypatch.delenv("PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED", raising=False)
    monkeypatch.delenv("PREFECT_CLIENT_CSRF_SUPPORT_ENABLED", raising=False)
    worker = build_spec(Component.WORKER, StackConfig(), StateDir(tmp_path))
    env = worker.env
    assert worker.argv[worker.argv.index("--type") + 1] == WORKER_TYPE  # woken by events
    assert env["PREFECT_WORKER_QUERY_SECONDS"] == "1"
    assert env["PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED"] == "false"
    assert env["PREFECT_CLIENT_CSRF_SUPPORT_ENABLED"] == "false"  # the server has no CSRF
    assert Path(env["MSI_WARM_START_FLOWS"], "backup_file.py").is_file()
    monkeypatch.setenv("PREFECT_WORKER_QUERY_SECONDS", "5")
    env = build_spec(Component.WORKER, StackConfig(), StateDir(tmp_path)).env
    assert env["PREFECT_WORKER_QUERY_SECONDS"] == "5"


def test_each_share_of_the_free_ports_is_apart_from_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from msi_prefect.stack import processes

    picked = {}
    for index in range(3):
        monkeypatch.setattr(processes, "PORT_SHARE", (index, 3))
        picked[index] = set(find_free_ports(20))
        offset = (processes.PRIVATE_PORTS_FROM + index) % 3
        assert all(port % 3 == offset for port in picked[index])
    assert not (picked[0] & picked[1] or picked[1] & picked[2] or picked[0] & picked[2])


def test_the_servers_sqlite_connections_share_one_bounded_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    from prefect.server.database.configurations import AioSqliteConfiguration

    from msi_prefect.stack.components import sqlite_page_cache_bounded

    limit = 64 * 1024 * 1024
    # Prefect's own setup comes back after the test (the patch replaces it).
    monkeypatch.setattr(AioSqliteConfiguration, "setup_sqlite", AioSqliteConfiguration.setup_sqlite)
    sqlite_page_cache_bounded(limit)
    database = tmp_path / "prefect.db"
    config = AioSqliteConfiguration(connection_url=f"sqlite+aiosqlite:///{database}")
    conn = sqlite3.connect(database)
    try:
        config.setup_sqlite(conn, None)  # type: ignore[arg-type]
        assert conn.execute("PRAGMA soft_heap_limit").fetchone()[0] == limit
        assert conn.execute("PRAGMA cache_size").fetchone()[0] == 20000  # Prefect's, kept
    finally:
        conn.execute("PRAGMA soft_heap_limit = 0")  # the limit is the whole process's
        conn.close()


def test_the_one_process_servers_subscribers_get_deeper_queues(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefect.server.utilities.messaging import memory

    from msi_prefect.stack.components import subscription_queues_deepened

    # Prefect's own constructor comes back after the test (the patch replaces it).
    monkeypatch.setattr(memory.Subscription, "__init__", memory.Subscription.__init__)
    assert memory.Subscription(memory.Topic("msi-test"))._queue.maxsize == 10_000  # Prefect's
    subscription_queues_deepened(25_000)
    subscription = memory.Subscription(memory.Topic("msi-test"), max_retries=5)
    assert subscription._queue.maxsize == 25_000
    assert subscription.max_retries == 5  # the rest is Prefect's as before
