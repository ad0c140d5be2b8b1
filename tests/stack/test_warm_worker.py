"""The stack worker's quicker start: run wake-ups, shared reads (unit tests, no server)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio
import pytest
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.responses import DeploymentResponse
from prefect.utilities.dispatch import lookup_type
from prefect.workers.base import BaseWorker
from prefect.workers.process import ProcessWorker

from msi_prefect.warm_start import WORKER_TYPE
from msi_prefect.warm_start.process_worker import (
    ENTRYPOINT_ENV,
    EntrypointInPlace,
    InPlaceJobConfiguration,
    WarmProcessWorker,
    entrypoint_in_place,
)
from msi_prefect.warm_start.short_lived_reads import (
    ShortLivedReads,
    share_deployment_and_flow_reads,
)
from msi_prefect.warm_start.wake_ups import (
    RecentRuns,
    RunWakeUps,
    WakeUpPolicy,
    flow_run_id_of,
)

QUICK = WakeUpPolicy(min_gap_s=0.0, max_gap_s=0.0, retry_delays_s=(0.01, 0.01, 0.01))


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- shared reads


class CountingRead:
    """An API read that answers ``{"id": key, "env": {}}`` after ``delay_s``."""

    def __init__(self, delay_s: float = 0.0, failures: int = 0) -> None:
        self.delay_s = delay_s
        self.failures = failures
        self.calls: list[str] = []

    async def __call__(self, key: str) -> dict[str, Any]:
        self.calls.append(key)
        await anyio.sleep(self.delay_s)
        if self.failures:
            self.failures -= 1
            raise LookupError(f"no {key}")
        return {"id": key, "env": {}}


def test_concurrent_reads_of_one_key_make_one_read_and_each_caller_gets_its_own_copy() -> None:
    read = CountingRead(delay_s=0.05)
    reads: ShortLivedReads[str, dict[str, Any]] = ShortLivedReads(read, ttl_s=2.0)
    answers: list[dict[str, Any]] = []

    async def main() -> None:
        async def get() -> None:
            answers.append(await reads.get("d1"))

        async with anyio.create_task_group() as group:
            for _ in range(3):
                group.start_soon(get)

    anyio.run(main)
    assert read.calls == ["d1"]
    assert answers == [{"id": "d1", "env": {}}] * 3
    answers[0]["env"]["RUN"] = "a"  # Prefect updates a deployment's env in place
    assert answers[1]["env"] == {} and answers[2]["env"] == {}


def test_an_answer_serves_until_its_ttl_then_the_key_is_read_again() -> None:
    read, clock = CountingRead(), FakeClock()
    reads: ShortLivedReads[str, dict[str, Any]] = ShortLivedReads(read, ttl_s=2.0, clock=clock)

    async def main() -> None:
        await reads.get("d1")
        clock.now += 1.9
        await reads.get("d1")
        assert read.calls == ["d1"]
        clock.now += 0.2
        await reads.get("d1")

    anyio.run(main)
    assert read.calls == ["d1", "d1"]


def test_a_failed_read_reaches_every_waiter_and_is_not_kept() -> None:
    read = CountingRead(delay_s=0.05, failures=1)
    reads: ShortLivedReads[str, dict[str, Any]] = ShortLivedReads(read, ttl_s=60.0)
    errors: list[BaseException] = []

    async def main() -> None:
        async def get() -> None:
            try:
                await reads.get("gone")
            except LookupError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as group:
            group.start_soon(get)
            group.start_soon(get)
        assert await reads.get("gone") == {"id": "gone", "env": {}}

    anyio.run(main)
    assert len(errors) == 2
    assert read.calls == ["gone", "gone"]


def test_shared_reads_keep_at_most_their_capacity() -> None:
    read = CountingRead()
    reads: ShortLivedReads[str, dict[str, Any]] = ShortLivedReads(read, ttl_s=60.0, capacity=2)

    async def main() -> None:
        for key in ("a", "b", "c", "a"):
            await reads.get(key)

    anyio.run(main)
    assert read.calls == ["a", "b", "c", "a"]  # "a" was the oldest when "c" came


def test_a_client_shares_its_deployment_and_flow_reads_whatever_the_id_type() -> None:
    class Client:
        def __init__(self) -> None:
            self.deployment_reads = 0
            self.flow_reads = 0

        async def read_deployment(self, deployment_id: UUID) -> dict[str, str]:
            self.deployment_reads += 1
            return {"deployment": str(deployment_id)}

        async def read_flow(self, flow_id: UUID) -> dict[str, str]:
            self.flow_reads += 1
            return {"flow": str(flow_id)}

    client = Client()
    share_deployment_and_flow_reads(client)
    deployment_id, flow_id = uuid.uuid4(), uuid.uuid4()

    async def main() -> None:
        assert await client.read_deployment(deployment_id) == {"deployment": str(deployment_id)}
        assert await client.read_deployment(str(deployment_id)) == {
            "deployment": str(deployment_id)
        }
        await client.read_flow(flow_id)
        await client.read_flow(flow_id)

    anyio.run(main)
    assert (client.deployment_reads, client.flow_reads) == (1, 1)


def test_shared_reads_refuse_a_negative_ttl() -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        ShortLivedReads(CountingRead(), ttl_s=-1)


# --------------------------------------------------------------------------- wake-ups


class FakePoll:
    """The worker's poll: finds each run from its ``appears_at`` poll (1-based) on."""

    def __init__(self, appears_at: dict[UUID, int] | None = None, fail_first: bool = False) -> None:
        self.appears_at = appears_at or {}
        self.fail_first = fail_first
        self.taken: set[UUID] = set()
        self.started: list[float] = []

    async def __call__(self) -> Iterable[UUID]:
        self.started.append(time.monotonic())
        if self.fail_first and len(self.started) == 1:
            raise OSError("server gone")
        found = [
            run
            for run, poll in self.appears_at.items()
            if poll <= len(self.started) and run not in self.taken
        ]
        self.taken.update(found)
        return found

    def is_taken(self, run: UUID) -> bool:
        return run in self.taken


