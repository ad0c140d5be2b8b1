"""The durable event outbox: nothing is lost while the server is away (no server needed)."""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from msi_prefect.prefect_layer.event_outbox import (
    CONFIRM_AFTER_S,
    CONFIRM_INTERVAL_S,
    EARLIER_RUN_GRACE_S,
    RESEND_AFTER_S,
    EventChannel,
    EventSender,
    event_body,
    event_outbox,
    unconfirmed_outbox,
)
from msi_prefect.prefect_layer.events import EventName, FileFacts, file_event
from msi_prefect.transfer.wire import file_id_for

TOPIC = "lab.raw"
WAIT_S = 15.0


def spec(relpath: str) -> Any:
    facts = FileFacts(topic=TOPIC, file_id=file_id_for(relpath), path=relpath, generation=1)
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
