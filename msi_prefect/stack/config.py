"""Settings of the embedded local stack and where it keeps its state."""

from __future__ import annotations

import json
import os
import secrets
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator

from msi_prefect.errors import MsiError
from msi_prefect.prefect_layer.dispatch.mode import DownstreamDispatch
from msi_prefect.stack.processes import LOOPBACK, find_free_ports
from msi_prefect.transfer import user_state_dir

DEFAULT_STATE_DIR = Path(".msi")
STATE_DIR_ENV = "MSI_STATE_DIR"
CONFIG_FILE = "stack.json"
CREDENTIALS_FILE = "credentials.json"
# The key of the PostgreSQL password in the credentials file.
DATABASE_PASSWORD_KEY = "postgres_password"
DEFAULT_WORK_POOL = "msi-process"
BROKER_BUCKET = "tansu"
BACKUP_BUCKET = "msi-backup"

# Every port the stack binds, by the name used in `msi-prefect up --port NAME=PORT`.
# SeaweedFS `weed mini` opens several internal servers; all are pinned so two stacks (a
# user's and the test suite's) can run side by side.
DEFAULT_PORTS: dict[str, int] = {
    "prefect": 4200,
    "broker": 9092,
    "s3": 8333,
    "s3-grpc": 18333,
    "seaweed-master": 9333,
    "seaweed-master-grpc": 19333,
    "seaweed-volume": 9340,
    "seaweed-volume-grpc": 19340,
    "seaweed-filer": 8888,
    "seaweed-filer-grpc": 18888,
    "seaweed-admin": 23646,
    "seaweed-admin-grpc": 33646,
    # The stack's own PostgreSQL server (`up --database postgresql` only): not 5432, so a
    # system PostgreSQL on this machine and the stack's never meet.
    "postgres": 15432,
    # The stack's own Redis server (`up --server-layout split` only): the message bus
    # between the Prefect API process and its services process.
    "redis": 16379,
}


class BrokerStorage(StrEnum):
    """Where the Tansu broker keeps its topic log."""

    S3 = "s3"  # in the stack's SeaweedFS bucket: survives a broker restart
    MEMORY = "memory"  # in RAM: fastest, lost on restart, never freed until a topic is deleted


class PrefectDatabase(StrEnum):
    """The database the stack's Prefect server keeps its runs, events and deployments in."""

    SQLITE = "sqlite"  # a file under the state dir: nothing else to run (the default)
    POSTGRESQL = "postgresql"  # a PostgreSQL server of the stack's own, under the state dir


class ServerLayout(StrEnum):
    """How the Prefect server's work is spread over processes."""

    # One process: the API, the UI and every service (event persister, triggers, actions,
    # task-run recorder, scheduler...) on one Python event loop; messages in memory.
    ONE_PROCESS = "one-process"
    # The API and UI in one process (`prefect server start --no-services`), the services in
    # another (`prefect server services start`), messages between them through a Redis
    # server of the stack's own (prefect-redis): the services' CPU no longer delays the API.
    # PostgreSQL only.
    SPLIT = "split"


class Component(StrEnum):
    """The processes of the stack, in start order."""

    S3 = "s3"
    BROKER = "broker"
    POSTGRES = "postgres"  # only with PrefectDatabase.POSTGRESQL
    REDIS = "redis"  # only with ServerLayout.SPLIT
    PREFECT = "prefect"
    PREFECT_SERVICES = "prefect-services"  # only with ServerLayout.SPLIT
    WORKER = "worker"


# The components that only a split server layout runs.
SPLIT_LAYOUT_COMPONENTS = (Component.REDIS, Component.PREFECT_SERVICES)


class S3Credentials(BaseModel):
    """Access key pair of the embedded S3 store, generated once per state directory."""

    access_key_id: str = Field(description="S3 access key id of the embedded store.")
    secret_access_key: SecretStr = Field(description="S3 secret key of the embedded store.")

    @classmethod
    def generate(cls) -> S3Credentials:
        """Make a fresh random key pair."""
        return cls(
            access_key_id="msi" + secrets.token_hex(6),
            secret_access_key=SecretStr(secrets.token_urlsafe(24)),
        )


