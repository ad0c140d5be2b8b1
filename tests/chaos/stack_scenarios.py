"""Faults of the whole stack, as steps: power cuts, ``down``/``up``, a dead worker or server.

A :class:`StackRun` drops files into a private stack's watched folder, injects faults,
restarts the stack as an operator would (``msi-prefect up`` starts what is missing) and
ends with one verdict over every file dropped (:func:`assert_clean_stack`): rebuilt
byte-identical, its three downstream steps announced by their events, one
``msi.file.reconstructed`` event, one copy in the backup store. The long runs
(tests/chaos/test_stack_faults.py) and the fast one (tests/integration/test_stack_faults.py) share
these steps.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.chaos.harness import ChaosRecord, record, wait_for
from tests.stack_helpers import (
    EVENT_POLL_S,
    FileDropper,
    StackVerdict,
    UserStack,
    backup_versions,
    downstream_run_pids,
    judge,
    kill_server,
    kill_worker_and_its_runs,
    power_cut,
    rebuilt,
    transfer_run_ids,
    wait_until_done,
    workload,
)

# From the fault to the stack caught mid-flow (files rebuilt, downstream runs running).
MID_FLOW_TIMEOUT_S = 300.0
# From a restart to the next file rebuilt (a new transfer run starts and joins its group).
NEXT_REBUILT_TIMEOUT_S = 180.0
POLL_S = 0.2


def _answered(predicate: Callable[[], bool]) -> Callable[[], bool]:
    """``predicate``, false while the busy server does not answer (the caller polls again)."""

    def check() -> bool:
        try:
            return predicate()
        except httpx.HTTPError:
            return False

    return check


def p90(values: list[float]) -> float:
    """The 90th percentile (the value itself for one sample, 0 for none)."""
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=10, method="inclusive")[8]


def summary(values: list[float], name: str) -> dict[str, float]:
    """``<name>_median`` and ``<name>_max``, rounded (nothing for no values)."""
    if not values:
        return {}
    return {
        f"{name}_median": round(statistics.median(values), 2),
        f"{name}_max": round(max(values), 2),
    }


@dataclass
class MidFlow:
    """What was in flight when a fault was injected.

    Attributes:
        dropped: Files dropped so far.
        rebuilt: Files in the destination.
        downstream_processes: Downstream flow-run processes alive (launchers and children).
        at: When (``time.time()``).
        stored: Files with a copy in the backup store, when that was waited for.
    """

    dropped: int
    rebuilt: int
    downstream_processes: int
    at: float
    stored: int | None = None


@dataclass
class StackRun:
    """Files through one stack, with faults, up to one verdict.

    Args:
        stack: A running private stack (see :func:`tests.stack_helpers.user_stack`).
        seed: Seed of the file sizes and contents.
    """

    stack: UserStack
    seed: int
    dropper: FileDropper = field(init=False)
    since: float = field(init=False)
    restarts: list[float] = field(default_factory=list)
    up_s: list[float] = field(default_factory=list)
    down_s: list[float] = field(default_factory=list)
    next_rebuilt_s: list[float] = field(default_factory=list)
    faults: list[MidFlow] = field(default_factory=list)
    up_failures: list[str] = field(default_factory=list)
    _transfers: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.dropper = FileDropper(self.stack.inbox, self.stack.root / "staging", self.seed)
        # Events are read from a minute before the run (one clock: the same machine).
        self.since = time.time() - 60

    @property
    def sizes_bytes(self) -> int:
        """Bytes dropped so far."""
        return sum((self.stack.inbox / name).stat().st_size for name in self.dropper.expected)

    def transfers(self) -> set[str]:
        """Flow-run ids of the running transfers (asked once per start of the stack)."""
        if len(self._transfers) < 2:
            self._transfers = transfer_run_ids(self.stack.api)
        return self._transfers

    def wait_mid_flow(
        self, min_dropped: int = 1, min_rebuilt: int = 1, stored: tuple[int, int] | None = None
    ) -> MidFlow:
        """Wait until files are in flight, and say what is in flight.

        That is: at least ``min_dropped`` files dropped and ``min_rebuilt`` rebuilt, a
        downstream flow run running, and either a file dropped but not yet rebuilt (or
        more still to come) or, with ``stored`` (low, high), from low to fewer than high
        files with a copy in the backup store, and more than at the previous look (a
        burst rebuilt already, a backup run part-way through its files).
        """

        seen_stored: list[int | None] = [None]

        def in_flight() -> bool:
            names = set(self.dropper.expected)
            got = rebuilt(self.stack.received, names)
            if len(names) < min_dropped or len(got) < min_rebuilt:
                return False
            upstream = len(got) < len(names) or self.dropper.running
            if not upstream and stored is None:
                return False
            if not (len(self.transfers()) == 2 and self.downstream()):
                return False
            if stored is None:
                return True
            # Copies being written right now: a backup run is part-way through its files.
            copies, before = len(backup_versions(self.stack, names)), seen_stored[0]
            seen_stored[0] = copies
            return before is not None and before < copies and stored[0] <= copies < stored[1]

        wait_for(_answered(in_flight), "files in flight", MID_FLOW_TIMEOUT_S, POLL_S)
        names = set(self.dropper.expected)
        return MidFlow(
            dropped=len(names),
            rebuilt=len(rebuilt(self.stack.received, names)),
            downstream_processes=len(self.downstream()),
            at=time.time(),
            stored=None if stored is None else len(backup_versions(self.stack, names)),
        )

    def downstream(self) -> set[int]:
        """PIDs of the downstream flow runs' processes."""
        return downstream_run_pids(self.stack.api, self.transfers())

    def power_cut(self, **mid_flow: Any) -> MidFlow:
        """Once files are in flight, ``kill -9`` every process of the stack at once."""
        caught = self.wait_mid_flow(**mid_flow)
        power_cut(self.stack)
        self.faults.append(caught)
        return caught

    def kill_worker(self, **mid_flow: Any) -> MidFlow:
        """Once files are in flight, ``kill -9`` the worker, its warm server and its runs."""
        caught = self.wait_mid_flow(**mid_flow)
        caught.downstream_processes = kill_worker_and_its_runs(self.stack, self.transfers())
        self.faults.append(caught)
        return caught

    def kill_server(self, **mid_flow: Any) -> MidFlow:
        """Once files are in flight, ``kill -9`` the Prefect server."""
        caught = self.wait_mid_flow(**mid_flow)
        kill_server(self.stack)
        self.faults.append(caught)
        return caught

    def restart(self, wait_for_files: bool = True) -> float:
        """``msi-prefect up`` (starts what is missing); return its duration.

        A failed ``up`` is recorded in :attr:`up_failures` and run again, as an operator
        would.

        Args:
            wait_for_files: Then wait until a file that was not rebuilt before is rebuilt
                (if there is one), and record how long that took after the restart;
                otherwise only until both transfers are running.
        """
        self.restarts.append(time.time())
        names = set(self.dropper.expected)
        pending = names - rebuilt(self.stack.received, names)
        try:
            took = self.stack.up()
        except AssertionError as failed:
            # An operator whose `up` failed runs it again; the failure is a finding.
            self.up_failures.append(str(failed).strip().splitlines()[-1][:300])
            took = self.stack.up()
        self.up_s.append(took)
        self._transfers = set()
        if pending and wait_for_files:
            self._wait_next_rebuilt(pending)
        else:
            # At least until both transfers run: a `down` before that waits for them.
            wait_for(
                _answered(lambda: len(transfer_run_ids(self.stack.api, ("RUNNING",))) == 2),
                "both transfers running",
                NEXT_REBUILT_TIMEOUT_S,
                1.0,
            )
        return took

    def down_up(self, wait_for_files: bool = True) -> None:
        """``msi-prefect down``, then ``msi-prefect up`` (see :meth:`restart`)."""
        self.down_s.append(self.stack.down())
        self.restart(wait_for_files)

    def _wait_next_rebuilt(self, pending: set[str]) -> None:
        """Time from the last restart to the next of ``pending`` rebuilt."""

        def moved() -> bool:
            return bool(rebuilt(self.stack.received, pending))

        wait_for(moved, "a file rebuilt after the restart", NEXT_REBUILT_TIMEOUT_S, POLL_S)
        self.next_rebuilt_s.append(round(time.time() - self.restarts[-1], 2))

    def finish(self, timeout_s: float) -> tuple[StackVerdict, dict[str, float]]:
        """Let the drops end, wait until every file is done (or the timeout), and judge.

        Returns:
            The verdict, and recovery figures: from the last restart to the last file
            done (and the median, max and 90th percentile of the files done after it),
            and from the last drop to the last file done.
        """
        self.dropper.wait(timeout_s)
        expected = self.dropper.expected
        deadline = time.monotonic() + timeout_s
        complete, _ = wait_until_done(self.stack.api, self.since, lambda: set(expected), timeout_s)
        verdict = judge(self.stack, expected, self.since)
        # A file can be done (dispatched in a batch) while the server still misses its own
        # `reconstructed` event, which a cut lost: the outbox posts it again within seconds.
        while verdict.unannounced and time.monotonic() < deadline:
            time.sleep(EVENT_POLL_S)
            verdict = judge(self.stack, expected, self.since)
        done = verdict.done_at
        figures: dict[str, float] = {}
        if done:
            last_done = max(done.values())
            if self.restarts:
                restart = self.restarts[-1]
                figures["restart_to_all_done"] = round(last_done - restart, 2)
                # Most files are done soon; the tail waits for re-runs of crashed runs.
                after = sorted(at - restart for at in done.values() if at > restart)
                if after:
                    figures.update(summary(after, "restart_to_done"))
                    figures["restart_to_done_p90"] = round(p90(after), 2)
            figures["last_drop_to_all_done"] = round(
                last_done - max(self.dropper.dropped_at.values()), 2
            )
        verdict.notes["complete"] = complete
        verdict.notes["up_failures"] = self.up_failures
        verdict.notes["done_before_first_fault"] = self._done_before_fault(done)
        return verdict, figures

    def _done_before_fault(self, done: dict[str, float]) -> int | None:
        if not self.faults:
            return None
        return sum(1 for at in done.values() if at < self.faults[0].at)

    def report(
        self, fault: str, injected: str, verdict: StackVerdict, recover: dict[str, float]
    ) -> ChaosRecord:
        """Print (and append to ``$MSI_CHAOS_RESULTS``) the figures of this run."""
        entry = ChaosRecord(
            fault=fault,
            injected=injected,
            runs=len(self.faults) or len(self.down_s),
            files=verdict.files,
            bytes=self.sizes_bytes,
            lost=len(set(verdict.lost) | set(verdict.not_done) | set(verdict.unannounced)),
            corrupted=len(verdict.corrupted),
            duplicated=len(verdict.duplicated),
            recover_s={
                **recover,
                **summary(self.up_s, "up"),
                **summary(self.down_s, "down"),
                **summary(self.next_rebuilt_s, "restart_to_next_rebuilt"),
            },
            seconds=round(time.time() - self.since - 60, 1),
            notes={
                **verdict.notes,
                "at_faults": [
                    {
                        "dropped": f.dropped,
                        "rebuilt": f.rebuilt,
                        "downstream_processes": f.downstream_processes,
                        "stored": f.stored,
                    }
                    for f in self.faults
                ],
                "not_done": dict(list(verdict.not_done.items())[:10]),
                "duplicated": verdict.duplicated[:10],
            },
        )
        record(entry)
        return entry


