"""The warm server: imports Prefect and the flows' libraries once, forks a child per flow run.

``python -m msi_prefect.warm_start.server --socket PATH`` (started by
:mod:`msi_prefect.warm_start.worker`). It imports :data:`DEFAULT_PRELOAD` (plus the modules
named in ``MSI_WARM_START_PRELOAD``, comma-separated, for a lab's own analysis package),
then does once what every run would otherwise repeat (:mod:`msi_prefect.warm_start.prewarm`:
one TLS context for Prefect's API clients, the server's default result storage asked
once a minute, the flow scripts of ``MSI_WARM_START_FLOWS``
executed with their parameters' validators, Prefect's deferred models built, botocore's
S3 data and TLS context made, suspensions taken from the worker
(:mod:`msi_prefect.warm_start.suspensions`), and, as runs come, their Prefect settings built
once per distinct inputs (:mod:`msi_prefect.warm_start.run_settings`);
``MSI_WARM_START_PREWARM=0`` turns that off), then listens on a Unix socket that
only its own user may use. For each launcher that connects it forks; the child takes the
launcher's streams, environment and working directory, starts a session of its own (as the
process worker does for its runs), and runs ``prefect.engine`` as ``python -m prefect.engine``
would.

The server itself never starts a thread, an event loop or a client: a fork copies only the
thread that calls it, so anything running at that moment would be left half-done in the
child. Children are reaped by the kernel (``SIGCHLD`` ignored) and report their exit code to
their launcher themselves.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import logging
import os
import runpy
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from msi_prefect.warm_start.launch import FORWARDED_SIGNALS, SUSPENSION_SIGNAL
from msi_prefect.warm_start.prewarm import (
    PREWARM_ENV,
    build_deferred_models,
    flow_script_folders,
    preload_flow_scripts,
    remember_default_result_storage,
    share_api_tls_contexts,
    share_botocore_data,
    share_parameter_validators,
    share_s3_tls_contexts,
)
from msi_prefect.warm_start.protocol import (
    MAX_REQUEST_BYTES,
    STANDARD_FDS,
    LaunchRequest,
    Verb,
    send_message,
)
from msi_prefect.warm_start.run_settings import RunSettings
from msi_prefect.warm_start.suspensions import relay_suspensions

logger = logging.getLogger("msi_prefect.warm_start")

#: Imported before the first fork: Prefect's engine and what the project's flows use.
DEFAULT_PRELOAD = (
    "prefect",
    "prefect.engine",
    "prefect.flow_engine",
    "prefect.task_engine",
    "prefect.flows",
    "prefect.deployments.steps",
    "prefect.artifacts",
    "prefect.events",
    "prefect.client.orchestration",
    # What a run would otherwise import on its first task, request or topic check (profiled).
    "prefect.utilities.visualization",
    "anyio._backends._asyncio",
    "encodings.idna",
    "boto3",
    "s3fs",
    "confluent_kafka",
    "confluent_kafka.admin",
    "msi_prefect.prefect_layer.backup.tasks",
    "msi_prefect.prefect_layer.metadata_tasks",
    "msi_prefect.prefect_layer.analysis",
    "msi_prefect.prefect_layer.backup.audit",
    "msi_prefect.prefect_layer.dispatch.batches",
    "msi_prefect.prefect_layer.crashed_runs",
    "msi_prefect.prefect_layer.transfers.streaming",
    "msi_prefect.examples.analysis",
)
PRELOAD_ENV = "MSI_WARM_START_PRELOAD"
LISTEN_BACKLOG = 64
ACCEPT_POLL_S = 1.0
#: How long a child whose launcher vanished gets to stop on SIGTERM before SIGKILL.
ORPHAN_GRACE_S = 30.0
_CREDENTIALS = struct.Struct("3i")  # SO_PEERCRED: pid, uid, gid


def preload(modules: Sequence[str]) -> list[str]:
    """Import each module; return the ones that failed (logged, not fatal)."""
    failed = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:
            logger.exception("warm start: could not preload %s; runs import it themselves", name)
            failed.append(name)
    return failed


def prewarm_enabled() -> bool:
    """Whether the server does once what runs would repeat (``MSI_WARM_START_PREWARM``)."""
    return os.environ.get(PREWARM_ENV, "1") != "0"


def prewarm() -> None:
    """Do once what every run would repeat (see :mod:`msi_prefect.warm_start.prewarm`)."""
    if not prewarm_enabled():
        return
    try:
        share_api_tls_contexts()
        remember_default_result_storage()
        share_parameter_validators()  # before the flow scripts, which declare flows
        preload_flow_scripts(flow_script_folders())
        build_deferred_models()
        share_botocore_data()
        share_s3_tls_contexts()
        relay_suspensions()
    except Exception:
        logger.exception("warm start: prewarming failed; runs do that work themselves")


def _peer_uid(conn: socket.socket) -> int:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size)
    return int(_CREDENTIALS.unpack(raw)[1])


def _exit_code(exit_request: SystemExit) -> int:
    code = exit_request.code
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def _watch_launcher(conn: socket.socket) -> None:
    """In the child: stop this run if its launcher goes away (the worker killed it)."""

    def watch() -> None:
        with contextlib.suppress(OSError):
            while conn.recv(1):
                pass
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(ORPHAN_GRACE_S)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="warm-start-launcher-watch", daemon=True).start()


def _fork_holding_signals() -> int:
    """``os.fork()`` with the signals a launcher passes on blocked until the child owns them.

    The launcher passes its signals on as soon as it has the child's pid; until the child
    has set its own handlers (:func:`_own_signals`) they would run a copy of the server's
    (a stop request the child would never act on: a cancellation lost until the worker
    kills the launcher). Blocked, they wait for the child's handlers instead.
    """
    held = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    try:
        child = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        raise
    if child:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    return child


def _own_signals() -> None:
    """In the child: a flow-run process's handlers, then the signals held since the fork."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # Until the engine's suspension observer handles it (a suspension needs a RUNNING run).
    signal.signal(SUSPENSION_SIGNAL, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)


