"""The Prefect server's floor: its CPU for the fewest records per file a user keeps.

`bench.file_rate` measures the whole product: at 10 files/s the stack needed about 0.34
CPU-s per file, 60 % of it on the Prefect server, for about 25 events and 13 requests
per file. This harness asks what the server would need if each file left only the records
issue 13 keeps in every dispatch mode: a task run per step (backup, metadata, analysis:
3 state events each), its events (rebuilt and one per step), and, with ``--artifacts``,
the metadata and analysis artifacts. No file is read or written and no step does work:
what is left is the server's handling of the records, and the flow-run processes' own
cost of making them.

Like the product's batch dispatch, three processes (one per step) run one flow per
``--batch`` files, and each makes its file's task run and event as the files come, at
``--rate`` files per second. The server is a fresh embedded stack (`msi-prefect up`,
with ``--server-layout``/``--database`` as given); the rest of the stack sits idle. The
CPU of the server's processes is read from ``/proc`` (`bench.cpu_ledger`) from the first
record until the server has recorded every task run; the record makers' CPU from their
resource usage.

Usage::

    .venv/bin/python -m bench.record_floor --files 600 --rate 10 \\
        --server-layout split --database postgresql [--artifacts]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from bench.cpu_ledger import CpuLedger
from bench.trigger_latency import (
    DOWN_TIMEOUT_S,
    HTTP_TIMEOUT_S,
    REPO_DIR,
    STATUS_TIMEOUT_S,
    UP_TIMEOUT_S,
    cli,
    port_args,
)
from msi_prefect.stack.config import PrefectDatabase, ServerLayout

STEPS = ("backup", "metadata", "analysis")
#: The server's parts (`msi-prefect status` names); the rest of the stack is idle.
SERVER_PARTS = ("prefect", "prefect-services", "redis", "postgres")
SAMPLE_S = 0.5
#: How long the server may take, after the last record was made, to have stored them all.
DRAIN_TIMEOUT_S = 300.0
#: The server's event persister writes within a second; a little more for its last batch.
SETTLE_S = 3.0


def make_records(step: str, files: int, rate: float, batch: int, artifacts: bool) -> None:
    """One step's records for ``files`` files at ``rate`` per second, a flow run per batch.

    Runs in a process of its own with ``PREFECT_API_URL`` set.
    """
    from prefect import flow, task
    from prefect.artifacts import create_markdown_artifact
    from prefect.events import emit_event

    @task(task_run_name="{step} {path}")
    def record(step: str, path: str, file_id: str) -> None:
        emit_event(
            event=f"msi.floor.{step}-done",
            resource={"prefect.resource.id": f"msi.file.{file_id}", "msi.path": path},
        )
        if artifacts and step != "backup":
            create_markdown_artifact(
                key=f"floor-{step}-{file_id}", markdown=f"# {step} of `{path}`\n\nnothing"
            )

    @flow(name=f"floor-{step}-batch")
    def floor_batch(first: int, count: int, started: float) -> None:
        for index in range(first, first + count):
            # Paced like files arriving: file `index` is rebuilt at started + index / rate.
            time.sleep(max(0.0, started + index / rate - time.time()))
            file_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"floor/{index}"))
            path = f"floor/{index:05d}.bin"
            if step == STEPS[0]:  # the rebuilt file's own event, once per file
                emit_event(
                    event="msi.floor.rebuilt",
                    resource={"prefect.resource.id": f"msi.file.{file_id}", "msi.path": path},
                )
            record(step, path, file_id)

    started = float(os.environ["MSI_FLOOR_STARTED"])
    for first in range(0, files, batch):
        floor_batch(first, min(batch, files - first), started)


def _task_runs(client: httpx.Client) -> int:
    response = client.post("/task_runs/count", json={})
    response.raise_for_status()
    return int(response.json())


def measure(opts: argparse.Namespace) -> dict[str, object]:
    """Bring a stack up, make the records, read the server's CPU, bring it down."""
    work = Path(tempfile.mkdtemp(prefix="msi-record-floor-"))
    state, log = work / "state", work / "cli.log"
    up_args = ["up", "--storage", "memory", "--watch-dir", str(work / "inbox")]
    up_args += ["--destination-dir", str(work / "received"), *port_args()]
    up_args += ["--server-layout", opts.server_layout, "--database", opts.database]
    settings = {name: value for name, value in vars(opts).items() if name != "make"}
    result: dict[str, object] = {"work_dir": str(work), **settings}
    try:
        if cli(state, up_args, log, UP_TIMEOUT_S).returncode != 0:
            raise RuntimeError(f"up failed, see {log}")
        status = json.loads(cli(state, ["status", "--json"], log, STATUS_TIMEOUT_S).stdout)
        pids = {row["name"]: row["pid"] for row in status["components"] if row["pid"]}
        api = status["prefect_api_url"]
        time.sleep(SETTLE_S)  # the stack's own start-up records
        with (
            httpx.Client(base_url=api, timeout=HTTP_TIMEOUT_S) as client,
            (work / "makers.log").open("wb") as makers_log,
        ):
            before = _task_runs(client)
            ledger = CpuLedger({pid: name for name, pid in pids.items()}, pids["worker"])
            ledger.sample()
            env = {**os.environ, "PREFECT_API_URL": api, "MSI_FLOOR_STARTED": str(time.time())}
            makers = [
                subprocess.Popen(
                    [sys.executable, "-m", "bench.record_floor", "--make", step,
                     "--files", str(opts.files), "--rate", str(opts.rate),
                     "--batch", str(opts.batch), *(["--artifacts"] if opts.artifacts else [])],
                    env=env, cwd=REPO_DIR, stdout=makers_log, stderr=subprocess.STDOUT,
                )
                for step in STEPS
            ]  # fmt: skip
            makers_cpu_s = 0.0
            for maker in makers:
                while True:
                    finished, status_code, usage = os.wait4(maker.pid, os.WNOHANG)
                    if finished:
                        break
                    ledger.sample()
                    time.sleep(SAMPLE_S)
                maker.returncode = os.waitstatus_to_exitcode(status_code)
                if maker.returncode != 0:
                    raise RuntimeError(f"a record maker failed (exit {maker.returncode})")
                makers_cpu_s += usage.ru_utime + usage.ru_stime
            made_at = time.monotonic()
            expected = before + opts.files * len(STEPS)
            while _task_runs(client) < expected:
                if time.monotonic() - made_at > DRAIN_TIMEOUT_S:
                    raise RuntimeError(f"the server stored fewer than {expected} task runs")
                ledger.sample()
                time.sleep(SAMPLE_S)
            result["drain_s"] = round(time.monotonic() - made_at, 1)
            time.sleep(SETTLE_S)
            ledger.sample()
        parts = ledger.by_part()
        server = {part: parts.get(part, 0.0) for part in SERVER_PARTS if part in pids}
        per_file = {part: round(cpu / opts.files, 4) for part, cpu in server.items()}
        server_per_file = sum(server.values()) / opts.files
        result.update(
            server_cpu_s_per_file=round(server_per_file, 4),
            server_cpu_s_per_file_by_part=per_file,
            server_cores_at_rate=round(server_per_file * opts.rate, 2),
            makers_cpu_s_per_file=round(makers_cpu_s / opts.files, 4),
            machine_busy_s=round(ledger.machine_busy_s, 1),
            load=os.getloadavg(),
        )
    finally:
        cli(state, ["down"], log, DOWN_TIMEOUT_S)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=600)
    parser.add_argument("--rate", type=float, default=10.0, help="files per second")
    parser.add_argument("--batch", type=int, default=50, help="files per flow run")
    parser.add_argument("--artifacts", action="store_true", help="metadata and analysis artifacts")
    parser.add_argument(
        "--server-layout", default=ServerLayout.SPLIT.value, choices=[v.value for v in ServerLayout]
    )
    parser.add_argument(
        "--database",
        default=PrefectDatabase.POSTGRESQL.value,
        choices=[v.value for v in PrefectDatabase],
    )
    parser.add_argument("--make", choices=STEPS, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.files < 1 or opts.rate <= 0 or opts.batch < 1:
        parser.error("--files and --batch must be at least 1, --rate positive")
    if opts.make:
        make_records(opts.make, opts.files, opts.rate, opts.batch, opts.artifacts)
        return 0
    print(json.dumps(measure(opts), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
