"""bench.cpu_ledger: CPU seconds booked to the part of the stack a process descends from."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from bench.cpu_ledger import FLOW_RUNS, TRANSFER_RUNS, WORKER, CpuLedger

BURN_S = 0.4
# Starts a child that burns CPU for a moment, prints the child's PID, then sleeps.
BURN_IN_CHILD = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', "
    f"'import time\\nend = time.process_time() + {BURN_S}\\n"
    "while time.process_time() < end: pass\\ntime.sleep(60)'])\n"
    "print(child.pid, flush=True)\n"
    "time.sleep(60)\n"
)
SLEEP = "import time; time.sleep(60)"
BURN = (
    "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n" + SLEEP
)


def test_a_busy_grandchild_is_booked_to_its_component_and_others_are_not() -> None:
    component = subprocess.Popen([sys.executable, "-c", BURN_IN_CHILD], stdout=subprocess.PIPE)
    worker = subprocess.Popen([sys.executable, "-c", SLEEP])
    outsider = subprocess.Popen([sys.executable, "-c", BURN])
    assert component.stdout is not None
    grandchild = int(component.stdout.readline())
    try:
        ledger = CpuLedger({component.pid: "broker", worker.pid: WORKER}, worker.pid)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and ledger.by_part().get("broker", 0.0) < BURN_S / 2:
            ledger.sample()
            time.sleep(0.05)
        parts = ledger.by_part()
        assert parts["broker"] >= BURN_S / 2  # the grandchild's burn after the first sample
        assert parts.get(WORKER, 0.0) < 0.1  # asleep from the first sample on
        assert TRANSFER_RUNS not in parts and FLOW_RUNS not in parts
        assert set(parts) <= {"broker", WORKER}  # the outsider's CPU is nobody's
        assert ledger.machine_busy_s >= parts["broker"]
    finally:
        os.kill(grandchild, signal.SIGKILL)
        for process in (component, worker, outsider):
            process.kill()
            process.wait()
