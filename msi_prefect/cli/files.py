"""Where is my file? ``msi-prefect files [PATTERN] [--json]``.

For every file whose relative path matches a glob, and every generation of it, the
history the Prefect server holds: when it was sent and by which run
(``msi.file.uploaded``), when and where it was rebuilt (``msi.file.reconstructed``), its
backup (object URL and SHA-256, ``msi.file.backed-up``), its metadata and analysis
(``msi.file.metadata-extracted``, ``msi.file.analyzed``), a rejection with its reason
(``msi.file.rejected``) and a backup the audit found missing (``msi.backup.missing``).
Each step names the flow run that did it, its state and its link in the UI. A file still
in flight shows the last step it reached and the steps still to come.

The events come from ``POST /events/filter`` (paged through ``next_page``), at most
:data:`MAX_EVENTS` of them and none older than ``--since-days``. Files the producer claimed
but has not sent (being sent, aborted because they changed, failed) come from the producer
registry (``--registry``; by default the one of the stack's watch-directory deployment),
with the registry's reason. Files the watcher never claimed (excluded by a pattern, still
changing) are in no record: the registry keeps what was sent or tried, not what was skipped.

``--json`` prints :class:`FilesReport` as JSON (its fields are the documented format,
``docs/operations.md``, "Where is my file?").
"""

from __future__ import annotations

import argparse
import fnmatch
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from msi_prefect.cli.rerun import prefect_api_and_ui
from msi_prefect.errors import MsiError

if TYPE_CHECKING:
    from msi_prefect.transfer import Registry

#: A kind of record read from the producer registry.
T = TypeVar("T")

API_TIMEOUT_S = 30.0
EXIT_OK = 0
#: Events read at most (the newest are kept if there are more).
MAX_EVENTS = 5000
#: The most events the server returns per page (it refuses more).
EVENTS_PER_PAGE = 50
#: Flow runs asked for in one request.
RUNS_PER_REQUEST = 200
DEFAULT_SINCE_DAYS = 30.0
#: Version of the ``--json`` format; grows when a field changes meaning or goes away.
REPORT_FORMAT = 1
#: A detail longer than this (an analysis result) is cut in the text output, not in --json.
MAX_TEXT_VALUE_CHARS = 100
_GLOB_CHARS = "*?["


class Step(StrEnum):
    """A step of a file's way, in the order it goes (named by its ``--json`` key)."""

    SENT = "sent"
    REJECTED = "rejected"
    REBUILT = "rebuilt"
    BACKUP = "backup"
    METADATA = "metadata"
    ANALYSIS = "analysis"
    BACKUP_MISSING = "backup_missing"


#: Which event records which step.
STEP_OF_EVENT: dict[str, Step] = {
    "msi.file.uploaded": Step.SENT,
    "msi.file.rejected": Step.REJECTED,
    "msi.file.reconstructed": Step.REBUILT,
    "msi.file.backed-up": Step.BACKUP,
    "msi.file.metadata-extracted": Step.METADATA,
    "msi.file.analyzed": Step.ANALYSIS,
    "msi.backup.missing": Step.BACKUP_MISSING,
}
#: The steps a delivered file goes through, in order (how far a file in flight got).
WAY = (Step.SENT, Step.REBUILT, Step.BACKUP, Step.METADATA, Step.ANALYSIS)
#: Payload fields shown for each step, besides the file's own (path, topic, generation).
DETAILS: dict[Step, tuple[str, ...]] = {
    Step.SENT: ("size", "sha256"),
    Step.REJECTED: ("reason_code", "reason"),
    Step.REBUILT: ("url", "size", "sha256"),
    Step.BACKUP: ("backup_url", "backup", "sha256"),
    Step.METADATA: ("metadata_topic", "mime_type", "extractor", "warnings"),
    Step.ANALYSIS: ("analysis", "result", "result_cut"),
    Step.BACKUP_MISSING: ("status", "backup"),
}


