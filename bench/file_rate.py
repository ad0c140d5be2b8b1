"""What a user waits for: from a file settling in the watched folder to its downstream work done.

Question: once a file is in the instrument's folder, how long until it is rebuilt AND backed
up AND described AND analysed, for one file into an idle stack, for a burst of files
dropped at once, and while files keep arriving at a steady rate? And how many files per
second does the stack carry all the way through?

Scenarios (``--scenarios``; each runs once per dispatch mode in ``--modes``):

- ``idle``: 5 files, one every 10 s, so each meets an idle stack;
- ``burst``: 200 files dropped at once;
- ``sustained``: 10 files/s for 60 s (600 files);
- ``custom``: ``--files`` files at ``--rate`` files/s.

Method, per scenario and mode, in one run:

1. A private embedded stack is started with the project CLI, as a user does:
   ``python -m msi_prefect.cli --state-dir STATE up --storage memory --dispatch MODE
   --watch-dir W --destination-dir D --port NAME=PORT ...`` on free loopback ports, in a
   temporary directory; ``down`` always runs at the end. A mode written ``MODE@DIR`` runs
   the stack from another checkout (``PYTHONPATH=DIR`` for the CLI and everything it
   starts), to measure older code side by side with the same harness in the same run;
   ``MODE+NAME=VALUE`` (repeatable) sets an environment variable for the stack, to
   compare a setting with its default (the stack's tuning yields to the caller's
   environment); ``MODE+database=postgresql`` (a lower-case name: an option of ``up``)
   runs the Prefect server on the stack's own PostgreSQL instead of SQLite, so
   ``--modes adaptive adaptive+database=postgresql`` compares the two side by side.
2. Once the long-running runs are RUNNING and the consumer group is STABLE, the files (16
   KiB of random bytes each) are dropped into W at the scenario's rate (written outside W,
   then ``os.replace``-d in).
3. The harness reads the server's events every few seconds. A file is *done* when its
   ``msi.file.backed-up``, ``msi.file.metadata-extracted`` and ``msi.file.analyzed`` events
   are all there; its latency is from its ``msi.file.uploaded`` event (the watcher sends a
   file as soon as it is stable, so this is "stable -> done"; "drop -> done" adds the
   2 s stability window and is reported too) to the last of the three.
4. Figures: files done; median, p90 and max latency; the sustained rate (files done /
   (last done - first drop)); created -> running of every downstream flow run; peak RSS of
   the Prefect server, the worker (with its warm server) and all flow-run processes
   together; and how many downstream runs the server created; the CPU seconds per file
   of each part of the stack (``bench.cpu_ledger``: the server's processes, PostgreSQL,
   the broker, the S3 store, the worker, its warm server, the transfer runs and the
   downstream runs), beside the whole machine's.
5. From the server's log: how many events its in-memory queues dropped ("Subscription
   queue is full"), and the deepest queue of each subscriber of each topic (the server
   logs them every few seconds: ``msi_prefect.stack.queue_probe``), so a subscriber that
   falls behind is named.
6. From the worker's log, where httpx logs each request of the flow-run processes: the
   flow runs' API requests by method and path, per file and per step done (the
   artifacts' share, the history's reads, the event queries); and from the server, how
   many versions of the files' history artifacts it holds (the history's writes).

Usage::

    .venv/bin/python -m bench.file_rate                      # every scenario, adaptive
    .venv/bin/python -m bench.file_rate --modes adaptive per-file batch
    .venv/bin/python -m bench.file_rate --scenarios burst sustained \
        --modes adaptive adaptive+database=postgresql      # SQLite against PostgreSQL
    git worktree add --detach /tmp/before HEAD~3      # older code, in the same run:
    .venv/bin/python -m bench.file_rate --modes per-file@/tmp/before batch@/tmp/before \
        adaptive --report /tmp/compare.md

Results go to stdout and to ``bench/FILE_RATE.md`` (or ``--report``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common import BENCH_DIR, write_replace
from bench.cpu_ledger import CpuLedger
from bench.report import fmt_seconds, format_load, p90
from bench.trigger_latency import (
    DEFAULT_GROUP,
    DOWN_TIMEOUT_S,
    HTTP_TIMEOUT_S,
    REPO_DIR,
    STATUS_TIMEOUT_S,
    UP_TIMEOUT_S,
    Deadline,
    cli,
    fetch_events,
    port_args,
    stack_ready,
)
from msi_prefect.prefect_layer.dispatch.mode import FILE_FLOWS
from msi_prefect.prefect_layer.file_history import HISTORY_KEY_PREFIX
from msi_prefect.stack.log_relay import log_files_oldest_first

REPORT_PATH = BENCH_DIR / "FILE_RATE.md"
COMMAND = "cd /work/main && .venv/bin/python -m bench.file_rate"
KIB = 1024
SENT_EVENT = "msi.file.uploaded"
DONE_EVENTS = ("msi.file.backed-up", "msi.file.metadata-extracted", "msi.file.analyzed")
# The per-file and batch actions (the audit is scheduled, not triggered by files), also the
# batch flows before process-batch (a checkout before it is measured beside the new).
DOWNSTREAM_FLOWS = FILE_FLOWS
FILE_KIB = 16


@dataclass(frozen=True)
class Scenario:
    """How files arrive: ``files`` files at ``rate`` files/s, then a drain time."""

    name: str
    files: int
    rate: float
    drain_timeout_s: float


SCENARIOS = {
    "idle": Scenario("idle", files=5, rate=0.1, drain_timeout_s=60.0),
    "burst": Scenario("burst", files=200, rate=10_000.0, drain_timeout_s=240.0),
    "sustained": Scenario("sustained", files=600, rate=10.0, drain_timeout_s=240.0),
    # Is memory flat in the number of files? (Not in the default set: 17 minutes.)
    "soak": Scenario("soak", files=10_000, rate=10.0, drain_timeout_s=300.0),
}
DEFAULT_SCENARIOS = ("idle", "burst", "sustained")
# How often the harness reads the events. Each read takes the last EVENT_OVERLAP_S of them
# again, about 1,200 at 10 files/s, so at 3 s (as before 2026-12-06) the harness's own reads
# were about 4 % of the server's core (py-spy). A file's latency comes from its events'
# times, not from when they are read: a slower read only ends a run a little later.
EVENT_POLL_S = 10.0
# Each read of the events starts this long before the newest one seen (late arrivals).
EVENT_OVERLAP_S = 30.0
RUNS_PAGE = 200
#: Downstream runs whose state history is read for the phases of their start (a request
#: each, after the run).
PHASED_RUNS = 300
RSS_SAMPLE_S = 0.5
RSS_KEYS = ("server", "worker", "flow runs")
# `MODE+NAME=VALUE` with one of these names is an option of `up`, not an environment variable.
UP_OPTIONS = {"database": "--database", "server_layout": "--server-layout"}
# The processes of the Prefect server: one, or with `--server-layout split` the API, its
# services and their Redis bus (their RSS is summed as the server's).
SERVER_COMPONENTS = ("prefect", "prefect-services", "redis")
# The server reports its queues' depths this often (msi_prefect.stack.queue_probe).
QUEUE_REPORT_S = "2"
QUEUE_REPORT_ENV = "MSI_SERVER_QUEUE_REPORT_S"
QUEUE_REPORT_PREFIX = "msi-queue-depths"
DROPPED_MESSAGE = "Subscription queue is full, dropping message"
HTTP_REQUEST = re.compile(r"HTTP Request: (?P<method>[A-Z]+) https?://[^/\s]+/api(?P<path>[^?\s]*)")
UUID_IN_PATH = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# The per-file history's calls besides its writes (msi_prefect.prefect_layer.file_history).
HISTORY_REQUESTS = ("POST /artifacts/filter", "POST /artifacts/latest/filter")


@dataclass
class ModeResult:
    """What one dispatch mode achieved in one scenario."""

    scenario: str
    mode: str
    files: int
    offered_rate: float
    first_drop: float = 0.0
    last_drop: float = 0.0
    dropped_at: dict[str, float] = field(default_factory=dict)
    sent_at: dict[str, float] = field(default_factory=dict)
    done_at: dict[str, float] = field(default_factory=dict)
    per_event: dict[str, int] = field(default_factory=dict)
    flow_runs: dict[str, int] = field(default_factory=dict)
    # created -> running of every downstream flow run, seconds.
    run_starts: list[float] = field(default_factory=list)
    # Where the start went, for the first PHASED_RUNS of them.
    start_phases: list[StartPhases] = field(default_factory=list)
    # Peak resident memory in MB: the Prefect server, the worker (with its warm server),
    # and all flow-run processes together.
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    # (files done, server MB, worker MB) over the run: is memory flat in the file count?
    rss_timeline: list[tuple[int, float, float]] = field(default_factory=list)
    # The flow runs' API requests, by method and path (ids as {id}), from the worker's log.
    api_requests: dict[str, int] = field(default_factory=dict)
    # Versions of the files' history artifacts the server holds at the end.
    history_versions: int = 0
    # CPU seconds by part of the stack from the first drop to the end (bench.cpu_ledger),
    # and the whole machine's busy CPU seconds over the same span.
    cpu_by_part: dict[str, float] = field(default_factory=dict)
    machine_busy_s: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> int:
        return len(self.done_at)

    @property
    def sustained_rate(self) -> float | None:
        if not self.done_at:
            return None
        return self.done / max(1e-6, max(self.done_at.values()) - self.first_drop)

    def drop_latencies(self) -> list[float]:
        """Drop -> done of every done file."""
        return [self.done_at[name] - self.dropped_at[name] for name in self.done_at]

    def latencies(self) -> list[float]:
        """Stable (its ``uploaded`` event) -> done of every done file."""
        return [
            self.done_at[name] - self.sent_at[name] for name in self.done_at if name in self.sent_at
        ]


class EventTally:
    """The events of the dropped files, read a page at a time as they come.

    Attributes:
        sent: When each file's ``uploaded`` event occurred.
        steps: Per file, when each of its downstream events occurred.
        newest: The newest ``occurred`` seen (the next read starts a little before it).
    """

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.sent: dict[str, float] = {}
        self.steps: dict[str, dict[str, float]] = {}
        self.newest = 0.0

    def add(self, events: list[dict[str, Any]]) -> None:
        """Take in events (a re-read one changes nothing)."""
        for event in events:
            path = (event.get("payload") or {}).get("path")
            if path not in self.names:
                continue
            occurred = _epoch(event["occurred"])
            self.newest = max(self.newest, occurred)
            if event["event"] == SENT_EVENT:
                self.sent.setdefault(path, occurred)
            else:
                self.steps.setdefault(path, {}).setdefault(event["event"], occurred)

    def done_at(self) -> dict[str, float]:
        """Per done file: when the last of its three downstream events occurred."""
        return {
            path: max(kinds.values())
            for path, kinds in self.steps.items()
            if len(kinds) == len(DONE_EVENTS)
        }

    def per_event(self) -> dict[str, int]:
        """How many files have each downstream event."""
        return {name: sum(name in k for k in self.steps.values()) for name in DONE_EVENTS}


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


def _count_history_versions(client: httpx.Client) -> int:
    """Versions of the per-file history artifacts on the server (keys ``file-...``)."""
    response = client.post(
        "/artifacts/count", json={"artifacts": {"key": {"like_": f"{HISTORY_KEY_PREFIX}-"}}}
    )
    response.raise_for_status()
    return int(response.json())


@dataclass(frozen=True)
class StartPhases:
    """Where a downstream run's start went, from its state history (seconds)."""

    #: created -> Pending: the worker heard of the run, polled and took it.
    to_pending: float
    #: Pending -> RUNNING: the worker's job configuration, the run's process (launcher,
    #: fork) and Prefect's engine up to its request for RUNNING.
    to_running: float