def _serve(wake_ups: RunWakeUps, announce: Any, seconds: float = 0.3) -> None:
    async def main() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(wake_ups.serve)
            await anyio.sleep(0)
            await announce()
            await anyio.sleep(seconds)
            group.cancel_scope.cancel()

    anyio.run(main)


def test_an_announced_run_is_polled_for_at_once() -> None:
    run = uuid.uuid4()
    poll = FakePoll({run: 1})
    wake_ups = RunWakeUps(poll, poll.is_taken, QUICK)

    async def announce() -> None:
        wake_ups.announce(run)

    _serve(wake_ups, announce)
    assert poll.taken == {run}
    assert len(poll.started) == 1


def test_a_burst_of_announcements_is_one_poll() -> None:
    runs = [uuid.uuid4() for _ in range(20)]
    poll = FakePoll(dict.fromkeys(runs, 1))
    wake_ups = RunWakeUps(poll, poll.is_taken, QUICK)

    async def announce() -> None:
        for run in runs:
            wake_ups.announce(run)

    _serve(wake_ups, announce)
    assert poll.taken == set(runs)
    assert len(poll.started) == 1


def test_a_run_announced_before_it_is_visible_is_polled_for_again() -> None:
    run = uuid.uuid4()
    poll = FakePoll({run: 3})  # the first two polls come before its transaction commits
    wake_ups = RunWakeUps(poll, poll.is_taken, QUICK)

    async def announce() -> None:
        wake_ups.announce(run)

    _serve(wake_ups, announce)
    assert poll.taken == {run}
    assert len(poll.started) == 3


def test_a_run_never_found_costs_the_retries_and_no_more() -> None:
    poll = FakePoll()
    wake_ups = RunWakeUps(poll, poll.is_taken, QUICK)

    async def announce() -> None:
        wake_ups.announce(uuid.uuid4())

    _serve(wake_ups, announce)
    assert len(poll.started) == 1 + len(QUICK.retry_delays_s)


def test_a_run_taken_already_wakes_nothing() -> None:
    run = uuid.uuid4()
    poll = FakePoll({run: 1})
    poll.taken.add(run)
    wake_ups = RunWakeUps(poll, poll.is_taken, QUICK)

    async def announce() -> None:
        wake_ups.announce(run)

    _serve(wake_ups, announce)
    assert poll.started == []


