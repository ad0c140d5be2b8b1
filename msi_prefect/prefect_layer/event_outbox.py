"""A durable outbox for the file events of the long-running flows.

Prefect's own ``emit_event`` hands an event to an in-memory queue and a websocket; if
the server is down, or the process dies before the queue drains, the event is gone and
so is the downstream work it would have started. The long-running flows therefore write
every event to a small SQLite outbox first (before the file's Kafka offsets are
committed) and a sender thread posts the outbox to the server's ``POST /api/events`` in
batches, oldest first, deleting rows only once the server has accepted them. While the
server is unreachable the sender retries with a growing pause (up to
``MAX_RETRY_PAUSE_S``) and the transfer goes on; when it is back, every event is
delivered. Event ids are deterministic (``msi_prefect.prefect_layer.events``), so an event
posted twice (accepted, then the process died before deleting it) is kept once by the server.

A server that accepted an event can still lose it: Prefect's server keeps accepted
events in memory queues until its services (the persister, the triggers) take them, so a
server that dies (a power cut) loses what it had not processed, and an overloaded one
drops events once a queue is full (10,000 messages in Prefect's code, 30,000 on the
embedded stack's server). So a posted event moves to a second outbox, the *unconfirmed*
one, and the sender asks the server (``POST /api/events/filter`` by id) whether it stored
it: a stored event is forgotten, one still missing :data:`RESEND_AFTER_S` (5 minutes)
after it was posted is posted again, and one that an earlier run of the flow posted and
the server still lacks :data:`EARLIER_RUN_GRACE_S` after this run started is posted again
at once (a power cut takes the server's memory queues with it, and the flow restarts with
the server). The server's triggers skip an id they have seen (for 15 minutes), so a
re-sent event that did start its work is not acted on twice; only an event lost in the
second between the triggers and the persister, on a server that then died, can start its
work twice. The unconfirmed outbox lives on disk too, so the next run of the flow goes on
confirming what this one posted.

Memory stays flat: the sender reads at most ``batch_size`` rows at a time; the backlog
lives on disk.

The short downstream runs (backup, metadata, analysis) announce their steps through an
outbox of the same kind, one per host and Prefect server (:func:`emit_downstream_event`):
a run writes its event and posts it at once, never waiting for the server, and the
``reconstruct-files`` run of the host relays what runs left behind and confirms what they
posted (:class:`DownstreamEventRelay`); see the section below.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, cast

from msi_prefect.prefect_layer.events import FileEventSpec
from msi_prefect.transfer import DurableQueue, user_state_dir

if TYPE_CHECKING:
    from prefect.settings import Settings

logger = logging.getLogger(__name__)

#: Beside the outbox: events posted but not yet seen stored by the server.
UNCONFIRMED_SUFFIX = ".unconfirmed"
DEFAULT_BATCH_SIZE = 100
#: A posted event is looked for this long after it was posted (Prefect's persister writes
#: events within 5 s by default, within 1 s on the embedded stack, but lags far behind on
#: an overloaded server).
CONFIRM_AFTER_S = 60.0
#: ...and posted again if the server has not stored it this long after. Long: an event
#: that is late, not lost, and is posted again only adds to an overloaded server's work
#: (measured: at 10 files/s a 30 s limit re-posted 131 batches and made it worse).
RESEND_AFTER_S = 300.0
#: Event ids asked about per query (the server's largest page), and queries per round.
CONFIRM_BATCH = 50
CONFIRM_QUERIES_PER_ROUND = 8
#: How often the sender asks about posted events.
CONFIRM_INTERVAL_S = 10.0
#: Events an earlier run posted and the server still lacks this long after this run
#: started are posted again at once: the likely story is a server that died with them in
#: memory (a power cut), and the flow was started again with it.
EARLIER_RUN_GRACE_S = 10.0
# The bounds of the id query's time window: any time.
EPOCH_ISO = "2000-01-01T00:00:00Z"
FAR_FUTURE_ISO = "2100-01-01T00:00:00Z"
# The sender looks at the outbox at least this often, even without a wake-up.
IDLE_CHECK_S = 1.0
#: After a post, the sender waits this long before the next, so the events that come
#: meanwhile go in one request: at 10 files/s the transfers' events were 2.5 requests
#: per file, each alone. An event into a quiet sender is posted at once.
POST_SPACING_S = 0.25
FIRST_RETRY_PAUSE_S = 1.0
MAX_RETRY_PAUSE_S = 30.0
# How long `close()` keeps trying to deliver what is left before leaving it for next time.
DEFAULT_DRAIN_S = 10.0

#: Where the downstream flow runs of a host keep their event outbox; `msi-prefect up` sets
#: it for the stack's worker to ``STATE_DIR/events``. Default: the same subfolder of the
#: user's state directory (``msi_prefect.transfer.user_state_dir``).
DOWNSTREAM_OUTBOX_DIR_ENV = "MSI_EVENT_OUTBOX_DIR"
DOWNSTREAM_OUTBOX_SUBDIR = "events"
DOWNSTREAM_OUTBOX_PREFIX = "downstream-events-"
# Characters of the API URL's SHA-256 in the outbox's name: one outbox per Prefect server.
API_DIGEST_CHARS = 16
#: A downstream run posts its events itself; the relay in the long-running reconstruct
#: flow posts an event left in the outbox once it is this old (its run died, or could not
#: reach the server).
LEFT_BEHIND_AFTER_S = 5.0
#: One direct post of a downstream event may take this long (a run must not wait on a
#: server that does not answer)...
DIRECT_POST_TIMEOUT_S = 5.0
#: ...and after a failed one the run only writes its events to disk for this long.
DIRECT_POST_PAUSE_S = 30.0
#: A batch run posts its files' events together, at most this often (see
#: :class:`GatheredEventPoster`): a file's event reaches the server at most this much later.
#: Measured at 10 files/s: every 0.1 s took out only a fifth of the posts (a loaded run
#: does about a file per 0.1 s).
GATHER_INTERVAL_S = 0.5

#: Posts a batch of events (JSON objects); raises if the server did not accept them.
PostEvents = Callable[[list[dict[str, Any]]], None]
#: Of some event ids, the ones the server has stored; raises if it cannot tell.
ConfirmEvents = Callable[[list[str]], set[str]]


def event_outbox(path: str | Path) -> DurableQueue:
    """The durable queue of events waiting to be delivered, keyed by event id."""
    return DurableQueue(path, name="event outbox")


def unconfirmed_outbox(path: str | Path) -> DurableQueue:
    """The events posted from the outbox at ``path`` that the server has not shown stored."""
    path = Path(path)
    return DurableQueue(path.with_name(path.name + UNCONFIRMED_SUFFIX), name="unconfirmed events")


class EventSender:
    """Delivers an outbox in the background; survives server outages.

    Args:
        outbox: The events to deliver.
        post: Sends one batch; raises when the server did not take it.
        batch_size: Events per post.
        unconfirmed: Where posted events wait until the server shows them stored; without
            it (and ``confirm``) a posted event is forgotten at once.
        confirm: Asks the server which of some event ids it stored.
        clock: Wall-clock time source (tests inject a fake).
        post_after_s: Post an event only once it is this old (by its ``occurred`` time):
            for an outbox shared with the processes that wrote it, which post their own
            events at once (:class:`DownstreamEventOutbox`); this sender posts what they
            left behind.
        post_spacing_s: The shortest time between two posts (a full batch goes at once).
    """

    def __init__(
        self,
        outbox: DurableQueue,
        post: PostEvents,
        batch_size: int = DEFAULT_BATCH_SIZE,
        unconfirmed: DurableQueue | None = None,
        confirm: ConfirmEvents | None = None,
        clock: Callable[[], float] = time.time,
        post_after_s: float = 0.0,
        post_spacing_s: float = POST_SPACING_S,
    ) -> None:
        self._outbox = outbox
        self._post_after_s = post_after_s
        self._post_spacing_s = post_spacing_s
        self._post = post
        self._batch_size = batch_size
        self._unconfirmed = unconfirmed if confirm is not None else None
        self._confirm = confirm
        self._clock = clock
        self._confirmed_at = 0.0
        self._started_at = clock()
        # Whether a round has asked about an earlier run's events since the grace ended.
        self._earlier_asked = False
        self.resent = 0
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._pause = FIRST_RETRY_PAUSE_S
        self.delivered = 0
        self.failed_posts = 0

    def start(self) -> None:
        """Start the sender thread."""
        # In the caller's context: Prefect's settings (the API URL) live in context
        # variables, which a new thread would not see.
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._run,), name="msi-event-sender", daemon=True
        )
        self._thread.start()

    def wake(self) -> None:
        """Tell the sender that a new event waits (it also looks every second)."""
        self._wakeup.set()

    def deliver_once(self) -> int:
        """Post one batch, if any; how many events were delivered (0: none).

        Raises:
            Exception: Whatever ``post`` raised; the batch stays queued.
        """
        batch = self._outbox.oldest(self._batch_size)
        if self._post_after_s > 0:
            cutoff = self._clock() - self._post_after_s
            batch = list(itertools.takewhile(lambda row: occurred_at(row[1]) <= cutoff, batch))
        if not batch:
            return 0
        self._post([body for _, body in batch])
        if self._unconfirmed is not None:
            # Recorded before the outbox forgets them: a crash in between posts them again.
            posted_at = self._clock()
            self._unconfirmed.add_many(
                [(str(body["id"]), {"posted_at": posted_at, "event": body}) for _, body in batch]
            )
        self._outbox.remove_through(batch[-1][0])
        self.delivered += len(batch)
        return len(batch)

    def confirm_once(self) -> int:
        """Ask the server about the posted events that are due; re-queue the lost ones.

        Returns:
            How many events were settled (found stored, or queued to be posted again).

        Raises:
            Exception: Whatever ``confirm`` raised; the events stay unconfirmed.
        """
        if self._unconfirmed is None or self._confirm is None:
            return 0
        settled = 0
        for _ in range(CONFIRM_QUERIES_PER_ROUND):
            now = self._clock()
            # Posted by an earlier run of the flow: given up on sooner (see above).
            earlier_due = now - self._started_at >= EARLIER_RUN_GRACE_S
            due = [
                record
                for _, record in self._unconfirmed.oldest(CONFIRM_BATCH)
                if now - record["posted_at"] >= CONFIRM_AFTER_S
                or (earlier_due and record["posted_at"] < self._started_at)
            ]
            if not due:
                break
            stored = self._confirm([record["event"]["id"] for record in due])
            lost = [
                record
                for record in due
                if record["event"]["id"] not in stored
                and (
                    now - record["posted_at"] >= RESEND_AFTER_S
                    or record["posted_at"] < self._started_at
                )
            ]
            if lost:
                logger.warning(
                    "The Prefect server lost %d of the events it accepted (a restart, or "
                    "its queues overflowed); posting them again",
                    len(lost),
                )
                self._outbox.add_many([(record["event"]["id"], record["event"]) for record in lost])
                self.resent += len(lost)
                self._wakeup.set()
            done = [*stored, *(record["event"]["id"] for record in lost)]
            self._unconfirmed.remove_keys(done)
            settled += len(done)
            if len(done) < len(due):  # the rest is not due for a verdict yet
                break
        return settled

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                delivered = self.deliver_once()
                if delivered:
                    if self._pause > FIRST_RETRY_PAUSE_S:
                        logger.warning("Prefect server reachable again; delivering events")
                    self._pause = FIRST_RETRY_PAUSE_S
                    if delivered < self._batch_size:  # the next events gather meanwhile
                        self._stopping.wait(self._post_spacing_s)
                    continue
                if self._confirm_due():
                    self._confirmed_at = self._clock()
                    self._earlier_asked = (
                        self._confirmed_at - self._started_at >= EARLIER_RUN_GRACE_S
                    )
                    self._confirm_quietly()
            except Exception as exc:  # the server is down or refused: keep the events
                self.failed_posts += 1
                if self._pause == FIRST_RETRY_PAUSE_S:
                    logger.warning(
                        "Cannot deliver events to the Prefect server (%s); %d wait on disk, "
                        "retrying",
                        exc,
                        self._outbox.count(),
                    )
                self._stopping.wait(self._pause)
                self._pause = min(MAX_RETRY_PAUSE_S, self._pause * 2)
                continue
            self._wakeup.wait(IDLE_CHECK_S)
            self._wakeup.clear()

    def _confirm_due(self) -> bool:
        # Every CONFIRM_INTERVAL_S, and once right when the grace for an earlier run's
        # events ends: a file whose event a power cut lost should not wait a whole interval.
        now = self._clock()
        if now - self._confirmed_at >= CONFIRM_INTERVAL_S:
            return True
        return not self._earlier_asked and now - self._started_at >= EARLIER_RUN_GRACE_S

    def _confirm_quietly(self) -> None:
        # A server that cannot answer now is asked again in a moment; the posting of new
        # events must not pause for it.
        try:
            self.confirm_once()
        except Exception as exc:
            logger.debug("could not ask the Prefect server about posted events: %r", exc)

    def close(self, drain_s: float = DEFAULT_DRAIN_S) -> int:
        """Stop the thread, then try to deliver what is left for up to ``drain_s`` seconds.

        Returns:
            Events still waiting (delivered by the next run of the flow).
        """
        self._stopping.set()
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join()
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline:
            try:
                if not self.deliver_once():
                    break
            except Exception as exc:
                logger.warning("Events left undelivered until the next run: %s", exc)
                break
        return self._outbox.count()


def settings_without_client_retries(settings: Settings) -> Settings:
    """``settings`` with Prefect's client retries off (``PREFECT_CLIENT_MAX_RETRIES`` 0).

    A copy of the one field, not ``Settings.copy_with_update``: that builds every settings
    model again from the environment, about 25 ms of CPU, and profiling showed it as the
    largest single cost of a short flow run (two posters per run).
    """
    client = settings.client.model_copy(update={"max_retries": 0})
    return settings.model_copy(update={"client": client})


class PrefectEventPoster:
    """Posts event batches to the Prefect API of the environment (``POST /api/events``).

    One HTTP client is kept for the sender thread's life (a new one per post costs a
    connection and Prefect's client start-up, about 0.3 s on a busy machine); it is
    replaced after a failure.

    Args:
        timeout_s: Timeout of one request (default: Prefect's client setting).
        retries: Whether Prefect's client retries a request (it does for about a minute
            when the server is away: right for a sender thread, wrong for a flow run that
            posts in line).
    """

    def __init__(self, timeout_s: float | None = None, retries: bool = True) -> None:
        self._client: Any = None
        self._timeout_s = timeout_s
        self._retries = retries

    def __call__(self, events: list[dict[str, Any]]) -> None:
        """Post one batch.

        Raises:
            httpx.HTTPError: The server is unreachable or did not accept them.
        """
        self._request("/events", events)

    def stored(self, event_ids: list[str]) -> set[str]:
        """Of ``event_ids``, the ones the server has stored (``POST /events/filter``).

        Raises:
            httpx.HTTPError: The server is unreachable or did not answer.
        """
        body = {
            "filter": {
                "id": {"id": event_ids},
                # An event can be old: it may have waited out an outage in the outbox.
                "occurred": {"since": EPOCH_ISO, "until": FAR_FUTURE_ISO},
            },
            "limit": len(event_ids),
        }
        response = self._request("/events/filter", body)
        return {str(event["id"]) for event in response.json().get("events", [])}

    def post_json(self, path: str, body: Any) -> Any:
        """POST ``body`` to ``path`` of the API and return the answer's JSON.

        For the file history (:mod:`msi_prefect.prefect_layer.file_history`), which
        reads and writes artifacts with the same quick, kept client.

        Raises:
            httpx.HTTPError: The server is unreachable or did not accept it.
        """
        return self._request(path, body).json()

    def _request(self, path: str, body: Any) -> Any:
        """POST ``body`` to ``path`` with the kept client; drop the client on a failure."""
        from prefect.client.orchestration import get_client

        try:
            with self._settings_scope():
                if self._client is None:
                    settings = {"timeout": self._timeout_s} if self._timeout_s else None
                    client = get_client(httpx_settings=settings, sync_client=True)
                    client.__enter__()  # may ask the server for its version
                    self._client = client
                response = self._client.request("POST", cast(Any, path), json=body)
            response.raise_for_status()
        except Exception:
            self.close()
            raise
        return response

    def _settings_scope(self) -> contextlib.AbstractContextManager[Any]:
        """The settings to post under: Prefect's, without its client's retries if asked."""
        if self._retries:
            return contextlib.nullcontext()
        import prefect.context

        current = prefect.context.get_settings_context()
        return prefect.context.SettingsContext(
            profile=current.profile, settings=settings_without_client_retries(current.settings)
        )

    def close(self) -> None:
        """Close the HTTP client (a later post opens a new one)."""
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.__exit__(None, None, None)


def run_related_resources() -> list[dict[str, str]]:
    """The current flow run's related resources (flow run, flow, deployment, work pool...).

    ``emit_event`` attaches these from the run context when it sends; events sent later
    from the outbox carry the ones of the run that raised them, looked up once here.
    Empty outside a flow run; only the flow run itself if the server cannot be asked.
    """
    from prefect.client.orchestration import get_client
    from prefect.events.related import related_resources_from_run_context
    from prefect.runtime import flow_run
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def lookup() -> list[dict[str, str]]:
        async with get_client() as client:
            related = await related_resources_from_run_context(client)
        return [dict(resource.root) for resource in related]

    if not flow_run.id:
        return []
    try:
        return run_coro_as_sync(lookup()) or []
    except Exception:  # the server is down: the flow run's id still links the events
        logger.warning("Cannot look up the flow run's resources; events name the run only")
        return [
            {
                "prefect.resource.id": f"prefect.flow-run.{flow_run.id}",
                "prefect.resource.role": "flow-run",
            }
        ]


def event_body(spec: FileEventSpec, run_related: list[dict[str, str]]) -> dict[str, Any]:
    """The JSON of a Prefect event for ``spec``, occurring now, as the server takes it."""
    from prefect.events import Event

    # Validated by Prefect's own model, so a malformed event fails here, not on the server.
    event = Event.model_validate(
        {
            "event": spec.name.value,
            "resource": spec.resource,
            "related": [*spec.related, *run_related],
            "payload": spec.payload,
            "id": spec.event_id,
        }
    )
    return event.model_dump(mode="json")


@dataclass(frozen=True)
class ServerDelivery:
    """How an outbox reaches the server: the caller's functions, or a poster of its own.

    Attributes:
        post: Sends one batch of events.
        confirm: Asks which event ids the server stored (None: never asked).
        own_poster: The poster made here, which its outbox closes; None for the caller's.
    """

    post: PostEvents
    confirm: ConfirmEvents | None
    own_poster: PrefectEventPoster | None

    @classmethod
    def of(cls, post: PostEvents | None, confirm: ConfirmEvents | None) -> ServerDelivery:
        """The caller's ``post`` and ``confirm``, or else the Prefect API's (tests inject)."""
        if post is not None:
            return cls(post, confirm, None)
        poster = PrefectEventPoster()
        return cls(poster, poster.stored, poster)


class EventChannel:
    """Durable event emission for one long-running flow run: an outbox and its sender.

    Use as a context manager; :meth:`emit` returns once the event is on disk.

    Args:
        path: The outbox database.
        post: Delivers a batch (default: a :class:`PrefectEventPoster`).
        run_related: Related resources added to every event (default: the current flow
            run's, looked up once).
        confirm: Asks the server which events it stored (default with the default
            ``post``: :meth:`PrefectEventPoster.stored`; none with a ``post`` of the
            caller's unless given).
    """

    def __init__(
        self,
        path: str | Path,
        post: PostEvents | None = None,
        run_related: list[dict[str, str]] | None = None,
        confirm: ConfirmEvents | None = None,
    ) -> None:
        self._path = Path(path)
        delivery = ServerDelivery.of(post, confirm)
        self._poster = delivery.own_poster
        self._post = delivery.post
        self._confirm = delivery.confirm
        self._run_related = run_related
        self._outbox: DurableQueue | None = None
        self._unconfirmed: DurableQueue | None = None
        self._sender: EventSender | None = None

    def __enter__(self) -> Self:
        if self._run_related is None:
            self._run_related = run_related_resources()
        self._outbox = event_outbox(self._path)
        if self._confirm is not None:
            self._unconfirmed = unconfirmed_outbox(self._path)
        self._sender = EventSender(
            self._outbox, self._post, unconfirmed=self._unconfirmed, confirm=self._confirm
        )
        self._sender.start()
        return self

    def emit(self, spec: FileEventSpec) -> None:
        """Record an event for delivery (durably) and wake the sender.

        An event whose id is queued already is kept once (ids are deterministic, so a
        replayed batch re-emits the same ids); the server keeps an id once too.

        Raises:
            sqlite3.OperationalError: The outbox could not be written (e.g. "database or
                disk is full"): the event is not queued, and the caller must not commit
                what it announces. The reassembler turns this into ``EventDeliveryError``
                and retries its batch.
        """
        assert self._outbox is not None and self._sender is not None, "not entered"
        self._outbox.add(str(spec.event_id), event_body(spec, self._run_related or []))
        self._sender.wake()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._sender is not None:
            left = self._sender.close()
            if left:
                logger.warning("%d events wait in %s for the next run", left, self._path)
        if self._outbox is not None:
            self._outbox.close()
        if self._unconfirmed is not None:
            self._unconfirmed.close()
        if self._poster is not None:
            self._poster.close()


# ------------------------------------------------------------------ downstream flow runs
#
# The backup, metadata and analysis runs are short processes, several at once on a worker,
# each announcing a file's step with one event (``msi.file.backed-up`` and the like). They
# share one outbox per host and Prefect server: a run writes its event there (durably) and
# posts it at once, as ``emit_event`` would, and moves it to the unconfirmed outbox; it
# never waits for a confirmation. What a run leaves behind (it could not reach the server,
# or it died between writing and posting) and the confirmation of what runs posted are the
# work of one long-lived process on the host: the relay in the ``reconstruct-files`` run,
# which rebuilt the files these runs read and so runs where they run. Event ids are
# deterministic, so a re-run of the same step posts the same id, and the outbox and the
# server keep it once.


def downstream_outbox_path(
    api_url: str | None = None, environ: Mapping[str, str] | None = None
) -> Path:
    """The host's outbox of downstream file events for one Prefect server.

    Args:
        api_url: The Prefect API the events go to (default: the current settings').
        environ: Where to read :data:`DOWNSTREAM_OUTBOX_DIR_ENV` (default: ``os.environ``).

    Returns:
        ``<dir>/downstream-events-<digest>.sqlite``: the folder from
        :data:`DOWNSTREAM_OUTBOX_DIR_ENV`, else the user's state directory; one file per API
        URL, so two stacks on one machine never post each other's events.
    """
    if api_url is None:
        from prefect.settings import PREFECT_API_URL

        api_url = PREFECT_API_URL.value() or ""
    environ = os.environ if environ is None else environ
    folder = environ.get(DOWNSTREAM_OUTBOX_DIR_ENV) or user_state_dir() / DOWNSTREAM_OUTBOX_SUBDIR
    digest = hashlib.sha256(api_url.encode()).hexdigest()[:API_DIGEST_CHARS]
    return Path(folder) / f"{DOWNSTREAM_OUTBOX_PREFIX}{digest}.sqlite"


def occurred_at(body: dict[str, Any]) -> float:
    """When an event (as posted) occurred, as a timestamp; 0 if it does not say."""
    try:
        return datetime.fromisoformat(str(body["occurred"])).timestamp()
    except (KeyError, ValueError):
        return 0.0


def run_context_related() -> list[dict[str, str]]:
    """The current run's related resources, read from the run context alone.

    The same resources ``emit_event`` attaches (flow run, task run, flow, deployment and
    tags), without its look-ups on the server: a downstream run emits while the server may
    be away, and must not wait for it. Empty outside a run.
    """
    from prefect.context import FlowRunContext, TaskRunContext

    flow_context = FlowRunContext.get()
    task_context = TaskRunContext.get()
    flow_run = flow_context.flow_run if flow_context is not None else None
    task_run = task_context.task_run if task_context is not None else None
    related: list[dict[str, str]] = []
    tags: set[str] = set()
    if flow_run is not None:
        related.append(_related("flow-run", flow_run.id, flow_run.name))
        tags |= set(flow_run.tags)
    elif task_run is not None and task_run.flow_run_id is not None:
        related.append(_related("flow-run", task_run.flow_run_id))
    if task_run is not None:
        related.append(_related("task-run", task_run.id, task_run.name))
        tags |= set(task_run.tags)
    if flow_run is not None and flow_context is not None:
        flow = flow_context.flow
        related.append(_related("flow", flow_run.flow_id, flow.name if flow else None))
        if flow_run.deployment_id is not None:
            related.append(_related("deployment", flow_run.deployment_id))
    related += [
        {"prefect.resource.id": f"prefect.tag.{tag}", "prefect.resource.role": "tag"}
        for tag in sorted(tags)
    ]
    return related


def _related(kind: str, object_id: object, name: str | None = None) -> dict[str, str]:
    resource = {"prefect.resource.id": f"prefect.{kind}.{object_id}", "prefect.resource.role": kind}
    if name:
        resource["prefect.resource.name"] = name
    return resource


@dataclass(frozen=True)
class WrittenEvent:
    """A downstream event written to the outbox, as it will be posted.

    Attributes:
        name: The event's name (for messages).
        key: Its id, the outbox's key.
        body: The event as ``POST /api/events`` takes it.
    """

    name: str
    key: str
    body: dict[str, Any]


class DownstreamEventOutbox:
    """Durable file events of the short downstream runs on one host (see above).

    Args:
        path: The host's outbox (:func:`downstream_outbox_path`).
        post: Posts one event at once; must fail fast when the server is away (default:
            a :class:`PrefectEventPoster` with a short timeout and no retries).
        clock: Wall-clock time source (tests inject a fake).
    """

    def __init__(
        self,
        path: str | Path,
        post: PostEvents | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._poster: PrefectEventPoster | None = None
        if post is None:
            self._poster = PrefectEventPoster(timeout_s=DIRECT_POST_TIMEOUT_S, retries=False)
            post = self._poster
        self._post = post
        self._clock = clock
        self._outbox = event_outbox(self.path)
        self._unconfirmed = unconfirmed_outbox(self.path)
        self._paused_until = 0.0
        self._lock = threading.Lock()

    def emit(self, spec: FileEventSpec, run_related: list[dict[str, str]]) -> bool:
        """Write the event to the outbox (durably), then post it unless posting is paused.

        Returns:
            Whether it was posted now (otherwise it waits on disk for the relay).

        Raises:
            sqlite3.OperationalError: The outbox could not be written (e.g. a full disk):
                the step is not announced, and the task fails (and is retried).
        """
        return self.post_written([self.write(spec, run_related)])

    def write(self, spec: FileEventSpec, run_related: list[dict[str, str]]) -> WrittenEvent:
        """Write the event to the outbox (durably), not posting it yet.

        Raises:
            sqlite3.OperationalError: The outbox could not be written (e.g. a full disk).
        """
        written = WrittenEvent(spec.name.value, str(spec.event_id), event_body(spec, run_related))
        self._outbox.add(written.key, written.body)  # a re-run's event: kept once
        return written

    def post_written(self, events: list[WrittenEvent]) -> bool:
        """Post events already written, in one request, unless posting is paused.

        Returns:
            Whether they were posted (otherwise they wait on disk for the relay).
        """
        if not events:
            return True
        with self._lock:
            if self._clock() < self._paused_until:
                return False
        try:  # not under the lock: the next file's event is written meanwhile
            self._post([event.body for event in events])
        except Exception as exc:  # the server is away: the events wait on disk
            with self._lock:
                self._paused_until = self._clock() + DIRECT_POST_PAUSE_S
            names = ", ".join(sorted({event.name for event in events}))
            logger.warning(
                "Cannot post %d event(s) (%s) to the Prefect server (%s); they wait in %s "
                "and are delivered by the reconstruct-files run of this host",
                len(events),
                names,
                exc,
                self.path,
            )
            return False
        posted_at = self._clock()
        self._unconfirmed.add_many(
            [(event.key, {"posted_at": posted_at, "event": event.body}) for event in events]
        )
        self._outbox.remove_keys([event.key for event in events])
        return True

    def close(self) -> None:
        """Close the queues and the HTTP client."""
        self._outbox.close()
        self._unconfirmed.close()
        if self._poster is not None:
            self._poster.close()


# One outbox per path in a process (a run's tasks share it); made on first use, so the
# warm-start server, which forks the runs, never holds one.
_DOWNSTREAM_OUTBOXES: dict[Path, DownstreamEventOutbox] = {}
_DOWNSTREAM_LOCK = threading.Lock()


def emit_downstream_event(spec: FileEventSpec) -> bool:
    """Emit a downstream run's file event durably (``msi.file.backed-up`` and the like).

    Returns:
        Whether it was posted now; if not, it waits in the host's outbox and the
        ``reconstruct-files`` run's relay delivers it.
    """
    gathered = _GATHERED.get()
    if gathered is not None:
        gathered.add(spec, run_context_related())
        return False
    return _downstream_outbox().emit(spec, run_context_related())


def _downstream_outbox() -> DownstreamEventOutbox:
    """This process's outbox of downstream events for the current Prefect server."""
    path = downstream_outbox_path()
    with _DOWNSTREAM_LOCK:
        outbox = _DOWNSTREAM_OUTBOXES.get(path)
        if outbox is None:
            outbox = _DOWNSTREAM_OUTBOXES[path] = DownstreamEventOutbox(path)
    return outbox


class GatheredEventPoster:
    """Posts the downstream events of a batch run together, from a thread of its own.

    A batch run emits a file event per file and step, one file after the other; posted one
    by one they were 4 of the 13 requests a file cost the server at 10 files/s
    (bench/RESULTS.md). Here each event is written to the outbox at once (durably, as
    before) and queued; the thread posts everything queued in one request: the first at
    once, the next at most every :data:`GATHER_INTERVAL_S` (and not before the post in
    flight has returned). So a file's event reaches the server at most that much later,
    and a batch makes one post per interval instead of one per file. What is queued when
    the batch ends is posted before it ends; what cannot be posted waits on disk for the
    relay, as before.

    Args:
        outbox: Where the events are written and posted from.
        interval_s: Shortest time between two posts.
        clock: Monotonic time source.
    """

    def __init__(
        self,
        outbox: DownstreamEventOutbox,
        interval_s: float = GATHER_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._outbox = outbox
        self._interval_s = interval_s
        self._clock = clock
        self._queued: list[WrittenEvent] = []
        self._closing = False
        self._changed = threading.Condition()
        # In the caller's context: the poster uses the run's Prefect settings.
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._run,), name="msi-gathered-events", daemon=True
        )
        self._thread.start()

    def add(self, spec: FileEventSpec, run_related: list[dict[str, str]]) -> None:
        """Write the event to the outbox now and queue it for the next post.

        Raises:
            sqlite3.OperationalError: The outbox could not be written (e.g. a full disk).
        """
        written = self._outbox.write(spec, run_related)
        with self._changed:
            self._queued.append(written)
            self._changed.notify()

    def close(self) -> None:
        """Post what is queued, then stop the thread."""
        with self._changed:
            self._closing = True
            self._changed.notify()
        # A post is bounded by DIRECT_POST_TIMEOUT_S; two of them at most are left.
        self._thread.join(2 * DIRECT_POST_TIMEOUT_S + self._interval_s)

    def _run(self) -> None:
        last_post = float("-inf")
        while True:
            with self._changed:
                while not self._queued and not self._closing:
                    self._changed.wait()
                if not self._queued:
                    return
                # Spaced posts: the events of the next files gather meanwhile.
                while (
                    not self._closing
                    and (wait_s := last_post + self._interval_s - self._clock()) > 0
                ):
                    self._changed.wait(wait_s)
                batch, self._queued = self._queued, []
            last_post = self._clock()
            try:
                self._outbox.post_written(batch)
            except Exception:  # e.g. the unconfirmed outbox: the events stay on disk
                logger.exception("could not record %d posted event(s)", len(batch))


_GATHERED: contextvars.ContextVar[GatheredEventPoster | None] = contextvars.ContextVar(
    "msi_gathered_events", default=None
)


@contextlib.contextmanager
def gathered_downstream_events() -> Iterator[GatheredEventPoster]:
    """Within it, :func:`emit_downstream_event` posts through one :class:`GatheredEventPoster`.

    Used by batch runs around their files (``dispatch/batches.py``).
    """
    poster = GatheredEventPoster(_downstream_outbox())
    token = _GATHERED.set(poster)
    try:
        yield poster
    finally:
        _GATHERED.reset(token)
        poster.close()


class DownstreamEventRelay:
    """Delivers what the host's downstream runs left in their outbox; confirms what they posted.

    Runs for the life of a long-running flow run (``reconstruct-files``): a sender thread
    posts every event older than :data:`LEFT_BEHIND_AFTER_S` (the run that wrote it died
    or could not reach the server), and asks the server whether the posted events were
    stored, posting the lost ones again, as the rebuilt-file events' outbox does.

    Args:
        path: The host's outbox (default: :func:`downstream_outbox_path`).
        post: Delivers a batch (default: a :class:`PrefectEventPoster`).
        confirm: Asks the server which events it stored (default with the default ``post``:
            :meth:`PrefectEventPoster.stored`).
        clock: Wall-clock time source (tests inject a fake).
    """

    def __init__(
        self,
        path: str | Path | None = None,
        post: PostEvents | None = None,
        confirm: ConfirmEvents | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path) if path is not None else downstream_outbox_path()
        self._clock = clock
        delivery = ServerDelivery.of(post, confirm)
        self._poster = delivery.own_poster
        self._post = delivery.post
        self._confirm = delivery.confirm
        self._outbox: DurableQueue | None = None
        self._unconfirmed: DurableQueue | None = None
        self._sender: EventSender | None = None

    def __enter__(self) -> Self:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._outbox = event_outbox(self.path)
        self._unconfirmed = unconfirmed_outbox(self.path)
        self._sender = EventSender(
            self._outbox,
            self._post,
            unconfirmed=self._unconfirmed,
            confirm=self._confirm,
            clock=self._clock,
            post_after_s=LEFT_BEHIND_AFTER_S,
        )
        self._sender.start()
        return self

    @property
    def sender(self) -> EventSender:
        """The sender thread's state (counters), for logs and tests."""
        assert self._sender is not None, "not entered"
        return self._sender

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._sender is not None:
            self._sender.close()
        for queue in (self._outbox, self._unconfirmed):
            if queue is not None:
                queue.close()
        if self._poster is not None:
            self._poster.close()
