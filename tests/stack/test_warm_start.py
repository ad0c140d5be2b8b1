"""Warm start: the launcher, the warm server and the forked flow-run child, without a stack.

The child runs the real ``prefect.engine``; given a flow-run id it cannot load (no server
answers), it fails or waits the way ``python -m prefect.engine`` would, which is enough to
check what the worker relies on: exit codes, streams, signals and a killed child.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from msi_prefect.warm_start import LAUNCH_MODULE, SOCKET_ENV
from msi_prefect.warm_start.launch import LOST_CHILD_EXIT, SUSPENSION_SIGNAL
from msi_prefect.warm_start.protocol import LaunchRequest, Message, Verb, parse_message
from msi_prefect.warm_start.worker import SOCKET_NAME, start_server
from tests.transfer_helpers import wait_until

RUN_TIMEOUT_S = 60
READY_TIMEOUT_S = 60


def test_a_launch_request_round_trips() -> None:
    request = LaunchRequest(argv=["x"], env={"A": "b"}, cwd="/tmp")
    assert LaunchRequest.decode(request.encode()) == request


@pytest.mark.parametrize(
    ("raw", "complaint"),
    [
        (b"[]", "JSON object"),
        (b'{"argv": [1], "env": {}, "cwd": "/"}', "argv"),
        (b'{"argv": [], "env": {"A": 1}, "cwd": "/"}', "env"),
        (b'{"argv": [], "env": {}, "cwd": null}', "cwd"),
    ],
)
def test_a_malformed_launch_request_is_refused_with_its_reason(raw: bytes, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        LaunchRequest.decode(raw)


@pytest.mark.parametrize(
    ("packet", "message"),
    [
        (b"pid 42", Message(Verb.PID, 42)),
        (b"exit 3", Message(Verb.EXIT, 3)),
        (b"exit three", None),
        (b"hello 1", None),
        (b"", None),
    ],
)
def test_child_messages_parse(packet: bytes, message: Message | None) -> None:
    assert parse_message(packet) == message


@pytest.fixture(scope="module")
def warm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    """A real warm server (Prefect preloaded) on a socket in a private folder."""
    folder = Path(os.path.realpath("/tmp")) / f"msi-warm-test-{uuid.uuid4().hex[:8]}"
    folder.mkdir(mode=0o700)
    path = folder / SOCKET_NAME
    server = start_server(path)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert path.exists(), "the warm server did not come up"
        yield path, server.pid
    finally:
        server.terminate()
        server.wait(RUN_TIMEOUT_S)
        path.unlink(missing_ok=True)
        folder.rmdir()


def _launch(socket_path: Path | str, *args: str, api_port: int) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        SOCKET_ENV: str(socket_path),
        # Nothing answers there: the engine waits for its flow run, or fails.
        "PREFECT_API_URL": f"http://127.0.0.1:{api_port}/api",
    }
    return subprocess.Popen(
        [sys.executable, "-m", LAUNCH_MODULE, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.update(int(p) for p in (task / "children").read_text().split())
    return found


def _wait_for_child(server_pid: int, before: set[int]) -> int:
    """The child the server forks after `before` (its children until then) was taken."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        new = _children(server_pid) - before
        if new:
            return new.pop()
        time.sleep(0.05)
    raise AssertionError("the warm server forked no child")