def assert_every_file_done(verdict: StackVerdict) -> None:
    """Every file rebuilt byte-identical, announced, and its three steps announced."""
    assert not verdict.lost, f"not rebuilt: {verdict.lost[:10]}; {verdict.summary()}"
    assert not verdict.corrupted, f"corrupted: {verdict.corrupted[:10]}"
    assert not verdict.unannounced, (
        f"no msi.file.reconstructed event: {verdict.unannounced[:10]}; {verdict.summary()}"
    )
    assert not verdict.not_done, f"downstream steps missing: {verdict.summary()}"


def assert_nothing_twice(verdict: StackVerdict) -> None:
    """No file announced rebuilt twice, none with two copies in the backup store."""
    assert not verdict.duplicated, f"announced or backed up twice: {verdict.summary()}"


def assert_clean_stack(verdict: StackVerdict) -> None:
    """Every file done (:func:`assert_every_file_done`), nothing twice."""
    assert_every_file_done(verdict)
    assert_nothing_twice(verdict)


# ------------------------------------------------------------------------- the scenarios


def power_cut_mid_flow(
    stack: UserStack, files: int, rate: float, after: int, timeout_s: float, seed: int
) -> tuple[ChaosRecord, StackVerdict]:
    """``kill -9`` of everything while ``files`` arrive at ``rate``; ``up``; ``after`` more.

    The cut lands once a quarter of the files have been dropped, some are rebuilt and a
    downstream run is running. The drops go on through the cut and the restart.
    """
    run = StackRun(stack, seed)
    run.dropper.start(workload("cut", files, seed), rate)
    caught = run.power_cut(min_dropped=max(1, files // 4))
    run.restart()
    run.dropper.wait(timeout_s)
    run.dropper.drop_all(workload("after-cut", after, seed + 1, large_every=0))
    verdict, recover = run.finish(timeout_s)
    entry = run.report(
        "power cut",
        "kill -9 of every process of the stack at once (S3 store, broker, Prefect server, "
        f"worker, warm server, every flow run) with {caught.dropped} of {files} files "
        f"dropped, {caught.rebuilt} rebuilt, {caught.downstream_processes} downstream "
        f"flow-run processes running; then `msi-prefect up`; {after} files dropped after",
        verdict,
        recover,
    )
    return entry, verdict


def down_up_cycles(
    stack: UserStack, cycles: int, files: int, rate: float, after: int, timeout_s: float, seed: int
) -> tuple[ChaosRecord, StackVerdict]:
    """``cycles`` times ``down`` then ``up`` while files keep arriving at ``rate``.

    Each ``down`` comes once a file has been rebuilt since the last ``up``, more are on
    their way and a downstream run is running. The drops go on until the cycles are over
    and at least ``files`` were dropped; ``after`` more come at the end.
    """
    run = StackRun(stack, seed)
    run.dropper.start(workload("cycle", files, seed), rate, more="cycle-more")
    for _ in range(cycles):
        # A file rebuilt since the last `up` (the stack moves files again), and more.
        names = set(run.dropper.expected)
        run.faults.append(run.wait_mid_flow(min_rebuilt=len(rebuilt(stack.received, names)) + 1))
        run.down_up()
    run.dropper.wait(timeout_s)
    run.dropper.drop_all(workload("after-cycles", after, seed + 1, large_every=0))
    verdict, recover = run.finish(timeout_s)
    entry = run.report(
        "`down` / `up` cycles",
        f"`msi-prefect down` then `up`, {cycles} times, while files kept arriving "
        f"({rate} files/s), each `down` with files in flight and downstream runs running",
        verdict,
        recover,
    )
    return entry, verdict


def downstream_fault(
    stack: UserStack, fault: str, files: int, timeout_s: float, seed: int
) -> tuple[ChaosRecord, StackVerdict]:
    """A burst of ``files`` at once; ``kill -9`` of the worker or the server mid-burst; ``up``.

    Args:
        stack: The stack.
        fault: ``"worker"`` (the worker, its warm server and every downstream flow-run
            process; the transfers keep running) or ``"server"`` (the Prefect server).
        files: Size of the burst.
        timeout_s: For the files to be done after the restart.
        seed: Seed of the files.
    """
    run = StackRun(stack, seed)
    run.dropper.drop_all(workload(f"burst-{fault}", files, seed, large_every=0))
    # Mid-burst: the burst's downstream runs running, its backups partly stored (some
    # files backed up, most not yet).
    mid_burst = {"stored": (min(3, files), max(4, files // 2))}
    if fault == "worker":
        caught = run.kill_worker(**mid_burst)
        injected = (
            "kill -9 of the worker, its warm server and every downstream flow-run process "
            f"({caught.downstream_processes}) in the middle of a burst of {files} files"
        )
    else:
        caught = run.kill_server(**mid_burst)
        injected = f"kill -9 of the Prefect server in the middle of a burst of {files} files"
    run.restart()
    verdict, recover = run.finish(timeout_s)
    injected += f" ({caught.stored} backed up so far); then `msi-prefect up`"
    entry = run.report(f"kill -9 {fault} mid-burst", injected, verdict, recover)
    return entry, verdict
