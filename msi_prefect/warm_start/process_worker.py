"""The stack's worker: Prefect's process worker, quicker from a run's creation to its start.

:class:`WarmProcessWorker` is Prefect's ``ProcessWorker`` (its runs, logs, cancellation,
Crashed states, concurrency limits and retries are Prefect's own code) with these changes
to what happens before a run's process starts:

- **wake-ups** (:mod:`msi_prefect.warm_start.wake_ups`): a new run announced on the events
  websocket is polled for at once, instead of at the next interval poll;
- **shared reads** (:mod:`msi_prefect.warm_start.short_lived_reads`): the run's deployment
  is read once, not twice, and its flow at the same time, not after it;
- **labels in the background**: the worker's labels on the run (its name and pool, for the
  UI) are written while the run starts, not before (the run's ``Submitting`` state is
  not: proposed in the background, it can reach a busy server after the run's
  ``Completed``, which the server accepts, and the finished run is Pending again);
- **the settings' environment once** (:mod:`msi_prefect.warm_start.settings_environment`):
  Prefect turned the worker's settings into environment variables twice per run, about
  35 ms of CPU; the worker now does it once per settings object;
- **the entrypoint in place** (:class:`InPlaceJobConfiguration`): a deployment whose only
  pull step is ``set_working_directory`` (as ``prefect.yaml``'s) runs in that folder with
  its entrypoint given to the engine (``PREFECT__FLOW_ENTRYPOINT``), so the run's process
  does not read the deployment again nor run the step (a request, an event and about
  0.1 s before the run is RUNNING). Any other deployment starts as Prefect starts it;
- **one run context for all runs**: Prefect's process worker builds, for every run, the
  machinery that watches it (two API clients, a control channel, an events websocket
  listening for its cancellation) and tears it down when the run ends: about 0.25 s
  between the run's Submitting state and its process starting, with three runs per file
  starting at once. This worker enters that machinery (Prefect's
  ``FlowRunExecutorContext``, which watches any number of runs, as Prefect's own runner
  does) once, when it starts, and gives each run an executor of it. A run started with
  no command of its own in the pool (Prefect resolves its workspace per run) starts as
  Prefect starts it;
- **suspensions relayed** (:mod:`msi_prefect.warm_start.suspensions`): Prefect's engine
  starts, in each deployment run, an observer of the run being suspended from the UI (a
  thread, an event loop, a read and an events websocket). This worker observes all its
  runs at once and signals the run that was suspended, whose process then checks and
  stops as Prefect's observer would have made it.

It presents itself to the server as a ``process`` worker (the pool's type and job template
stay Prefect's), but is registered under its own key, :data:`WORKER_TYPE`, so that
Prefect's process worker is not replaced: ``prefect worker start --type msi-warm-process``
in a process that imported this module.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

import anyio
import anyio.abc
from prefect.events.clients import get_events_subscriber
from prefect.events.filters import EventAnyResourceFilter, EventFilter, EventNameFilter
from prefect.flows import load_flow_from_flow_run
from prefect.runner._flow_run_executor import FlowRunExecutionResult, FlowRunExecutorContext
from prefect.runner._process_manager import ProcessHandle
from prefect.runner._starter_engine import EngineCommandStarter
from prefect.workers.process import ProcessJobConfiguration, ProcessWorker, ProcessWorkerResult

from msi_prefect.warm_start import WORKER_TYPE
from msi_prefect.warm_start.settings_environment import remember_settings_environment
from msi_prefect.warm_start.short_lived_reads import share_deployment_and_flow_reads
from msi_prefect.warm_start.suspensions import RELAY_ENV, RELAYED, SuspensionRelay
from msi_prefect.warm_start.wake_ups import (
    SCHEDULED_EVENT,
    RecentRuns,
    RunWakeUps,
    flow_run_id_of,
)

if TYPE_CHECKING:
    from prefect.client.schemas.objects import Flow, FlowRun, WorkPool
    from prefect.client.schemas.responses import DeploymentResponse

logger = logging.getLogger("msi_prefect.warm_start")

#: Seconds before the events websocket is tried again after it failed for good.
RESUBSCRIBE_S = 5.0
#: The engine loads the flow from this entrypoint instead of from the run's deployment.
ENTRYPOINT_ENV = "PREFECT__FLOW_ENTRYPOINT"
#: The names ``prefect deploy`` stores a ``set_working_directory`` pull step under.
SET_WORKING_DIRECTORY_STEPS = frozenset(
    {
        "prefect.deployments.steps.set_working_directory",
        "prefect.deployments.steps.pull.set_working_directory",
    }
)


@dataclass(frozen=True)
class EntrypointInPlace:
    """A deployment's flow found without its pull steps: ``entrypoint`` inside ``directory``."""

    directory: Path
    entrypoint: str