def _become_flow_run(
    conn: socket.socket,
    listener: socket.socket,
    request: LaunchRequest,
    fds: list[int],
    run_settings: RunSettings,
) -> NoReturn:
    """In the forked child: turn into the launcher's flow-run process and run the engine."""
    code = 1
    try:
        listener.close()
        os.setsid()
        _own_signals()
        for target, fd in zip(STANDARD_FDS, fds, strict=True):
            os.dup2(fd, target)
            os.close(fd)
        os.environ.clear()
        os.environ.update(request.env)
        os.chdir(request.cwd)
        sys.argv = ["prefect.engine", *request.argv]
        run_settings.apply()  # settings read from the run's environment, or known already
        _watch_launcher(conn)
        # runpy warns that prefect.engine is imported already: that is the point here.
        warnings.filterwarnings("ignore", "'prefect.engine' found in sys.modules", RuntimeWarning)
        try:
            runpy.run_module("prefect.engine", run_name="__main__", alter_sys=False)
            code = 0
        except SystemExit as exit_request:
            code = _exit_code(exit_request)
    except BaseException:
        traceback.print_exc()
    finally:
        # What an interpreter does on its way out: Prefect's exit handlers send the logs
        # and events still queued (the run's last lines in the UI).
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        with contextlib.suppress(OSError):
            send_message(conn, Verb.EXIT, code)
        os._exit(code)


def _serve_one(conn: socket.socket, listener: socket.socket, run_settings: RunSettings) -> None:
    """Read one launch request, fork its child, then learn the settings of its inputs."""
    fds: list[int] = []
    try:
        if _peer_uid(conn) != os.getuid():
            logger.warning("warm start: refused a connection from another user")
            return
        message, fds, _flags, _address = socket.recv_fds(conn, MAX_REQUEST_BYTES, len(STANDARD_FDS))
        if len(fds) != len(STANDARD_FDS):
            logger.warning("warm start: a request came without its three streams; refused")
            return
        try:
            request = LaunchRequest.decode(message)
        except ValueError as exc:
            logger.warning("warm start: refused a malformed request: %s", exc)
            return
        if threading.active_count() > 1:
            logger.warning("warm start: the server runs threads; a fork copies only one")
        sys.stdout.flush()
        sys.stderr.flush()
        child = _fork_holding_signals()
        if child == 0:
            _become_flow_run(conn, listener, request, fds, run_settings)
        # From here on the launcher stands in for the child: a launcher that hears nothing
        # was refused before any fork, and may run the flow itself.
        send_message(conn, Verb.PID, child)
        run_settings.learn(request.env, request.cwd)  # after the fork: off this run's path
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        conn.close()


def serve(socket_path: Path, modules: Sequence[str]) -> None:
    """Preload ``modules``, then fork a flow-run child per launcher until SIGTERM."""
    preload(modules)
    prewarm()
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(socket_path))
    socket_path.chmod(0o600)
    listener.listen(LISTEN_BACKLOG)
    listener.settimeout(ACCEPT_POLL_S)
    stopping = False
    run_settings = RunSettings(enabled=prewarm_enabled())

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the children
    logger.info("warm start: ready on %s", socket_path)
    try:
        while not stopping:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except InterruptedError:
                continue
            conn.settimeout(None)
            _serve_one(conn, listener, run_settings)
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``--socket PATH``."""
    parser = argparse.ArgumentParser(prog="python -m msi_prefect.warm_start.server")
    parser.add_argument("--socket", type=Path, required=True, help="Unix socket to listen on")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    extra = [name for name in os.environ.get(PRELOAD_ENV, "").split(",") if name.strip()]
    serve(args.socket, [*DEFAULT_PRELOAD, *(name.strip() for name in extra)])


if __name__ == "__main__":
    main()