@dataclass
class RunRef:
    """The flow run that did a step.

    Attributes:
        id: The flow run's id.
        name: Its name (``backup run1/a.tif``, ``watch /data/inbox``...).
        state: Its state's type now (``COMPLETED``, ``FAILED``...), if the server said.
        ui_url: Its page in the Prefect UI, when the UI's address is known.
    """

    id: str
    name: str | None
    state: str | None = None
    ui_url: str | None = None


@dataclass
class StepRecord:
    """One step of one generation of a file.

    Attributes:
        at: When it happened (ISO 8601, UTC).
        event: The event's name.
        event_id: The event's id (the UI's Events page shows it).
        run: The flow run that did it, if it ran in one.
        details: What the event says about the step (see :data:`DETAILS`).
    """

    at: str
    event: str
    event_id: str
    run: RunRef | None
    details: dict[str, Any]


@dataclass
class GenerationHistory:
    """Every step one generation of a file went through.

    Attributes:
        generation: The generation (1 for the first version sent).
        file_id: The file id (uuid5 of the path).
        steps: Each step reached, by :class:`Step` value, in the order of :class:`Step`; a
            step seen more than once (a re-run) shows its newest record.
        reached: The last step of :data:`WAY` this generation reached, or ``rejected``.
        waiting_for: The steps of :data:`WAY` it has not reached yet (empty when done,
            and for a rejected generation).
    """

    generation: int | None
    file_id: str
    steps: dict[str, StepRecord] = field(default_factory=dict)
    reached: str | None = None
    waiting_for: list[str] = field(default_factory=list)


@dataclass
class FileHistory:
    """One file (a path on a topic) and its generations, oldest first.

    Attributes:
        path: The relative path.
        topic: The topic.
        generations: Each generation's steps.
        artifact_key: The key of its history artifact in the UI (written by its downstream
            steps and, for a rejection, by the reconstruct run).
        artifact_url: That artifact's page in the UI, when the UI's address is known.
    """

    path: str
    topic: str
    generations: list[GenerationHistory] = field(default_factory=list)
    artifact_key: str = ""
    artifact_url: str | None = None


@dataclass
class NotSent:
    """A file the producer claimed but has not sent, from the producer registry.

    Attributes:
        path: The relative path.
        topic: The topic it is for.
        generation: The generation claimed.
        state: ``sending`` (in progress, or cut short), ``pending`` (aborted: it changed
            while read; sent again once stable) or ``failed``.
        reason: Why it was aborted or failed.
        updated_at: When the registry last changed it (ISO 8601, UTC).
    """

    path: str
    topic: str
    generation: int
    state: str
    reason: str | None
    updated_at: str


@dataclass
class SkippedByWatcher:
    """A file the watcher skipped and has not sent since, from the producer registry.

    Attributes:
        path: The relative path.
        topic: The topic it would go to.
        reason: ``excluded``, ``still-changing`` or ``unreadable``.
        detail: The rule that excluded it, or the error.
        at: When it was skipped (ISO 8601, UTC).
    """

    path: str
    topic: str
    reason: str
    detail: str
    at: str


@dataclass
class FilesReport:
    """What ``msi-prefect files --json`` prints.

    Attributes:
        format: :data:`REPORT_FORMAT`.
        pattern: The glob the paths were matched against.
        since: The oldest event time read.
        events_read: How many events were read.
        truncated: Whether :data:`MAX_EVENTS` cut the reading short (older events left out).
        files: The matching files, by path then topic.
        registry: The producer registry read, or None.
        not_sent: The matching files the registry holds as not sent.
        skipped: The matching files the watcher skipped, with its reason.
    """

    format: int
    pattern: str
    since: str
    events_read: int
    truncated: bool
    files: list[FileHistory]
    registry: str | None = None
    not_sent: list[NotSent] = field(default_factory=list)
    skipped: list[SkippedByWatcher] = field(default_factory=list)


def literal_prefix(pattern: str) -> str:
    """The part of a glob before its first wildcard (``run1/*.tif`` -> ``run1/``)."""
    cut = min((pattern.find(char) for char in _GLOB_CHARS if char in pattern), default=-1)
    return pattern if cut < 0 else pattern[:cut]


