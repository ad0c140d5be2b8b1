"""A power cut and a ``down``/``up`` with files in flight, on a real stack (the fast iteration).

One private stack (``msi-prefect up`` on free ports, S3-backed broker): files arrive at a
steady rate; once some are rebuilt and downstream runs are running, every process of the
stack is killed at once; ``up``; ``down`` and ``up`` again while the stack is catching up;
more files are dropped after each restart. The verdict is read from the destination, the
per-file events on the server and the backup store's object versions, never from flow-run
names. The long runs (100 files, 5 cycles, a dead worker or server mid-burst) are in
tests/chaos/test_stack_faults.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.chaos.stack_scenarios import StackRun
from tests.stack_helpers import StackVerdict, user_stack, workload

# The stack's start, the cut, two restarts and the catch-up: minutes on a busy machine.
pytestmark = [pytest.mark.stack, pytest.mark.own_stack, pytest.mark.timeout(480)]

FILES = 14
# Slow enough that files are still arriving when the first downstream runs start.
RATE = 1.5
SEED = 5
# Every file is done within this after the last drop (group join, re-runs of the runs the
# cut crashed, events the cut lost posted again).
SETTLE_S = 120.0


@dataclass(frozen=True)
class PowerCutRun:
    """The run every test of this module judges."""

    run: StackRun
    verdict: StackVerdict
    after_restarts: set[str]


@pytest.fixture(scope="module")
def power_cut_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PowerCutRun]:
    """Files through a power cut and a ``down``/``up`` cycle; the stack is stopped after."""
    with user_stack(tmp_path_factory.mktemp("power-cut")) as stack:
        run = StackRun(stack, SEED)
        run.dropper.start(workload("cut", FILES, SEED, large_every=5), RATE)
        caught = run.power_cut(min_dropped=4)
        run.restart(wait_for_files=False)
        run.dropper.wait(60)
        after = workload("after-cut", 2, SEED + 1, large_every=0)
        run.dropper.drop_all(after)
        # `down` while the restarted stack is still catching up, then `up` again.
        run.down_up(wait_for_files=False)
        after_cycle = workload("after-cycle", 2, SEED + 2, large_every=0)
        run.dropper.drop_all(after_cycle)
        after |= after_cycle
        verdict, recover = run.finish(SETTLE_S)
        injected = (
            f"kill -9 of every process of the stack with {caught.dropped} of {FILES} files "
            f"dropped, {caught.rebuilt} rebuilt, {caught.downstream_processes} downstream "
            "flow-run processes running; `up`; `down` and `up`; 4 files after"
        )
        run.report("power cut + down/up (fast)", injected, verdict, recover)
        yield PowerCutRun(run, verdict, set(after))


def test_power_cut_loses_no_file_and_duplicates_nothing(power_cut_run: PowerCutRun) -> None:
    verdict = power_cut_run.verdict
    caught = power_cut_run.run.faults[0]
    assert caught.rebuilt >= 1 and caught.downstream_processes >= 1, caught
    assert verdict.lost == [] and verdict.corrupted == [], verdict.summary()
    # One generation per file, announced at most once; at most one copy in the store.
    assert verdict.duplicated == [], verdict.summary()


def test_files_dropped_after_the_restarts_are_processed(power_cut_run: PowerCutRun) -> None:
    verdict = power_cut_run.verdict
    after = power_cut_run.after_restarts
    assert {n: verdict.reconstructed[n] for n in after} == dict.fromkeys(after, 1)
    assert {n for n in after if n in verdict.not_done} == set(), verdict.summary()
    assert {n: verdict.backups[n] for n in after} == dict.fromkeys(after, 1)


def test_every_file_in_flight_at_the_cut_is_announced_and_processed(
    power_cut_run: PowerCutRun,
) -> None:
    verdict = power_cut_run.verdict
    assert verdict.unannounced == [], verdict.summary()
    assert verdict.not_done == {}, verdict.summary()
    assert set(verdict.backups.values()) == {1}, verdict.summary()
