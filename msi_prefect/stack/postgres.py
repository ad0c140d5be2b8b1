"""The stack's own PostgreSQL server, for `msi-prefect up --database postgresql`.

Debian's server binaries (``postgresql-15``; ``scripts/bootstrap`` installs them) run a
cluster under ``STATE_DIR/postgres/data``: created once by ``initdb`` with a superuser,
a generated password (kept in the stack's 0600 credentials file) and a database for
Prefect; served on 127.0.0.1 and the stack's ``postgres`` port only, with no Unix socket.

PostgreSQL refuses to run as root. When the stack is started by root (as on these
machines), every PostgreSQL program runs through ``unshare --user`` as an unprivileged
user of a user namespace of its own, mapped to root outside: the server is not root
inside, so it starts, and its files are root's outside, so it reads and writes a state
dir under a folder only root may enter (``/tmp/pytest-of-root``, ``/root``), which a
system user such as ``postgres`` could not. ``unshare`` execs the program in its own
place, so the PID the stack records is the server's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from msi_prefect.errors import MsiError
from msi_prefect.stack.config import StackConfig, StateDir
from msi_prefect.stack.processes import LOOPBACK, pid_alive

POSTGRES_BIN_DIR_ENV = "MSI_POSTGRES_BIN_DIR"
# Where Debian installs each major version's server programs: /usr/lib/postgresql/15/bin.
DEBIAN_POSTGRES_ROOT = Path("/usr/lib/postgresql")
DEBIAN_PACKAGE = "postgresql-15"
SERVER_PROGRAMS = ("initdb", "postgres", "pg_isready")
COMPONENT_DIR = "postgres"
DATA_SUBDIR = "data"
#: PostgreSQL's lock file in the data directory; its first line is the server's PID.
POSTMASTER_PID_FILE = "postmaster.pid"
# A cluster being created; renamed to DATA_SUBDIR once it holds Prefect's database.
INIT_SUBDIR = "data.init"
PASSWORD_FILE = "initdb-password"
SUPERUSER = "msi"
DATABASE_NAME = "prefect"
# The unprivileged user and group inside the user namespace (nobody, nogroup).
UNPRIVILEGED_ID = 65534
INIT_TIMEOUT_S = 120.0
READY_TIMEOUT_S = 2
ASYNC_DRIVER = "postgresql+asyncpg"


@dataclass(frozen=True)
class PostgresPrograms:
    """The PostgreSQL server programs of one installation."""

    bin_dir: Path

    @property
    def initdb(self) -> Path:
        """Creates a cluster."""
        return self.bin_dir / "initdb"

    @property
    def postgres(self) -> Path:
        """The server (and its single-user mode)."""
        return self.bin_dir / "postgres"

    @property
    def pg_isready(self) -> Path:
        """Asks a server whether it accepts connections."""
        return self.bin_dir / "pg_isready"

    def missing(self) -> list[str]:
        """The server programs not found (or not executable) in ``bin_dir``."""
        return [
            name
            for name in SERVER_PROGRAMS
            if not os.access(self.bin_dir / name, os.X_OK) or not (self.bin_dir / name).is_file()
        ]


def locate_programs(environ: dict[str, str] | None = None) -> PostgresPrograms:
    """The server programs: ``$MSI_POSTGRES_BIN_DIR``, ``pg_config --bindir``, or Debian's.

    Never fails: the result may name programs that do not exist (see
    :func:`require_programs`), so the stack can still be stopped without them.

    Args:
        environ: The environment to read the override from (default: this process's).
    """
    environ = dict(os.environ) if environ is None else environ
    if override := environ.get(POSTGRES_BIN_DIR_ENV):
        return PostgresPrograms(Path(override))
    candidates: list[Path] = []
    if pg_config := shutil.which("pg_config"):
        try:
            answer = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(Path(answer.stdout.strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    if DEBIAN_POSTGRES_ROOT.is_dir():
        versions = [p for p in DEBIAN_POSTGRES_ROOT.iterdir() if p.name.isdigit()]
        candidates += [p / "bin" for p in sorted(versions, key=lambda p: -int(p.name))]
    for candidate in candidates:
        if not PostgresPrograms(candidate).missing():
            return PostgresPrograms(candidate)
    return PostgresPrograms(candidates[0] if candidates else DEBIAN_POSTGRES_ROOT / "15" / "bin")


def require_programs() -> PostgresPrograms:
    """The server programs, or a clear error that says how to install them.

    Raises:
        MsiError: initdb, postgres or pg_isready is missing, or root has no ``unshare``.
    """
    programs = locate_programs()
    missing = programs.missing()
    if missing:
        raise MsiError(
            f"--database postgresql needs PostgreSQL's server programs ({', '.join(missing)} "
            f"not found in {programs.bin_dir}). Install them with "
            f"'sudo apt-get install {DEBIAN_PACKAGE}' (./scripts/bootstrap does it), or "
            f"name their folder in ${POSTGRES_BIN_DIR_ENV}."
        )
    if os.geteuid() == 0 and shutil.which("unshare") is None:
        raise MsiError(
            "PostgreSQL does not run as root, and 'unshare' (util-linux), which runs it "
            "as an unprivileged user here, is missing; install util-linux, or run "
            "'msi-prefect up' as another user."
        )
    return programs


def privilege_launcher() -> tuple[str, ...]:
    """The command that runs a PostgreSQL program unprivileged: empty unless we are root."""
    if os.geteuid() != 0:
        return ()
    return (
        shutil.which("unshare") or "/usr/bin/unshare",
        "--user",
        f"--map-user={UNPRIVILEGED_ID}",
        f"--map-group={UNPRIVILEGED_ID}",
        "--",
    )


def component_dir(state: StateDir) -> Path:
    """The folder of the stack's PostgreSQL (its cluster and password file)."""
    return state.component_dir(COMPONENT_DIR)


def data_dir(state: StateDir) -> Path:
    """The cluster's data directory."""
    return component_dir(state) / DATA_SUBDIR


def remove_stale_lock(state: StateDir) -> bool:
    """Remove the cluster's ``postmaster.pid`` when the server it names is gone.

    A power cut leaves the file behind. PostgreSQL then refuses to start for as long as
    the PID in it answers ``kill(0)``, which a killed server still does as a zombie until
    its parent (here the machine's init, which may be slow to) reaps it.

    Returns:
        True if a stale lock file was removed.
    """
    lock = data_dir(state) / POSTMASTER_PID_FILE
    try:
        first_line = lock.read_text(errors="replace").split("\n", 1)[0].strip()
    except FileNotFoundError:
        return False
    if first_line.isdigit() and pid_alive(int(first_line)):
        return False
    lock.unlink(missing_ok=True)
    return True


def server_argv(config: StackConfig, state: StateDir) -> list[str]:
    """The server's command line: loopback and the stack's port only, no Unix socket."""
    return [
        str(locate_programs().postgres),
        "-D",
        str(data_dir(state)),
        "-c",
        f"listen_addresses={LOOPBACK}",
        "-c",
        f"port={config.ports['postgres']}",
        "-c",
        "unix_socket_directories=",
    ]


def connection_url(config: StackConfig, state: StateDir) -> str:
    """The SQLAlchemy URL Prefect's server connects with (it holds the password)."""
    password = state.database_password().get_secret_value()
    return (
        f"{ASYNC_DRIVER}://{SUPERUSER}:{password}@{LOOPBACK}:{config.ports['postgres']}"
        f"/{DATABASE_NAME}"
    )


def ensure_cluster(state: StateDir) -> bool:
    """Create the cluster and Prefect's database unless they exist already.

    ``initdb`` writes into a folder of its own that is renamed into place only once the
    database is created, so a set-up cut short is started afresh by the next `up`.

    Returns:
        True if the cluster was created now.

    Raises:
        MsiError: The programs are missing, or initdb or the database creation failed
            (the message quotes their output).
    """
    programs = require_programs()
    if (data_dir(state) / "PG_VERSION").is_file():
        return False
    folder = component_dir(state)
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / INIT_SUBDIR
    if staging.exists():
        shutil.rmtree(staging)
    password_file = folder / PASSWORD_FILE
    fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(state.database_password().get_secret_value() + "\n")
    try:
        _run(
            "initdb",
            [
                str(programs.initdb),
                "-D",
                str(staging),
                "-U",
                SUPERUSER,
                f"--pwfile={password_file}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
            ],
            folder,
        )
    finally:
        password_file.unlink(missing_ok=True)
    # Single-user mode: no server, no port, no socket.
    _run(
        f"creating the database {DATABASE_NAME!r}",
        [str(programs.postgres), "--single", "-D", str(staging), "postgres"],
        folder,
        stdin=f"CREATE DATABASE {DATABASE_NAME};\n",
    )
    staging.rename(data_dir(state))
    return True


def _run(step: str, argv: list[str], cwd: Path, stdin: str | None = None) -> None:
    """Run one set-up program unprivileged; a failure raises with its output."""
    try:
        done = subprocess.run(
            [*privilege_launcher(), *argv],
            input=stdin,
            capture_output=True,
            text=True,
            cwd=cwd,
            timeout=INIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MsiError(f"PostgreSQL set-up: {step} failed: {exc}") from exc
    output = done.stdout + done.stderr
    if done.returncode != 0 or "\nERROR:" in output or output.startswith("ERROR:"):
        raise MsiError(
            f"PostgreSQL set-up: {step} failed (exit {done.returncode}):\n{output[-2000:]}"
        )


def postgres_healthy(config: StackConfig) -> bool:
    """The server accepts connections to Prefect's database on the stack's port."""
    answer = subprocess.run(
        [
            str(locate_programs().pg_isready),
            "--host",
            LOOPBACK,
            "--port",
            str(config.ports["postgres"]),
            "--dbname",
            DATABASE_NAME,
            "--timeout",
            str(READY_TIMEOUT_S),
        ],
        capture_output=True,
        timeout=READY_TIMEOUT_S + 5,
        check=False,
    )
    return answer.returncode == 0
