"""The durable event outboxes: nothing is lost while the server is away (stack: real server)."""

from __future__ import annotations

import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from msi_prefect.prefect_layer.event_outbox import (
    CONFIRM_AFTER_S,
    CONFIRM_INTERVAL_S,
    DIRECT_POST_PAUSE_S,
    DOWNSTREAM_OUTBOX_DIR_ENV,
    EARLIER_RUN_GRACE_S,
    IDLE_CHECK_S,
    LEFT_BEHIND_AFTER_S,
    RESEND_AFTER_S,
    DownstreamEventOutbox,
    DownstreamEventRelay,
    EventChannel,
    EventSender,
    GatheredEventPoster,
    downstream_outbox_path,
    event_body,
    event_outbox,
    settings_without_client_retries,
    unconfirmed_outbox,
)
from msi_prefect.prefect_layer.events import EventName, FileFacts, file_event
from msi_prefect.transfer.wire import file_id_for

TOPIC = "lab.raw"
WAIT_S = 15.0


def spec(path: str) -> Any:
    facts = FileFacts(topic=TOPIC, file_id=file_id_for(path), path=path, generation=1)
    return file_event(EventName.RECONSTRUCTED, facts)


class FlakyServer:
    """Refuses the first ``down_for`` posts, then keeps what it is sent."""

    def __init__(self, down_for: int = 0) -> None:
        self.down_for = down_for
        self.received: list[dict[str, Any]] = []
        self.posts = 0

    def __call__(self, events: list[dict[str, Any]]) -> None:
        self.posts += 1
        if self.posts <= self.down_for:
            raise ConnectionRefusedError("server down")
        self.received.extend(events)


def wait_until(condition: Any) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_events_wait_on_disk_through_an_outage_and_arrive_in_order(tmp_path: Path) -> None:
    server = FlakyServer(down_for=2)
    names = [f"f{i}.bin" for i in range(5)]
    with EventChannel(tmp_path / "outbox.sqlite", post=server, run_related=[]) as channel:
        for name in names:
            channel.emit(spec(name))
        wait_until(lambda: len(server.received) == len(names))
    assert [event["payload"]["path"] for event in server.received] == names
    assert server.posts >= 3  # two refused, then delivered
    with event_outbox(tmp_path / "outbox.sqlite") as outbox:
        assert outbox.count() == 0


def test_undelivered_events_survive_a_restart(tmp_path: Path) -> None:
    down = FlakyServer(down_for=10**6)
    with EventChannel(tmp_path / "outbox.sqlite", post=down, run_related=[]) as channel:
        channel.emit(spec("a.bin"))
        channel.emit(spec("a.bin"))  # the same event again (a replay) is kept once
        channel.emit(spec("b.bin"))
    up = FlakyServer()
    with EventChannel(tmp_path / "outbox.sqlite", post=up, run_related=[]):
        wait_until(lambda: len(up.received) == 2)
    assert [event["payload"]["path"] for event in up.received] == ["a.bin", "b.bin"]


def test_close_delivers_what_is_left(tmp_path: Path) -> None:
    server = FlakyServer()
    with event_outbox(tmp_path / "outbox.sqlite") as outbox:
        for name in ("x", "y"):
            outbox.add(str(uuid.uuid4()), {"payload": {"path": name}})
        sender = EventSender(outbox, server, batch_size=1)  # never started: close() drains
        assert sender.close() == 0
    assert [event["payload"]["path"] for event in server.received] == ["x", "y"]
    assert server.posts == 2


def test_events_that_come_while_the_sender_rests_after_a_post_go_in_one_post(
    tmp_path: Path,
) -> None:
    server = FlakyServer()
    with event_outbox(tmp_path / "outbox.sqlite") as outbox:
        sender = EventSender(outbox, server, post_spacing_s=2.0)
        sender.start()
        try:
            outbox.add(str(uuid.uuid4()), {"payload": {"path": "first"}})
            sender.wake()
            wait_until(lambda: server.posts == 1)  # a quiet sender posts at once
            for name in ("a", "b", "c"):
                outbox.add(str(uuid.uuid4()), {"payload": {"path": name}})
                sender.wake()
            wait_until(lambda: len(server.received) == 4)
        finally:
            sender.close()
    assert server.posts == 2
    assert [event["payload"]["path"] for event in server.received] == ["first", "a", "b", "c"]