def _start_phases(client: httpx.Client, runs: list[dict[str, Any]]) -> list[StartPhases]:
    """The start phases of ``runs`` (one request each)."""
    phases = []
    for run in runs:
        response = client.get("/flow_run_states/", params={"flow_run_id": run["id"]})
        response.raise_for_status()
        first: dict[str, float] = {}
        for state in sorted(response.json(), key=lambda state: state["timestamp"]):
            first.setdefault(state["type"], _epoch(state["timestamp"]))
        if "PENDING" in first and "RUNNING" in first:
            pending = first["PENDING"]
            phases.append(StartPhases(pending - _epoch(run["created"]), first["RUNNING"] - pending))
    return phases


def _run_starts(client: httpx.Client) -> tuple[list[float], list[StartPhases]]:
    """created -> running (s) of every downstream flow run that started, and the phases of
    the first :data:`PHASED_RUNS` of them."""
    starts = []
    started_runs: list[dict[str, Any]] = []
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
        started = [run for run in page if run.get("start_time")]
        starts += [_epoch(run["start_time"]) - _epoch(run["created"]) for run in started]
        started_runs += started[: max(0, PHASED_RUNS - len(started_runs))]
        if len(page) < RUNS_PAGE:
            break
    return starts, _start_phases(client, started_runs)


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _sample_rss(api_url: str, server_pids: list[int], worker_pid: int, result: ModeResult) -> None:
    """Record the RSS of the server, the worker (+ warm server) and the flow runs."""
    wanted = f"PREFECT_API_URL={api_url}".encode()
    worker = _rss_mb(worker_pid)
    flow_runs = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in (*server_pids, worker_pid):
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
    server = sum(_rss_mb(pid) for pid in server_pids)
    for key, value in (("server", server), ("worker", worker), ("flow runs", flow_runs)):
        result.peak_rss_mb[key] = round(max(result.peak_rss_mb.get(key, 0.0), value), 1)
    result.rss_timeline.append((result.done, round(server, 1), round(worker, 1)))


