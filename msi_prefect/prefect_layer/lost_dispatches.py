"""Start the downstream runs that a dying Prefect server was told to start and never did.

A rebuilt file starts its downstream work through the deployment triggers of
``prefect.yaml``: the server stores the file's event (``msi.file.reconstructed`` labelled
``msi.dispatch: per-file``, or one ``msi.files.batch-ready`` per batch) and, apart from
that, its triggers service matches the event and queues one ``run-deployment`` action per
automation, which its actions service then runs, one after the other. Those queues live in
the server's memory. A server that dies (a power cut, ``kill -9``) or is stopped (``msi-prefect
down``) in the moment after it stored an event can therefore have created some of the
event's runs and not the others: the event is stored, so the outbox that confirms it is
satisfied; the missing run never existed, so it cannot crash and ``rerun-crashed`` has
nothing to re-run; and the restarted server never looks at the event again. Seen in
``tests/integration/test_stack_faults.py``: the power cut came 0.3 s after the server stored
``cut-0004.bin``'s event; its three automations had triggered, ``analyze-file`` and
``backup-file`` had their runs, ``extract-metadata`` never did, and the file never got its
``msi.file.metadata-extracted`` event.

So the sweep that follows a start of the server (``rerun-crashed`` with
``server_started_at``, scheduled by ``msi-prefect up``) also calls
:func:`start_lost_dispatches`: it reads the dispatching events that the server's previous
life *received* (``received`` before the start), from the newest of them back
:data:`LOST_DISPATCH_WINDOW_S`, and the runs of their downstream deployments since; every
deployment with no run for an event's file (or batch) gets one, with the parameters its
trigger renders (:func:`expected_dispatches`, checked against ``prefect.yaml`` by the
tests) and an idempotency key of the event and the deployment, so any number of sweeps
start it once. This cannot race the restarted server's triggers: they never see an event
its previous life received (the outboxes post again only events the server did not store).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from msi_prefect.prefect_layer.dispatch.mode import BATCH_FLOW, PER_FILE_FLOWS, DownstreamDispatch
from msi_prefect.prefect_layer.events import DISPATCH_LABEL, REBUILT_FILE_FIELDS, EventName

__all__ = [
    "LOST_DISPATCH_TAG",
    "LOST_DISPATCH_WINDOW_S",
    "Dispatch",
    "DispatchingEvent",
    "expected_dispatches",
    "missing_dispatches",
    "start_lost_dispatches",
]

logger = logging.getLogger(__name__)

#: Tag of a run started here; its idempotency key is ``<tag>:<event id>:<deployment>``.
LOST_DISPATCH_TAG = "msi.lost-dispatch"
#: How far back from the newest dispatching event the previous server received the sweep
#: looks: the triggers act on an event within about a second; minutes cover a server that
#: lagged behind before it died.
LOST_DISPATCH_WINDOW_S = 300.0
#: A run is created after its event: runs are read from this long before the oldest event.
RUN_LOOKUP_SLACK_S = 60.0
#: The most dispatching events one sweep looks at (the server returns 50 per page).
MAX_EVENTS_CHECKED = 2000
EVENTS_PAGE = 50
#: The newest dispatching event before the start is looked for this far back.
EVENT_LOOKBACK_HOURS = 24.0
RUNS_PAGE = 200
# The flows a per-file event and a batch event start (prefect.yaml, PER_FILE_FLOWS and
# BATCH_FLOW), one deployment each, named after its flow. The metadata flows take the
# event's time (a file unchanged since is not hashed again), the per-file backup the
# event's id (its dedup key).
ANNOUNCED_AT_FLOWS = ("extract-metadata", BATCH_FLOW)
TRIGGER_EVENT_ID_FLOW = "backup-file"
# A file of a run: its id and generation.
FileKey = tuple[str, int]


@dataclass(frozen=True)
class DispatchingEvent:
    """An event that starts downstream runs through the triggers, as the server stored it.

    Attributes:
        id: The event's id.
        name: ``msi.file.reconstructed`` or ``msi.files.batch-ready``.
        dispatch: Its ``msi.dispatch`` label (only ``per-file`` and ``batch`` start runs).
        occurred: When it occurred (the metadata flows take it as ``announced_at``).
        received: When the server received it.
        payload: Its payload: the file, or ``files`` for a batch.
    """

    id: str
    name: str
    dispatch: str
    occurred: datetime
    received: datetime
    payload: Mapping[str, Any]

    @classmethod
    def from_json(cls, event: Mapping[str, Any]) -> DispatchingEvent:
        """From an event as ``POST /events/filter`` returns it.

        Raises:
            KeyError: A field is missing.
            ValueError: A time is not ISO 8601.
        """
        return cls(
            id=str(event["id"]),
            name=str(event["event"]),
            dispatch=str(event.get("resource", {}).get(DISPATCH_LABEL, "")),
            occurred=_utc(event["occurred"]),
            received=_utc(event["received"]),
            payload=event.get("payload") or {},
        )

    def flows(self) -> tuple[str, ...]:
        """The flows this event's triggers start (none for a file dispatched in a batch)."""
        if self.name == EventName.RECONSTRUCTED and self.dispatch == DownstreamDispatch.PER_FILE:
            return PER_FILE_FLOWS
        if self.name == EventName.BATCH_READY and self.dispatch == DownstreamDispatch.BATCH:
            return (BATCH_FLOW,)
        return ()


