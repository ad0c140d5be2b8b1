"""Run one step of one file's downstream work again: ``msi-prefect rerun STEP PATH``.

Whatever the dispatch (a run per file, or a task run inside a batch run), every rebuilt
file can have its backup, metadata or analysis run again on its own, as a run of the
per-file deployment (``backup-file``, ``extract-metadata``, ``analyze-file``) with the
parameters of the file's newest ``msi.file.reconstructed`` event. That is what a user would
do by hand in the Prefect UI (the deployment's *Run → Custom run*, with the values shown in
the event's payload on the *Events* page); this command looks the values up.

A re-run does the right thing for each step: the backup copies the file again, verified by
SHA-256, and announces it with a new ``msi.file.backed-up`` event (the request's own id
makes it distinct from the first); the metadata run publishes a new version of the file's
metadata artifact and message; the analysis runs the deployment's analysis again.
"""

from __future__ import annotations

import argparse
import os
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from msi_prefect.errors import MsiError

API_TIMEOUT_S = 30.0
# msi_prefect.prefect_layer.events.EventName.RECONSTRUCTED, not imported: it would load the
# transfer core into every start of the CLI.
RECONSTRUCTED_EVENT = "msi.file.reconstructed"
EXIT_OK = 0
# The event payload keys the per-file flows take as parameters.
FILE_PARAMETERS = ("topic", "file_id", "generation", "path", "url", "size", "sha256")


class Step(StrEnum):
    """A downstream step of one file, by the name a user would say."""

    BACKUP = "backup"
    METADATA = "metadata"
    ANALYSIS = "analysis"

    @property
    def deployment(self) -> str:
        """The per-file deployment that does the step (``flow/deployment``)."""
        name = {
            Step.BACKUP: "backup-file",
            Step.METADATA: "extract-metadata",
            Step.ANALYSIS: "analyze-file",
        }[self]
        return f"{name}/{name}"


@dataclass(frozen=True)
class Rerun:
    """A flow run started for one step of one file.

    Attributes:
        flow_run_id: The new run's id.
        ui_url: Where the Prefect UI shows it, when the UI address is known.
    """

    flow_run_id: str
    ui_url: str | None


def newest_rebuilt(client: Any, path: str, topic: str | None = None) -> dict[str, Any]:
    """The payload of the newest ``msi.file.reconstructed`` event of ``path``.

    Args:
        client: An ``httpx.Client`` on the Prefect API.
        path: The file's relative POSIX path, as shown in the UI and the destination.
        topic: Only this topic's files (a path may come through several topics).

    Raises:
        MsiError: The server knows no rebuilt file of that path.
    """
    labels: dict[str, list[str]] = {"msi.path": [path]}
    if topic:
        labels["msi.topic"] = [topic]
    response = client.post(
        "/events/filter",
        json={
            "filter": {
                "event": {"name": [RECONSTRUCTED_EVENT]},
                "resource": {"labels": labels},
                "occurred": {"since": "2000-01-01T00:00:00Z"},
                "order": "DESC",
            },
            "limit": 1,
        },
    )
    response.raise_for_status()
    events = response.json().get("events", [])
    if not events:
        where = f" on topic {topic!r}" if topic else ""
        raise MsiError(
            f"the Prefect server has no rebuilt file {path!r}{where}; give the path relative "
            "to the destination folder, as the flow run names show it (events older than "
            "the server's event retention are gone)"
        )
    payload: dict[str, Any] = events[0]["payload"]
    return payload


def rerun_step(client: Any, step: Step, payload: dict[str, Any], ui: str | None) -> Rerun:
    """Start the per-file deployment of ``step`` for the file an event payload describes.

    Raises:
        MsiError: The deployment is not there (the flows were not deployed).
    """
    found = client.get(f"/deployments/name/{step.deployment}")
    if found.status_code == 404:
        raise MsiError(
            f"no deployment {step.deployment} on the Prefect server; deploy the flows "
            "(msi-prefect up, or prefect deploy --all in the project folder)"
        )
    found.raise_for_status()
    parameters = {key: payload[key] for key in FILE_PARAMETERS}
    if step is Step.BACKUP:
        # Makes the msi.file.backed-up event of this backup distinct from the first one's.
        parameters["trigger_event_id"] = f"rerun-{uuid.uuid4()}"
    created = client.post(
        f"/deployments/{found.json()['id']}/create_flow_run",
        json={"parameters": parameters, "tags": ["msi.manual-rerun"]},
    )
    created.raise_for_status()
    run_id = created.json()["id"]
    return Rerun(flow_run_id=run_id, ui_url=f"{ui}/runs/flow-run/{run_id}" if ui else None)


def prefect_api_and_ui(args: argparse.Namespace) -> tuple[str, str | None]:
    """The Prefect API (and UI) to use.

    In this order: ``--api-url``; the stack named by ``--state-dir``; $PREFECT_API_URL;
    the stack of $MSI_STATE_DIR or ./.msi.
    """
    if args.api_url:
        return args.api_url, None
    if args.state_dir is None and os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"], os.environ.get("PREFECT_UI_URL")
    from msi_prefect.stack.config import StateDir

    config = StateDir.from_env(args.state_dir).load_config()
    if config is None:
        raise MsiError(
            "no Prefect server to ask: give --api-url, set PREFECT_API_URL, or run this "
            "next to a stack started with msi-prefect up (or give --state-dir)"
        )
    return config.prefect_api_url, config.prefect_ui_url


def _rerun(args: argparse.Namespace) -> int:
    import httpx

    api, ui = prefect_api_and_ui(args)
    try:
        with httpx.Client(base_url=api, timeout=API_TIMEOUT_S) as client:
            payload = newest_rebuilt(client, args.path, args.topic)
            rerun = rerun_step(client, Step(args.step), payload, ui)
    except httpx.HTTPError as exc:
        raise MsiError(f"the Prefect server at {api} did not answer: {exc}") from exc
    print(
        f"started the {args.step} of {args.path} (generation {payload['generation']}): "
        f"flow run {rerun.flow_run_id}"
    )
    if rerun.ui_url:
        print(f"  {rerun.ui_url}")
    return EXIT_OK


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``rerun`` to the CLI."""
    parser = subparsers.add_parser(
        "rerun",
        help="run one step (backup, metadata, analysis) of one rebuilt file again",
        description="Run the backup, metadata extraction or analysis of one rebuilt file "
        "again, as a run of its per-file deployment, with the parameters of the file's "
        "newest msi.file.reconstructed event.",
    )
    parser.add_argument("step", choices=[step.value for step in Step])
    parser.add_argument("path", help="the file's path relative to the destination folder")
    parser.add_argument("--topic", help="the topic it came through (if several)")
    parser.add_argument(
        "--api-url",
        help="Prefect API (default: the stack of --state-dir, else $PREFECT_API_URL, else "
        "the stack of $MSI_STATE_DIR or ./.msi)",
    )
    parser.set_defaults(handler=_rerun)