def entrypoint_in_place(deployment: DeploymentResponse | None) -> EntrypointInPlace | None:
    """The folder and entrypoint of a deployment whose only pull step sets the working folder.

    ``None`` for anything else (no deployment, other or more pull steps, a storage block, a
    module-path entrypoint, which relies on the pull steps to be importable, or a folder
    that is not there now): such a run starts as Prefect starts it, and reports its own
    errors.
    """
    if deployment is None or deployment.storage_document_id is not None:
        return None
    entrypoint = deployment.entrypoint
    if not entrypoint or ":" not in entrypoint:
        return None
    steps = deployment.pull_steps or []
    if len(steps) != 1 or len(steps[0]) != 1:
        return None
    ((name, arguments),) = steps[0].items()
    if name not in SET_WORKING_DIRECTORY_STEPS or not isinstance(arguments, dict):
        return None
    if set(arguments) != {"directory"} or not isinstance(arguments["directory"], str):
        return None
    directory = Path(arguments["directory"])
    if not directory.is_absolute() or not directory.is_dir():
        return None
    return EntrypointInPlace(directory, entrypoint)


class InPlaceJobConfiguration(ProcessJobConfiguration):
    """Prefect's process job configuration that starts a run in its deployment's folder.

    See :func:`entrypoint_in_place`; a working directory set in the pool or the deployment
    (``job_variables.working_dir``) is kept, and the run then starts as Prefect starts it.
    """

    def prepare_for_flow_run(
        self,
        flow_run: FlowRun,
        deployment: DeploymentResponse | None = None,
        flow: Flow | None = None,
        work_pool: WorkPool | None = None,
        worker_name: str | None = None,
        worker_id: UUID | None = None,
    ) -> None:
        super().prepare_for_flow_run(
            flow_run, deployment, flow, work_pool, worker_name, worker_id=worker_id
        )
        in_place = entrypoint_in_place(deployment) if self.working_dir is None else None
        if in_place is not None and ENTRYPOINT_ENV not in self.env:
            self.working_dir = in_place.directory
            self.env[ENTRYPOINT_ENV] = in_place.entrypoint