@dataclass(frozen=True)
class Dispatch:
    """One run that an event's trigger starts.

    Attributes:
        flow: The flow, and the name of its deployment (``extract-metadata``).
        event_id: The event.
        parameters: What the trigger renders from the event.
    """

    flow: str
    event_id: str
    parameters: dict[str, Any]

    @property
    def idempotency_key(self) -> str:
        """One run per event and deployment, however many sweeps ask."""
        return f"{LOST_DISPATCH_TAG}:{self.event_id}:{self.flow}"

    def files(self) -> frozenset[FileKey]:
        """The files the run works on."""
        return files_of(self.parameters)


def _utc(value: Any) -> datetime:
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    if moment.tzinfo is None:
        raise ValueError(f"{value!r} has no time zone")
    return moment


def files_of(parameters: Mapping[str, Any]) -> frozenset[FileKey]:
    """The files (id, generation) of a downstream run's parameters, per-file or batch.

    Entries without a file id or generation (not a downstream run of a rebuilt file) are
    left out.
    """
    entries = parameters.get("files")
    candidates = entries if isinstance(entries, list) else [parameters]
    found = set()
    for entry in candidates:
        if not isinstance(entry, Mapping):
            continue
        try:
            found.add((str(entry["file_id"]), int(entry["generation"])))
        except (KeyError, TypeError, ValueError):
            continue
    return frozenset(found)


def expected_dispatches(event: DispatchingEvent) -> list[Dispatch]:
    """The runs ``event``'s triggers start, with the parameters they render (prefect.yaml)."""
    dispatches = []
    for flow in event.flows():
        if flow == BATCH_FLOW:
            parameters: dict[str, Any] = {"files": list(event.payload.get("files") or [])}
        else:
            parameters = {field: event.payload.get(field) for field in REBUILT_FILE_FIELDS}
        if flow in ANNOUNCED_AT_FLOWS:
            # As the trigger renders ``{{ event.occurred | string }}``.
            parameters["announced_at"] = str(event.occurred)
        if flow == TRIGGER_EVENT_ID_FLOW:
            parameters["trigger_event_id"] = event.id
        dispatches.append(Dispatch(flow, event.id, parameters))
    return dispatches


def previous_life_events(
    events: Iterable[DispatchingEvent], server_started_at: datetime
) -> list[DispatchingEvent]:
    """The dispatching events the server received before it started last, the newest first.

    From the newest of them back :data:`LOST_DISPATCH_WINDOW_S`: the ones whose runs the
    previous server may not have started when it went away.
    """
    before = sorted(
        (event for event in events if event.flows() and event.received < server_started_at),
        key=lambda event: event.received,
        reverse=True,
    )
    if not before:
        return []
    since = before[0].received - timedelta(seconds=LOST_DISPATCH_WINDOW_S)
    return [event for event in before if event.received >= since]


def missing_dispatches(
    events: Iterable[DispatchingEvent], runs: Iterable[tuple[str, Mapping[str, Any]]]
) -> list[Dispatch]:
    """The runs the events' triggers start that do not exist.

    Args:
        events: The dispatching events to check.
        runs: Every run (any state, re-runs included) of the downstream deployments since
            the events: its flow (deployment) name and its parameters.

    Returns:
        Per event and flow with no run that holds the event's files, the run to start.
    """
    covered: dict[str, set[FileKey]] = {}
    for flow, parameters in runs:
        covered.setdefault(flow, set()).update(files_of(parameters))
    missing = []
    for event in events:
        for dispatch in expected_dispatches(event):
            files = dispatch.files()
            if files and not files <= covered.get(dispatch.flow, set()):
                missing.append(dispatch)
    return missing


