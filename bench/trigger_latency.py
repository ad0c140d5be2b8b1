"""Prefect-layer latency: from "file stable" to "its ``backup-file`` run created".

Target: "the latency from a file becoming stable to its ``backup-file`` run being created:
under 2 s median on the embedded stack".

Method:

1. A private, full embedded stack is started with the project CLI, exactly as a user does:
   ``python -m msi_prefect.cli --state-dir STATE up --storage memory --watch-dir W
   --destination-dir D --port NAME=PORT ...`` in a temporary directory, on free loopback
   ports (``msi_prefect.stack.config.free_port_map()``). That starts the S3 store, the Tansu broker,
   the Prefect server and a process worker, deploys every flow of ``prefect.yaml`` and
   starts the long-running ``watch-directory`` and ``reconstruct-files`` runs.
   ``msi_prefect.cli --state-dir STATE down`` always runs at the end.
2. The Prefect API URL comes from ``status --json``. The harness waits until both
   long-running runs are RUNNING and the reassembler's consumer group is STABLE, then
   a few seconds more.
3. ``N`` files are dropped into W, one every ``--interval`` seconds: each is written under a
   temporary name outside W, then ``os.replace``-d into it; ``t0`` is the time just after
   the rename returns. The file becomes stable at ``t_stable = t0 + window`` (the
   ``stability_window_s`` of the ``embedded`` TransferSettings block, 2 s by default).
4. A thread stats D every 10 ms (``rebuilt``: the first stat showing the full size; the
   reassembler renames verified files into place). Another thread lists the runs of the
   ``backup-file`` deployment every second and matches them to files by their ``path``
   parameter. A run is created by the deployment trigger under a generated name and gets
   its ``backup <path>`` name only when the flow starts, so matching by name would only find
   it after it started; the poll time does not matter anyway, since the figures use the
   server's own ``created``, ``expected_start_time``, ``start_time`` and ``end_time``.
   The harness waits (bounded) until every run is in a final state.
5. The ``msi.file.uploaded`` and ``msi.file.reconstructed`` events are read back from
   ``/events/filter`` (``occurred`` is stamped by the emitting flow, ``received`` by the
   server), and so are the server's ``prefect.automation.action.triggered`` (when the
   trigger fired) and ``prefect.automation.action.executed`` (which run it created) events.
   Together they split the latency into its stages.

Everything runs on one machine, so client and server clocks are the same clock.
Results go to stdout and to ``bench/TRIGGER_LATENCY.md``.

Usage::

    .venv/bin/python -m bench.trigger_latency
    .venv/bin/python -m bench.trigger_latency --files 5 --no-write --keep
    .venv/bin/python -m bench.trigger_latency --files 6 --interval 12 --log-retryable --no-write

``--log-retryable`` starts the stack with ``PREFECT_SERVER_LOG_RETRYABLE_ERRORS=true`` (a
logging setting only), so the report can count the SQLite write conflicts that the server
answers with HTTP 503.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    BENCH_DIR,
    wait_for_other_bench,
    wait_group_stable,
    write_replace,
)
from bench.report import fmt_seconds, machine_lines, minus, p90
from msi_prefect.prefect_layer.event_queries import event_pages
from msi_prefect.stack.config import free_port_map
from msi_prefect.stack.log_relay import log_files_oldest_first

REPO_DIR = BENCH_DIR.parent
REPORT_PATH = BENCH_DIR / "TRIGGER_LATENCY.md"
COMMAND = "cd /work/main && .venv/bin/python -m bench.trigger_latency"

KIB = 1024
TARGET_S = 2.0
"""The target: median (backup run created - t_stable) below this."""
DEFAULT_WINDOW_S = 2.0
"""Stability window assumed when the ``embedded`` TransferSettings block cannot be read."""
BACKUP_DEPLOYMENT = ("backup-file", "backup-file")
TRANSFER_BLOCK = ("msi-transfer-settings", "embedded")
DEFAULT_GROUP = "msi-reassembler"
LONG_RUNNING = ("watch-directory", "reconstruct-files")
UP_TIMEOUT_S = 240.0
DOWN_TIMEOUT_S = 120.0
STATUS_TIMEOUT_S = 60.0
RUNNING_TIMEOUT_S = 60.0
"""How long the long-running runs may take to be RUNNING after ``up`` returned."""
GROUP_TIMEOUT_S = 30.0
SETTLE_S = 3.0
"""Extra pause once the consumer group is STABLE."""
DEST_POLL_S = 0.01
API_POLL_S = 1.0
"""Period of the run poller. The figures use the server's timestamps, so a slow poll
costs no precision, and it keeps the harness's own load on the server low."""
HTTP_TIMEOUT_S = 10.0
FINAL_HTTP_TIMEOUT_S = 75.0
"""HTTP timeout of the final reads: longer than SQLite's 60 s busy timeout in the server."""
RUN_TIMEOUT_S = 60.0
"""A file without a ``backup-file`` run this long after ``t_stable`` counts as missed."""
FINISH_TIMEOUT_S = 90.0
"""How long to wait, after the last file, for every backup run to reach a final state."""
STALL_S = 10.0
"""Event-to-run longer than this counts as "queued or stalled" (a breakdown only)."""
RETRYABLE_ENV = "PREFECT_SERVER_LOG_RETRYABLE_ERRORS"
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})


# --------------------------------------------------------------------------- records