def read_file_events(
    client: Any, pattern: str, since: datetime
) -> tuple[list[dict[str, Any]], bool]:
    """The file events whose path may match ``pattern``, newest first, at most :data:`MAX_EVENTS`.

    Args:
        client: An ``httpx.Client`` on the Prefect API.
        pattern: The glob on the relative path.
        since: The oldest event to read.

    Returns:
        The events, and whether there were more than :data:`MAX_EVENTS`.
    """
    resource: dict[str, Any] = {"id_prefix": ["msi.file."]}
    prefix = literal_prefix(pattern)
    if prefix == pattern:
        resource["labels"] = {"msi.path": [pattern]}
    elif prefix:
        resource["labels"] = {"msi.path": [f"{prefix}*"]}
    body = {
        "filter": {
            "event": {"name": list(STEP_OF_EVENT)},
            "resource": resource,
            "occurred": {
                "since": since.isoformat(),
                "until": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
            },
            "order": "DESC",
        },
        "limit": EVENTS_PER_PAGE,
    }
    # Here, not at the top: every subcommand's module is imported to build the parser,
    # and `upload` must not pay for the HTTP client.
    from msi_prefect.prefect_layer.event_queries import event_pages

    events: list[dict[str, Any]] = []
    for page in event_pages(client, body):
        events += page
        if len(events) >= MAX_EVENTS:
            return events[:MAX_EVENTS], True
    return events, False


def _run_of(event: dict[str, Any]) -> RunRef | None:
    for related in event.get("related", []):
        if related.get("prefect.resource.role") == "flow-run":
            run_id = related["prefect.resource.id"].removeprefix("prefect.flow-run.")
            return RunRef(id=run_id, name=related.get("prefect.resource.name"))
    return None


def build_histories(events: list[dict[str, Any]], pattern: str) -> list[FileHistory]:
    """Group file events by path, topic and generation; steps in the order they happened.

    Args:
        events: Events as the API returns them, in any order.
        pattern: Only paths matching this glob are kept.
    """
    files: dict[tuple[str, str], FileHistory] = {}
    generations: dict[tuple[str, str, int | None], GenerationHistory] = {}
    for event in sorted(events, key=lambda e: str(e["occurred"])):
        step = STEP_OF_EVENT.get(event["event"])
        payload = event.get("payload") or {}
        path = str(payload.get("path") or event["resource"].get("msi.path") or "")
        topic = str(payload.get("topic") or event["resource"].get("msi.topic") or "")
        if step is None or not fnmatch.fnmatchcase(path, pattern):
            continue
        generation = payload.get("generation")
        history = files.setdefault((path, topic), FileHistory(path=path, topic=topic))
        key = (path, topic, generation)
        if key not in generations:
            generations[key] = GenerationHistory(
                generation=generation, file_id=str(payload.get("file_id") or "")
            )
            history.generations.append(generations[key])
        details = {name: payload[name] for name in DETAILS[step] if name in payload}
        generations[key].steps[step.value] = StepRecord(
            at=str(event["occurred"]),
            event=event["event"],
            event_id=str(event["id"]),
            run=_run_of(event),
            details=details,
        )
    for history in files.values():
        history.generations.sort(key=lambda g: g.generation or 0)
        for generation_history in history.generations:
            _mark_progress(generation_history)
    return [files[key] for key in sorted(files)]


def _mark_progress(history: GenerationHistory) -> None:
    history.steps = {
        step.value: history.steps[step.value] for step in Step if step.value in history.steps
    }
    if Step.REJECTED.value in history.steps:
        history.reached = Step.REJECTED.value
        return
    done = [step for step in WAY if step.value in history.steps]
    history.reached = done[-1].value if done else None
    history.waiting_for = [step.value for step in WAY if step.value not in history.steps]