def test_event_body_is_a_valid_prefect_event_with_the_run_resources() -> None:
    run = {"prefect.resource.id": "prefect.flow-run.123", "prefect.resource.role": "flow-run"}
    body = event_body(spec("run/a.tif"), [run])
    assert body["event"] == "msi.file.reconstructed"
    assert body["id"] == str(spec("run/a.tif").event_id)
    assert body["resource"]["msi.path"] == "run/a.tif"
    assert [r["prefect.resource.role"] for r in body["related"]] == ["topic", "flow-run"]
    assert body["occurred"]


def test_a_malformed_event_is_refused_before_it_is_queued() -> None:
    bad = spec("a.bin")
    broken = type(bad)(bad.name, {"no": "resource id"}, [], {}, bad.event_id)
    with pytest.raises(ValueError, match=re.escape("prefect.resource.id")):
        event_body(broken, [])


def test_the_sender_thread_sees_the_callers_prefect_settings(tmp_path: Path) -> None:
    # Prefect keeps its settings (the API URL) in context variables; a sender thread that
    # did not inherit them would post to a temporary server of its own instead.
    from prefect.settings import PREFECT_API_URL, temporary_settings

    seen: list[str | None] = []

    def post(events: list[dict[str, Any]]) -> None:
        seen.append(PREFECT_API_URL.value())

    with (
        temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}),
        EventChannel(tmp_path / "outbox.sqlite", post=post, run_related=[]) as channel,
    ):
        channel.emit(spec("a.bin"))
        wait_until(lambda: bool(seen))
    assert seen == ["http://127.0.0.1:9/api"]


def test_settings_without_client_retries_change_that_one_setting() -> None:
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_CLIENT_MAX_RETRIES,
        PREFECT_CLIENT_RETRY_JITTER_FACTOR,
        get_current_settings,
        temporary_settings,
    )

    with temporary_settings(
        updates={PREFECT_API_URL: "http://127.0.0.1:9/api", PREFECT_CLIENT_MAX_RETRIES: 4}
    ):
        settings = get_current_settings()
        quiet = settings_without_client_retries(settings)
    assert PREFECT_CLIENT_MAX_RETRIES.value_from(quiet) == 0
    assert PREFECT_CLIENT_MAX_RETRIES.value_from(settings) == 4  # the original is untouched
    assert PREFECT_API_URL.value_from(quiet) == "http://127.0.0.1:9/api"
    assert PREFECT_CLIENT_RETRY_JITTER_FACTOR.value_from(quiet) == (
        PREFECT_CLIENT_RETRY_JITTER_FACTOR.value_from(settings)
    )


class ForgetfulServer(FlakyServer):
    """Accepts every post, but stores only the events not named in ``loses`` (once)."""

    def __init__(self, loses: set[str]) -> None:
        super().__init__()
        self.loses = set(loses)
        self.asked: list[list[str]] = []

    def __call__(self, events: list[dict[str, Any]]) -> None:
        self.posts += 1
        for event in events:
            if event["id"] in self.loses:
                self.loses.discard(event["id"])  # lost this time; kept when sent again
            else:
                self.received.append(event)

    def stored(self, event_ids: list[str]) -> set[str]:
        self.asked.append(list(event_ids))
        return {event["id"] for event in self.received} & set(event_ids)


class FakeWallClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_an_event_the_server_accepted_but_lost_is_posted_again(tmp_path: Path) -> None:
    specs = [spec(f"run/{i}.dat") for i in range(5)]
    lost = str(specs[2].event_id)
    server, clock = ForgetfulServer(loses={lost}), FakeWallClock()
    with (
        event_outbox(tmp_path / "outbox.sqlite") as outbox,
        unconfirmed_outbox(tmp_path / "outbox.sqlite") as unconfirmed,
    ):
        for one in specs:
            outbox.add(str(one.event_id), event_body(one, []))
        sender = EventSender(outbox, server, unconfirmed=unconfirmed, confirm=server.stored,
                             clock=clock)  # fmt: skip
        assert sender.deliver_once()
        assert outbox.count() == 0 and unconfirmed.count() == 5
        assert sender.confirm_once() == 0  # too soon to ask
        clock.now += CONFIRM_AFTER_S
        # Four are stored and forgotten; the lost one is not given up on yet.
        assert sender.confirm_once() == 4
        assert unconfirmed.count() == 1 and outbox.count() == 0
        clock.now += RESEND_AFTER_S
        assert sender.confirm_once() == 1  # still missing: queued to be posted again
        assert outbox.count() == 1 and sender.resent == 1
        assert sender.deliver_once()
        clock.now += CONFIRM_AFTER_S
        assert sender.confirm_once() == 1
        assert outbox.count() == 0 and unconfirmed.count() == 0
    assert sorted(event["id"] for event in server.received) == sorted(
        str(one.event_id) for one in specs
    )