@dataclasses.dataclass
class Sample:
    """One file's journey, as ``time.time()`` values (``None`` when not observed).

    Attributes:
        name: File name (also its relative path, the run's ``path`` parameter).
        size: Size in bytes.
        t0: Just after the rename into W returned.
        t_stable: ``t0`` plus the stability window.
        rebuilt: First 10 ms stat of D that showed the file at full size.
        uploaded_occurred: ``occurred`` of its ``msi.file.uploaded`` event.
        reconstructed_occurred: ``occurred`` of its ``msi.file.reconstructed`` event.
        reconstructed_received: ``received`` (server side) of that event.
        event_id: Id of that event.
        fired: When the server's trigger fired for the ``backup-file`` automation (the
            ``occurred`` of its ``prefect.automation.action.triggered`` event).
        action_rank: Position of the ``backup-file`` action among the actions that the
            same event triggered (1 = executed first), by ``action.executed`` time.
        run_id: Id of its ``backup-file`` run.
        runs: How many ``backup-file`` runs named this path.
        created: The run's ``created``.
        expected_start: The run's ``expected_start_time``.
        start: The run's ``start_time``.
        end: The run's ``end_time``.
        found_at: When the harness first saw the run (1 s polls).
        named_at: When the harness first saw it named ``backup <name>``.
        first_name: The run's name when first seen.
        state: The run's last seen state type.
    """

    name: str
    size: int
    t0: float
    t_stable: float
    rebuilt: float | None = None
    uploaded_occurred: float | None = None
    reconstructed_occurred: float | None = None
    reconstructed_received: float | None = None
    event_id: str | None = None
    fired: float | None = None
    action_rank: int | None = None
    run_id: str | None = None
    runs: int = 0
    created: float | None = None
    expected_start: float | None = None
    start: float | None = None
    end: float | None = None
    found_at: float | None = None
    named_at: float | None = None
    first_name: str | None = None
    state: str | None = None

    def settled(self, now: float) -> bool:
        """Whether the harness need not wait for this file any longer.

        Args:
            now: Current ``time.time()``.

        Returns:
            True once its run is in a final state, or no run appeared in time.
        """
        if self.run_id is None:
            return now - self.t_stable > RUN_TIMEOUT_S
        return self.state in FINAL_STATES


@dataclasses.dataclass(frozen=True)
class Metric:
    """One derived figure of every sample.

    Attributes:
        key: Short name.
        label: Markdown label.
        value: Computes the figure of one sample, or ``None``.
    """

    key: str
    label: str
    value: Callable[[Sample], float | None]


HEADLINE = (
    Metric(
        "target",
        "**stable -> `backup-file` run created** (target < 2 s)",
        lambda s: minus(s.created, s.t_stable),
    ),
    Metric("rebuilt", "stable -> rebuilt in D", lambda s: minus(s.rebuilt, s.t_stable)),
    Metric("start", "run created -> run started", lambda s: minus(s.start, s.created)),
)
STAGES = (
    Metric(
        "sent",
        "stable -> `msi.file.uploaded` occurred (watcher, producer)",
        lambda s: minus(s.uploaded_occurred, s.t_stable),
    ),
    Metric(
        "consumer",
        "`uploaded` -> rebuilt in D (broker, reassembler)",
        lambda s: minus(s.rebuilt, s.uploaded_occurred),
    ),
    Metric(
        "emit",
        "rebuilt in D -> `msi.file.reconstructed` occurred",
        lambda s: minus(s.reconstructed_occurred, s.rebuilt),
    ),
    Metric(
        "deliver",
        "`reconstructed` occurred -> received by the server",
        lambda s: minus(s.reconstructed_received, s.reconstructed_occurred),
    ),
    Metric(
        "server",
        "event received -> run created (trigger and action, together)",
        lambda s: minus(s.created, s.reconstructed_received),
    ),
    Metric(
        "fire",
        "... event received -> trigger fired",
        lambda s: minus(s.fired, s.reconstructed_received),
    ),
    Metric(
        "queue",
        "... trigger fired -> action begins (`expected_start_time`): actions queue, "
        "deployment lookup",
        lambda s: minus(s.expected_start, s.fired),
    ),
    Metric(
        "create",
        "... action begins -> run created: parameter rendering, create-run API call",
        lambda s: minus(s.created, s.expected_start),
    ),
    Metric(
        "start",
        "run created -> started (worker poll, process start)",
        lambda s: minus(s.start, s.created),
    ),
    Metric("flow", "run started -> ended (the backup flow)", lambda s: minus(s.end, s.start)),
    Metric("ended", "stable -> backup run ended", lambda s: minus(s.end, s.t_stable)),
    Metric(
        "named",
        "run created -> seen named `backup <path>` (1 s polls)",
        lambda s: minus(s.named_at, s.created),
    ),
)


def figures(metric: Metric, samples: Sequence[Sample]) -> tuple[int, float, float, float] | None:
    """Summarise one metric.

    Args:
        metric: What to compute.
        samples: Every file.

    Returns:
        Count, median, p90 and max in seconds, or ``None`` when no sample has it.
    """
    values = [v for v in (metric.value(s) for s in samples) if v is not None]
    if not values:
        return None
    return len(values), statistics.median(values), p90(values), max(values)


def metric_rows(metrics: Sequence[Metric], samples: Sequence[Sample]) -> list[str]:
    """Return markdown table rows for some metrics.

    Args:
        metrics: Rows to produce.
        samples: Every file.

    Returns:
        One ``| label | n | median | p90 | max |`` line per metric.
    """
    rows = []
    for metric in metrics:
        found = figures(metric, samples)
        if found is None:
            rows.append(f"| {metric.label} | 0/{len(samples)} | n/a | n/a | n/a |")
            continue
        n, median, p90, top = found
        rows.append(
            f"| {metric.label} | {n}/{len(samples)} | {median:.3f} | {p90:.3f} | {top:.3f} |"
        )
    return rows


def metric_table(metrics: Sequence[Metric], samples: Sequence[Sample]) -> str:
    """Return a markdown table of some metrics.

    Args:
        metrics: Rows to produce.
        samples: Every file.

    Returns:
        The table.
    """
    head = ["| interval | n | median (s) | p90 (s) | max (s) |", "|---|---|---|---|---|"]
    return "\n".join(head + metric_rows(metrics, samples))