def test_polls_are_spaced_by_the_minimum_gap() -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    poll = FakePoll({first: 1, second: 2})
    gap = 0.2
    wake_ups = RunWakeUps(poll, poll.is_taken, WakeUpPolicy(min_gap_s=gap, retry_delays_s=()))

    async def announce() -> None:
        wake_ups.announce(first)
        await anyio.sleep(0.02)  # the first poll is done
        wake_ups.announce(second)

    _serve(wake_ups, announce, seconds=0.5)
    assert poll.taken == {first, second}
    assert len(poll.started) == 2
    assert poll.started[1] - poll.started[0] >= gap


def test_the_gap_between_polls_follows_the_last_poll_within_its_bounds() -> None:
    policy = WakeUpPolicy(gap_in_poll_times=4.0, min_gap_s=0.05, max_gap_s=0.5)
    assert policy.gap_after(0.001) == 0.05  # an idle server: the floor
    assert policy.gap_after(0.05) == pytest.approx(0.2)
    assert policy.gap_after(2.0) == 0.5  # a slow server: never wider than the ceiling


@pytest.mark.parametrize(
    "fields",
    [{"min_gap_s": 0.6, "max_gap_s": 0.5}, {"min_gap_s": -0.1}, {"gap_in_poll_times": -1.0}],
)
def test_a_policy_with_impossible_gaps_is_refused(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="wake-up gaps"):
        WakeUpPolicy(**fields)


def test_a_slow_poll_spaces_the_next_one_by_its_duration() -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    slow_s = 0.06
    inner = FakePoll({first: 1, second: 2})

    async def slow_poll() -> Iterable[UUID]:
        found = await inner()
        await anyio.sleep(slow_s)
        return found

    policy = WakeUpPolicy(gap_in_poll_times=4.0, min_gap_s=0.0, max_gap_s=1.0, retry_delays_s=())
    wake_ups = RunWakeUps(slow_poll, inner.is_taken, policy)

    async def announce() -> None:
        wake_ups.announce(first)
        await anyio.sleep(slow_s + 0.02)  # the first poll is done
        wake_ups.announce(second)

    _serve(wake_ups, announce, seconds=0.6)
    assert inner.taken == {first, second}
    assert inner.started[1] - inner.started[0] >= 4.0 * slow_s


def test_a_failed_poll_leaves_the_wake_ups_serving() -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    poll = FakePoll({first: 1, second: 1}, fail_first=True)
    wake_ups = RunWakeUps(poll, poll.is_taken, QUICK)

    async def announce() -> None:
        wake_ups.announce(first)
        await anyio.sleep(0.05)
        wake_ups.announce(second)

    _serve(wake_ups, announce)
    assert poll.taken == {first, second}  # the second announcement's poll found both


def test_wake_up_policy_refuses_non_positive_retry_delays() -> None:
    with pytest.raises(ValueError, match="positive"):
        WakeUpPolicy(retry_delays_s=(0.0,))


@pytest.mark.parametrize(
    ("resource_id", "expected"),
    [
        (
            "prefect.flow-run.6f1d5a9e-0d5e-4a8e-9a51-3c1b4e2f7a10",
            "6f1d5a9e-0d5e-4a8e-9a51-3c1b4e2f7a10",
        ),
        ("prefect.flow-run.not-a-uuid", None),
        ("prefect.task-run.6f1d5a9e-0d5e-4a8e-9a51-3c1b4e2f7a10", None),
        ("", None),
    ],
)
def test_flow_run_ids_are_read_from_resource_ids(resource_id: str, expected: str | None) -> None:
    assert flow_run_id_of(resource_id) == (UUID(expected) if expected else None)


def test_recent_runs_forget_the_oldest_beyond_their_capacity() -> None:
    recent = RecentRuns(capacity=2)
    runs = [uuid.uuid4() for _ in range(3)]
    for run in runs:
        recent.add(run)
    assert runs[0] not in recent and runs[1] in recent and runs[2] in recent
    assert len(recent) == 2


# --------------------------------------------------------------------------- the worker


def test_the_warm_worker_is_its_own_type_and_leaves_prefects_process_worker_alone() -> None:
    assert lookup_type(BaseWorker, WORKER_TYPE) is WarmProcessWorker
    assert lookup_type(BaseWorker, "process") is ProcessWorker
    # To the server it is a process worker: the pool's type and job template are Prefect's.
    assert WarmProcessWorker.type == "process"
    assert (
        WarmProcessWorker.get_default_base_job_template()
        == ProcessWorker.get_default_base_job_template()
    )