def add_run_states(client: Any, files: list[FileHistory], ui_url: str | None) -> None:
    """Fill in each step's run state and UI link from ``POST /flow_runs/filter``."""
    runs = {
        record.run.id: record.run
        for history in files
        for generation in history.generations
        for record in generation.steps.values()
        if record.run is not None
    }
    run_ids = list(runs)
    for start in range(0, len(run_ids), RUNS_PER_REQUEST):
        chunk = run_ids[start : start + RUNS_PER_REQUEST]
        response = client.post(
            "/flow_runs/filter",
            json={"flow_runs": {"id": {"any_": chunk}}, "limit": len(chunk)},
        )
        response.raise_for_status()
        for found in response.json():
            for history in files:
                for generation in history.generations:
                    for record in generation.steps.values():
                        if record.run is not None and record.run.id == found["id"]:
                            record.run.state = found.get("state_type")
                            record.run.name = found.get("name") or record.run.name
    if ui_url:
        for history in files:
            for generation in history.generations:
                for record in generation.steps.values():
                    if record.run is not None:
                        record.run.ui_url = f"{ui_url}/runs/flow-run/{record.run.id}"


def _read_registry(registry: Path, read: Callable[[Registry], list[T]]) -> list[T]:
    """What ``read`` returns from the producer registry at ``registry``.

    Raises:
        MsiError: The registry cannot be read.
    """
    import sqlite3

    from msi_prefect.transfer import Registry

    try:
        with Registry(registry) as store:
            return read(store)
    except (sqlite3.Error, OSError) as exc:
        raise MsiError(f"cannot read the producer registry {registry}: {exc}") from exc


def not_sent_files(registry: Path, pattern: str) -> list[NotSent]:
    """The files matching ``pattern`` that a producer registry holds as not sent.

    Raises:
        MsiError: The registry cannot be read.
    """
    from msi_prefect.transfer import Registry

    records = _read_registry(registry, Registry.not_sent)
    return [
        NotSent(
            path=record.relpath,
            topic=record.topic,
            generation=record.generation,
            state=record.state.value,
            reason=record.reason,
            updated_at=datetime.fromtimestamp(record.updated_at, UTC).isoformat(),
        )
        for record in records
        if fnmatch.fnmatchcase(record.relpath, pattern)
    ]


def skipped_files(registry: Path, pattern: str) -> list[SkippedByWatcher]:
    """The files matching ``pattern`` that the watcher skipped and has not sent since.

    Raises:
        MsiError: The registry cannot be read.
    """
    from msi_prefect.transfer import Registry

    records = _read_registry(registry, Registry.skipped)
    return [
        SkippedByWatcher(
            path=record.skipped.relpath,
            topic=record.topic,
            reason=record.skipped.reason.value,
            detail=record.skipped.detail,
            at=datetime.fromtimestamp(record.skipped.at, UTC).isoformat(),
        )
        for record in records
        if fnmatch.fnmatchcase(record.skipped.relpath, pattern)
    ]


def add_artifact_keys(files: list[FileHistory], ui_url: str | None) -> None:
    """Name each file's history artifact (and its page in the UI)."""
    # Here, not at the top: the Prefect layer's modules load the transfer core.
    from msi_prefect.prefect_layer.file_history import file_history_key

    for history in files:
        history.artifact_key = file_history_key(history.topic, history.path)
        if ui_url:
            history.artifact_url = f"{ui_url}/artifacts/key/{history.artifact_key}"


def stack_registry(args: argparse.Namespace) -> Path | None:
    """The registry of the watch-directory deployment of the stack next to us, if any."""
    from msi_prefect.stack.config import StateDir
    from msi_prefect.transfer import registry_beside

    try:
        config = StateDir.from_env(args.state_dir).load_config()
    except (OSError, ValueError):
        return None
    if config is None or config.watch_dir is None:
        return None
    path = registry_beside(Path(config.watch_dir))
    return path if path.is_file() else None


def file_report(client: Any, pattern: str, since_days: float, ui_url: str | None) -> FilesReport:
    """The history of every file matching ``pattern``, as :class:`FilesReport`."""
    since = datetime.now(UTC) - timedelta(days=since_days)
    events, truncated = read_file_events(client, pattern, since)
    files = build_histories(events, pattern)
    add_run_states(client, files, ui_url)
    add_artifact_keys(files, ui_url)
    return FilesReport(
        format=REPORT_FORMAT,
        pattern=pattern,
        since=since.isoformat(),
        events_read=len(events),
        truncated=truncated,
        files=files,
    )