def _drop(
    scenario: Scenario, names: list[str], watch: Path, staging: Path, result: ModeResult
) -> None:
    """Drop the files into the watched folder at the scenario's rate."""
    next_at = time.monotonic()
    for name in names:
        time.sleep(max(0.0, next_at - time.monotonic()))
        next_at += 1.0 / scenario.rate
        result.dropped_at[name] = write_replace(watch, staging, name, os.urandom(FILE_KIB * KIB))


def run_mode(scenario: Scenario, mode: str, opts: argparse.Namespace) -> ModeResult:
    """Bring a stack up with one dispatch mode, push the files through, bring it down."""
    result = ModeResult(scenario.name, mode, files=scenario.files, offered_rate=scenario.rate)
    mode, *assignments = mode.split("+")
    mode, _, code = mode.partition("@")
    deadline = Deadline(opts.timeout)
    settings = dict(a.split("=", 1) for a in assignments)
    up_options = [
        arg for name, value in settings.items() if name in UP_OPTIONS
        for arg in (UP_OPTIONS[name], value)
    ]  # fmt: skip
    extra_env = {name: value for name, value in settings.items() if name not in UP_OPTIONS}
    extra_env.setdefault(QUEUE_REPORT_ENV, QUEUE_REPORT_S)
    if code:
        extra_env["PYTHONPATH"] = code
    # Its CLI too (`up` writes the command lines and settings of everything it starts).
    checkout = Path(code) if code else REPO_DIR
    work = Path(tempfile.mkdtemp(prefix=f"msi-file-rate-{scenario.name}-{mode}-"))
    state, watch, dest, staging = (work / n for n in ("state", "inbox", "received", "staging"))
    staging.mkdir()
    log = work / "cli.log"
    result.notes["work_dir"] = str(work)
    try:
        up_args = ["up", "--storage", "memory", "--dispatch", mode, "--watch-dir", str(watch)]
        up_args += ["--destination-dir", str(dest), *up_options, *port_args()]
        tag = f"{scenario.name}/{result.mode}"
        print(f"[{tag}] msi-prefect up ...", flush=True)
        started = time.monotonic()
        up = cli(state, up_args, log, UP_TIMEOUT_S, extra_env, checkout)
        if up.returncode != 0:
            raise RuntimeError(f"up failed (exit {up.returncode}), see {log}")
        result.notes["up_s"] = round(time.monotonic() - started, 1)
        status = json.loads(
            cli(state, ["status", "--json"], log, STATUS_TIMEOUT_S, extra_env, checkout).stdout
        )
        pids = {row["name"]: row["pid"] for row in status["components"]}
        server_pids = [pids[name] for name in SERVER_COMPONENTS if pids.get(name)]
        result.notes["load_at_drop"] = format_load(os.getloadavg())
        api_url = status["prefect_api_url"]
        with httpx.Client(base_url=status["prefect_api_url"], timeout=HTTP_TIMEOUT_S) as client:
            stack_ready(client, status["bootstrap_servers"], DEFAULT_GROUP, result.notes, deadline)
            stamp = time.strftime("%H%M%S")
            names = [f"rate-{mode}-{stamp}-{i:04d}.bin" for i in range(scenario.files)]
            # The files are dropped by a thread while this one watches memory, CPU and events.
            dropper = threading.Thread(
                target=_drop, args=(scenario, names, watch, staging, result), daemon=True
            )
            ledger = CpuLedger({pid: name for name, pid in pids.items() if pid}, pids["worker"])
            ledger.sample()
            dropper.start()
            tally = EventTally(set(names))
            limit = float("inf")
            while time.monotonic() < limit and not deadline.passed():
                sample_until = time.monotonic() + EVENT_POLL_S
                while time.monotonic() < sample_until:
                    _sample_rss(api_url, server_pids, pids["worker"], result)
                    ledger.sample()
                    time.sleep(RSS_SAMPLE_S)
                if not dropper.is_alive() and limit == float("inf"):
                    result.notes["load_after_drops"] = format_load(os.getloadavg())
                    print(f"[{tag}] dropped {len(names)} files", flush=True)
                    limit = time.monotonic() + scenario.drain_timeout_s
                if not result.dropped_at:
                    continue
                since = max(min(result.dropped_at.values()) - 60, tally.newest - EVENT_OVERLAP_S)
                try:
                    tally.add(fetch_events(client, since, (SENT_EVENT, *DONE_EVENTS)))
                except httpx.HTTPError as exc:
                    print(f"[{tag}] event read failed: {exc!r}", flush=True)
                    continue
                result.done_at, result.sent_at = tally.done_at(), tally.sent
                result.per_event = tally.per_event()
                print(f"[{tag}] done {result.done}/{len(names)} {result.per_event}", flush=True)
                if result.done == len(names):
                    break
            dropper.join()
            _sample_rss(api_url, server_pids, pids["worker"], result)  # with the final count
            ledger.sample()
            result.cpu_by_part = ledger.by_part()
            result.machine_busy_s = ledger.machine_busy_s
            result.first_drop = min(result.dropped_at.values())
            result.last_drop = max(result.dropped_at.values())
            # A starved harness drops more slowly than asked: the rate really offered.
            result.notes["dropped_in_s"] = round(result.last_drop - result.first_drop, 1)
            try:
                result.flow_runs = _count_runs(client)
                result.history_versions = _count_history_versions(client)
                result.run_starts, result.start_phases = _run_starts(client)
            except httpx.HTTPError as exc:
                result.notes["run_count_error"] = repr(exc)
    finally:
        result.notes.update(server_queue_notes(state / "logs" / "prefect.log"))
        result.api_requests = flow_run_requests(state / "logs" / "worker.log")
        print(f"[{scenario.name}/{result.mode}] msi-prefect down ...", flush=True)
        try:
            down = cli(state, ["down"], log, DOWN_TIMEOUT_S, extra_env, checkout)
            result.notes["down_exit"] = down.returncode
        except subprocess.TimeoutExpired:
            result.notes["down_exit"] = "timeout"
    return result