# --------------------------------------------------------------------------- entrypoint in place

SET_WORKING_DIRECTORY = "prefect.deployments.steps.set_working_directory"
ENTRYPOINT = "flows/backup_file.py:backup_file_flow"


def deployment(
    pull_steps: list[dict[str, Any]] | None, entrypoint: str = ENTRYPOINT, **more: Any
) -> DeploymentResponse:
    return DeploymentResponse(
        id=uuid.uuid4(),
        name="backup-file",
        flow_id=uuid.uuid4(),
        entrypoint=entrypoint,
        pull_steps=pull_steps,
        **more,
    )


def flow_run_of(deployed: DeploymentResponse) -> FlowRun:
    return FlowRun(id=uuid.uuid4(), flow_id=deployed.flow_id, deployment_id=deployed.id)


def test_a_project_deployment_runs_its_entrypoint_in_its_folder(tmp_path: Path) -> None:
    deployed = deployment([{SET_WORKING_DIRECTORY: {"directory": str(tmp_path)}}])
    assert entrypoint_in_place(deployed) == EntrypointInPlace(tmp_path, ENTRYPOINT)

    configuration = InPlaceJobConfiguration(command="python -m launcher", env={})
    configuration.prepare_for_flow_run(flow_run_of(deployed), deployed)
    assert configuration.working_dir == tmp_path
    assert configuration.env[ENTRYPOINT_ENV] == ENTRYPOINT
    assert configuration.command == "python -m launcher"


@pytest.mark.parametrize(
    ("steps", "entrypoint", "more"),
    [
        (None, ENTRYPOINT, {}),
        ([], ENTRYPOINT, {}),
        # A clone, or a second step: the code comes from the steps.
        ([{"prefect.deployments.steps.git_clone": {"repository": "https://x/y"}}], ENTRYPOINT, {}),
        ([{SET_WORKING_DIRECTORY: {"directory": "{dir}"}}, {"x.y": {}}], ENTRYPOINT, {}),
        ([{SET_WORKING_DIRECTORY: {"directory": "relative/dir"}}], ENTRYPOINT, {}),
        ([{SET_WORKING_DIRECTORY: {"directory": "{dir}/missing"}}], ENTRYPOINT, {}),
        ([{SET_WORKING_DIRECTORY: {"directory": "{dir}", "extra": 1}}], ENTRYPOINT, {}),
        # A module path is importable only after the steps.
        ([{SET_WORKING_DIRECTORY: {"directory": "{dir}"}}], "flows.backup_file.flow", {}),
        ([{SET_WORKING_DIRECTORY: {"directory": "{dir}"}}], ENTRYPOINT,
         {"storage_document_id": uuid.uuid4()}),
    ],
)  # fmt: skip
def test_any_other_deployment_starts_as_prefect_starts_it(
    tmp_path: Path, steps: list[dict[str, Any]] | None, entrypoint: str, more: dict[str, Any]
) -> None:
    rendered = [
        {name: {key: str(value).replace("{dir}", str(tmp_path)) for key, value in args.items()}}
        for step in steps or []
        for name, args in step.items()
    ]
    deployed = deployment(rendered if steps is not None else None, entrypoint, **more)
    assert entrypoint_in_place(deployed) is None

    configuration = InPlaceJobConfiguration(command="python -m launcher", env={})
    configuration.prepare_for_flow_run(flow_run_of(deployed), deployed)
    assert configuration.working_dir is None
    assert ENTRYPOINT_ENV not in configuration.env


def test_a_working_directory_set_in_the_pool_is_kept(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    deployed = deployment([{SET_WORKING_DIRECTORY: {"directory": str(tmp_path)}}])
    configuration = InPlaceJobConfiguration(
        command="python -m launcher", env={}, working_dir=elsewhere
    )
    configuration.prepare_for_flow_run(flow_run_of(deployed), deployed)
    assert configuration.working_dir == elsewhere
    assert ENTRYPOINT_ENV not in configuration.env


def test_the_warm_worker_builds_in_place_job_configurations() -> None:
    assert WarmProcessWorker.job_configuration is InPlaceJobConfiguration