def _signal_mask(pid: int, mask: str, signum: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{mask}:"):
            return bool(int(line.split()[1], 16) & (1 << (signum - 1)))
    return False


def _catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler for `signum` (its SigCgt mask)."""
    return _signal_mask(pid, "SigCgt", signum)


def _ignores(pid: int, signum: int) -> bool:
    """Whether process `pid` ignores `signum` (its SigIgn mask)."""
    return _signal_mask(pid, "SigIgn", signum)


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return True
    return state == "Z"


@pytest.fixture
def api_port() -> Iterator[int]:
    """A loopback port that accepts connections and never answers: the engine waits."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        yield silent.getsockname()[1]


def test_without_a_warm_server_the_launcher_becomes_the_engine(
    tmp_path: Path, api_port: int
) -> None:
    launcher = _launch(tmp_path / "nothing-here.sock", "not-a-flow-run-id", api_port=api_port)
    _, stderr = launcher.communicate(timeout=RUN_TIMEOUT_S)
    assert launcher.returncode == 1
    assert "Invalid flow run id" in stderr


def test_a_warm_child_gets_the_launchers_streams_and_exit_code(
    warm_server: tuple[Path, int], api_port: int
) -> None:
    socket_path, _ = warm_server
    launcher = _launch(socket_path, "not-a-flow-run-id", api_port=api_port)
    _, stderr = launcher.communicate(timeout=RUN_TIMEOUT_S)
    assert launcher.returncode == 1
    assert "Invalid flow run id" in stderr
    assert "not-a-flow-run-id" in stderr  # the launcher's arguments reached the engine


def test_a_killed_child_makes_its_launcher_exit_non_zero(
    warm_server: tuple[Path, int], api_port: int
) -> None:
    socket_path, server_pid = warm_server
    before = _children(server_pid)
    launcher = _launch(socket_path, str(uuid.uuid4()), api_port=api_port)
    child = _wait_for_child(server_pid, before)
    assert child != launcher.pid
    os.kill(child, signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=RUN_TIMEOUT_S)
    assert launcher.returncode == LOST_CHILD_EXIT
    assert "ended without an exit code" in stderr


def test_a_signal_to_the_launcher_reaches_the_child(
    warm_server: tuple[Path, int], api_port: int
) -> None:
    socket_path, server_pid = warm_server
    before = _children(server_pid)
    launcher = _launch(socket_path, str(uuid.uuid4()), api_port=api_port)
    child = _wait_for_child(server_pid, before)
    # It forwards once it knows the child.
    wait_until(
        lambda: _catches(launcher.pid, signal.SIGTERM), "the launcher forwards it", RUN_TIMEOUT_S
    )
    launcher.send_signal(signal.SIGTERM)
    launcher.communicate(timeout=RUN_TIMEOUT_S)
    assert launcher.returncode != 0
    wait_until(lambda: _gone(child), "the child stopped", RUN_TIMEOUT_S)


def test_the_suspension_signal_ends_neither_the_launcher_nor_its_child(
    warm_server: tuple[Path, int], api_port: int
) -> None:
    socket_path, server_pid = warm_server
    before = _children(server_pid)
    launcher = _launch(socket_path, str(uuid.uuid4()), api_port=api_port)
    try:
        child = _wait_for_child(server_pid, before)
        wait_until(
            lambda: _catches(launcher.pid, SUSPENSION_SIGNAL),
            "the launcher forwards it",
            RUN_TIMEOUT_S,
        )
        # Until the engine's observer handles it, the child ignores it (the engine here
        # waits for a server that never answers, before it observes anything). A child
        # just forked holds the signal blocked until it has set that.
        wait_until(
            lambda: _ignores(child, SUSPENSION_SIGNAL), "the child ignores it", RUN_TIMEOUT_S
        )
        launcher.send_signal(SUSPENSION_SIGNAL)
        time.sleep(0.5)
        assert launcher.poll() is None
        assert not _gone(child)
    finally:
        launcher.send_signal(signal.SIGTERM)
        launcher.communicate(timeout=RUN_TIMEOUT_S)


def test_an_engine_the_launcher_becomes_ignores_the_suspension_signal(
    tmp_path: Path, api_port: int
) -> None:
    launcher = _launch(tmp_path / "nothing-here.sock", str(uuid.uuid4()), api_port=api_port)
    try:
        cmdline = Path(f"/proc/{launcher.pid}/cmdline")
        wait_until(
            lambda: b"prefect.engine" in cmdline.read_bytes(),
            "the launcher became it",
            RUN_TIMEOUT_S,
        )
        assert _ignores(launcher.pid, SUSPENSION_SIGNAL)
        launcher.send_signal(SUSPENSION_SIGNAL)
        time.sleep(0.5)
        assert launcher.poll() is None
    finally:
        launcher.kill()
        launcher.communicate(timeout=RUN_TIMEOUT_S)


# A signal that reaches the child between the fork and its own handlers, in a process of
# its own (the script replaces SIGTERM's handler, as the warm server does).
SIGNAL_IN_THE_FORK_WINDOW = textwrap.dedent(
    """
    import os, signal
    from msi_prefect.warm_start.server import _fork_holding_signals, _own_signals

    servers_handler_ran = []
    signal.signal(signal.SIGTERM, lambda *_: servers_handler_ran.append(True))
    child = _fork_holding_signals()
    if child == 0:
        os.kill(os.getpid(), signal.SIGTERM)  # before the child has its handlers
        if servers_handler_ran:
            os._exit(3)  # the server's handler took it: the child would run on
        _own_signals()
        os._exit(0)  # not reached: the held SIGTERM ends the child here
    _, status = os.waitpid(child, 0)
    print(os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM,
          os.WEXITSTATUS(status) if os.WIFEXITED(status) else None)
    """
)


def test_a_signal_before_the_child_has_its_handlers_reaches_them() -> None:
    completed = subprocess.run(
        [sys.executable, "-c", SIGNAL_IN_THE_FORK_WINDOW],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=True,
    )
    assert completed.stdout.split() == ["True", "None"]


def test_a_child_whose_launcher_was_killed_stops(
    warm_server: tuple[Path, int], api_port: int
) -> None:
    socket_path, server_pid = warm_server
    before = _children(server_pid)
    launcher = _launch(socket_path, str(uuid.uuid4()), api_port=api_port)
    child = _wait_for_child(server_pid, before)
    launcher.kill()
    launcher.communicate(timeout=RUN_TIMEOUT_S)
    wait_until(lambda: _gone(child), "the child stopped", RUN_TIMEOUT_S)


def test_prefects_api_clients_share_one_verified_tls_context(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ssl

    import certifi
    from prefect.client import orchestration

    from msi_prefect.warm_start.prewarm import share_api_tls_contexts

    monkeypatch.setattr(orchestration, "ssl", ssl)
    assert share_api_tls_contexts()
    shared = orchestration.ssl
    verified = shared.create_default_context(cafile=certifi.where())
    assert shared.create_default_context(cafile=certifi.where()) is verified
    assert verified.verify_mode is ssl.CERT_REQUIRED and verified.check_hostname
    # The insecure context Prefect changes afterwards is a new one each time.
    assert shared.create_default_context() is not shared.create_default_context()
    assert shared.CERT_NONE is ssl.CERT_NONE


def test_a_preloaded_flow_script_is_a_cache_hit_until_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.utilities import importtools

    from msi_prefect.warm_start.prewarm import flow_script_folders, preload_flow_scripts

    monkeypatch.setattr(importtools, "load_script_as_module", importtools.load_script_as_module)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "flows"
    folder.mkdir()
    script = folder / f"warm_{uuid.uuid4().hex[:8]}.py"
    script.write_text("import itertools\nLOADS = next(itertools.count())\nVALUE = 1\n")
    (folder / "broken.py").write_text("raise RuntimeError('not a flow script')\n")
    monkeypatch.setenv("MSI_WARM_START_FLOWS", f"{folder}{os.pathsep}{tmp_path / 'missing'}")

    loaded = preload_flow_scripts(flow_script_folders())

    assert list(loaded) == [script.resolve()]  # the broken one is left out, not fatal
    first = importtools.import_object(f"flows/{script.name}:VALUE")
    module = importtools.load_script_as_module(f"flows/{script.name}")
    assert first == 1 and module is loaded[script.resolve()]
    assert sys.path[:2] == [str(folder.resolve()), str(tmp_path)]
    script.write_text("VALUE = 2\n")  # changed (size and mtime): loaded afresh
    assert importtools.import_object(f"flows/{script.name}:VALUE") == 2


def test_a_run_asks_for_the_servers_default_result_storage_once_per_ttl(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import anyio
    from prefect.client.orchestration import PrefectClient, SyncPrefectClient
    from prefect.client.schemas.objects import ServerDefaultResultStorage

    from msi_prefect.warm_start.prewarm import remember_default_result_storage

    asked: list[str] = []
    failures = [OSError("server gone")]

    def sync_read(client: object) -> ServerDefaultResultStorage:
        asked.append("sync")
        if failures:
            raise failures.pop()
        return ServerDefaultResultStorage(default_result_storage_block_id=None)

    async def async_read(client: object) -> ServerDefaultResultStorage:
        asked.append("async")
        return ServerDefaultResultStorage(default_result_storage_block_id=None)

    monkeypatch.setattr(SyncPrefectClient, "read_server_default_result_storage", sync_read)
    monkeypatch.setattr(PrefectClient, "read_server_default_result_storage", async_read)
    now = [0.0]
    assert remember_default_result_storage(ttl_s=60.0, clock=lambda: now[0])

    class Client:
        api_url = "http://127.0.0.1:1/api"

    client: Any = Client()
    with pytest.raises(OSError):  # a failure is Prefect's to handle, and not remembered
        SyncPrefectClient.read_server_default_result_storage(client)
    first = SyncPrefectClient.read_server_default_result_storage(client)
    again = SyncPrefectClient.read_server_default_result_storage(client)
    assert anyio.run(PrefectClient.read_server_default_result_storage, client) == first
    assert again == first and again is not first
    assert asked == ["sync", "sync"]
    now[0] = 61.0
    SyncPrefectClient.read_server_default_result_storage(client)
    assert asked == ["sync", "sync", "sync"]


def test_deferred_models_are_built_before_the_first_fork() -> None:
    from pydantic import BaseModel, ConfigDict

    from msi_prefect.warm_start.prewarm import build_deferred_models

    class Deferred(BaseModel):  # as Prefect's models: built on first use
        model_config = ConfigDict(defer_build=True)
        size: int

    class Unresolvable(BaseModel):
        model_config = ConfigDict(defer_build=True)
        later: NotDefinedYet  # type: ignore[name-defined]  # noqa: F821

    class NoSchema:
        pass

    class Unbuildable(BaseModel):  # pydantic has no schema for a plain class
        model_config = ConfigDict(defer_build=True)
        thing: NoSchema

    assert not Deferred.__pydantic_complete__
    assert build_deferred_models(packages=("tests",)) >= 1
    assert Deferred.__pydantic_complete__
    # Left for their first use, and no error here.
    assert not Unresolvable.__pydantic_complete__
    assert not Unbuildable.__pydantic_complete__
    assert Deferred(size=3).size == 3


def test_a_flows_parameter_validator_is_built_once_per_function(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefect import flow, flows
    from prefect.exceptions import ParameterTypeError

    from msi_prefect.warm_start.prewarm import share_parameter_validators

    built: list[object] = []
    prefects = flows.ValidatedFunction

    def counting(function: Any, config: Any = None) -> Any:
        built.append(function)
        return prefects(function, config=config)

    monkeypatch.setattr(flows, "ValidatedFunction", counting)
    assert share_parameter_validators()

    @flow
    def sized(size: int, label: str = "x") -> None:
        pass

    assert len(built) == 1  # the declaration's own check
    assert sized.validate_parameters({"size": "3"}) == {"size": 3, "label": "x"}
    assert sized.validate_parameters({"size": 4, "label": "y"}) == {"size": 4, "label": "y"}
    with pytest.raises(ParameterTypeError):
        sized.validate_parameters({"size": "three"})
    assert len(built) == 1  # ...and every run's validation after it
    # Any other configuration is Prefect's to build, each time.
    flows.ValidatedFunction(sized.fn, config={"strict": True})
    flows.ValidatedFunction(sized.fn, config={"strict": True})
    assert len(built) == 3


def test_botocores_data_is_read_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    import botocore.loaders
    import botocore.session
    from aiobotocore.session import AioSession  # what s3fs starts for each file system

    from msi_prefect.warm_start.prewarm import share_botocore_data

    monkeypatch.setattr(botocore.session, "create_loader", botocore.session.create_loader)
    reads: list[str] = []
    load_file = botocore.loaders.JSONFileLoader.load_file

    def counting(self: Any, file_path: str) -> Any:
        reads.append(file_path)
        return load_file(self, file_path)

    monkeypatch.setattr(botocore.loaders.JSONFileLoader, "load_file", counting)
    assert share_botocore_data()
    loaded = len(reads)
    assert loaded >= 2  # the S3 model and endpoints, at least

    async def service_of_a_new_session() -> str:
        async with AioSession().create_client(
            "s3",
            region_name="us-east-1",
            endpoint_url="http://127.0.0.1:9",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        ) as client:
            return str(client.meta.service_model.service_name)

    assert asyncio.run(service_of_a_new_session()) == "s3"
    assert asyncio.run(service_of_a_new_session()) == "s3"
    assert len(reads) == loaded  # neither session read a file again


def test_s3_clients_share_one_tls_context_per_verify_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import ssl

    import certifi
    from aiobotocore.httpsession import AIOHTTPSession

    from msi_prefect.warm_start.prewarm import share_s3_tls_contexts

    built: list[object] = []
    build = AIOHTTPSession._build_ssl_contexts

    def counting(self: Any, proxy_url: str | None) -> Any:
        built.append(self._verify)
        return build(self, proxy_url)

    monkeypatch.setattr(AIOHTTPSession, "_build_ssl_contexts", counting)
    bundle = str(tmp_path / "bundle.pem")
    Path(bundle).write_bytes(Path(certifi.where()).read_bytes())
    monkeypatch.setenv("AWS_CA_BUNDLE", bundle)
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    assert share_s3_tls_contexts()
    assert built == [bundle, True]  # what a run's client comes with, built before the fork

    first = AIOHTTPSession(verify=bundle)._build_ssl_contexts(None)
    assert AIOHTTPSession(verify=bundle)._build_ssl_contexts(None)[0] is first[0]
    assert AIOHTTPSession(verify=True)._build_ssl_contexts(None)[0] is not first[0]
    assert built == [bundle, True]
    insecure = AIOHTTPSession(verify=False)._build_ssl_contexts(None)[0]
    assert insecure.verify_mode == ssl.CERT_NONE
    # Behind a proxy a session builds its own, as before.
    proxied = AIOHTTPSession(verify=bundle)._build_ssl_contexts("http://127.0.0.1:9")
    assert proxied[0] is not first[0]
    assert built == [bundle, True, False, bundle]


#: Prefect's worker command as far as its stop goes: its SIGTERM handler, in its event loop.
WORKER_STOP = textwrap.dedent(
    """
    import asyncio, os
    from prefect.utilities.processutils import setup_signal_handlers_worker
    from msi_prefect.warm_start.worker import restore_sigint_handler

    restore_sigint_handler()

    async def main() -> None:
        setup_signal_handlers_worker(os.getpid(), "worker", print)
        print("ready", flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
    """
)


def test_sigterm_stops_a_worker_started_with_sigint_ignored() -> None:
    # A shell's background job starts with SIGINT ignored; Prefect's worker stops on SIGTERM
    # by sending itself SIGINT, which it would then never hear.
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER_STOP],
        stdout=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline() == b"ready\n"
        worker.send_signal(signal.SIGTERM)
        worker.wait(10)  # without restore_sigint_handler(): TimeoutExpired
    finally:
        worker.kill()
        worker.wait()
