"""Sustained file rate of the Prefect layer: per-file against batch dispatch, side by side.

Question: how many files per second does the embedded stack carry all the way through,
i.e. rebuilt AND backed up AND described AND analysed, when files keep arriving?

Method, once per dispatch mode (``per-file``, then ``batch``), in one run:

1. A private embedded stack is started with the project CLI, as a user does:
   ``python -m msi_prefect.cli --state-dir STATE up --storage memory --dispatch MODE
   --watch-dir W --destination-dir D --port NAME=PORT ...`` on free loopback ports, in a
   temporary directory; ``down`` always runs at the end.
2. Once the long-running runs are RUNNING and the consumer group is STABLE, ``--files``
   files of ``--size-kib`` KiB are dropped into W at ``--rate`` files per second (written
   outside W, then ``os.replace``-d in).
3. The harness reads the server's ``msi.file.backed-up``, ``msi.file.metadata-extracted``
   and ``msi.file.analyzed`` events every few seconds. A file is *done* when it has all
   three. It waits until every file is done or ``--drain-timeout`` seconds have passed
   since the last drop.
4. Figures: files done; the sustained rate = files done / (time of the last done file's
   last event - time of the first drop); the median and p90 of drop -> done; how many
   downstream flow runs the server created.

Usage::

    .venv/bin/python -m bench.file_rate
    .venv/bin/python -m bench.file_rate --files 20 --rate 1 --modes batch --no-write

Results go to stdout and to ``bench/FILE_RATE.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common import BENCH_DIR, fmt_seconds, format_load, p90, write_replace
from bench.trigger_latency import (
    DEFAULT_GROUP,
    DOWN_TIMEOUT_S,
    HTTP_TIMEOUT_S,
    STATUS_TIMEOUT_S,
    UP_TIMEOUT_S,
    Deadline,
    cli,
    fetch_events,
    port_args,
    stack_ready,
)
from msi_prefect.crashed_runs import DOWNSTREAM_DEPLOYMENTS

REPORT_PATH = BENCH_DIR / "FILE_RATE.md"
COMMAND = "cd /work/main && .venv/bin/python -m bench.file_rate"
KIB = 1024
DONE_EVENTS = ("msi.file.backed-up", "msi.file.metadata-extracted", "msi.file.analyzed")
# The per-file and batch actions (the audit is scheduled, not triggered by files).
DOWNSTREAM_FLOWS = tuple(name for name in DOWNSTREAM_DEPLOYMENTS if name != "audit-backups")
EVENT_POLL_S = 3.0
RUNS_PAGE = 200
RSS_SAMPLE_S = 0.5
RSS_KEYS = ("server", "worker", "flow runs")


@dataclass
class ModeResult:
    """What one dispatch mode achieved."""

    mode: str
    files: int
    offered_rate: float
    first_drop: float = 0.0
    last_drop: float = 0.0
    dropped_at: dict[str, float] = field(default_factory=dict)
    done_at: dict[str, float] = field(default_factory=dict)
    per_event: dict[str, int] = field(default_factory=dict)
    flow_runs: dict[str, int] = field(default_factory=dict)
    # created -> running of every downstream flow run, seconds.
    run_starts: list[float] = field(default_factory=list)
    # Peak resident memory in MB: the Prefect server, the worker (with its warm server),
    # and all flow-run processes together.
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> int:
        return len(self.done_at)

    @property
    def sustained_rate(self) -> float | None:
        if not self.done_at:
            return None
        return self.done / max(1e-6, max(self.done_at.values()) - self.first_drop)

    def latencies(self) -> list[float]:
        return [self.done_at[name] - self.dropped_at[name] for name in self.done_at]


def _done_times(events: list[dict[str, Any]], names: set[str]) -> tuple[dict[str, float], Any]:
    """Per file (by path): when its last downstream event occurred, if it has all three."""
    seen: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = dict.fromkeys(DONE_EVENTS, 0)
    for event in events:
        path = (event.get("payload") or {}).get("path")
        if path not in names:
            continue
        occurred = _epoch(event["occurred"])
        kinds = seen.setdefault(path, {})
        if event["event"] not in kinds:
            counts[event["event"]] += 1
        kinds[event["event"]] = occurred
    done = {path: max(k.values()) for path, k in seen.items() if len(k) == len(DONE_EVENTS)}
    return done, counts


def _epoch(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _count_runs(client: httpx.Client) -> dict[str, int]:
    counts = {}
    for name in DOWNSTREAM_FLOWS:
        response = client.post("/flow_runs/count", json={"flows": {"name": {"any_": [name]}}})
        response.raise_for_status()
        if response.json():
            counts[name] = int(response.json())
    return counts


def _run_starts(client: httpx.Client) -> list[float]:
    """created -> running (s) of every downstream flow run that started."""
    starts = []
    for offset in range(0, 10_000, RUNS_PAGE):
        response = client.post(
            "/flow_runs/filter",
            json={
                "flows": {"name": {"any_": list(DOWNSTREAM_FLOWS)}},
                "limit": RUNS_PAGE,
                "offset": offset,
            },
        )
        response.raise_for_status()
        page = response.json()
        starts += [
            _epoch(run["start_time"]) - _epoch(run["created"])
            for run in page
            if run.get("start_time")
        ]
        if len(page) < RUNS_PAGE:
            break
    return starts


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _sample_rss(api_url: str, server_pid: int, worker_pid: int, peaks: dict[str, float]) -> None:
    """Update the peak RSS of the server, the worker (+ warm server) and the flow runs."""
    wanted = f"PREFECT_API_URL={api_url}".encode()
    worker = _rss_mb(worker_pid)
    flow_runs = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in (server_pid, worker_pid):
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if wanted not in environ:
            continue
        if parent == worker_pid and not any(
            v.startswith(b"PREFECT__FLOW_RUN_ID=") for v in environ
        ):
            worker += _rss_mb(int(entry.name))  # the warm server
        else:
            flow_runs += _rss_mb(int(entry.name))
    for key, value in (
        ("server", _rss_mb(server_pid)),
        ("worker", worker),
        ("flow runs", flow_runs),
    ):
        peaks[key] = round(max(peaks.get(key, 0.0), value), 1)


def run_mode(mode: str, opts: argparse.Namespace) -> ModeResult:
    """Bring a stack up with one dispatch mode, push the files through, bring it down."""
    result = ModeResult(mode=mode, files=opts.files, offered_rate=opts.rate)
    deadline = Deadline(opts.timeout)
    work = Path(tempfile.mkdtemp(prefix=f"msi-file-rate-{mode}-"))
    state, watch, dest, staging = (work / n for n in ("state", "inbox", "received", "staging"))
    staging.mkdir()
    log = work / "cli.log"
    result.notes["work_dir"] = str(work)
    try:
        up_args = ["up", "--storage", "memory", "--dispatch", mode, "--watch-dir", str(watch)]
        up_args += ["--destination-dir", str(dest), *port_args()]
        print(f"[{mode}] msi-prefect up ...", flush=True)
        started = time.monotonic()
        up = cli(state, up_args, log, UP_TIMEOUT_S)
        if up.returncode != 0:
            raise RuntimeError(f"up failed (exit {up.returncode}), see {log}")
        result.notes["up_s"] = round(time.monotonic() - started, 1)
        status = json.loads(cli(state, ["status", "--json"], log, STATUS_TIMEOUT_S).stdout)
        pids = {row["name"]: row["pid"] for row in status["components"]}
        api_url = status["prefect_api_url"]
        with httpx.Client(base_url=status["prefect_api_url"], timeout=HTTP_TIMEOUT_S) as client:
            stack_ready(client, status["bootstrap_servers"], DEFAULT_GROUP, result.notes, deadline)
            tag = time.strftime("%H%M%S")
            names = [f"rate-{mode}-{tag}-{i:04d}.bin" for i in range(opts.files)]
            next_at = time.monotonic()
            for name in names:
                time.sleep(max(0.0, next_at - time.monotonic()))
                next_at += 1.0 / opts.rate
                result.dropped_at[name] = write_replace(
                    watch, staging, name, os.urandom(opts.size_kib * KIB)
                )
            result.first_drop = min(result.dropped_at.values())
            result.last_drop = max(result.dropped_at.values())
            print(f"[{mode}] dropped {len(names)} files", flush=True)
            limit = time.monotonic() + opts.drain_timeout
            wanted = set(names)
            while time.monotonic() < limit and not deadline.passed():
                sample_until = time.monotonic() + EVENT_POLL_S
                while time.monotonic() < sample_until:
                    _sample_rss(api_url, pids["prefect"], pids["worker"], result.peak_rss_mb)
                    time.sleep(RSS_SAMPLE_S)
                try:
                    events = fetch_events(client, result.first_drop - 60, DONE_EVENTS)
                except httpx.HTTPError as exc:
                    print(f"[{mode}] event read failed: {exc!r}", flush=True)
                    continue
                result.done_at, result.per_event = _done_times(events, wanted)
                print(f"[{mode}] done {result.done}/{len(names)} {result.per_event}", flush=True)
                if result.done == len(names):
                    break
            try:
                result.flow_runs = _count_runs(client)
                result.run_starts = _run_starts(client)
            except httpx.HTTPError as exc:
                result.notes["run_count_error"] = repr(exc)
    finally:
        print(f"[{mode}] msi-prefect down ...", flush=True)
        try:
            result.notes["down_exit"] = cli(state, ["down"], log, DOWN_TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            result.notes["down_exit"] = "timeout"
    return result


def report(
    results: list[ModeResult], opts: argparse.Namespace, load: tuple[float, float, float]
) -> str:
    """The markdown report of one run."""
    argv = " ".join(sys.argv[1:])
    lines = [
        "# Sustained file rate of the Prefect layer: per-file against batch dispatch",
        "",
        f"- Command: `{COMMAND}{(' ' + argv) if argv else ''}`",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
        f"- {os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()};"
        " a shared machine that may be busy.",
        f"- Load average at start: {format_load(load)}; at end: {format_load(os.getloadavg())}.",
        f"- Per mode: a fresh embedded stack (`up --storage memory --dispatch MODE`), "
        f"{opts.files} files of {opts.size_kib} KiB dropped at {opts.rate} files/s, then up to "
        f"{opts.drain_timeout:.0f} s for the downstream work. A file is done when its "
        "`msi.file.backed-up`, `msi.file.metadata-extracted` and `msi.file.analyzed` "
        "events are all on the server. Batch settings: the TransferSettings defaults "
        "(50 files or 5 s).",
        "",
        "| dispatch | files done | sustained files/s (done / first drop -> last done) "
        "| drop -> done median (s) | p90 (s) | max (s) | run created -> running median (s) "
        "| peak RSS MB (server / worker / flow runs) | downstream flow runs created |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        latencies = result.latencies()
        rate = result.sustained_rate
        runs = ", ".join(f"{name} {n}" for name, n in result.flow_runs.items()) or "-"
        lines.append(
            f"| {result.mode} | {result.done}/{result.files} "
            f"| {'-' if rate is None else f'{rate:.2f}'} "
            f"| {fmt_seconds(statistics.median(latencies) if latencies else None)} "
            f"| {fmt_seconds(p90(latencies) if latencies else None)} "
            f"| {fmt_seconds(max(latencies) if latencies else None)} "
            f"| {fmt_seconds(statistics.median(result.run_starts) if result.run_starts else None)} "
            f"| {' / '.join(str(result.peak_rss_mb.get(k, '-')) for k in RSS_KEYS)} | {runs} |"
        )
    by_mode = {r.mode: r.sustained_rate for r in results}
    if by_mode.get("per-file") and by_mode.get("batch"):
        ratio = by_mode["batch"] / by_mode["per-file"]  # type: ignore[operator]
        lines += ["", f"Batch / per-file sustained rate: **{ratio:.1f}x**."]
    lines += ["", "Events counted per mode (distinct files):", ""]
    lines += [f"- {r.mode}: {r.per_event}; notes: {r.notes}" for r in results]
    return "\n".join(lines) + "\n"


def main() -> int:
    """Run the modes one after the other and report them side by side."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=60, help="files per mode")
    parser.add_argument("--rate", type=float, default=2.0, help="files dropped per second")
    parser.add_argument("--size-kib", type=int, default=16, help="KiB per file")
    parser.add_argument("--modes", nargs="+", default=["per-file", "batch"])
    parser.add_argument("--drain-timeout", type=float, default=240.0, help="s after dropping")
    parser.add_argument("--timeout", type=float, default=600.0, help="overall s per mode")
    parser.add_argument("--no-write", action="store_true", help="do not write the report")
    opts = parser.parse_args()
    if opts.files < 1 or opts.rate <= 0:
        parser.error("--files must be >= 1 and --rate > 0")
    load = os.getloadavg()
    results = [run_mode(mode, opts) for mode in opts.modes]
    text = report(results, opts, load)
    print(text)
    if not opts.no_write:
        REPORT_PATH.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