def _shorten(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_TEXT_VALUE_CHARS else text[: MAX_TEXT_VALUE_CHARS - 3] + "..."


def _print_text(report: FilesReport) -> None:
    if not report.files:
        print(f"no file matching {report.pattern!r} in the events since {report.since}")
    for history in report.files:
        print(f"{history.path}  (topic {history.topic})")
        where = f"  {history.artifact_url}" if history.artifact_url else ""
        print(f"  history artifact {history.artifact_key}{where}")
        for generation in history.generations:
            waiting = (
                f"; waiting for {', '.join(generation.waiting_for)}"
                if generation.waiting_for
                else ""
            )
            print(f"  generation {generation.generation}: reached {generation.reached}{waiting}")
            for step, record in generation.steps.items():
                details = ", ".join(
                    f"{key} {_shorten(value)}" for key, value in record.details.items()
                )
                print(f"    {step:<15} {record.at}  {details}")
                if record.run is not None:
                    link = f"  {record.run.ui_url}" if record.run.ui_url else ""
                    print(f"    {'':<15} run {record.run.name!r} {record.run.state}{link}")
    if report.not_sent:
        print(f"claimed but not sent (producer registry {report.registry}):")
    for entry in report.not_sent:
        reason = f": {entry.reason}" if entry.reason else ""
        print(
            f"  {entry.path}  (topic {entry.topic}) generation {entry.generation} "
            f"{entry.state} since {entry.updated_at}{reason}"
        )
    if report.skipped:
        print(f"never sent, skipped by the watcher (producer registry {report.registry}):")
    for skipped in report.skipped:
        print(
            f"  {skipped.path}  (topic {skipped.topic}) {skipped.reason} since {skipped.at}: "
            f"{skipped.detail}"
        )
    if report.truncated:
        print(f"(only the newest {report.events_read} events were read)")


def _files(args: argparse.Namespace) -> int:
    import httpx

    if args.since_days <= 0:
        raise MsiError(f"--since-days must be more than 0, not {args.since_days}")
    api, ui = prefect_api_and_ui(args)
    try:
        with httpx.Client(base_url=api, timeout=API_TIMEOUT_S) as client:
            report = file_report(client, args.pattern, args.since_days, ui)
    except httpx.HTTPError as exc:
        raise MsiError(f"the Prefect server at {api} did not answer: {exc}") from exc
    registry = args.registry or stack_registry(args)
    if args.registry is not None and not args.registry.is_file():
        raise MsiError(f"no producer registry at {args.registry}")
    if registry is not None:
        report.registry = str(registry)
        report.not_sent = not_sent_files(registry, args.pattern)
        report.skipped = skipped_files(registry, args.pattern)
    if args.json:
        print(json.dumps(asdict(report), indent=2, default=str))
    else:
        _print_text(report)
    return EXIT_OK


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``files`` to the CLI."""
    parser = subparsers.add_parser(
        "files",
        help="where is my file: each generation's way (sent, rebuilt, backup, metadata, "
        "analysis, rejection) with its runs",
        description="Show, for every file whose relative path matches PATTERN, each "
        "generation's history from the Prefect server's events: sent, rebuilt, backed up, "
        "described, analysed or rejected, with the runs, their states and UI links.",
    )
    parser.add_argument(
        "pattern", nargs="?", default="*", help="glob on the relative path (default: every file)"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--since-days",
        type=float,
        default=DEFAULT_SINCE_DAYS,
        help=f"read events of this many days back (default {DEFAULT_SINCE_DAYS:g})",
    )
    parser.add_argument(
        "--registry",
        type=Path,
        help="producer registry to list the files claimed but not sent from (default: the "
        "one of the stack's watch-directory deployment, beside its watched folder)",
    )
    parser.add_argument(
        "--api-url",
        help="Prefect API (default: the stack of --state-dir, else $PREFECT_API_URL, else "
        "the stack of $MSI_STATE_DIR or ./.msi)",
    )
    parser.set_defaults(handler=_files)
