"""Where a stack's CPU goes: CPU seconds of its processes by part, sampled from ``/proc``.

A :class:`CpuLedger` is given the stack's component processes (``msi-prefect status
--json``: the Prefect server, its services and Redis, PostgreSQL, the broker, the S3 store,
the worker). Each :meth:`CpuLedger.sample` walks ``/proc`` and books every process under the
component it descends from; inside the worker's tree it tells the worker, its warm server,
the transfer runs (flow runs already running at the first sample: the watcher, the
rebuilder) and the flow runs started since (the downstream work). A process is counted
from the first sample that sees it (from zero if it started after the first sample) to the
last. CPU a process spends after the last sample that saw it alive is not seen, so short
runs are undercounted by up to one sampling interval each; the machine's busy time over the
same span (``/proc/stat``) is reported beside the sum for that reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
WORKER = "worker"
WARM_SERVER = "warm server"
TRANSFER_RUNS = "transfer runs"
FLOW_RUNS = "downstream runs"
WARM_SERVER_MODULE = b"msi_prefect.warm_start.server"


@dataclass(frozen=True)
class ProcessStat:
    """The fields of ``/proc/PID/stat`` the ledger needs."""

    parent: int
    cpu_s: float
    started: int  # clock ticks after boot: a reused PID is another process


def read_stat(pid: int) -> ProcessStat | None:
    """``/proc/PID/stat`` of a live process, or ``None`` if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    # After the name: state, ppid, ... utime (12th) and stime (13th), starttime (20th).
    return ProcessStat(
        parent=int(fields[1]),
        cpu_s=(int(fields[11]) + int(fields[12])) / CLOCK_TICKS,
        started=int(fields[19]),
    )


def _command_line(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy since boot (all but idle and iowait)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLOCK_TICKS


@dataclass
class _Booked:
    part: str
    first_s: float
    last_s: float


@dataclass
class CpuLedger:
    """CPU seconds of a stack's processes by part (see the module docstring).

    Attributes:
        components: The stack's component processes: PID -> part name.
        worker_pid: The worker's PID (its tree is split further).
    """

    components: dict[int, str]
    worker_pid: int
    _booked: dict[tuple[int, int], _Booked] = field(default_factory=dict)
    _busy_at_start: float | None = None
    _busy_at_end: float = 0.0

    def _part(self, pid: int, stats: dict[int, ProcessStat], first: bool) -> str | None:
        """The part a process belongs to, or ``None`` if it is not the stack's."""
        chain = [pid]
        while chain[-1] not in self.components and chain[-1] in stats and len(chain) < 64:
            chain.append(stats[chain[-1]].parent)
        top = chain[-1]
        if top not in self.components:
            return None
        if top != self.worker_pid:
            return self.components[top]
        # chain: ..., grandchild, child, worker
        if len(chain) == 1:
            return WORKER
        if len(chain) == 2 and WARM_SERVER_MODULE in _command_line(pid):
            return WARM_SERVER
        # A run's launcher (a child of the worker) or its forked process (the warm server's).
        return TRANSFER_RUNS if first else FLOW_RUNS

    def sample(self) -> None:
        """Read every process's CPU time once."""
        first = self._busy_at_start is None
        if first:
            self._busy_at_start = machine_busy_s()
        stats = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                stat = read_stat(int(entry))
                if stat is not None:
                    stats[int(entry)] = stat
        for pid, stat in stats.items():
            key = (pid, stat.started)
            booked = self._booked.get(key)
            if booked is not None:
                booked.last_s = stat.cpu_s
                continue
            part = self._part(pid, stats, first)
            if part is not None:
                self._booked[key] = _Booked(part, stat.cpu_s if first else 0.0, stat.cpu_s)
        self._busy_at_end = machine_busy_s()

    def by_part(self) -> dict[str, float]:
        """CPU seconds per part since the first sample, the largest first."""
        totals: dict[str, float] = {}
        for booked in self._booked.values():
            totals[booked.part] = totals.get(booked.part, 0.0) + booked.last_s - booked.first_s
        return dict(sorted(totals.items(), key=lambda item: -item[1]))

    @property
    def machine_busy_s(self) -> float:
        """The whole machine's busy CPU seconds over the same span (others' work too)."""
        if self._busy_at_start is None:
            return 0.0
        return self._busy_at_end - self._busy_at_start