def server_queue_notes(server_log: Path) -> dict[str, Any]:
    """Events the server's queues dropped, and each subscription's deepest queue.

    Args:
        server_log: The Prefect server's log of the run's stack.
    """
    try:
        lines = [
            line
            for path in log_files_oldest_first(server_log)
            for line in path.read_text(errors="replace").splitlines()
        ]
    except OSError:
        return {}
    deepest: dict[str, int] = {}
    for line in lines:
        if not line.startswith(QUEUE_REPORT_PREFIX):
            continue
        for item in line.split()[2:]:
            name, _, depths = item.partition("=")
            depth = sum(int(part) for part in depths.split("+") if part.isdigit())
            deepest[name] = max(deepest.get(name, 0), depth)
    return {
        "server_dropped_messages": sum(DROPPED_MESSAGE in line for line in lines),
        "deepest_server_queues": {k: v for k, v in sorted(deepest.items()) if v},
    }


def flow_run_requests(worker_log: Path) -> dict[str, int]:
    """The flow runs' API requests, counted by method and path (``POST /artifacts/filter``).

    The flow-run processes' output goes to the worker's log, where httpx logs each request
    (``HTTP Request: POST http://.../api/artifacts/filter "HTTP/1.1 200 OK"``); ids in a
    path are written ``{id}`` and the query string is left out.

    Args:
        worker_log: The worker's log of the run's stack.
    """
    counts: dict[str, int] = {}
    try:
        paths = log_files_oldest_first(worker_log)
        for path in paths:
            with path.open(errors="replace") as lines:
                for line in lines:
                    match = HTTP_REQUEST.search(line)
                    if match:
                        name = f"{match['method']} {UUID_IN_PATH.sub('{id}', match['path'])}"
                        counts[name] = counts.get(name, 0) + 1
    except OSError:
        return {}
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def _requests_row(result: ModeResult) -> str:
    requests = result.api_requests
    total = sum(requests.values())
    artifacts = sum(n for name, n in requests.items() if name.split()[1].startswith("/artifacts"))
    history = sum(requests.get(name, 0) for name in HISTORY_REQUESTS)
    queries = requests.get("POST /events/filter", 0)
    files = result.done or 0

    # Steps done: the backups, metadata and analyses on the server (of files not all done too).
    steps = sum(result.per_event.values())

    def per_file(count: int) -> str:
        return f"{count / files:.1f}" if files else "-"

    def per_step(count: int) -> str:
        return f"{count / steps:.2f}" if steps else "-"

    return (
        f"| {result.scenario} | {result.mode} | {files} | {total} | {per_file(total)} "
        f"| {artifacts} ({100 * artifacts / total if total else 0:.0f} %) | {per_file(artifacts)} "
        f"| {per_file(history)} | {per_file(queries)} | {per_file(result.history_versions)} "
        f"| {result.history_versions} ({per_step(result.history_versions)}) "
        f"| {per_step(total)} |"
    )