def test_unconfirmed_events_are_confirmed_by_the_next_run(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    server = ForgetfulServer(loses=set())
    one = spec("a.dat")
    with EventChannel(path, post=server, run_related=[], confirm=server.stored) as channel:
        channel.emit(one)
        wait_until(lambda: server.received)
    # The run ended before it could ask: the next run asks, and forgets the stored event.
    with unconfirmed_outbox(path) as unconfirmed:
        assert unconfirmed.count() == 1
    clock = FakeWallClock()
    clock.now = time.time() + CONFIRM_AFTER_S
    with event_outbox(path) as outbox, unconfirmed_outbox(path) as unconfirmed:
        sender = EventSender(outbox, server, unconfirmed=unconfirmed, confirm=server.stored,
                             clock=clock)  # fmt: skip
        assert sender.confirm_once() == 1
        assert unconfirmed.count() == 0
    assert server.asked == [[str(one.event_id)]]


def test_what_an_earlier_run_posted_and_the_server_lost_goes_again_soon(tmp_path: Path) -> None:
    # A power cut: the server took the event into memory and died; the flow starts again.
    path = tmp_path / "outbox.sqlite"
    one = spec("cut.dat")
    server, clock = ForgetfulServer(loses={str(one.event_id)}), FakeWallClock()
    with event_outbox(path) as outbox, unconfirmed_outbox(path) as unconfirmed:
        outbox.add(str(one.event_id), event_body(one, []))
        first_run = EventSender(outbox, server, unconfirmed=unconfirmed,
                                confirm=server.stored, clock=clock)  # fmt: skip
        assert first_run.deliver_once() and server.received == []
    clock.now += 30  # the restart
    with event_outbox(path) as outbox, unconfirmed_outbox(path) as unconfirmed:
        second_run = EventSender(outbox, server, unconfirmed=unconfirmed,
                                 confirm=server.stored, clock=clock)  # fmt: skip
        assert second_run.confirm_once() == 0  # the server gets a moment after the restart
        clock.now += EARLIER_RUN_GRACE_S
        assert second_run.confirm_once() == 1
        assert second_run.resent == 1 and second_run.deliver_once()
    assert [event["id"] for event in server.received] == [str(one.event_id)]


def test_the_sender_asks_about_an_earlier_run_as_soon_as_the_grace_ends(tmp_path: Path) -> None:
    # The first round is late (new events were being posted), so the next regular round
    # would come a whole interval later; the earlier run's lost event must not wait for it.
    path = tmp_path / "outbox.sqlite"
    one = spec("cut.dat")
    server, clock = ForgetfulServer(loses={str(one.event_id)}), FakeWallClock()
    with event_outbox(path) as outbox, unconfirmed_outbox(path) as unconfirmed:
        outbox.add(str(one.event_id), event_body(one, []))
        EventSender(outbox, server, unconfirmed=unconfirmed, confirm=server.stored,
                    clock=clock).deliver_once()  # fmt: skip
    clock.now += 30  # the restart
    with event_outbox(path) as outbox, unconfirmed_outbox(path) as unconfirmed:
        sender = EventSender(outbox, server, unconfirmed=unconfirmed, confirm=server.stored,
                             clock=clock)  # fmt: skip
        clock.now += EARLIER_RUN_GRACE_S / 2
        sender.start()
        try:
            # The first round: too soon to judge the earlier run's event, so nothing asked.
            wait_until(lambda: sender._confirmed_at == clock.now)
            assert server.asked == [] and sender.resent == 0
            clock.now += EARLIER_RUN_GRACE_S / 2  # the grace is over; the interval is not
            assert EARLIER_RUN_GRACE_S / 2 < CONFIRM_INTERVAL_S
            wait_until(lambda: [event["id"] for event in server.received] == [str(one.event_id)])
            assert sender.resent == 1
        finally:
            sender.close(drain_s=0)


# ----------------------------------------------------------- the downstream runs' outbox


def downstream_spec(path: str) -> Any:
    facts = FileFacts(topic=TOPIC, file_id=file_id_for(path), path=path, generation=1)
    return file_event(EventName.BACKED_UP, facts)


def test_a_downstream_event_is_written_then_posted_at_once(tmp_path: Path) -> None:
    path = tmp_path / "downstream.sqlite"
    server = FlakyServer()
    outbox = DownstreamEventOutbox(path, post=server)
    try:
        assert outbox.emit(downstream_spec("a.bin"), [])
    finally:
        outbox.close()
    assert [event["payload"]["path"] for event in server.received] == ["a.bin"]
    # Posted: out of the outbox, into the unconfirmed one, where the relay confirms it.
    with event_outbox(path) as queued, unconfirmed_outbox(path) as unconfirmed:
        assert queued.count() == 0 and unconfirmed.count() == 1


class HeldServer(FlakyServer):
    """Keeps each post waiting until the test lets it go."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = threading.Semaphore(0)
        self.go = threading.Semaphore(0)
        self.batches: list[list[str]] = []

    def __call__(self, events: list[dict[str, Any]]) -> None:
        self.arrived.release()
        assert self.go.acquire(timeout=WAIT_S), "the test never let the post go"
        super().__call__(events)
        self.batches.append([event["payload"]["path"] for event in events])


def test_a_batch_runs_events_gather_while_a_post_is_in_flight(tmp_path: Path) -> None:
    path = tmp_path / "downstream.sqlite"
    server = HeldServer()
    outbox = DownstreamEventOutbox(path, post=server)
    poster = GatheredEventPoster(outbox, interval_s=0.0)
    try:
        poster.add(downstream_spec("a.bin"), [])
        assert server.arrived.acquire(timeout=WAIT_S)  # a.bin's post is in flight...
        for name in ("b.bin", "c.bin", "d.bin"):  # ...and the next files' events are on disk
            poster.add(downstream_spec(name), [])
        with event_outbox(path) as queued:
            assert queued.count() == 4
        server.go.release()
        assert server.arrived.acquire(timeout=WAIT_S)  # the next post: the three together
        server.go.release()
    finally:
        poster.close()
        outbox.close()
    assert server.batches == [["a.bin"], ["b.bin", "c.bin", "d.bin"]]
    with event_outbox(path) as queued, unconfirmed_outbox(path) as unconfirmed:
        assert queued.count() == 0 and unconfirmed.count() == 4


def test_a_batch_runs_events_are_posted_when_it_ends_or_left_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "downstream.sqlite"
    server = FlakyServer()
    outbox = DownstreamEventOutbox(path, post=server)
    poster = GatheredEventPoster(outbox, interval_s=60.0)
    try:
        poster.add(downstream_spec("a.bin"), [])  # the first goes at once...
        wait_until(lambda: server.posts == 1)
        poster.add(downstream_spec("b.bin"), [])  # ...the next wait for the interval or the end
        poster.add(downstream_spec("c.bin"), [])
        time.sleep(0.2)
        assert server.posts == 1
        poster.close()
        assert server.posts == 2
        assert [event["payload"]["path"] for event in server.received] == [
            "a.bin",
            "b.bin",
            "c.bin",
        ]
        server.down_for = server.posts + 1  # the server goes away: the events stay on disk
        unlucky = GatheredEventPoster(outbox, interval_s=0.0)
        unlucky.add(downstream_spec("d.bin"), [])
        unlucky.close()
    finally:
        outbox.close()
    with event_outbox(path) as queued:
        assert [body["payload"]["path"] for _, body in queued.oldest(10)] == ["d.bin"]


def test_a_downstream_run_does_not_wait_for_a_server_that_is_away(tmp_path: Path) -> None:
    path = tmp_path / "downstream.sqlite"
    server, clock = FlakyServer(down_for=10**6), FakeWallClock()
    outbox = DownstreamEventOutbox(path, post=server, clock=clock)
    try:
        assert not outbox.emit(downstream_spec("a.bin"), [])
        # The run goes on; its next events only go to disk for a while (no second wait).
        assert not outbox.emit(downstream_spec("b.bin"), [])
        assert not outbox.emit(downstream_spec("a.bin"), [])  # a re-run: the same id
        assert server.posts == 1
        clock.now += DIRECT_POST_PAUSE_S
        assert not outbox.emit(downstream_spec("c.bin"), [])
        assert server.posts == 2
    finally:
        outbox.close()
    with event_outbox(path) as queued:
        paths = [body["payload"]["path"] for _, body in queued.oldest(10)]
    assert paths == ["a.bin", "b.bin", "c.bin"]


def test_the_relay_delivers_what_runs_left_behind_once_it_is_old_enough(tmp_path: Path) -> None:
    # A run that is alive posts its own events; the relay takes only the old ones, so the
    # two do not both post every event.
    path = tmp_path / "downstream.sqlite"
    left = downstream_spec("left.bin")
    server, clock = ForgetfulServer(loses=set()), FakeWallClock()
    clock.now = time.time()
    with event_outbox(path) as queued:
        queued.add(str(left.event_id), event_body(left, []))
    relay = DownstreamEventRelay(path, post=server, confirm=server.stored, clock=clock)
    with relay:
        time.sleep(2 * IDLE_CHECK_S)  # the sender looked at least once
        assert server.posts == 0  # just written: its run may still post it
        clock.now += LEFT_BEHIND_AFTER_S + 1
        wait_until(lambda: [event["id"] for event in server.received] == [str(left.event_id)])


def test_the_relay_posts_again_what_the_server_accepted_from_a_run_and_lost(
    tmp_path: Path,
) -> None:
    path = tmp_path / "downstream.sqlite"
    lost = downstream_spec("lost.bin")
    server, clock = ForgetfulServer(loses={str(lost.event_id)}), FakeWallClock()
    clock.now = time.time()  # the relay compares it with the events' occurred times
    run = DownstreamEventOutbox(path, post=server, clock=clock)
    try:
        assert run.emit(lost, [])  # accepted, and lost by the server
    finally:
        run.close()
    assert server.received == []
    clock.now += CONFIRM_AFTER_S
    with event_outbox(path) as queued, unconfirmed_outbox(path) as unconfirmed:
        relay = EventSender(queued, server, unconfirmed=unconfirmed, confirm=server.stored,
                            clock=clock, post_after_s=LEFT_BEHIND_AFTER_S)  # fmt: skip
        clock.now += RESEND_AFTER_S
        assert relay.confirm_once() == 1 and relay.resent == 1
        assert relay.deliver_once()
    assert [event["id"] for event in server.received] == [str(lost.event_id)]


def test_each_prefect_server_has_its_own_downstream_outbox(tmp_path: Path) -> None:
    environ = {DOWNSTREAM_OUTBOX_DIR_ENV: str(tmp_path)}
    first = downstream_outbox_path("http://127.0.0.1:4200/api", environ)
    second = downstream_outbox_path("http://127.0.0.1:4201/api", environ)
    assert first.parent == second.parent == tmp_path
    assert first != second
    assert first == downstream_outbox_path("http://127.0.0.1:4200/api", environ)


# ------------------------------------------------------ the same, on the real Prefect server

# The relay gives up on an earlier run's posted event after the grace, then posts it.
SERVER_WAIT_S = 60.0


def stored_on_server(event_id: str) -> bool:
    from msi_prefect.prefect_layer.event_outbox import PrefectEventPoster

    poster = PrefectEventPoster()
    try:
        return event_id in poster.stored([event_id])
    finally:
        poster.close()


def wait_until_stored(event_id: str) -> None:
    deadline = time.monotonic() + SERVER_WAIT_S
    while not stored_on_server(event_id):
        assert time.monotonic() < deadline, f"event {event_id} never stored"
        time.sleep(1.0)


@pytest.mark.stack
def test_a_run_that_cannot_reach_the_server_leaves_its_event_for_the_relay(
    prefect_api: str, tmp_path: Path
) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from msi_prefect.stack.config import free_port_map

    path = tmp_path / "downstream.sqlite"
    event = downstream_spec(f"away-{uuid.uuid4().hex}.bin")
    nobody = f"http://127.0.0.1:{free_port_map()['prefect']}/api"
    with temporary_settings(updates={PREFECT_API_URL: nobody}):
        run = DownstreamEventOutbox(path)  # Prefect's own client, no retries
        started = time.monotonic()
        try:
            assert not run.emit(event, [])
        finally:
            run.close()
        assert time.monotonic() - started < DIRECT_POST_PAUSE_S / 10  # the run went on
    with DownstreamEventRelay(path):  # the reconstruct run of the host, server reachable
        wait_until_stored(str(event.event_id))
    with event_outbox(path) as queued:
        assert queued.count() == 0


@pytest.mark.stack
def test_an_event_the_server_accepted_from_a_run_and_lost_is_posted_again(
    prefect_api: str, tmp_path: Path
) -> None:
    # As a server that died with the event in memory: posted, never stored.
    path = tmp_path / "downstream.sqlite"
    event = downstream_spec(f"lost-{uuid.uuid4().hex}.bin")
    posted_long_ago = time.time() - RESEND_AFTER_S
    with unconfirmed_outbox(path) as unconfirmed:
        unconfirmed.add(
            str(event.event_id), {"posted_at": posted_long_ago, "event": event_body(event, [])}
        )
    assert not stored_on_server(str(event.event_id))
    with DownstreamEventRelay(path) as relay:
        wait_until_stored(str(event.event_id))
        assert relay.sender.resent == 1
