"""Faults of the whole stack with files in flight: power cuts, restarts, a dead worker or server.

Opt in with ``-m chaos`` (each run takes minutes). Each run starts a private stack with
``msi-prefect up`` on free ports, as a user would, and stops it by PID at the end. Every
run ends with the same verdict over every file dropped, also after a restart (see
:mod:`tests.chaos.stack_scenarios`): every file done (rebuilt byte-identical, one
``msi.file.reconstructed`` event, its backup, metadata and analysis announced by their
events) and nothing twice (one announcement, one copy in the backup store, counted as S3
object versions); a fault's two halves are separate tests.

Sizes come from the environment:

- ``MSI_CHAOS_STACK_FILES`` (100): files per run (per burst for the downstream faults);
- ``MSI_CHAOS_STACK_RATE`` (2.0): files per second of the steady drops;
- ``MSI_CHAOS_STACK_CYCLES`` (5): ``down``/``up`` cycles;
- ``MSI_CHAOS_STACK_SETTLE_S`` (1200): how long the files may take after the last
  restart. Longer than Prefect's 15 minutes: a run crashed by the fault is re-run on its
  ``Crashed`` event, which a restarted server may hold back that long;
- ``MSI_CHAOS_RESULTS``: a file to append every run's figures to (JSON lines).

    PYTHONPATH=. .venv/bin/python -m pytest -m chaos tests/chaos/test_stack_faults.py -s

Figures measured with them are in docs/reliability.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos import stack_scenarios
from tests.chaos.harness import env_float, env_int
from tests.chaos.stack_scenarios import (
    assert_clean_stack,
    assert_every_file_done,
    assert_nothing_twice,
)
from tests.stack_helpers import StackVerdict, UserStack, user_stack

pytestmark = [pytest.mark.chaos, pytest.mark.stack]

FILES = env_int("MSI_CHAOS_STACK_FILES", 100)
RATE = env_float("MSI_CHAOS_STACK_RATE", 2.0)
CYCLES = env_int("MSI_CHAOS_STACK_CYCLES", 5)
SETTLE_S = env_float("MSI_CHAOS_STACK_SETTLE_S", 1200)
# The files arrive and the faults land before the settling starts.
TIMEOUT_S = int(SETTLE_S) + env_int("MSI_CHAOS_TIMEOUT_S", 1800)
# Files dropped once the stack is back: a tenth, at least two.
AFTER = max(2, FILES // 10)


@pytest.fixture(scope="module")
def power_cut(tmp_path_factory: pytest.TempPathFactory) -> StackVerdict:
    """The verdict after a power cut with files in flight (the stack is stopped after)."""
    with user_stack(tmp_path_factory.mktemp("power-cut")) as stack:
        _, verdict = stack_scenarios.power_cut_mid_flow(
            stack, FILES, RATE, AFTER, SETTLE_S, seed=21
        )
    return verdict


@pytest.mark.timeout(TIMEOUT_S)
def test_power_cut_every_file_done(power_cut: StackVerdict) -> None:
    # Files dropped after the restart too.
    assert any(name.startswith("after-") for name in power_cut.reconstructed)
    assert_every_file_done(power_cut)


def test_power_cut_nothing_twice(power_cut: StackVerdict) -> None:
    assert_nothing_twice(power_cut)


@pytest.mark.timeout(TIMEOUT_S + CYCLES * 120)
def test_down_up_cycles_while_files_arrive(tmp_path: Path) -> None:
    # The drops span the cycles (about 40 s each: down, up, a file through).
    rate = min(RATE, FILES / (CYCLES * 40.0))
    with user_stack(tmp_path) as stack:
        _, verdict = stack_scenarios.down_up_cycles(
            stack, CYCLES, FILES, rate, AFTER, SETTLE_S, seed=22
        )
    assert_clean_stack(verdict)


@pytest.fixture(scope="module")
def burst_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UserStack]:
    """One stack for the downstream faults, a burst each."""
    with user_stack(tmp_path_factory.mktemp("bursts")) as stack:
        yield stack


@pytest.fixture(scope="module")
def worker_burst(burst_stack: UserStack) -> StackVerdict:
    """The verdict of a burst during which the worker and its runs were killed."""
    _, verdict = stack_scenarios.downstream_fault(burst_stack, "worker", FILES, SETTLE_S, seed=23)
    return verdict


@pytest.fixture(scope="module")
def server_burst(burst_stack: UserStack) -> StackVerdict:
    """The verdict of a burst during which the Prefect server was killed."""
    _, verdict = stack_scenarios.downstream_fault(burst_stack, "server", FILES, SETTLE_S, seed=24)
    return verdict


@pytest.mark.timeout(TIMEOUT_S)
def test_worker_killed_mid_burst_every_file_done(worker_burst: StackVerdict) -> None:
    assert_every_file_done(worker_burst)


def test_worker_killed_mid_burst_nothing_backed_up_twice(worker_burst: StackVerdict) -> None:
    assert_nothing_twice(worker_burst)


@pytest.mark.timeout(TIMEOUT_S)
def test_server_killed_mid_burst_every_file_done(server_burst: StackVerdict) -> None:
    assert_every_file_done(server_burst)


def test_server_killed_mid_burst_nothing_backed_up_twice(server_burst: StackVerdict) -> None:
    assert_nothing_twice(server_burst)


def test_server_killed_mid_burst_up_starts_the_server(server_burst: StackVerdict) -> None:
    # The operator's first `up` after the crash brings the server back.
    assert server_burst.notes["up_failures"] == []
