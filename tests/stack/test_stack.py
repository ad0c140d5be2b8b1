"""The embedded stack as a user drives it: `up`, `up` again, `status --json`, `down`."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from msi_prefect.cli.stack import DEPLOY_CURRENT
from msi_prefect.stack.components import Component
from msi_prefect.stack.config import StateDir, free_port_map
from msi_prefect.stack.manager import StackManager
from msi_prefect.stack.processes import flow_run_processes, live_flow_runs, port_is_free
from tests.conftest import RunningStack
from tests.flow_helpers import REPO, s3_client
from tests.listening import not_on_loopback
from tests.stack.preview_checks import (
    PREVIEW_SAMPLE,
    PREVIEW_SCREENSHOT,
    PREVIEW_SIZE,
    png_size,
    preview_artifact,
    shows_picture,
)
from tests.stack_helpers import (
    API_TIMEOUT_S,
    FINAL_STATES,
    cli,
    flow_run_named,
    pid_alive,
    wait_until_done,
)

pytestmark = pytest.mark.stack

# Worker start of two flow runs, a group join and a stability window, on a busy machine.
ARRIVAL_TIMEOUT_S = 120
# A Prefect CLI command (imports take seconds on a busy machine).
CLI_TIMEOUT_S = 120
# Between two looks at a run's state, a count or the destination: each look is one small
# request, and the whole journey waits on some thirty of them.
POLL_S = 0.5
# The store stays down at least this long, and until the second backup's first attempt
# failed; its first retry comes 10 s after that failure, when the store is back.
OUTAGE_S = 12
# The browser check: the Prefect UI is a single-page app; give it time to render.
BROWSER_WINDOW = "1400,1000"
RENDER_BUDGET_MS = 15000
BROWSER_ATTEMPTS = 3
SCREENSHOT = REPO / "test-artifacts" / "prefect-ui-runs.png"
# Files dropped at once: adaptive dispatch groups them into batch runs.
BURST_FILES = 12
BACKUP_FLOWS = ["backup-file", "process-batch"]


def _wait_for_state(
    fetch: Callable[[], dict[str, Any] | None], wanted: tuple[str, ...] = FINAL_STATES
) -> str | None:
    """Poll a flow run until its state type is one of `wanted`; return the last state seen."""
    deadline = time.monotonic() + ARRIVAL_TIMEOUT_S
    state = None
    while time.monotonic() < deadline:
        run = fetch()
        state = run["state"]["type"] if run else None
        if state in wanted:
            return str(state)
        time.sleep(POLL_S)
    return state


def _wait_for_retry(api: str, flow_run_id: str) -> bool:
    """Wait until a task run of the flow run has failed an attempt and awaits its retry."""
    deadline = time.monotonic() + ARRIVAL_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            task_runs = httpx.post(
                f"{api}/task_runs/filter",
                json={"flow_runs": {"id": {"any_": [flow_run_id]}}},
                timeout=API_TIMEOUT_S,
            ).json()
            # A task run just created may have no state yet (None).
            states = [(t.get("state") or {}).get("name") for t in task_runs]
            if any(state in ("AwaitingRetry", "Retrying") for state in states):
                return True
        time.sleep(POLL_S)
    return False


def _run_by_id(api: str, flow_run_id: str) -> dict[str, Any] | None:
    """The flow run `flow_run_id`, or None if the server did not answer."""
    with contextlib.suppress(httpx.HTTPError):
        answer = httpx.get(f"{api}/flow_runs/{flow_run_id}", timeout=API_TIMEOUT_S)
        if answer.is_success:
            return dict(answer.json())
    return None


def _wait_for_run(api: str, name: str) -> str | None:
    """The final state type of the flow run called `name`."""
    return _wait_for_state(lambda: flow_run_named(api, name))


def _backup_run_of(api: str, filename: str) -> dict[str, Any] | None:
    """The (first) backup run whose name names `filename`: a per-file or a batch run."""
    with contextlib.suppress(httpx.HTTPError):
        runs = httpx.post(
            f"{api}/flow_runs/filter",
            json={
                "flows": {"name": {"any_": BACKUP_FLOWS}},
                "flow_runs": {"name": {"like_": filename}},
                "sort": "EXPECTED_START_TIME_ASC",
                "limit": 1,
            },
            timeout=API_TIMEOUT_S,
        ).json()
        return runs[0] if runs else None
    return None


def _tagged_run(api: str, tag: str) -> dict[str, Any] | None:
    """The flow run carrying `tag`, or None."""
    with contextlib.suppress(httpx.HTTPError):
        runs = httpx.post(
            f"{api}/flow_runs/filter",
            json={"flow_runs": {"tags": {"all_": [tag]}}, "limit": 1},
            timeout=API_TIMEOUT_S,
        ).json()
        return runs[0] if runs else None
    return None


def _events_of(api: str, name: str, path: str) -> list[dict[str, Any]]:
    """The events called `name` about the file at `path` (at most 50)."""
    with contextlib.suppress(httpx.HTTPError):
        return list(
            httpx.post(
                f"{api}/events/filter",
                json={
                    "filter": {
                        "event": {"name": [name]},
                        "resource": {"labels": {"msi.path": [path]}},
                        "occurred": {"since": "2000-01-01T00:00:00Z"},
                    },
                    "limit": 50,
                },
                timeout=API_TIMEOUT_S,
            ).json()["events"]
        )
    return []


def _heartbeats_of(api: str, run_id: str) -> int:
    """How many ``prefect.flow-run.heartbeat`` events the flow run sent (at most 50)."""
    with contextlib.suppress(httpx.HTTPError):
        return len(
            httpx.post(
                f"{api}/events/filter",
                json={
                    "filter": {
                        "event": {"name": ["prefect.flow-run.heartbeat"]},
                        "resource": {"id": [f"prefect.flow-run.{run_id}"]},
                        "occurred": {"since": "2000-01-01T00:00:00Z"},
                    },
                    "limit": 50,
                },
                timeout=API_TIMEOUT_S,
            ).json()["events"]
        )
    return 0


def _wait_for_count(count: Callable[[], int], wanted: int) -> bool:
    """Poll `count` until it reaches `wanted` (True) or the arrival timeout passes."""
    deadline = time.monotonic() + ARRIVAL_TIMEOUT_S
    while count() < wanted and time.monotonic() < deadline:
        time.sleep(POLL_S)
    return count() == wanted


def _look_at_prefect_ui(url: str, screenshot: Path, expected: tuple[str, ...]) -> str:
    """Open `url` in headless Chromium; return its rendered DOM and save a screenshot.

    The UI renders the runs after its API calls return, which takes longer on a busy
    machine: the page is loaded again (up to BROWSER_ATTEMPTS times) until its DOM shows
    every `expected` text. Each load dumps the DOM and takes the screenshot (one browser
    start, not two): the one kept is of the DOM returned.
    """
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed: ./scripts/test installs it"
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    common = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--disable-component-update", "--no-first-run",
        f"--window-size={BROWSER_WINDOW}", f"--virtual-time-budget={RENDER_BUDGET_MS}",
    ]  # fmt: skip
    dom = ""
    for _ in range(BROWSER_ATTEMPTS):
        screenshot.unlink(missing_ok=True)
        with tempfile.TemporaryDirectory() as profile:
            dom = subprocess.run(
                [*common, f"--user-data-dir={profile}", "--dump-dom",
                 f"--screenshot={screenshot}", url],
                capture_output=True, text=True, timeout=120, check=True,
            ).stdout  # fmt: skip
        if all(text in dom for text in expected):
            break
    assert screenshot.is_file(), f"no screenshot of {url}"
    return dom


def _api_pages(api: str, path: str, body: dict[str, Any]) -> list[str]:
    """Every page (as text) of a Prefect `filter` endpoint."""
    pages, offset = [], 0
    while True:
        response = httpx.post(
            f"{api}/{path}", json={**body, "limit": 200, "offset": offset}, timeout=API_TIMEOUT_S
        )
        assert response.status_code == 200, (path, response.text)
        items = response.json()
        pages.append(response.text)
        if len(items) < 200:
            return pages
        offset += 200


def _assert_secret_nowhere(api: str, secret: str) -> None:
    """No run, task run, log, artifact, event or block the server holds shows `secret`."""
    outputs = {
        "flow runs (parameters, states)": _api_pages(api, "flow_runs/filter", {}),
        "task runs (states, messages)": _api_pages(api, "task_runs/filter", {}),
        "logs": _api_pages(api, "logs/filter", {}),
        "artifacts": _api_pages(api, "artifacts/filter", {}),
        "deployments": _api_pages(api, "deployments/filter", {}),
        "block documents (as read)": _api_pages(api, "block_documents/filter", {}),
    }
    events = httpx.post(f"{api}/events/filter", json={"limit": 50}, timeout=API_TIMEOUT_S)
    assert events.status_code == 200
    page, outputs["events"] = events.json(), [events.text]
    while page.get("next_page"):
        following = httpx.get(page["next_page"], timeout=API_TIMEOUT_S)
        outputs["events"].append(following.text)
        page = following.json()
    assert "dropped.dat" in "".join(outputs["flow runs (parameters, states)"])
    assert "dropped.dat" in "".join(outputs["logs"])
    leaks = [what for what, texts in outputs.items() if any(secret in t for t in texts)]
    assert leaks == []


# The whole user journey: about 2 minutes on a quiet machine, up to four times that when
# the machine is shared (measured: over 10 minutes at a load average of 15-20).
@pytest.mark.own_stack
@pytest.mark.timeout(900)
def test_up_twice_status_and_down_leave_nothing_behind(tmp_path: Path) -> None:
    ports = free_port_map()
    port_args = [arg for name, port in ports.items() for arg in ("--port", f"{name}={port}")]
    state_dir = tmp_path / "state"
    try:
        first = cli(state_dir, "up", "--storage", "memory", *port_args)
        assert first.returncode == 0, first.stderr
        assert "started: s3, broker, prefect, worker" in first.stdout

        status = cli(state_dir, "status", "--json")
        assert status.returncode == 0, status.stdout + status.stderr
        report = json.loads(status.stdout)
        assert report["healthy"] is True
        assert report["bootstrap_servers"] == f"127.0.0.1:{ports['broker']}"
        assert report["prefect_api_url"] == f"http://127.0.0.1:{ports['prefect']}/api"
        assert report["s3_endpoint"] == f"http://127.0.0.1:{ports['s3']}"
        pids = {c["name"]: c["pid"] for c in report["components"]}
        assert all(pids.values())

        again = cli(state_dir, "up")
        assert again.returncode == 0, again.stderr
        assert "already running: s3, broker, prefect, worker" in again.stdout
        # Nothing `prefect deploy` reads has changed: its deployments are kept as they are.
        assert DEPLOY_CURRENT in again.stdout
        report_again = json.loads(cli(state_dir, "status", "--json").stdout)
        assert {c["name"]: c["pid"] for c in report_again["components"]} == pids

        for log in ("s3", "broker", "prefect", "worker"):
            assert (state_dir / "logs" / f"{log}.log").stat().st_size > 0

        # `up` deployed the flows and started the transfers: a dropped file arrives.
        assert "flows deployed; started: watch-directory" in first.stdout
        assert report["watch_dir"] == str(tmp_path / "inbox")
        assert report["destination_dir"] == str(tmp_path / "received")
        (tmp_path / "inbox" / "dropped.dat").write_bytes(b"from the microscope" * 100)
        arrived = tmp_path / "received" / "dropped.dat"
        deadline = time.monotonic() + ARRIVAL_TIMEOUT_S
        while not arrived.exists() and time.monotonic() < deadline:
            time.sleep(POLL_S)
        assert arrived.read_bytes() == b"from the microscope" * 100
        # ...and its event started the downstream deployments, each a run named after it.
        api = report["prefect_api_url"]
        for run_name in ("backup dropped.dat", "metadata of dropped.dat", "analyze dropped.dat"):
            assert _wait_for_run(api, run_name) == "COMPLETED", run_name

        # An instrument's image: its metadata run stores a preview beside the backup and
        # shows it as an image artifact, at a URL a browser loads without credentials.
        preview_image = None
        if PREVIEW_SAMPLE.is_file():
            shutil.copyfile(PREVIEW_SAMPLE, tmp_path / "inbox" / PREVIEW_SAMPLE.name)
            preview_run_name = f"metadata of {PREVIEW_SAMPLE.name}"
            assert _wait_for_run(api, preview_run_name) == "COMPLETED"
            preview_run = flow_run_named(api, preview_run_name)
            assert preview_run is not None
            preview_image = preview_artifact(api, preview_run["id"])
            assert preview_image is not None, "the metadata run has an image artifact"
            fetched = httpx.get(preview_image["data"], timeout=API_TIMEOUT_S)
            assert fetched.status_code == 200, fetched.text
            assert png_size(fetched.content) == PREVIEW_SIZE

        # A burst: files dropped at once. Adaptive dispatch sends the first on its own and
        # groups the others into batch runs while runs start, and every file still gets its
        # backup, metadata and analysis, each announced by its own event.
        burst = [f"burst-{i:02d}.dat" for i in range(BURST_FILES)]
        for name in burst:
            (tmp_path / "inbox" / name).write_bytes(name.encode() * 50)
        assert wait_until_done(api, 0.0, lambda: set(burst), ARRIVAL_TIMEOUT_S)[0]
        # ...through the batch deployment's trigger: one run per batch, named after its
        # files, with task runs per file inside.
        batch_runs = httpx.post(
            f"{api}/flow_runs/filter",
            json={"flows": {"name": {"any_": ["process-batch"]}}, "limit": 50},
            timeout=API_TIMEOUT_S,
        ).json()
        assert batch_runs, "a burst is grouped into process-batch runs"
        # A batch run emits its files' events before it writes their histories and ends:
        # a file is done a moment before its batch run is Completed.
        for run in batch_runs:
            final = _wait_for_state(functools.partial(_run_by_id, api, run["id"]))
            assert final == "COMPLETED", (run["name"], final)
        assert all(run["name"].startswith("process ") for run in batch_runs)
        assert any("burst-" in run["name"] for run in batch_runs)

        # One file's backup, run again by hand whatever the dispatch: a run of backup-file
        # with the parameters of its rebuilt event, announced by a new backed-up event.
        again = cli(state_dir, "rerun", "backup", burst[-1])
        assert again.returncode == 0, again.stderr
        assert f"started the backup of {burst[-1]} (generation 1): flow run " in again.stdout
        manual_id = again.stdout.split("flow run ")[1].split()[0]
        manual_run = functools.partial(_run_by_id, api, manual_id)
        assert _wait_for_state(manual_run) == "COMPLETED"
        assert manual_run()["name"] == f"backup {burst[-1]}"  # type: ignore[index]
        # Its own backed-up event beside the first backup's (events arrive a moment after
        # the run's final state).
        assert _wait_for_count(lambda: len(_events_of(api, "msi.file.backed-up", burst[-1])), 2)

        # Every server of the stack, and every flow run it started, listens on loopback only.
        stack_pids = set(pids.values()) | set(flow_run_processes(api))
        assert not_on_loopback(stack_pids) == []

        # The S3 secret reached the flows (the backup worked) but no output shows it.
        secret = json.loads((state_dir / "credentials.json").read_text())["secret_access_key"]
        _assert_secret_nowhere(api, secret)

        # A downstream failure is retried and then succeeds: the backup store is down when
        # the next file arrives, and back before the backup task's retries run out.
        manager = StackManager.open(StateDir(state_dir))
        manager.process(Component.S3).stop()
        outage_started = time.monotonic()
        # Two files arrive during the outage, their backup runs waiting for the store side
        # by side (one outage, not two in a row). First, a flow-run process killed
        # (SIGKILL) while its backup waits for the store: the worker marks the run
        # Crashed, and rerun-crashed starts it again, which completes once the store is
        # back.
        (tmp_path / "inbox" / "killed.dat").write_bytes(b"k" * 1000)
        killed_run = lambda: _backup_run_of(api, "killed.dat")  # noqa: E731
        assert _wait_for_state(killed_run, ("RUNNING", *FINAL_STATES)) == "RUNNING"
        killed_id = killed_run()["id"]  # type: ignore[index]
        # The second file once the first one's run is running: a run of its own.
        (tmp_path / "inbox" / "during-outage.dat").write_bytes(b"x" * 1000)
        assert _wait_for_retry(api, killed_id)
        victims = [p.pid for p in live_flow_runs(api) if p.flow_run_id == killed_id]
        assert victims, "the backup run has a process of its own"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        killed_state = functools.partial(_run_by_id, api, killed_id)
        assert _wait_for_state(killed_state) == "CRASHED"

        outage_run = lambda: _backup_run_of(api, "during-outage.dat")  # noqa: E731
        assert _wait_for_state(outage_run, ("RUNNING", *FINAL_STATES)) == "RUNNING"
        assert outage_run()["id"] != killed_id  # type: ignore[index]
        # The store comes back only once the first attempt has failed: on a busy machine
        # the run's process may take longer than the outage to reach its task.
        assert _wait_for_retry(api, outage_run()["id"])  # type: ignore[index]
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - outage_started)))
        manager.up([Component.S3])
        assert _wait_for_state(outage_run) == "COMPLETED"
        backup_run = outage_run()
        assert backup_run is not None

        def most_attempts() -> int:
            task_runs = httpx.post(
                f"{api}/task_runs/filter",
                json={"flow_runs": {"id": {"any_": [backup_run["id"]]}}},
                timeout=API_TIMEOUT_S,
            ).json()
            return max((task["run_count"] for task in task_runs), default=0)

        # It was retried (task-run states are recorded in batches, a second apart).
        assert _wait_for_count(lambda: min(most_attempts(), 2), 2)
        rerun_of_killed = lambda: _tagged_run(api, f"msi.rerun-of:{killed_id}")  # noqa: E731
        assert _wait_for_state(rerun_of_killed) == "COMPLETED"
        assert wait_until_done(api, 0.0, lambda: {"killed.dat"}, ARRIVAL_TIMEOUT_S)[0]

        # A completed run can be run again from the API, with the same parameters.
        rerun = httpx.post(
            f"{api}/deployments/{backup_run['deployment_id']}/create_flow_run",
            json={"parameters": backup_run["parameters"]},
            timeout=API_TIMEOUT_S,
        )
        assert rerun.status_code == 201, rerun.text
        rerun_run = functools.partial(_run_by_id, api, rerun.json()["id"])
        assert _wait_for_state(rerun_run) == "COMPLETED"

        # The transfers send heartbeats every FLOW_RUN_HEARTBEAT_S (the worker's setting;
        # Prefect's own default is 180 s, longer than this test has run), and `up` applied
        # the automation that crashes a run whose heartbeats stop.
        for transfer in _transfer_runs(api):
            beats = lambda run=transfer: min(_heartbeats_of(api, run), 2)  # noqa: E731
            assert _wait_for_count(beats, 2), f"heartbeats of {transfer}"
        automations = httpx.post(f"{api}/automations/filter", json={}, timeout=API_TIMEOUT_S)
        assert "msi: crash unresponsive runs" in {a["name"] for a in automations.json()}

        # A person's view: the Prefect UI in a real browser lists the file's runs.
        file_runs = ("backup dropped.dat", "metadata of dropped.dat", "analyze dropped.dat")
        dom = _look_at_prefect_ui(report["prefect_ui_url"] + "/runs", SCREENSHOT, file_runs)
        for run_name in file_runs:
            assert run_name in dom, run_name
        # ...and the preview's artifact page shows the picture (the run list shows none:
        # the check can fail).
        if preview_image is not None:
            artifact_page = f"{report['prefect_ui_url']}/artifacts/artifact/{preview_image['id']}"
            _look_at_prefect_ui(artifact_page, PREVIEW_SCREENSHOT, (PREVIEW_SAMPLE.name,))
            assert shows_picture(PREVIEW_SCREENSHOT), f"no picture in {PREVIEW_SCREENSHOT}"
            assert not shows_picture(SCREENSHOT)

        # After an outage, retries, a re-run and batch runs, still no output shows the secret.
        _assert_secret_nowhere(api, secret)

        # `down` then `up`: the transfers were cancelled through Prefect, start again, and a
        # file dropped afterwards is sent, rebuilt and processed. (A power cut and the `up`
        # after it: tests/stack/test_postgres_stack.py, on a stack that has one anyway.)
        old_transfers = _transfer_runs(api)
        assert cli(state_dir, "down").returncode == 0
        _assert_restarted(state_dir, tmp_path, api, "after-restart.dat")
        assert {_run_state(api, run_id) for run_id in old_transfers} == {"CANCELLED"}
        pids = {
            c["name"]: c["pid"]
            for c in json.loads(cli(state_dir, "status", "--json").stdout)["components"]
        }
    finally:
        down = cli(state_dir, "down")
    for path in state_dir.rglob("*"):
        if path.is_file() and (path.suffix == ".log" or "log" in path.parent.name):
            assert secret not in path.read_text(errors="replace"), path
    assert down.returncode == 0, down.stderr
    assert "stopped: worker, prefect, broker, s3" in down.stdout
    assert not [name for name, pid in pids.items() if pid_alive(pid)]
    assert flow_run_processes(f"http://127.0.0.1:{ports['prefect']}/api") == []
    # Not the ports of the parts this stack did not run (PostgreSQL's and Redis's on the
    # default stack): another test's may hold them by now.
    not_run = {component.value for component in Component} - set(pids)
    assert not [
        name for name, port in ports.items() if name not in not_run and not port_is_free(port)
    ]
    assert list((state_dir / "run").glob("*.pid")) == []
    if preview_image is None:
        pytest.skip(
            f"everything else passed; the preview was not checked: {PREVIEW_SAMPLE} is absent"
        )


def _transfer_runs(api: str) -> list[str]:
    """Ids of the active runs of the two long-running deployments."""
    runs = httpx.post(
        f"{api}/flow_runs/filter",
        json={
            "flow_runs": {"state": {"type": {"any_": ["RUNNING", "PENDING"]}}},
            "deployments": {"name": {"any_": ["watch-directory", "reconstruct-files"]}},
        },
        timeout=API_TIMEOUT_S,
    ).json()
    assert len(runs) == 2, [r["name"] for r in runs]
    return [run["id"] for run in runs]


def _run_state(api: str, run_id: str) -> str:
    return str(httpx.get(f"{api}/flow_runs/{run_id}", timeout=API_TIMEOUT_S).json()["state_type"])


def _assert_restarted(state_dir: Path, tmp_path: Path, api: str, name: str) -> None:
    """`up` starts both transfers again, and a file dropped then gets its three runs."""
    up = cli(state_dir, "up")
    assert up.returncode == 0, up.stderr
    assert "started: watch-directory/watch-directory, reconstruct-files/reconstruct-files" in (
        up.stdout
    )
    assert DEPLOY_CURRENT in up.stdout  # the server kept the deployments of the first `up`
    (tmp_path / "inbox" / name).write_bytes(name.encode() * 100)
    for verb in ("backup", "metadata of", "analyze"):
        assert _wait_for_run(api, f"{verb} {name}") == "COMPLETED", verb
    assert (tmp_path / "received" / name).read_bytes() == name.encode() * 100


def test_second_stack_on_a_taken_port_is_refused(kafka_stack: RunningStack, tmp_path: Path) -> None:
    taken = kafka_stack.config.ports["broker"]
    others = free_port_map()
    others["broker"] = taken
    port_args = [arg for name, port in others.items() for arg in ("--port", f"{name}={port}")]
    result = cli(tmp_path / "other", "up", "--only", "broker", *port_args)
    assert result.returncode == 1
    assert f"port {taken} (broker)" in result.stderr
    assert "already in use" in result.stderr


def test_broker_and_s3_answer(kafka_stack: RunningStack, topic: str) -> None:
    """A produced message comes back through a consumer group on the session's broker."""
    from confluent_kafka import Consumer, Producer

    producer = Producer({"bootstrap.servers": kafka_stack.bootstrap_servers})
    producer.produce(topic, key=b"k", value=b"hello", headers=[("h", b"1")])
    assert producer.flush(30) == 0
    consumer = Consumer(
        {
            "bootstrap.servers": kafka_stack.bootstrap_servers,
            "group.id": f"g-{topic}",
            "session.timeout.ms": 6000,
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic])
    try:
        message = None
        for _ in range(120):
            message = consumer.poll(0.5)
            if message is not None and not message.error():
                break
        assert message is not None and message.value() == b"hello"
        assert message.headers() == [("h", b"1")]
    finally:
        consumer.close()

    s3 = s3_client(kafka_stack.s3_env())
    s3.put_object(Bucket="msi-backup", Key="probe.txt", Body=b"ok")
    assert s3.get_object(Bucket="msi-backup", Key="probe.txt")["Body"].read() == b"ok"
    s3.delete_object(Bucket="msi-backup", Key="probe.txt")