class StackConfig(BaseModel):
    """Everything needed to start, find and stop one embedded stack."""

    ports: dict[str, int] = Field(
        default_factory=lambda: dict(DEFAULT_PORTS),
        description="TCP port of every server, by name; all bind 127.0.0.1.",
    )
    broker_storage: BrokerStorage = Field(
        default=BrokerStorage.S3, description="Where the broker keeps topic data."
    )
    work_pool: str = Field(default=DEFAULT_WORK_POOL, description="Prefect process work pool.")
    watch_dir: str | None = Field(default=None, description="Folder the watcher deployment reads.")
    destination_dir: str | None = Field(
        default=None, description="Folder the rebuilder deployment writes."
    )
    downstream_dispatch: DownstreamDispatch = Field(
        default=DownstreamDispatch.ADAPTIVE,
        description="How rebuilt files start their backup, metadata and analysis runs.",
    )
    encrypted: bool = Field(
        default=False,
        description="Whether the deployed transfers encrypt end to end with KafkaCrypto.",
    )
    database: PrefectDatabase = Field(
        default=PrefectDatabase.SQLITE,
        description="The Prefect server's database: SQLite, or the stack's own PostgreSQL.",
    )
    server_layout: ServerLayout = Field(
        default=ServerLayout.ONE_PROCESS,
        description="The Prefect server in one process, or its API and services split "
        "over two processes with a Redis message bus between them.",
    )

    @field_validator("ports")
    @classmethod
    def _check_ports(cls, ports: dict[str, int]) -> dict[str, int]:
        unknown = sorted(set(ports) - set(DEFAULT_PORTS))
        if unknown:
            raise ValueError(
                f"unknown port name(s) {unknown}; known names: {sorted(DEFAULT_PORTS)}"
            )
        for name, port in ports.items():
            if not 1 <= port <= 65535:
                raise ValueError(f"port {name}={port} is outside 1..65535")
        merged = {**DEFAULT_PORTS, **ports}
        clashes = {p for p in merged.values() if list(merged.values()).count(p) > 1}
        if clashes:
            raise ValueError(f"the same port is given to two servers: {sorted(clashes)}")
        return merged

    @model_validator(mode="after")
    def _split_needs_postgresql(self) -> StackConfig:
        # Two processes writing one SQLite file take turns through its file lock: measured
        # slower than one process (bench/RESULTS.md, issue 13), so it is not offered.
        if (
            self.server_layout is ServerLayout.SPLIT
            and self.database is not PrefectDatabase.POSTGRESQL
        ):
            raise ValueError(
                "the split server layout needs the PostgreSQL database: "
                "use --server-layout split with --database postgresql"
            )
        return self

    @property
    def components(self) -> tuple[Component, ...]:
        """The processes this stack runs, in start order (PostgreSQL, Redis only when chosen)."""
        split = self.server_layout is ServerLayout.SPLIT
        return tuple(
            component
            for component in Component
            if (component is not Component.POSTGRES or self.database is PrefectDatabase.POSTGRESQL)
            and (component not in SPLIT_LAYOUT_COMPONENTS or split)
        )

    @property
    def redis_url(self) -> str:
        """The stack's Redis server (split server layout only), database 0."""
        return f"redis://{LOOPBACK}:{self.ports['redis']}/0"

    @property
    def prefect_api_url(self) -> str:
        """The Prefect REST API of the embedded server."""
        return f"http://{LOOPBACK}:{self.ports['prefect']}/api"

    @property
    def prefect_ui_url(self) -> str:
        """The Prefect web UI of the embedded server."""
        return f"http://{LOOPBACK}:{self.ports['prefect']}"

    @property
    def bootstrap_servers(self) -> str:
        """Kafka bootstrap address of the embedded broker."""
        return f"{LOOPBACK}:{self.ports['broker']}"

    @property
    def s3_endpoint(self) -> str:
        """S3 endpoint URL of the embedded store."""
        return f"http://{LOOPBACK}:{self.ports['s3']}"


def free_port_map() -> dict[str, int]:
    """A free loopback port for every server of the stack (for tests and benchmarks)."""
    return dict(zip(DEFAULT_PORTS, find_free_ports(len(DEFAULT_PORTS)), strict=True))


def parse_port_overrides(items: list[str]) -> dict[str, int]:
    """Turn `["broker=19092", ...]` into a dict, with clear errors for bad items."""
    overrides: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise MsiError(f"--port expects NAME=NUMBER (for example broker=19092), got {item!r}")
        if name not in DEFAULT_PORTS:
            raise MsiError(f"unknown port name {name!r}; known names: {', '.join(DEFAULT_PORTS)}")
        overrides[name] = int(value)
    return overrides


