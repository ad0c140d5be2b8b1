"""One small run of each transfer fault (the long runs are in tests/chaos, opt-in).

Each run ends with the destination byte-identical to the source: nothing lost, corrupted
or duplicated, every file reported reconstructed. See docs/reliability.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from msi_prefect.stack.manager import StackManager
from tests.chaos import scenarios
from tests.chaos.harness import (
    KIB,
    MIB,
    Processes,
    create_topic,
    mixed_sizes,
)
from tests.conftest import RunningStack

pytestmark = pytest.mark.stack


@pytest.mark.timeout(120)
def test_reassembler_killed_once_mid_transfer(
    kafka_stack: RunningStack, topic: str, tmp_path: Path, processes: Processes
) -> None:
    sizes = mixed_sizes(20, [24 * MIB], seed=1)
    scenarios.kill_reassembler(
        kafka_stack.bootstrap_servers, topic, tmp_path, processes, sizes, kills=1, seed=1
    )


@pytest.mark.timeout(120)
def test_watcher_killed_once_mid_file(
    kafka_stack: RunningStack, topic: str, tmp_path: Path, processes: Processes
) -> None:
    scenarios.kill_watcher(
        kafka_stack.bootstrap_servers, topic, tmp_path, processes, kills=1, large=[8 * MIB],
        seed=2, max_files=12,
    )  # fmt: skip


@pytest.mark.timeout(150)
def test_broker_restarted_and_paused_mid_transfer(
    private_stack: StackManager, tmp_path: Path, processes: Processes
) -> None:
    topic = create_topic(private_stack.config.bootstrap_servers)
    sizes = mixed_sizes(30, [8 * MIB, 8 * MIB], seed=3)
    scenarios.broker_faults(
        private_stack, topic, tmp_path, processes, sizes, restarts=1, pause_s=3.0, gap_s=0.2
    )


@pytest.mark.timeout(120)
def test_destination_disk_full_then_freed(
    kafka_stack: RunningStack, topic: str, tmp_path: Path, processes: Processes, tiny_tmpfs: Path
) -> None:
    sizes = {f"full/f-{i:02d}.bin": 700 * KIB for i in range(10)} | {"full/big.bin": 3 * MIB}
    scenarios.disk_full(
        kafka_stack.bootstrap_servers, topic, tmp_path, processes, tiny_tmpfs, sizes,
        filler_bytes=12 * MIB, full_wait_s=2.0,
    )  # fmt: skip


@pytest.mark.timeout(120)
def test_source_faults_have_clear_outcomes(
    kafka_stack: RunningStack, topic: str, tmp_path: Path, processes: Processes
) -> None:
    scenarios.source_faults(
        kafka_stack.bootstrap_servers,
        topic,
        tmp_path,
        processes,
        big_bytes=48 * MIB,
        rewrites=1,
        window_s=0.5,
    )
