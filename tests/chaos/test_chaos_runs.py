"""The long fault-injection runs (opt in: ``pytest -m chaos tests/chaos``).

Sizes and counts come from the environment, so a run can be shortened or lengthened:

- ``MSI_CHAOS_KILLS`` (20): kill -9 count for the reassembler and for the watcher;
- ``MSI_CHAOS_FILES`` (300): files of the reassembler run;
- ``MSI_CHAOS_LARGE_MIB`` ("200,100,50,20,10"): sizes of its large files, MiB;
- ``MSI_CHAOS_BROKER_RESTARTS`` (3) and ``MSI_CHAOS_PAUSE_S`` (30): broker faults;
- ``MSI_CHAOS_RESULTS``: a file to append every run's figures to (JSON lines).

Figures measured with them are in docs/reliability.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from msi_prefect.stack.manager import StackManager
from tests.chaos import scenarios
from tests.chaos.harness import (
    KIB,
    MIB,
    Processes,
    create_topic,
    env_float,
    env_int,
    mixed_sizes,
)
from tests.conftest import RunningStack

pytestmark = [pytest.mark.chaos, pytest.mark.stack]

KILLS = env_int("MSI_CHAOS_KILLS", 20)


def _large_sizes() -> list[int]:
    text = os.environ.get("MSI_CHAOS_LARGE_MIB", "200,100,50,20,10")
    return [int(float(part) * MIB) for part in text.split(",") if part.strip()]


@pytest.mark.timeout(env_int("MSI_CHAOS_TIMEOUT_S", 1800))
def test_reassembler_killed_repeatedly(
    kafka_stack: RunningStack, topic: str, tmp_path: Path, processes: Processes
) -> None:
    sizes = mixed_sizes(env_int("MSI_CHAOS_FILES", 300), _large_sizes(), seed=11)
    entry = scenarios.kill_reassembler(
        kafka_stack.bootstrap_servers, topic, tmp_path, processes, sizes, kills=KILLS, seed=11
    )
    assert entry.runs >= KILLS


@pytest.mark.timeout(env_int("MSI_CHAOS_TIMEOUT_S", 1800))
def test_watcher_killed_repeatedly_while_files_arrive(
    kafka_stack: RunningStack, topic: str, tmp_path: Path, processes: Processes
) -> None:
    scenarios.kill_watcher(
        kafka_stack.bootstrap_servers, topic, tmp_path, processes, kills=KILLS,
        large=[4 * MIB, 16 * MIB, 32 * MIB], seed=12, gap_s=(0.05, 0.4), max_files=300,
    )  # fmt: skip


@pytest.mark.timeout(env_int("MSI_CHAOS_TIMEOUT_S", 1800))
def test_broker_restarted_and_paused(
    private_stack: StackManager, tmp_path: Path, processes: Processes
) -> None:
    restarts = env_int("MSI_CHAOS_BROKER_RESTARTS", 3)
    sizes = mixed_sizes(40 * (restarts + 2), [32 * MIB, 16 * MIB, 64 * MIB], seed=13)
    scenarios.broker_faults(
        private_stack,
        create_topic(private_stack.config.bootstrap_servers),
        tmp_path,
        processes,
        sizes,
        restarts=restarts,
        pause_s=env_float("MSI_CHAOS_PAUSE_S", 30.0),
        gap_s=0.1,
    )


@pytest.mark.timeout(env_int("MSI_CHAOS_TIMEOUT_S", 1800))
@pytest.mark.parametrize("filler_mib", [12, 18])
def test_destination_disk_full(
    kafka_stack: RunningStack,
    topic: str,
    tmp_path: Path,
    processes: Processes,
    tiny_tmpfs: Path,
    filler_mib: int,
) -> None:
    # Many small files as well as a few larger ones: the progress store (on the same disk)
    # as well as the staging files can be the first to find the disk full.
    sizes = {f"full/s-{i:03d}.bin": (1 + i % 13) * 3 * KIB for i in range(150)}
    sizes |= {f"full/m-{i:02d}.bin": 900 * KIB for i in range(6)} | {"full/big.bin": 4 * MIB}
    scenarios.disk_full(
        kafka_stack.bootstrap_servers, topic, tmp_path, processes, tiny_tmpfs, sizes,
        filler_bytes=filler_mib * MIB, full_wait_s=15.0,
    )  # fmt: skip


@pytest.mark.timeout(env_int("MSI_CHAOS_TIMEOUT_S", 1800))
def test_source_faults(
    kafka_stack: RunningStack, topic: str, tmp_path: Path, processes: Processes
) -> None:
    scenarios.source_faults(
        kafka_stack.bootstrap_servers, topic, tmp_path, processes, big_bytes=128 * MIB,
        rewrites=3,
    )  # fmt: skip