def _row(result: ModeResult) -> str:
    latencies, drops = result.latencies(), result.drop_latencies()
    rate = result.sustained_rate
    runs = ", ".join(f"{name} {n}" for name, n in result.flow_runs.items()) or "-"
    starts = result.run_starts
    return (
        f"| {result.scenario} | {result.mode} | {result.done}/{result.files} "
        f"| {fmt_seconds(statistics.median(latencies) if latencies else None)} "
        f"| {fmt_seconds(p90(latencies) if latencies else None)} "
        f"| {fmt_seconds(max(latencies) if latencies else None)} "
        f"| {fmt_seconds(statistics.median(drops) if drops else None)} "
        f"| {'-' if rate is None else f'{rate:.2f}'} "
        f"| {fmt_seconds(statistics.median(starts) if starts else None)} "
        f"| {' / '.join(str(result.peak_rss_mb.get(k, '-')) for k in RSS_KEYS)} | {runs} |"
    )


def _phases_line(result: ModeResult) -> str:
    phases = result.start_phases
    if not phases:
        return f"- {result.scenario}/{result.mode}: no run started"
    pending = [phase.to_pending for phase in phases]
    running = [phase.to_running for phase in phases]
    return (
        f"- {result.scenario}/{result.mode}: {len(phases)} runs; created -> Pending "
        f"{fmt_seconds(statistics.median(pending))} (p90 {fmt_seconds(p90(pending))}), "
        f"Pending -> RUNNING {fmt_seconds(statistics.median(running))} "
        f"(p90 {fmt_seconds(p90(running))})"
    )


