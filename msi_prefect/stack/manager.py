"""Bring the embedded stack up, report on it, and take it down again."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from msi_prefect.errors import MsiError
from msi_prefect.stack import postgres, profile, runs
from msi_prefect.stack.components import (
    HEALTH_CHECKS,
    START_TIMEOUT_S,
    Component,
    address_of,
    build_spec,
    ensure_work_pool,
    prefect_env,
    s3_env,
)
from msi_prefect.stack.config import (
    BACKUP_BUCKET,
    SPLIT_LAYOUT_COMPONENTS,
    BrokerStorage,
    ServerLayout,
    StackConfig,
    StateDir,
)
from msi_prefect.stack.processes import (
    HEALTH_POLL_S,
    ManagedProcess,
    ProcessState,
    flow_run_processes,
    terminate,
)

logger = logging.getLogger(__name__)

# Every process a stack may have; a stack runs those of `StackConfig.components`.
ALL_COMPONENTS: tuple[Component, ...] = tuple(Component)


def start_needs(component: Component, config: StackConfig) -> set[Component]:
    """The parts that must be healthy before ``component`` starts (if this `up` starts them).

    The broker keeps its topics in the S3 store (unless in memory); the Prefect server
    needs its database and, split, its Redis; the services process and the worker need
    the server (the worker its work pool too, which the server's preparation creates).
    """
    if component is Component.BROKER:
        return {Component.S3} if config.broker_storage is BrokerStorage.S3 else set()
    if component is Component.PREFECT:
        return {Component.POSTGRES, Component.REDIS}
    if component is Component.PREFECT_SERVICES:
        return {Component.PREFECT}
    if component is Component.WORKER:
        return {Component.PREFECT, Component.PREFECT_SERVICES}
    return set()


class _ServerNotPrepared(Exception):
    """The Prefect server is healthy but did not take the work pool (`cause` says why)."""

    def __init__(self, cause: MsiError) -> None:
        super().__init__(str(cause))
        self.cause = cause


class Health(StrEnum):
    """Health of one component as `status` reports it."""

    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"  # the process runs but does not answer its check
    STOPPED = "stopped"


@dataclass(frozen=True)
class ComponentStatus:
    """One row of `msi-prefect status`."""

    name: str
    health: Health
    pid: int | None
    address: str
    log_file: str


@dataclass(frozen=True)
class StackStatus:
    """Everything `msi-prefect status --json` prints."""

    state_dir: str
    prefect_api_url: str
    prefect_ui_url: str
    bootstrap_servers: str
    s3_endpoint: str
    backup_bucket: str
    broker_storage: str
    database: str
    server_layout: str
    watch_dir: str | None
    destination_dir: str | None
    downstream_dispatch: str
    components: list[ComponentStatus]

    @property
    def all_healthy(self) -> bool:
        """True when every component answers its health check."""
        return all(c.health is Health.HEALTHY for c in self.components)

    def to_json_dict(self) -> dict[str, Any]:
        """Plain data for `status --json`."""
        data = asdict(self)
        data["healthy"] = self.all_healthy
        for row in data["components"]:
            row["health"] = row["health"].value
        return data


class StackManager:
    """Starts and stops the processes of one state directory's stack."""

    def __init__(self, state: StateDir, config: StackConfig) -> None:
        self.state = state
        self.config = config

    @classmethod
    def open(cls, state: StateDir) -> StackManager:
        """The manager for the stack saved in `state` (default settings if none is saved)."""
        return cls(state, state.load_config() or StackConfig())

    def process(self, component: Component) -> ManagedProcess:
        """The tracked process of a component."""
        spec = build_spec(component, self.config, self.state)
        return ManagedProcess(spec, self.state.run_dir, self.state.log_dir)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Serialise `up`/`down` calls on one state dir (two terminals, or a test and a user)."""
        self.state.ensure_writable()
        with (self.state.run_dir / "stack.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def running_components(self) -> list[Component]:
        """Components whose process is alive."""
        return [c for c in ALL_COMPONENTS if self.process(c).state() is ProcessState.RUNNING]

    def wanted_components(self, requested: Sequence[Component] | None) -> list[Component]:
        """The components `up` starts for ``requested`` (None: the whole stack), in order.

        The Prefect server brings the stack's PostgreSQL along when that is its database.

        Raises:
            MsiError: PostgreSQL is asked for, but the stack's database is SQLite.
        """
        configured = self.config.components
        if requested is None:
            return list(configured)
        if Component.POSTGRES in requested and Component.POSTGRES not in configured:
            raise MsiError(
                "this stack's Prefect database is SQLite; it has no PostgreSQL to start. "
                "Choose it with 'msi-prefect up --database postgresql' (while the stack is down)."
            )
        wanted = set(requested)
        if Component.PREFECT in wanted and Component.POSTGRES in configured:
            wanted.add(Component.POSTGRES)
        wanted |= self._split_server_parts(wanted)
        return [component for component in configured if component in wanted]

    def _split_server_parts(self, wanted: set[Component]) -> set[Component]:
        """The split layout's Redis and services process, which go with the Prefect server.

        Raises:
            MsiError: One of them is asked for, but the server runs as one process.
        """
        parts = set(SPLIT_LAYOUT_COMPONENTS)
        if self.config.server_layout is ServerLayout.SPLIT:
            return parts if wanted & {Component.PREFECT, *parts} else set()
        if wanted & parts:
            raise MsiError(
                "this stack's Prefect server runs as one process; it has no Redis or services "
                "process to start. Choose them with 'msi-prefect up --server-layout split' "
                "(while the stack is down)."
            )
        return set()

    def up(self, components: Sequence[Component] | None = None) -> list[Component]:
        """Start the named components and wait until each is healthy.

        Each part starts as soon as the parts it needs are healthy (`START_NEEDS`), so
        the Prefect server, the slowest to start, starts beside the S3 store and the
        broker rather than after them. Components already running are left alone, so
        calling `up` twice starts nothing twice. A component that does not become
        healthy is stopped again, with any still starting beside it; the ones that did
        become healthy stay running (a later step failing says nothing against them), so
        `up` run again goes on from where this one stopped.

        Args:
            components: The parts to start (default: every part of this stack's settings).

        Returns:
            The components this call started, in start order (`Component`'s).

        Raises:
            MsiError: a port is taken, a binary is missing, a part did not become healthy,
                or the Prefect API did not take the work pool in time; the message names
                the step and the parts left running.
        """
        started: list[Component] = []
        wanted = self.wanted_components(components)
        if Component.POSTGRES in wanted:
            postgres.require_programs()  # before anything starts: a clear error
        with self._exclusive():
            self.state.save_config(self.config)
            ready: set[Component] = set()  # healthy: running already, or started now
            waiting: list[Component] = []
            for component in wanted:
                if self.process(component).state() is ProcessState.RUNNING:
                    logger.info("%s is already running", component.value)
                    ready.add(component)
                    if component is Component.PREFECT:  # an earlier `up` may have failed here
                        try:
                            self._prepare_server()
                        except _ServerNotPrepared as exc:
                            step = "preparing the Prefect server"
                            raise self._failed(step, exc.cause, started) from exc.cause
                else:
                    waiting.append(component)
            self._start_in_order(waiting, set(wanted), ready, started)
        return sorted(started, key=ALL_COMPONENTS.index)

    def _start_in_order(
        self,
        waiting: list[Component],
        wanted: set[Component],
        ready: set[Component],
        started: list[Component],
    ) -> None:
        """Start each of ``waiting`` once what it needs of ``wanted`` is in ``ready``.

        Every part is started and health-checked from this one thread: it starts a part's
        process, then looks at every part still starting in turn.

        Raises:
            MsiError: A part did not start or become healthy (it and any part still
                starting are stopped again), or the server's preparation failed.
        """
        starting: dict[Component, tuple[ManagedProcess, float]] = {}
        step = ""
        try:
            while waiting or starting:
                for component in list(waiting):
                    if not start_needs(component, self.config) & wanted <= ready:
                        continue
                    waiting.remove(component)
                    process = self.process(component)
                    starting[component] = (process, math.inf)  # stopped if its start fails
                    step = f"starting {component.value}"
                    if component is Component.POSTGRES:
                        postgres.ensure_cluster(self.state)
                        if postgres.remove_stale_lock(self.state):
                            logger.info("removed the lock file a killed PostgreSQL left")
                    process.start()
                    starting[component] = (process, time.monotonic() + START_TIMEOUT_S[component])
                if not starting:  # cannot happen: what a part needs comes before it
                    step = "starting the stack"
                    raise MsiError(f"nothing to wait for before {waiting[0].value}")
                for component, (process, deadline) in list(starting.items()):
                    step = f"starting {component.value}"
                    check = functools.partial(HEALTH_CHECKS[component], self.config)
                    if not process.poll_healthy(check, deadline, START_TIMEOUT_S[component]):
                        continue
                    del starting[component]
                    ready.add(component)
                    started.append(component)
                    if component is Component.PREFECT:
                        step = "preparing the Prefect server"
                        self._prepare_server()
                if starting:
                    time.sleep(HEALTH_POLL_S)
        except BaseException as exc:  # a part failed; or Ctrl-C, or a bug
            # Only the parts still starting are stopped: they are half-started.
            for process, _ in starting.values():
                process.stop()
            if isinstance(exc, _ServerNotPrepared):
                raise self._failed(step, exc.cause, started) from exc.cause
            if isinstance(exc, MsiError):
                raise self._failed(step, exc, started) from exc
            raise

    def _prepare_server(self) -> None:
        """Create or update the work pool; the server stays up if that fails.

        Then make the stack's Prefect CLI profile the active one (`msi_prefect.stack.profile`).

        Raises:
            _ServerNotPrepared: The API did not take the work pool.
        """
        try:
            ensure_work_pool(self.config)
        except MsiError as exc:
            raise _ServerNotPrepared(exc) from exc
        try:
            record = profile.activate_stack_profile(self.state, self.config)
        except MsiError as exc:  # the stack works without it: say how to point the CLI
            logger.warning('%s; point the Prefect CLI with: eval "$(msi-prefect env)"', exc)
        else:
            logger.info(
                "the Prefect CLI uses this stack: profile %s is active in %s (down restores %s)",
                record.profile,
                record.profiles_path,
                record.previous_active or "the default",
            )

    def _failed(self, step: str, exc: MsiError, started: list[Component]) -> MsiError:
        """The error `up` raises when ``step`` failed, saying what is left running."""
        running = [component.value for component in self.running_components()]
        left = (
            f"Left running: {', '.join(running)} (healthy"
            + (f"; started now: {', '.join(c.value for c in started)}" if started else "")
            + "). Run 'msi-prefect up' again to go on from here, or 'msi-prefect down'."
            if running
            else "Nothing of the stack is running."
        )
        return MsiError(f"{step} failed: {exc}\n{left}")

    def down(self) -> list[Component]:
        """Stop every component of this state dir, in reverse start order.

        The Prefect CLI profile active before `up` is made active again.

        Returns:
            The components that were running and are now stopped.
        """
        stopped = []
        with self._exclusive():
            try:
                profile.restore_previous_profile(self.state)
            except MsiError as exc:  # `down` must stop the processes all the same
                logger.warning("could not restore the Prefect CLI profile: %s", exc)
            server_up = self.process(Component.PREFECT).state() is ProcessState.RUNNING
            if server_up and self.process(Component.WORKER).state() is ProcessState.RUNNING:
                self._settle_runs(runs.cancel_transfers, "cancel the transfers")
            for component in reversed(ALL_COMPONENTS):
                if component is Component.PREFECT and server_up:
                    self._settle_runs(runs.settle_after_stop, "settle the stopped runs")
                if self.process(component).stop():
                    stopped.append(component)
                if component is Component.WORKER:
                    # The worker's flow runs live in sessions of their own.
                    terminate(flow_run_processes(self.config.prefect_api_url))
        return stopped

    def _settle_runs(
        self, step: Callable[[StackConfig, tuple[str, ...]], object], what: str
    ) -> None:
        """One run-bookkeeping step of `down`; a server that does not answer only warns."""
        try:
            step(self.config, runs.TRANSFER_DEPLOYMENTS)
        except Exception as exc:  # `down` must stop the processes whatever the API says
            logger.warning("could not %s through the Prefect API: %s", what, exc)

    def status(self) -> StackStatus:
        """Health, PID and address of every component."""
        rows = []
        running = set(self.running_components())
        for component in ALL_COMPONENTS:
            if component not in self.config.components and component not in running:
                continue
            process = self.process(component)
            record = process.read_pid()
            if process.state() is not ProcessState.RUNNING:
                health = Health.STOPPED
            else:
                try:
                    healthy = HEALTH_CHECKS[component](self.config)
                except Exception:  # any failure to answer is simply "unhealthy"
                    healthy = False
                health = Health.HEALTHY if healthy else Health.UNHEALTHY
            rows.append(
                ComponentStatus(
                    name=component.value,
                    health=health,
                    pid=record.pid if record and health is not Health.STOPPED else None,
                    address=address_of(component, self.config),
                    log_file=str(process.log_file),
                )
            )
        return StackStatus(
            state_dir=str(self.state.root),
            prefect_api_url=self.config.prefect_api_url,
            prefect_ui_url=self.config.prefect_ui_url,
            bootstrap_servers=self.config.bootstrap_servers,
            s3_endpoint=self.config.s3_endpoint,
            backup_bucket=BACKUP_BUCKET,
            broker_storage=self.config.broker_storage.value,
            database=self.config.database.value,
            server_layout=self.config.server_layout.value,
            watch_dir=self.config.watch_dir,
            destination_dir=self.config.destination_dir,
            downstream_dispatch=self.config.downstream_dispatch.value,
            components=rows,
        )

    def client_env(self) -> dict[str, str]:
        """Environment for programs that use this stack (Prefect API, S3 credentials, Kafka)."""
        env = {**prefect_env(self.config, self.state)}
        env.update(s3_env(self.config, self.state.credentials()))
        env["MSI_BOOTSTRAP_SERVERS"] = self.config.bootstrap_servers
        # Clients must not own the server's database settings.
        for key in ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_API_HOST"):
            env.pop(key, None)
        return env