def start_lost_dispatches(
    server_started_at: datetime, deployment_names: Mapping[str, str] | None = None
) -> list[str]:
    """Start the downstream runs the server's previous life was told to start and did not.

    Args:
        server_started_at: When the Prefect server started (as ``msi-prefect up`` recorded
            it); the events it received before are the previous life's.
        deployment_names: The deployment (``flow/deployment``) of each downstream flow, if
            not the one of its name (``extract-metadata/extract-metadata``).

    Returns:
        The ids of the runs started (or found started by an earlier sweep).

    Raises:
        httpx.HTTPError: The server did not answer (the sweep fails and is run again by
            the next one).
        ValueError: ``server_started_at`` has no time zone.
    """
    from prefect.client.orchestration import get_client

    _utc(server_started_at)
    with get_client(sync_client=True) as client:
        events = previous_life_events(
            _dispatching_events(client, server_started_at), server_started_at
        )
        if not events:
            return []
        since = min(event.occurred for event in events) - timedelta(seconds=RUN_LOOKUP_SLACK_S)
        flows = {flow for event in events for flow in event.flows()}
        names = {flow: (deployment_names or {}).get(flow, f"{flow}/{flow}") for flow in flows}
        deployments = _deployment_ids(client, names)
        runs = _runs_since(client, deployments, since)
        started = []
        for dispatch in missing_dispatches(events, runs):
            deployment_id = deployments.get(dispatch.flow)
            if deployment_id is None:
                continue
            run = client.create_flow_run_from_deployment(
                deployment_id,
                parameters=dispatch.parameters,
                tags=[LOST_DISPATCH_TAG],
                idempotency_key=dispatch.idempotency_key,
            )
            logger.warning(
                "The Prefect server stored event %s before it went away but never started "
                "its %s run; started %s",
                dispatch.event_id,
                dispatch.flow,
                run.id,
            )
            started.append(str(run.id))
    return started


def _dispatching_events(client: Any, server_started_at: datetime) -> list[DispatchingEvent]:
    """The dispatching events that occurred before the start, the newest first (bounded)."""
    from prefect.events.filters import EventFilter

    # Received before the start means occurred before it (the emitters share the clock).
    event_filter = EventFilter.model_validate(
        {
            "occurred": {
                "since": server_started_at - timedelta(hours=EVENT_LOOKBACK_HOURS),
                "until": server_started_at,
            },
            "event": {"name": [EventName.RECONSTRUCTED.value, EventName.BATCH_READY.value]},
            "order": "DESC",
        }
    )
    page = client.read_events(event_filter, limit=EVENTS_PAGE)
    found: list[DispatchingEvent] = []
    newest: datetime | None = None
    while True:
        for event in page.events:
            parsed = DispatchingEvent.from_json(event.model_dump(mode="json"))
            if newest is None and parsed.flows() and parsed.received < server_started_at:
                newest = parsed.received
            found.append(parsed)
        oldest = found[-1].occurred if found else None
        window_done = (
            newest is not None
            and oldest is not None
            and oldest < newest - timedelta(seconds=LOST_DISPATCH_WINDOW_S)
        )
        if window_done or page.next_page is None:
            return found
        if len(found) >= MAX_EVENTS_CHECKED:
            logger.warning(
                "More than %d dispatching events in the last %.0f s before the server "
                "started; only those were checked for runs never started",
                MAX_EVENTS_CHECKED,
                LOST_DISPATCH_WINDOW_S,
            )
            return found
        page = client.read_events_page(str(page.next_page))


def _deployment_ids(client: Any, names: Mapping[str, str]) -> dict[str, Any]:
    """The id of each flow's deployment (by ``flow/deployment`` name); one not there is left out."""
    from prefect.exceptions import ObjectNotFound

    found = {}
    for flow, name in sorted(names.items()):
        try:
            found[flow] = client.read_deployment_by_name(name).id
        except ObjectNotFound:
            logger.warning("no deployment %s: the runs it lost cannot be started", name)
    return found


def _runs_since(
    client: Any, deployments: Mapping[str, Any], since: datetime
) -> list[tuple[str, Mapping[str, Any]]]:
    """Every run of the deployments expected to start after ``since``: (flow, parameters)."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
    )

    runs: list[tuple[str, Mapping[str, Any]]] = []
    for flow, deployment_id in deployments.items():
        offset = 0
        while True:
            page = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    expected_start_time=FlowRunFilterExpectedStartTime(after_=since)  # type: ignore[arg-type]
                ),
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                limit=RUNS_PAGE,
                offset=offset,
            )
            runs += [(flow, run.parameters) for run in page]
            if len(page) < RUNS_PAGE:
                break
            offset += RUNS_PAGE
    return runs