def report(
    results: list[ModeResult], opts: argparse.Namespace, load: tuple[float, float, float]
) -> str:
    """The markdown report of one run."""
    argv = " ".join(sys.argv[1:])
    lines = [
        "# What a user waits for: a stable file to its backup, metadata and analysis",
        "",
        f"- Command: `{COMMAND}{(' ' + argv) if argv else ''}`",
        "- Code under test: this checkout, or DIR for a mode written `MODE@DIR`.",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
        f"- {os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()};"
        " a shared machine that may be busy.",
        f"- Load average at start: {format_load(load)}; at end: {format_load(os.getloadavg())}.",
        "- Per scenario and mode: a fresh embedded stack (`up --storage memory --dispatch "
        f"MODE`), files of {FILE_KIB} KiB. A file is done when its `msi.file.backed-up`, "
        "`msi.file.metadata-extracted` and `msi.file.analyzed` events are all on the "
        "server; latency is from its `msi.file.uploaded` event (sent once stable) to the "
        "last of them. Scenarios: "
        + "; ".join(f"{s.name} = {s.files} files at {s.rate:g}/s" for s in _scenarios(opts))
        + ".",
        "",
        "| scenario | dispatch | files done | stable -> done median (s) | p90 (s) | max (s) "
        "| drop -> done median (s) | files/s done | run created -> running median (s) "
        "| peak RSS MB (server / worker / flow runs) | downstream flow runs created |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *(_row(result) for result in results),
        "",
        "Where a downstream run's start went (medians over the first "
        f"{PHASED_RUNS} runs, from their state history): created -> Pending (the worker "
        "heard of the run and took it), Pending -> RUNNING (its job configuration, its "
        "process, Prefect's engine until it asked for RUNNING):",
        "",
        *(_phases_line(result) for result in results),
        "",
        "Events counted (distinct files) and notes:",
        "",
    ]
    lines += [f"- {r.scenario}/{r.mode}: {r.per_event}; {r.notes}" for r in results]
    lines += [
        "",
        "The flow runs' API requests (counted from the worker's log, where httpx logs each "
        "request of a flow-run process; all flows, the long-running ones too), per file done:",
        "",
        "| scenario | dispatch | files done | requests | per file | artifacts (share) "
        "| artifacts per file | artifact reads per file (`/artifacts/filter`, "
        "`/artifacts/latest/filter`) | `/events/filter` per file "
        "| history versions per file | history versions (per step done) "
        "| requests per step done |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(_requests_row(r) for r in results),
        "",
        "Requests by path, the most frequent first:",
        "",
    ]
    lines += [
        f"- {r.scenario}/{r.mode}: "
        + ", ".join(f"{name} {count}" for name, count in list(r.api_requests.items())[:15])
        for r in results
    ]
    lines += [
        "",
        "CPU seconds per file done, by part of the stack, from the first drop to the end "
        "(bench/cpu_ledger.py; 'machine' is the whole machine's busy time, others' work "
        "too; a run's last half second is not seen):",
        "",
        *(_cpu_line(r) for r in results),
    ]
    lines += ["", "Memory in the number of files (server / worker RSS, MB):", ""]
    lines += [f"- {r.scenario}/{r.mode}: {_memory_trend(r)}" for r in results]
    return "\n".join(lines) + "\n"