class StateDir:
    """The one directory that holds all of a stack's state, logs and PID files."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().absolute()

    @classmethod
    def from_env(cls, explicit: Path | None = None) -> StateDir:
        """The state dir named on the command line, else $MSI_STATE_DIR, else ./.msi."""
        if explicit is not None:
            return cls(explicit)
        return cls(Path(os.environ.get(STATE_DIR_ENV, str(DEFAULT_STATE_DIR))))

    @classmethod
    def for_transfers(cls, explicit: Path | None = None, cwd: Path | None = None) -> StateDir:
        """Where ``upload``, ``watch`` and ``reconstruct`` keep their state (the registry).

        The state dir named on the command line, else ``$MSI_STATE_DIR``, else the state
        dir of the stack whose project folder holds ``cwd`` (see :meth:`find_stack`), else
        the user's state directory (:func:`user_state_dir`). Never ``./.msi`` by default:
        these commands are often run inside a data folder, which must stay as it was.

        Args:
            explicit: ``--state-dir``, if given.
            cwd: Where to start looking for a project folder (default: the current one).
        """
        if explicit is not None:
            return cls(explicit)
        named = os.environ.get(STATE_DIR_ENV)
        if named:
            return cls(Path(named))
        return cls.find_stack(cwd) or cls(user_state_dir())

    @classmethod
    def find_stack(cls, start: Path | None = None) -> StateDir | None:
        """The stack state dir (``.msi`` with its config file) in ``start`` or a parent.

        ``msi-prefect up`` saves the config file in its state dir, so a ``.msi`` without one
        (left by an older version of a transfer command, say) is not taken for a stack.

        Args:
            start: The folder to start in (default: the current one).
        """
        here = (start or Path.cwd()).absolute()
        for folder in (here, *here.parents):
            candidate = folder / DEFAULT_STATE_DIR
            if (candidate / CONFIG_FILE).is_file():
                return cls(candidate)
        return None

    @property
    def run_dir(self) -> Path:
        """PID files."""
        return self.root / "run"

    @property
    def log_dir(self) -> Path:
        """One log file per component."""
        return self.root / "logs"

    def component_dir(self, name: str) -> Path:
        """Data directory of one component."""
        return self.root / name

    def ensure_writable(self, *, stack_layout: bool = True) -> None:
        """Create the layout, or fail with a clear message if the directory is not writable.

        Args:
            stack_layout: Also create the stack's ``run`` and ``logs`` folders (not wanted
                for a transfer command's state in the user's state directory).
        """
        folders = (self.root, self.run_dir, self.log_dir) if stack_layout else (self.root,)
        try:
            for path in folders:
                path.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise MsiError(
                f"the state directory {self.root} is not writable ({exc.strerror or exc}). "
                f"Choose another with --state-dir or ${STATE_DIR_ENV}."
            ) from exc

    def load_config(self) -> StackConfig | None:
        """The saved stack settings, or None when this state dir has none yet."""
        path = self.root / CONFIG_FILE
        if not path.exists():
            return None
        try:
            return StackConfig.model_validate_json(path.read_text())
        except (OSError, ValidationError) as exc:
            raise MsiError(f"{path} is damaged ({exc}); fix it or remove it.") from exc

    def save_config(self, config: StackConfig) -> None:
        """Write the settings atomically."""
        self._write_atomic(self.root / CONFIG_FILE, config.model_dump_json(indent=2), mode=0o644)

    def credentials(self) -> S3Credentials:
        """The S3 key pair of this stack, generated on first use and kept private (0600)."""
        path = self.root / CREDENTIALS_FILE
        if path.exists():
            data = json.loads(path.read_text())
            return S3Credentials(
                access_key_id=data["access_key_id"],
                secret_access_key=SecretStr(data["secret_access_key"]),
            )
        creds = S3Credentials.generate()
        payload = {
            "access_key_id": creds.access_key_id,
            "secret_access_key": creds.secret_access_key.get_secret_value(),
        }
        self._write_atomic(path, json.dumps(payload), mode=0o600)
        return creds

    def database_password(self) -> SecretStr:
        """The password of the stack's PostgreSQL server, generated on first use (0600 file).

        It is kept in the credentials file beside the S3 key pair (which is created first
        if need be), so `down` and `up` find the same one.
        """
        self.credentials()
        path = self.root / CREDENTIALS_FILE
        data = json.loads(path.read_text())
        if DATABASE_PASSWORD_KEY not in data:
            data[DATABASE_PASSWORD_KEY] = secrets.token_urlsafe(24)
            self._write_atomic(path, json.dumps(data), mode=0o600)
        return SecretStr(data[DATABASE_PASSWORD_KEY])

    @staticmethod
    def _write_atomic(path: Path, text: str, mode: int) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        tmp.replace(path)