def per_file_table(samples: Sequence[Sample]) -> str:
    """Return one markdown row per file, times relative to ``t_stable``.

    Args:
        samples: Every file.

    Returns:
        The table.
    """
    lines = [
        "| # | file | rebuilt | `reconstructed` occurred | received | trigger fired "
        "| action begins | run created | backup action's rank | run started | run ended "
        "| final state | first name |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for index, s in enumerate(samples, 1):
        cells = [
            minus(s.rebuilt, s.t_stable),
            minus(s.reconstructed_occurred, s.t_stable),
            minus(s.reconstructed_received, s.t_stable),
            minus(s.fired, s.t_stable),
            minus(s.expected_start, s.t_stable),
            minus(s.created, s.t_stable),
        ]
        later = [minus(s.start, s.t_stable), minus(s.end, s.t_stable)]
        extra = f" ({s.runs} runs)" if s.runs > 1 else ""
        lines.append(
            f"| {index} | `{s.name}` | "
            + " | ".join(fmt_seconds(c) for c in cells)
            + f" | {s.action_rank or 'n/a'} | "
            + " | ".join(fmt_seconds(c) for c in later)
            + f" | {s.state or 'no run'}{extra} | `{s.first_name or ''}` |"
        )
    return "\n".join(lines)


def verdict(samples: Sequence[Sample]) -> tuple[bool, str]:
    """Judge the target.

    Args:
        samples: Every file.

    Returns:
        Whether the median met the target, and a sentence saying so.
    """
    values = [HEADLINE[0].value(s) for s in samples]
    present = sorted(v for v in values if v is not None)
    missed = len(values) - len(present)
    if not samples:
        return False, "no file was dropped: **not met**"
    # A file without a run counts as slower than any file with one.
    median = statistics.median([*present, *([math.inf] * missed)])
    ok = median < TARGET_S and not missed
    word = "met" if ok else "**not met**"
    shown = (
        f"{median:.3f} s"
        if math.isfinite(median)
        else f"unbounded (more than half the files had no run within {RUN_TIMEOUT_S:g} s)"
    )
    with_run = f"{p90(present):.3f} s" if present else "n/a"
    return ok, (
        f"median stable -> `backup-file` run created over all {len(samples)} files, a file "
        f"without a run counting as slowest = {shown}; {missed} files without a run; "
        f"p90 of the files with a run {with_run}; target < {TARGET_S:g} s: {word}"
    )


# --------------------------------------------------------------------------- helpers


def _ts(text: str | None) -> float | None:
    """Parse a Prefect ISO timestamp into a ``time.time()`` value."""
    if not text:
        return None
    return datetime.fromisoformat(text).timestamp()


def _iso(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).isoformat()


class Deadline:
    """An overall time limit.

    Args:
        seconds: Seconds from now.
    """

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def left(self) -> float:
        """Seconds left (negative once passed)."""
        return self.at - time.monotonic()

    def passed(self) -> bool:
        """Whether the limit has passed."""
        return self.left() <= 0


def cli(
    state: Path,
    args: Sequence[str],
    log: Path,
    timeout: float,
    extra_env: dict[str, str] | None = None,
    checkout: Path = REPO_DIR,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m msi_prefect.cli --state-dir STATE ARGS`` and log its output.

    Args:
        state: State directory.
        args: Subcommand and its arguments.
        log: File receiving the command line, stdout and stderr.
        timeout: Seconds before the command is killed.
        extra_env: Variables added to this process's environment for the command.
        checkout: The checkout whose CLI runs (its working directory: ``python -m`` puts
            it first on ``sys.path``, before ``PYTHONPATH``).

    Returns:
        The finished process.

    Raises:
        subprocess.TimeoutExpired: It ran longer than ``timeout``.
    """
    command = [sys.executable, "-m", "msi_prefect.cli", "--state-dir", str(state), *args]
    with log.open("a", encoding="utf-8") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        result = subprocess.run(
            command,
            cwd=checkout,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, **extra_env} if extra_env else None,
        )
        out.write(result.stdout + result.stderr + f"[exit {result.returncode}]\n")
    return result


RETRYABLE_MARK = "Encountered retryable exception in request"


def _lines_of(paths: list[Path]) -> Iterator[str]:
    for path in paths:
        with path.open(encoding="utf-8", errors="replace") as log:
            yield from log


def scan_server_log(path: Path, limit: int = 12) -> tuple[list[str], dict[str, int]]:
    """Read the Prefect server's log for errors.

    Args:
        path: The log file.
        limit: At most this many ERROR lines are returned.

    Returns:
        The ERROR lines other than retryable ones (shortened, at most ``limit`` plus a
        count of the rest), and the retryable errors (logged only with
        ``--log-retryable``) counted by the first words of the SQL statement that failed.
    """
    found: list[str] = []
    retryable: dict[str, int] = {}
    pending = False
    try:
        for line in _lines_of(log_files_oldest_first(path)):
            if RETRYABLE_MARK in line:
                if pending:
                    retryable["(no SQL shown)"] = retryable.get("(no SQL shown)", 0) + 1
                pending = True
            elif pending and line.startswith("[SQL: "):
                key = " ".join(line[6:].split()[:3])
                retryable[key] = retryable.get(key, 0) + 1
                pending = False
            elif "| ERROR" in line:
                found.append(" ".join(line.split())[:160])
    except OSError:
        return [], {}
    if pending:
        retryable["(no SQL shown)"] = retryable.get("(no SQL shown)", 0) + 1
    if len(found) > limit:
        found = [*found[:limit], f"... and {len(found) - limit} more"]
    return found, retryable


def port_args() -> list[str]:
    """Return ``--port NAME=PORT`` arguments for a free loopback port per server."""
    args: list[str] = []
    for name, port in free_port_map().items():
        args += ["--port", f"{name}={port}"]
    return args


# --------------------------------------------------------------------------- observers


class DestinationPoller:
    """Stats D every 10 ms for outstanding files and records when each is complete.

    Args:
        dest: Destination folder.
    """

    def __init__(self, dest: Path) -> None:
        self._dest = dest
        self._lock = threading.Lock()
        self._outstanding: dict[str, Sample] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dest-poller", daemon=True)
        self._thread.start()

    def expect(self, sample: Sample) -> None:
        """Start watching for a file.

        Args:
            sample: The file; its ``rebuilt`` is set when it is found complete.
        """
        with self._lock:
            self._outstanding[sample.name] = sample

    def close(self) -> None:
        """Stop the polling thread."""
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(DEST_POLL_S):
            with self._lock:
                waiting = list(self._outstanding.values())
            for sample in waiting:
                try:
                    size = (self._dest / sample.name).stat().st_size
                except OSError:
                    continue
                if size == sample.size:
                    sample.rebuilt = time.time()
                    with self._lock:
                        self._outstanding.pop(sample.name, None)


class RunPoller:
    """Lists the ``backup-file`` runs every second and attaches them to the samples.

    Args:
        api: Prefect API URL.
        deployment_id: Id of the ``backup-file`` deployment.
    """

    def __init__(self, api: str, deployment_id: str) -> None:
        self._client = httpx.Client(base_url=api, timeout=HTTP_TIMEOUT_S)
        self._deployment_id = deployment_id
        self._lock = threading.Lock()
        self._samples: dict[str, Sample] = {}
        self.errors = 0
        self.slowest = 0.0
        """Longest poll in seconds (a stalled server answers late or not at all)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="run-poller", daemon=True)
        self._thread.start()

    def expect(self, sample: Sample) -> None:
        """Start matching runs to a file.

        Args:
            sample: The file.
        """
        with self._lock:
            self._samples[sample.name] = sample

    def stop(self) -> None:
        """Stop the polling thread (:meth:`poll` still works)."""
        self._stop.set()
        self._thread.join(timeout=HTTP_TIMEOUT_S + 5)

    def close(self) -> None:
        """Stop the polling thread and close the HTTP client."""
        self.stop()
        self._client.close()

    def poll(self, client: httpx.Client | None = None) -> None:
        """List the deployment's runs once and update the samples.

        Args:
            client: Client to use instead of the poller's own (e.g. a longer timeout).
        """
        asked = time.time()
        response = (client or self._client).post(
            "/flow_runs/filter",
            json={
                "deployments": {"id": {"any_": [self._deployment_id]}},
                "sort": "EXPECTED_START_TIME_ASC",
                "limit": 200,
            },
        )
        response.raise_for_status()
        seen = time.time()
        self.slowest = max(self.slowest, seen - asked)
        by_path: dict[str, list[dict[str, Any]]] = {}
        for run in response.json():
            path = (run.get("parameters") or {}).get("path")
            if isinstance(path, str):
                by_path.setdefault(path, []).append(run)
        with self._lock:
            samples = dict(self._samples)
        for name, sample in samples.items():
            runs = by_path.get(name)
            if not runs:
                continue
            run = min(runs, key=lambda r: r["created"])
            if sample.run_id is None:
                sample.found_at = seen
                sample.first_name = run.get("name")
            sample.run_id = run["id"]
            sample.runs = len(runs)
            sample.created = _ts(run.get("created"))
            sample.expected_start = _ts(run.get("expected_start_time"))
            sample.start = _ts(run.get("start_time"))
            sample.end = _ts(run.get("end_time"))
            sample.state = run.get("state_type")
            if sample.named_at is None and run.get("name") == f"backup {name}":
                sample.named_at = seen

    def _loop(self) -> None:
        while not self._stop.wait(API_POLL_S):
            try:
                self.poll()
            except httpx.HTTPError as exc:
                self.errors += 1
                self.slowest = max(self.slowest, HTTP_TIMEOUT_S)
                if self.errors <= 3:
                    print(f"run poll failed: {exc}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Options:
    """Settings of one benchmark run.

    Attributes:
        files: Files to drop.
        size: Bytes per file.
        interval: Seconds between two files.
        timeout: Overall time limit in seconds (``up`` and ``down`` included).
        write_report: Write ``bench/TRIGGER_LATENCY.md``.
        keep: Keep the temporary directory (state, logs, files).
        log_retryable: Start the stack with ``PREFECT_SERVER_LOG_RETRYABLE_ERRORS=true``,
            so that the server logs the SQLite conflicts it answers with HTTP 503.
    """

    files: int
    size: int
    interval: float
    timeout: float
    write_report: bool
    keep: bool
    log_retryable: bool = False


def _get_json(client: httpx.Client, path: str) -> Any:
    response = client.get(path)
    response.raise_for_status()
    return response.json()


def running_long_runs(client: httpx.Client) -> list[str]:
    """Return the names of the deployments whose runs are RUNNING.

    Args:
        client: Client on the Prefect API.

    Returns:
        Deployment names, e.g. ``watch-directory``.
    """
    response = client.post(
        "/flow_runs/filter",
        json={"flow_runs": {"state": {"type": {"any_": ["RUNNING"]}}}, "limit": 50},
    )
    response.raise_for_status()
    names = []
    for run in response.json():
        if run.get("deployment_id"):
            deployment = _get_json(client, f"/deployments/{run['deployment_id']}")
            names.append(deployment["name"])
    return names


FILE_EVENTS = ("msi.file.uploaded", "msi.file.reconstructed")
ACTION_TRIGGERED = "prefect.automation.action.triggered"
ACTION_EXECUTED = "prefect.automation.action.executed"
AUTOMATION_TRIGGERED = "prefect.automation.triggered"


def fetch_events(client: httpx.Client, since: float, names: Sequence[str]) -> list[dict[str, Any]]:
    """Read every event with one of some names that occurred since a time.

    Args:
        client: Client on the Prefect API.
        since: Earliest ``occurred`` (``time.time()``).
        names: Event names.

    Returns:
        The events, oldest first, as the API returns them.
    """
    body = {
        "filter": {
            "occurred": {"since": _iso(since), "until": _iso(time.time() + 60)},
            "event": {"name": list(names)},
            "order": "ASC",
        },
        "limit": 50,
    }
    return [event for page in event_pages(client, body) for event in page]


def _related(event: dict[str, Any], prefix: str, role: str | None = None) -> str | None:
    """Return the id (after ``prefix``) of the first related resource of an event that matches."""
    for resource in event.get("related") or []:
        rid = resource.get("prefect.resource.id", "")
        if rid.startswith(prefix) and (
            role is None or resource.get("prefect.resource.role") == role
        ):
            return str(rid[len(prefix) :])
    return None


def read_events(client: httpx.Client, since: float, samples: Sequence[Sample]) -> dict[str, int]:
    """Attach the file events and the ``backup-file`` automation's times to the samples.

    ``msi.file.uploaded`` and ``msi.file.reconstructed`` are matched by their ``path``
    payload. For the automations, the server emits ``prefect.automation.action.triggered``
    (``occurred`` = when the trigger fired) and ``prefect.automation.action.executed``
    (related to the created flow run and to the triggering event), both carrying the
    action's ``invocation`` id.

    Args:
        client: Client on the Prefect API.
        since: Earliest ``occurred`` to ask for (``time.time()``).
        samples: Every file.

    Returns:
        Counts: ``events`` read, ``automations_fired`` (``prefect.automation.triggered``, one
        per automation and event) and ``actions_executed``.
    """
    by_name = {s.name: s for s in samples}
    names = (*FILE_EVENTS, AUTOMATION_TRIGGERED, ACTION_TRIGGERED, ACTION_EXECUTED)
    events = fetch_events(client, since, names)
    fired: dict[str, float | None] = {}
    executed: list[tuple[float, str | None, str | None, str]] = []
    for event in events:
        name = event.get("event")
        payload = event.get("payload") or {}
        occurred = _ts(event.get("occurred"))
        if name == ACTION_TRIGGERED:
            fired[str(payload.get("invocation"))] = occurred
        elif name == ACTION_EXECUTED and occurred is not None:
            run_id = _related(event, "prefect.flow-run.")
            trigger = _related(event, "prefect.event.", "triggering-event")
            executed.append((occurred, run_id, trigger, str(payload.get("invocation"))))
        elif name in FILE_EVENTS:
            sample = by_name.get(payload.get("path", ""))
            if sample is None:
                continue
            if name == FILE_EVENTS[0] and sample.uploaded_occurred is None:
                sample.uploaded_occurred = occurred
            elif name == FILE_EVENTS[1] and sample.reconstructed_occurred is None:
                sample.reconstructed_occurred = occurred
                sample.reconstructed_received = _ts(event.get("received"))
                sample.event_id = event.get("id")
    by_run = {run_id: (when, trigger, inv) for when, run_id, trigger, inv in executed if run_id}
    for sample in samples:
        found = by_run.get(sample.run_id or "")
        if found is None:
            continue
        when, trigger, invocation = found
        sample.fired = fired.get(invocation)
        siblings = sorted(w for w, _, t, _ in executed if t is not None and t == trigger)
        if when in siblings:
            sample.action_rank = siblings.index(when) + 1
    return {
        "events": len(events),
        "automations_fired": sum(1 for e in events if e.get("event") == AUTOMATION_TRIGGERED),
        "actions_executed": len(executed),
    }


def stack_ready(
    client: httpx.Client, bootstrap: str, group: str, notes: dict[str, Any], deadline: Deadline
) -> None:
    """Wait for the long-running runs to be RUNNING and the consumer group to be STABLE.

    Args:
        client: Client on the Prefect API.
        bootstrap: Broker address.
        group: The reassemblers' consumer group.
        notes: Receives ``running_after_s`` and ``group_stable_after_s``.
        deadline: Overall limit.

    Raises:
        RuntimeError: The long-running runs were not RUNNING in time.
    """
    started = time.time()
    limit = time.monotonic() + min(RUNNING_TIMEOUT_S, max(1.0, deadline.left()))
    names: list[str] = []
    while time.monotonic() < limit:
        try:
            names = running_long_runs(client)
        except httpx.HTTPError:
            names = []
        if all(name in names for name in LONG_RUNNING):
            break
        time.sleep(0.5)
    else:
        raise RuntimeError(f"long-running runs not RUNNING in time (RUNNING: {names})")
    notes["running_after_s"] = round(time.time() - started, 2)
    print(f"{', '.join(LONG_RUNNING)} RUNNING {notes['running_after_s']} s after up", flush=True)
    stable = wait_group_stable(bootstrap, group, min(GROUP_TIMEOUT_S, max(1.0, deadline.left())))
    notes["group_stable_after_s"] = None if stable is None else round(stable - started, 2)
    print(f"consumer group {group} STABLE: {notes['group_stable_after_s']} s after up", flush=True)
    time.sleep(SETTLE_S)


def drop_files(
    opts: Options,
    watch: Path,
    staging: Path,
    window: float,
    observers: tuple[DestinationPoller, RunPoller],
    deadline: Deadline,
) -> list[Sample]:
    """Drop the files into W, one every ``opts.interval`` seconds.

    Args:
        opts: Run settings.
        watch: The watched folder W.
        staging: Folder for the temporary names, outside W.
        window: Stability window in seconds.
        observers: The destination and run pollers; every file is registered with both.
        deadline: Overall limit; files stop when less than a minute is left.

    Returns:
        The samples.
    """
    samples: list[Sample] = []
    tag = time.strftime("%H%M%S")
    next_at = time.monotonic()
    for index in range(opts.files):
        if deadline.left() < 60:
            print("overall timeout near; no more files", flush=True)
            break
        time.sleep(max(0.0, next_at - time.monotonic()))
        next_at += opts.interval
        name = f"trigger-{tag}-{index:03d}.bin"
        data = os.urandom(opts.size)
        t0 = write_replace(watch, staging, name, data)
        sample = Sample(name=name, size=opts.size, t0=t0, t_stable=t0 + window)
        for observer in observers:
            observer.expect(sample)
        samples.append(sample)
        print(f"dropped {name}", flush=True)
    return samples


def final_reads(
    api: str, run_poller: RunPoller, samples: Sequence[Sample], since: float, notes: dict[str, Any]
) -> None:
    """Take a last look at the runs and read the events, outlasting a stalled server.

    Args:
        api: Prefect API URL.
        run_poller: The (stopped) run poller.
        samples: Every file.
        since: Earliest event time to read.
        notes: Receives ``events`` and, on failure, ``final_read_errors``.
    """
    errors: list[str] = []
    with httpx.Client(base_url=api, timeout=FINAL_HTTP_TIMEOUT_S) as client:
        try:
            run_poller.poll(client)
        except httpx.HTTPError as exc:
            errors.append(f"runs: {exc!r}")
        try:
            notes.update(read_events(client, since, samples))
        except httpx.HTTPError as exc:
            errors.append(f"events: {exc!r}")
    if errors:
        notes["final_read_errors"] = errors
        print(f"final reads: {errors}", file=sys.stderr, flush=True)


def _component_pid(status: dict[str, Any], name: str) -> int | None:
    for component in status.get("components", []):
        if component.get("name") == name and component.get("pid"):
            return int(component["pid"])
    return None


class CpuMeter:
    """Measures how busy the machine and one process were between start and :meth:`stop`.

    Args:
        pid: Process to follow (the Prefect server), if known.
    """

    def __init__(self, pid: int | None) -> None:
        self._pid = pid
        self._wall = time.monotonic()
        self._machine = self._machine_ticks()
        self._process = self._process_ticks()

    @staticmethod
    def _machine_ticks() -> tuple[int, int] | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    def _process_ticks(self) -> int | None:
        if self._pid is None:
            return None
        try:
            stat = Path(f"/proc/{self._pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return int(stat[11]) + int(stat[12])

    def stop(self) -> dict[str, Any]:
        """Return the figures since start.

        Returns:
            ``machine_busy`` (fraction of all cores) and ``server_cores`` (CPU seconds of
            the followed process per wall second), each ``None`` when unknown.
        """
        wall = time.monotonic() - self._wall
        machine, process = self._machine_ticks(), self._process_ticks()
        busy = None
        if machine and self._machine and machine[0] > self._machine[0]:
            total = machine[0] - self._machine[0]
            busy = round(1 - (machine[1] - self._machine[1]) / total, 2)
        cores = None
        if process is not None and self._process is not None and wall > 0:
            cores = round((process - self._process) / os.sysconf("SC_CLK_TCK") / wall, 2)
        return {"machine_busy": busy, "server_cores": cores, "measured_s": round(wall, 1)}


def wait_settled(samples: Sequence[Sample], deadline: Deadline) -> bool:
    """Wait until every file's run is final or given up, bounded.

    Args:
        samples: Every file.
        deadline: Overall limit (a margin is kept for ``down``).

    Returns:
        True when everything settled in time.
    """
    limit = time.monotonic() + FINISH_TIMEOUT_S
    while time.monotonic() < limit and deadline.left() > 20:
        if all(s.settled(time.time()) for s in samples):
            return True
        time.sleep(0.25)
    return all(s.settled(time.time()) for s in samples)


def run(opts: Options) -> tuple[list[Sample], dict[str, Any]]:
    """Bring the stack up, drop the files, observe them, and bring the stack down.

    Args:
        opts: Run settings.

    Returns:
        The samples and notes about the run (timings, paths, exit codes).
    """
    deadline = Deadline(opts.timeout)
    work = Path(tempfile.mkdtemp(prefix="msi-trigger-latency-"))
    state, watch, dest, staging = (work / n for n in ("state", "inbox", "received", "staging"))
    staging.mkdir()
    log = work / "cli.log"
    notes: dict[str, Any] = {"work_dir": str(work), "window_s": DEFAULT_WINDOW_S}
    samples: list[Sample] = []
    dest_poller: DestinationPoller | None = None
    run_poller: RunPoller | None = None
    try:
        up_args = [
            "up",
            "--storage",
            "memory",
            "--watch-dir",
            str(watch),
            "--destination-dir",
            str(dest),
            *port_args(),
        ]
        notes["up_command"] = "python -m msi_prefect.cli --state-dir STATE " + " ".join(
            a if not a.startswith(str(work)) else a.replace(str(work), "TMP") for a in up_args
        )
        print("msi-prefect up ...", flush=True)
        started = time.monotonic()
        up_env = {RETRYABLE_ENV: "true"} if opts.log_retryable else None
        up_timeout = min(UP_TIMEOUT_S, max(10.0, deadline.left() - 60))
        up = cli(state, up_args, log, up_timeout, up_env)
        notes["up_s"] = round(time.monotonic() - started, 1)
        if up.returncode != 0:
            raise RuntimeError(f"up failed (exit {up.returncode}), see {log}")
        print(f"up took {notes['up_s']} s", flush=True)
        status = json.loads(cli(state, ["status", "--json"], log, STATUS_TIMEOUT_S).stdout)
        api = status["prefect_api_url"]
        with httpx.Client(base_url=api, timeout=HTTP_TIMEOUT_S) as client:
            block = _get_json(
                client, "/block_types/slug/{}/block_documents/name/{}".format(*TRANSFER_BLOCK)
            ).get("data", {})
            window = float(block.get("stability_window_s", DEFAULT_WINDOW_S))
            notes["window_s"] = window
            deployment = _get_json(client, "/deployments/name/{}/{}".format(*BACKUP_DEPLOYMENT))
            stack_ready(
                client,
                status["bootstrap_servers"],
                block.get("consumer_group", DEFAULT_GROUP),
                notes,
                deadline,
            )
            dest_poller = DestinationPoller(dest)
            run_poller = RunPoller(api, deployment["id"])
            first = time.time()
            cpu = CpuMeter(_component_pid(status, "prefect"))
            samples = drop_files(opts, watch, staging, window, (dest_poller, run_poller), deadline)
            notes["settled"] = wait_settled(samples, deadline)
            notes.update(cpu.stop())
            run_poller.stop()
            notes["poll_errors"] = run_poller.errors
            notes["slowest_poll_s"] = round(run_poller.slowest, 2)
            final_reads(api, run_poller, samples, first - 60, notes)
    finally:
        if dest_poller is not None:
            dest_poller.close()
        if run_poller is not None:
            run_poller.close()
        print("msi-prefect down ...", flush=True)
        started = time.monotonic()
        try:
            down = cli(state, ["down"], log, DOWN_TIMEOUT_S)
            notes["down_exit"] = down.returncode
            print(down.stdout.strip(), flush=True)
        except subprocess.TimeoutExpired:
            notes["down_exit"] = "timeout"
            print(f"down timed out; see {log}", file=sys.stderr, flush=True)
        notes["down_s"] = round(time.monotonic() - started, 1)
        notes["server_errors"], notes["retryable"] = scan_server_log(state / "logs" / "prefect.log")
        notes["timed_out"] = deadline.passed()
    return samples, notes


# --------------------------------------------------------------------------- report


def machine_notes(load_start: tuple[float, float, float]) -> list[str]:
    """Describe the machine.

    Args:
        load_start: ``os.getloadavg()`` at start.

    Returns:
        Markdown bullets.
    """
    try:
        from importlib.metadata import version

        prefect = version("prefect")
    except Exception:
        prefect = "unknown"
    return machine_lines(load_start, software=f", Prefect {prefect}")


def retryable_line(opts: Options, notes: dict[str, Any]) -> str:
    """Describe the SQLite conflicts the server answered with 503 (``--log-retryable``).

    Args:
        opts: Run settings.
        notes: Notes returned by :func:`run`.

    Returns:
        One markdown bullet.
    """
    if not opts.log_retryable:
        return (
            "- SQLite write conflicts answered with HTTP 503 were not logged in this run "
            "(`--log-retryable` logs and counts them)."
        )
    counts: dict[str, int] = notes.get("retryable", {})
    detail = ", ".join(f"`{k}` {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    return (
        f"- Stack started with `{RETRYABLE_ENV}=true`: the server answered "
        f"{sum(counts.values())} requests with 503 after an SQLite write conflict"
        + (f" (failed statement: {detail})." if detail else ".")
    )


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _median_of(metric: Metric, samples: Sequence[Sample]) -> str:
    found = figures(metric, samples)
    return "n/a" if found is None else f"{found[1]:.2f} s"


def rank_lines(samples: Sequence[Sample]) -> list[str]:
    """Describe the target latency by the backup action's position among its siblings.

    Every ``msi.file.reconstructed`` event triggers three automations (``backup-file``,
    ``extract-metadata``, ``analyze-file``), whose actions the server runs one after
    another.

    Args:
        samples: Every file.

    Returns:
        One markdown bullet per rank seen.
    """
    lines = []
    ranks = sorted({s.action_rank for s in samples if s.action_rank is not None})
    for rank in ranks:
        mine = [s for s in samples if s.action_rank == rank]
        found = figures(HEADLINE[0], mine)
        if found is not None:
            n, median, _, top = found
            lines.append(
                f"- backup action executed {_ordinal(rank)} of its event's actions: {n} files, "
                f"stable -> run created median {median:.3f} s, max {top:.3f} s"
            )
    return lines


def stall_lines(samples: Sequence[Sample]) -> list[str]:
    """Split the target latency into files the server handled promptly and the others.

    Args:
        samples: Every file.

    Returns:
        Markdown bullets (informational; the verdict counts every file).
    """
    lines = []
    for label, keep in (
        (f"server took <= {STALL_S:g} s (event received -> run created)", False),
        (f"server took > {STALL_S:g} s (queued or stalled)", True),
    ):
        mine = [s for s in samples if _stalled(s) is keep]
        found = figures(HEADLINE[0], mine)
        if found is not None:
            n, median, p90, top = found
            lines.append(
                f"- {label}: {n} files, stable -> run created median {median:.3f} s, "
                f"p90 {p90:.3f} s, max {top:.3f} s"
            )
    return lines


def _stalled(sample: Sample) -> bool | None:
    took = minus(sample.created, sample.reconstructed_received)
    return None if took is None else took > STALL_S


def _ordinal(rank: int) -> str:
    return {1: "first", 2: "second", 3: "third"}.get(rank, f"#{rank}")


def where_time_goes(samples: Sequence[Sample], window: float) -> list[str]:
    """Describe the stages, by their medians.

    Args:
        samples: Every file.
        window: Stability window in seconds.

    Returns:
        Markdown bullets.
    """
    m = {metric.key: _median_of(metric, samples) for metric in STAGES}
    return [
        f"- Before t_stable: the {window:g} s stability window (not counted).",
        f"- Watcher notices + producer sends: {m['sent']} (stable -> `uploaded`).",
        f"- Broker + reassembler (write, fsync, verify, rename): {m['consumer']}.",
        f"- Reassembler -> event emitted: {m['emit']}; emitted -> received by the server: "
        f"{m['deliver']}.",
        f"- Server, event received -> `backup-file` run created: {m['server']}. Of that: "
        f"the trigger fires in {m['fire']}; the action waits and looks the deployment up "
        f"for {m['queue']}; rendering its parameters and creating the run take "
        f"{m['create']} (when the action's in-process create-run call conflicts with "
        "another SQLite writer, the server answers 503 and Prefect's client retries after "
        "2 s, then 4 s; `--log-retryable` counts these conflicts).",
        f"- After creation (outside the target): created -> started {m['start']} (the "
        "process worker polls for scheduled runs every 10 s by default, then starts a "
        f"Python process), the backup flow itself {m['flow']}; stable -> backup ended "
        f"{m['ended']}.",
    ]


def report(
    samples: Sequence[Sample],
    opts: Options,
    notes: dict[str, Any],
    load_start: tuple[float, float, float],
    argv: Sequence[str],
    started: str,
) -> str:
    """Build the markdown report.

    Args:
        samples: Every file.
        opts: Run settings.
        notes: Notes returned by :func:`run`.
        load_start: ``os.getloadavg()`` at start.
        argv: Command-line arguments given.
        started: Start date and time, human readable.

    Returns:
        The report text.
    """
    command = COMMAND + ("" if not argv else " " + " ".join(argv))
    window = float(notes.get("window_s", DEFAULT_WINDOW_S))
    _, sentence = verdict(samples)
    states: dict[str, int] = {}
    for s in samples:
        states[s.state or "no run"] = states.get(s.state or "no run", 0) + 1
    parts = [
        "# Prefect-layer latency: file stable -> its `backup-file` run created",
        "",
        'Target: "the latency from a file becoming stable to its `backup-file` run being '
        'created: under 2 s median on the embedded stack".',
        "",
        f"- Command: `{command}`",
        f"- Date: {started}",
        *machine_notes(load_start),
        f"- Stack: `{notes.get('up_command', 'n/a')}` (free loopback ports from "
        "`msi_prefect.stack.config.free_port_map()`, a temporary state dir): S3 store, "
        "Tansu broker (memory storage), Prefect server (SQLite), process worker, every "
        "deployment of `prefect.yaml`. `down` at the end.",
        f"- `up` took {notes.get('up_s', 'n/a')} s; both long-running runs RUNNING "
        f"{notes.get('running_after_s', 'n/a')} s after it returned; consumer group STABLE "
        f"after {notes.get('group_stable_after_s', 'n/a')} s; then {SETTLE_S:g} s more. "
        f"`down` took {notes.get('down_s', 'n/a')} s (exit {notes.get('down_exit', 'n/a')}).",
        f"- {len(samples)} files of {opts.size // KIB} KiB (random bytes), one every "
        f"{opts.interval:g} s, written outside W and `os.replace`d in; t0 = just after the "
        f"rename; t_stable = t0 + {window:g} s (the `embedded` TransferSettings window).",
        "- Run times are the server's `created`, `expected_start_time`, `start_time`, "
        "`end_time`; event times are `occurred` (stamped by the emitting flow) and `received` "
        "(server). Runs are matched by their `path` parameter: a triggered run gets its "
        "`backup <path>` name only when the flow starts (see the last stage row).",
        f"- Final states of the backup runs: {', '.join(f'{k} {v}' for k, v in states.items())}"
        + ("; **overall timeout reached**" if notes.get("timed_out") else "")
        + (
            f"; final reads failed: {notes['final_read_errors']}"
            if notes.get("final_read_errors")
            else ""
        ),
        f"- While the files were handled ({notes.get('measured_s', 'n/a')} s): the machine's "
        f"cores were {_pct(notes.get('machine_busy'))} busy; the Prefect server process used "
        f"{notes.get('server_cores', 'n/a')} cores on average.",
        f"- Harness polls of `/flow_runs/filter` (every {API_POLL_S:g} s): slowest "
        f"{notes.get('slowest_poll_s', 'n/a')} s, {notes.get('poll_errors', 'n/a')} failed "
        f"(HTTP timeout {HTTP_TIMEOUT_S:g} s). ERROR lines in the Prefect server's log: "
        f"{len(notes.get('server_errors', []))}"
        + (" (listed at the end)." if notes.get("server_errors") else ".")
        + (
            f" Automations fired (3 per file): {notes['automations_fired']}; actions executed: "
            f"{notes.get('actions_executed', 'n/a')} (the rest were still queued, or lost, when "
            "the harness stopped waiting)."
            if "automations_fired" in notes
            else ""
        ),
        retryable_line(opts, notes),
        "",
        "## Verdict",
        "",
        f"- {sentence}",
        "",
        "## Results",
        "",
        metric_table(HEADLINE, samples),
        "",
        "### Stages",
        "",
        metric_table(STAGES, samples),
        "",
        "### Where the time goes (medians)",
        "",
        *where_time_goes(samples, window),
        "",
        "### Breakdowns (informational)",
        "",
        *stall_lines(samples),
        *rank_lines(samples),
        "",
        "### Per file (seconds after t_stable)",
        "",
        per_file_table(samples),
        "",
    ]
    if notes.get("server_errors"):
        parts += [
            "### ERROR lines of the Prefect server's log",
            "",
            "```",
            *notes["server_errors"],
            "```",
            "",
        ]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the report and write ``bench/TRIGGER_LATENCY.md``.

    Args:
        argv: Command-line arguments (``sys.argv[1:]`` when ``None``).

    Returns:
        0 when the target was met, else 1.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=15, help="files to drop")
    parser.add_argument("--size-kib", type=int, default=64, help="KiB per file")
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between files")
    parser.add_argument("--timeout", type=float, default=360.0, help="overall limit, seconds")
    parser.add_argument("--no-write", action="store_true", help="do not write the report file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--log-retryable",
        action="store_true",
        help=f"start the stack with {RETRYABLE_ENV}=true (the server then logs the SQLite "
        "conflicts it answers with 503; the report counts them by SQL statement)",
    )
    args = parser.parse_args(argv)
    given = list(sys.argv[1:] if argv is None else argv)
    opts = Options(
        files=args.files,
        size=args.size_kib * KIB,
        interval=args.interval,
        timeout=args.timeout,
        write_report=not args.no_write,
        keep=args.keep,
        log_retryable=args.log_retryable,
    )

    wait_for_other_bench()
    load_start = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    print(f"# bench.trigger_latency {' '.join(given)}  ({started})", flush=True)
    print(f"os.getloadavg() at start: {load_start}", flush=True)
    samples, notes = run(opts)
    work = Path(notes["work_dir"])
    (work / "samples.jsonl").write_text(
        "".join(json.dumps(dataclasses.asdict(s)) + "\n" for s in samples)
    )
    text = report(samples, opts, notes, load_start, given, started)
    print(text, flush=True)
    ok, _ = verdict(samples)
    if opts.write_report and samples:
        REPORT_PATH.write_text(text)
        print(f"wrote {REPORT_PATH}", flush=True)
    if opts.keep or notes.get("down_exit") != 0 or not ok:
        print(f"kept {work} (state, logs, samples.jsonl)", flush=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