def _cpu_line(result: ModeResult) -> str:
    if not result.done or not result.cpu_by_part:
        return f"- {result.scenario}/{result.mode}: n/a"
    parts = ", ".join(
        f"{part} {seconds / result.done:.3f}" for part, seconds in result.cpu_by_part.items()
    )
    total = sum(result.cpu_by_part.values())
    return (
        f"- {result.scenario}/{result.mode}: {parts}; stack {total / result.done:.3f}, "
        f"machine {result.machine_busy_s / result.done:.3f} "
        f"({total:.0f} and {result.machine_busy_s:.0f} CPU s in all)"
    )


def _memory_trend(result: ModeResult) -> str:
    """RSS once a tenth of the files were done (after warm-up) against at the end, and the
    RSS at each further tenth (a soak's growth curve)."""
    timeline = result.rss_timeline
    if not timeline or not result.done:
        return "n/a"
    warm = next((row for row in timeline if row[0] >= result.done / 10), timeline[0])
    end = timeline[-1]
    tenths = [
        next((row for row in timeline if row[0] >= result.done * tenth / 10), end)
        for tenth in range(1, 11)
    ]
    curve = ", ".join(f"{row[0]}: {row[1]:.0f}/{row[2]:.0f}" for row in tenths)
    return (
        f"{warm[1]} / {warm[2]} with {warm[0]} files done -> {end[1]} / {end[2]} with {end[0]} "
        f"done; at each tenth of the files done (files: server/worker MB): {curve}"
    )


