"""`up`'s Prefect API calls (retried until a deadline, then a clear error) and its start order."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from msi_prefect.errors import MsiError
from msi_prefect.stack.components import WEED_BIN_ENV
from msi_prefect.stack.config import (
    BrokerStorage,
    Component,
    StackConfig,
    StateDir,
    free_port_map,
)
from msi_prefect.stack.manager import StackManager, start_needs
from msi_prefect.stack.prefect_api import PrefectApiError, RetryPolicy, request
from msi_prefect.stack.processes import ProcessState, port_is_free

# Small figures, so that a test of "retried until the deadline" takes a second or two.
QUICK = RetryPolicy(deadline_s=3.0, attempt_timeout_s=0.5, first_pause_s=0.05, max_pause_s=0.2)
SLOW_ANSWER_S = 5.0  # far longer than one attempt may take, even on a loaded machine
# A loaded test machine may run the test a little late.
SCHEDULING_SLACK_S = 2.0


class ScriptedServer:
    """A local HTTP server that answers each request as its script says.

    Each entry is a status code, or ``None`` for "answer too late" (the handler sleeps
    past the attempt's timeout, then answers 200); the last entry repeats.
    """

    def __init__(self, script: list[int | None]) -> None:
        self.script = script
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                step = outer.script[min(outer.requests, len(outer.script) - 1)]
                outer.requests += 1
                if step is None:
                    time.sleep(SLOW_ANSWER_S)
                self.send_response(step or HTTPStatus.OK)
                self.send_header("Content-Length", "2")
                self.end_headers()
                with contextlib.suppress(OSError):  # the client may have given up
                    self.wfile.write(b"{}")

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @contextlib.contextmanager
    def running(self) -> Iterator[httpx.Client]:
        thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        thread.start()
        try:
            with httpx.Client(base_url=self.url) as client:
                yield client
        finally:
            self.httpd.shutdown()
            self.httpd.server_close()


def test_a_busy_server_that_answers_late_or_503_is_asked_again() -> None:
    server = ScriptedServer([None, HTTPStatus.SERVICE_UNAVAILABLE, HTTPStatus.CREATED])
    with server.running() as client:
        response = request(client, "POST", "/work_pools/", "creating the work pool", QUICK)
    assert response.status_code == HTTPStatus.CREATED
    assert server.requests == 3


def test_an_answer_that_is_not_a_retried_status_is_the_callers_to_judge() -> None:
    server = ScriptedServer([HTTPStatus.CONFLICT])
    with server.running() as client:
        response = request(client, "POST", "/work_pools/", "creating the work pool", QUICK)
    assert response.status_code == HTTPStatus.CONFLICT and server.requests == 1


def test_a_server_that_never_answers_in_time_fails_by_the_deadline_naming_the_step() -> None:
    server = ScriptedServer([HTTPStatus.SERVICE_UNAVAILABLE])
    started = time.monotonic()
    with server.running() as client, pytest.raises(PrefectApiError) as failed:
        request(client, "POST", "/work_pools/", "creating the work pool", QUICK)
    assert time.monotonic() - started < QUICK.deadline_s + QUICK.attempt_timeout_s + (
        SCHEDULING_SLACK_S
    )
    assert "creating the work pool failed" in str(failed.value)
    assert f"within {QUICK.deadline_s:.0f} s" in str(failed.value)
    assert "HTTP 503" in str(failed.value)
    assert server.requests > 2
    assert isinstance(failed.value, MsiError)  # the CLI prints it without a traceback


def test_a_refused_connection_is_retried_too() -> None:
    port = free_port_map()["prefect"]
    with (
        httpx.Client(base_url=f"http://127.0.0.1:{port}/api") as client,
        pytest.raises(PrefectApiError, match="ConnectError"),
    ):
        request(client, "GET", "/health", "asking for health", QUICK)


@pytest.mark.stack
def test_up_keeps_a_healthy_server_when_a_later_step_fails(tmp_path: Path) -> None:
    # A pool name the server refuses stands in for a server too busy to take the pool:
    # `up` must say which step failed, leave the healthy server running, and a second `up`
    # goes on from there.
    state = StateDir(tmp_path / "state")
    refused = StackConfig(ports=free_port_map(), work_pool="no/slashes")
    manager = StackManager(state, refused)
    try:
        with pytest.raises(MsiError) as failed:
            manager.up([Component.PREFECT])
        message = str(failed.value)
        assert message.startswith("preparing the Prefect server failed: ")
        assert "Left running: prefect" in message and "msi-prefect up' again" in message
        server = manager.process(Component.PREFECT)
        assert server.state() is ProcessState.RUNNING
        pid = server.read_pid()

        manager.config = refused.model_copy(update={"work_pool": "msi-process"})
        assert manager.up([Component.PREFECT]) == []  # nothing started twice
        assert server.read_pid() == pid
        pools = httpx.post(f"{refused.prefect_api_url}/work_pools/filter", json={}, timeout=30)
        assert "msi-process" in [pool["name"] for pool in pools.json()]
    finally:
        manager.down()


def test_each_part_waits_only_for_the_parts_it_needs() -> None:
    on_s3 = StackConfig()
    in_memory = StackConfig(broker_storage=BrokerStorage.MEMORY)
    assert start_needs(Component.PREFECT, on_s3) == {Component.POSTGRES, Component.REDIS}
    assert start_needs(Component.S3, on_s3) == set()
    assert start_needs(Component.BROKER, on_s3) == {Component.S3}
    assert start_needs(Component.BROKER, in_memory) == set()
    assert Component.PREFECT in start_needs(Component.WORKER, on_s3)
    # What a part needs comes before it in the start order: `up` can always go on.
    for config in (on_s3, in_memory):
        for component in Component:
            before = set(list(Component)[: list(Component).index(component)])
            assert start_needs(component, config) <= before, component


# The stand-in S3 store: it exits a moment after it starts, long before a Prefect server
# (a Python process that imports Prefect) can answer.
FAILING_S3 = "#!/bin/sh\necho 'no disk for the store' >&2\nsleep 1\nexit 3\n"


@pytest.mark.stack
def test_the_server_starts_beside_the_store_and_stops_when_the_store_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weed = tmp_path / "weed"
    weed.write_text(FAILING_S3)
    weed.chmod(0o755)
    monkeypatch.setenv(WEED_BIN_ENV, str(weed))
    state = StateDir(tmp_path / "state")
    manager = StackManager(state, StackConfig(ports=free_port_map()))
    try:
        with pytest.raises(MsiError) as failed:
            manager.up([Component.S3, Component.BROKER, Component.PREFECT])
        message = str(failed.value)
        assert message.startswith("starting s3 failed: s3 exited during start-up")
        assert "no disk for the store" in message
        assert "Nothing of the stack is running." in message
        # The server was started without waiting for the store, and stopped with it; the
        # broker, which keeps its topics in the store, was never started.
        server = manager.process(Component.PREFECT)
        assert "--- starting prefect" in server.log_file.read_text()
        assert server.state() is not ProcessState.RUNNING
        assert port_is_free(manager.config.ports["prefect"])
        assert not manager.process(Component.BROKER).log_file.exists()
    finally:
        manager.down()