class WarmProcessWorker(ProcessWorker):
    """Prefect's process worker that starts a new run sooner (see the module docstring)."""

    type = "process"
    job_configuration = InPlaceJobConfiguration

    @classmethod
    def __dispatch_key__(cls) -> str:
        return WORKER_TYPE

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._taken = RecentRuns()
        self._wake_ups: RunWakeUps | None = None
        self._run_context: FlowRunExecutorContext | None = None
        self._suspensions = SuspensionRelay()

    async def setup(self) -> None:
        # Entered before Prefect's setup enters the runs' task group, so that on the way
        # out it is left after that group has waited for the runs (its process manager
        # stops whatever run is still there, as each run's own context would).
        self._run_context = await self._exit_stack.enter_async_context(FlowRunExecutorContext())
        await self._exit_stack.enter_async_context(self._suspensions)
        remember_settings_environment()
        await super().setup()
        share_deployment_and_flow_reads(self.client)

    async def run(
        self,
        flow_run: FlowRun,
        configuration: ProcessJobConfiguration,
        task_status: anyio.abc.TaskStatus[int] | None = None,
    ) -> ProcessWorkerResult:
        """Start the run's command with the worker's run context; wait for its process to end."""
        shared = self._run_context
        if shared is None or not configuration._command_configured:
            return await super().run(flow_run, configuration, task_status)
        started = task_status if task_status is not None else anyio.TASK_STATUS_IGNORED
        folder = (
            contextlib.nullcontext(configuration.working_dir)
            if configuration.working_dir
            else tempfile.TemporaryDirectory(suffix="prefect")
        )
        env = configuration.env
        if self._suspensions.active:
            env = {**env, RELAY_ENV: RELAYED}
        with folder as working_dir, contextlib.ExitStack() as watches:
            starter = EngineCommandStarter(
                command=configuration.command,
                cwd=Path(working_dir).resolve(),
                env=env,
                stream_output=configuration.stream_output,
                control_channel=shared.control_channel,
            )
            executor = shared.create_executor(
                flow_run, starter, resolve_flow=load_flow_from_flow_run, propose_submitting=False
            )
            execution: FlowRunExecutionResult | None = None

            async def submit(*, task_status: anyio.abc.TaskStatus[ProcessHandle]) -> None:
                nonlocal execution
                execution = await executor.submit(task_status=task_status)

            async with anyio.create_task_group() as group:
                handle = await group.start(submit)  # returns once the process has started
                if handle.pid is None:
                    raise RuntimeError("Flow run process has no PID")
                watches.enter_context(self._suspensions.watching(flow_run.id, handle.pid))
                started.started(handle.pid)
        if execution is None or execution.status_code is None:
            raise RuntimeError("Failed to start flow run process.")
        return ProcessWorkerResult(
            status_code=execution.status_code, identifier=str(execution.handle.pid)
        )

    async def _initialize_after_sync(self) -> None:
        await super()._initialize_after_sync()
        if self._wake_ups is None and self._work_pool is not None:
            assert self._runs_task_group is not None
            self._wake_ups = RunWakeUps(self._woken_poll, self._is_taken)
            # Runs in the runs' task group (entered in `setup`, which may not be the task
            # that syncs); the exit stack unwinds last in, first out, so it is cancelled
            # before that group waits for its tasks.
            scope = anyio.CancelScope()
            self._exit_stack.callback(scope.cancel)
            self._runs_task_group.start_soon(self._serve_wake_ups, scope, self._work_pool.id)

    async def _serve_wake_ups(self, scope: anyio.CancelScope, work_pool_id: UUID) -> None:
        assert self._wake_ups is not None
        with scope:
            async with anyio.create_task_group() as group:
                group.start_soon(self._wake_ups.serve)
                group.start_soon(self._follow_announcements, work_pool_id)

    def _is_taken(self, flow_run_id: UUID) -> bool:
        return flow_run_id in self._taken or flow_run_id in self._submitting_flow_run_ids

    async def _woken_poll(self) -> list[UUID]:
        return [run.id for run in await self.get_and_submit_flow_runs()]

    async def _follow_announcements(self, work_pool_id: UUID) -> None:
        """Announce every run scheduled in this pool to the wake-ups, for good."""
        assert self._wake_ups is not None
        announced = EventFilter(
            event=EventNameFilter(name=[SCHEDULED_EVENT]),
            any_resource=EventAnyResourceFilter(id=[f"prefect.work-pool.{work_pool_id}"]),
        )
        while True:
            try:
                async with get_events_subscriber(
                    filter=announced, reconnect_on_clean_close=True
                ) as subscriber:
                    async for event in subscriber:
                        flow_run_id = flow_run_id_of(event.resource.id)
                        if flow_run_id is not None:
                            self._wake_ups.announce(flow_run_id)
            except Exception:
                logger.warning(
                    "warm start: no run announcements (events websocket); polling only, "
                    "trying again in %.0f s",
                    RESUBSCRIBE_S,
                    exc_info=True,
                )
            await anyio.sleep(RESUBSCRIBE_S)

    async def _submit_run(self, flow_run: FlowRun) -> None:
        self._taken.add(flow_run.id)
        if flow_run.deployment_id is not None:
            # The deployment and the flow at once; Prefect's reads then take these answers.
            async with anyio.create_task_group() as reads:
                reads.start_soon(
                    self._read_quietly, self.client.read_deployment, flow_run.deployment_id
                )
                reads.start_soon(self._read_quietly, self.client.read_flow, flow_run.flow_id)
        await super()._submit_run(flow_run)

    @staticmethod
    async def _read_quietly(read: Any, object_id: UUID) -> None:
        # A failure (a deleted deployment) is Prefect's to handle, when it reads again.
        try:
            await read(object_id)
        except Exception:
            logger.debug("warm start: an early read failed; Prefect reads again", exc_info=True)

    async def _give_worker_labels_to_flow_run(self, flow_run_id: UUID) -> None:
        # For the UI only; the run needs not wait for them.
        assert self._runs_task_group is not None
        self._runs_task_group.start_soon(self._label_quietly, flow_run_id)

    async def _label_quietly(self, flow_run_id: UUID) -> None:
        try:
            await super()._give_worker_labels_to_flow_run(flow_run_id)
        except Exception:
            logger.warning("warm start: could not label flow run %s", flow_run_id, exc_info=True)