def _scenarios(opts: argparse.Namespace) -> list[Scenario]:
    chosen = []
    for name in opts.scenarios:
        if name == "custom":
            chosen.append(Scenario("custom", opts.files, opts.rate, opts.drain_timeout))
        else:
            chosen.append(SCENARIOS[name])
    return chosen


def main() -> int:
    """Run every scenario in every mode, one after the other, and report them side by side."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--scenarios", nargs="+", default=list(DEFAULT_SCENARIOS), choices=[*SCENARIOS, "custom"]
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["adaptive"],
        help="dispatch modes; MODE@DIR runs that mode from the checkout DIR, "
        "MODE+NAME=VALUE with an environment variable set for the stack",
    )
    parser.add_argument("--files", type=int, default=60, help="custom: files")
    parser.add_argument("--rate", type=float, default=2.0, help="custom: files dropped per s")
    parser.add_argument("--drain-timeout", type=float, default=240.0, help="custom: s to drain")
    parser.add_argument("--timeout", type=float, default=900.0, help="overall s per run")
    parser.add_argument("--report", type=Path, default=REPORT_PATH, help="markdown report")
    parser.add_argument("--no-write", action="store_true", help="do not write the report")
    opts = parser.parse_args()
    if opts.files < 1 or opts.rate <= 0:
        parser.error("--files must be >= 1 and --rate > 0")
    load = os.getloadavg()
    results = []
    for scenario in _scenarios(opts):
        for mode in opts.modes:
            try:
                results.append(run_mode(scenario, mode, opts))
            except Exception as exc:  # one mode that cannot start must not lose the others
                print(f"[{scenario.name}/{mode}] failed: {exc!r}", flush=True)
                failed = ModeResult(scenario.name, mode, scenario.files, scenario.rate)
                failed.notes["error"] = repr(exc)
                results.append(failed)
    text = report(results, opts, load)
    print(text)
    if not opts.no_write:
        opts.report.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
