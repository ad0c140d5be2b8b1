"""The whole stack with its Prefect server on PostgreSQL: `up --database postgresql`.

A file dropped into the watched folder is rebuilt and backed up, described and analysed,
each announced by its event, with every run, event and deployment in the stack's own
PostgreSQL; `status` shows the database server; a power cut and `up` (which keeps the
choice) recover it: the transfers the cut left "Running" are marked crashed and started
again; `down` stops it by PID. About 2-4 minutes.
"""

from __future__ import annotations

import asyncio
import json
import stat
import time
from pathlib import Path

import pytest

from msi_prefect.cli.stack import DEPLOY_CURRENT
from msi_prefect.stack import postgres
from msi_prefect.stack.components import Component
from msi_prefect.stack.config import CREDENTIALS_FILE, DATABASE_PASSWORD_KEY
from msi_prefect.stack.processes import port_is_free
from tests.listening import not_on_loopback
from tests.stack_helpers import (
    UserStack,
    cli,
    pid_alive,
    power_cut,
    transfer_run_ids,
    user_stack,
    wait_until_done,
)

pytestmark = [
    pytest.mark.stack,
    pytest.mark.skipif(
        bool(postgres.locate_programs().missing()),
        reason="PostgreSQL's server programs are not installed",
    ),
]

# A stable window, a group join and three flow runs on a busy machine.
DONE_TIMEOUT_S = 180
# Where Debian's PostgreSQL puts its Unix sockets; the stack's server makes none.
SYSTEM_SOCKET_DIRS = (Path("/var/run/postgresql"), Path("/tmp"))


def _drop_and_wait(stack: UserStack, name: str) -> None:
    """Drop a file; it is rebuilt, and its three downstream steps announce themselves."""
    since = time.time() - 5
    content = name.encode() * 200
    (stack.inbox / name).write_bytes(content)
    done, _ = wait_until_done(stack.api, since, lambda: {name}, DONE_TIMEOUT_S)
    assert done, f"{name}: backed-up, metadata-extracted and analyzed events"
    assert (stack.received / name).read_bytes() == content


def _prefect_rows(stack: UserStack, table: str) -> int:
    """Rows of one of Prefect's tables, read from the stack's PostgreSQL itself."""
    import asyncpg

    password = json.loads((stack.state_dir / CREDENTIALS_FILE).read_text())[DATABASE_PASSWORD_KEY]

    async def count() -> int:
        connection = await asyncpg.connect(
            host="127.0.0.1",
            port=stack.ports["postgres"],
            user=postgres.SUPERUSER,
            password=password,
            database=postgres.DATABASE_NAME,
        )
        try:
            return int(await connection.fetchval(f"SELECT count(*) FROM {table}"))
        finally:
            await connection.close()

    return asyncio.run(count())


@pytest.mark.own_stack
@pytest.mark.timeout(900)
def test_the_stack_on_postgresql_carries_a_file_through_and_recovers(tmp_path: Path) -> None:
    with user_stack(tmp_path, "--database", "postgresql") as stack:
        report = json.loads(cli(stack.state_dir, "status", "--json").stdout)
        assert report["healthy"] is True
        assert report["database"] == "postgresql"
        rows = {row["name"]: row for row in report["components"]}
        assert list(rows) == ["s3", "broker", "postgres", "prefect", "worker"]
        port = stack.ports["postgres"]
        assert rows["postgres"]["address"] == f"postgresql://127.0.0.1:{port}/prefect"
        server_pid = rows["postgres"]["pid"]
        # Loopback only, and no Unix socket anywhere a system PostgreSQL would put one.
        assert not_on_loopback({server_pid}) == []
        assert not [d for d in SYSTEM_SOCKET_DIRS if (d / f".s.PGSQL.{port}").exists()]
        assert (stack.state_dir / "postgres" / "data" / "PG_VERSION").is_file()
        credentials = stack.state_dir / CREDENTIALS_FILE
        assert stat.S_IMODE(credentials.stat().st_mode) == 0o600

        _drop_and_wait(stack, "on-postgres.dat")
        # The runs and events are PostgreSQL's, not a SQLite file's.
        assert _prefect_rows(stack, "flow_run") >= 4  # two transfers and three runs
        assert _prefect_rows(stack, "events") > 0
        assert not (stack.state_dir / "prefect" / "prefect.db").exists()

        # A power cut; `up` without options keeps the database it was given. It finds the
        # transfers still "Running" with no process, marks them crashed and starts them
        # again, and keeps the deployments of the first `up`.
        old_transfers = transfer_run_ids(stack.api)
        assert len(old_transfers) == 2, old_transfers
        power_cut(stack)
        assert not pid_alive(server_pid)
        up = cli(stack.state_dir, "up")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "started: watch-directory/watch-directory, reconstruct-files/reconstruct-files" in (
            up.stdout
        )
        assert DEPLOY_CURRENT in up.stdout
        assert stack.manager().config.database.value == "postgresql"
        _drop_and_wait(stack, "after-power-cut.dat")
        assert old_transfers <= transfer_run_ids(stack.api, ("CRASHED",))
        pids = {c: stack.pid(c) for c in stack.manager().config.components}
        assert all(pids.values()), pids
    # `down` (by user_stack) stopped every part by PID, the database server too.
    assert not [c for c, pid in pids.items() if pid and pid_alive(pid)]
    assert port_is_free(port)
    assert stack.manager().process(Component.POSTGRES).read_pid() is None
