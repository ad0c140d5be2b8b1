"""`python -m msi_prefect.warm_start.worker ARGS`: `prefect worker start ARGS`, warm.

Starts the warm server (:mod:`msi_prefect.warm_start.server`) as a child that dies with this
process, points the flow runs at it through :data:`~msi_prefect.warm_start.SOCKET_ENV` (a
process worker hands its own environment to every run), then runs Prefect's own worker
command in this process. A pool whose ``command`` is the launcher (see
:func:`launch_command`) then starts its runs forked from the warm server.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from msi_prefect.warm_start import LAUNCH_MODULE, SOCKET_ENV

SERVER_MODULE = "msi_prefect.warm_start.server"
SOCKET_NAME = "warm.sock"
PR_SET_PDEATHSIG = 1
STOP_TIMEOUT_S = 10.0


def launch_command(python: str = sys.executable) -> str:
    """The work pool ``command`` that starts a flow run through the launcher."""
    return shlex.join([python, "-m", LAUNCH_MODULE])


def _die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn``: the kernel sends SIGTERM to the child when this process dies."""
    libc = ctypes.CDLL(None, use_errno=True)

    def arrange() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    return arrange


def start_server(path: Path) -> subprocess.Popen[bytes]:
    """Start a warm server listening at ``path`` (in a private, 0700 directory)."""
    return subprocess.Popen(
        [sys.executable, "-m", SERVER_MODULE, "--socket", str(path)],
        preexec_fn=_die_with_parent(),  # prctl only: safe between fork and exec
    )


def restore_sigint_handler() -> None:
    """Let SIGTERM stop Prefect's worker, which stops by sending itself SIGINT.

    A process started with SIGINT ignored (a shell's background job, ``nohup``, some CI
    runners) hands that on to its children, and Python then leaves SIGINT ignored: Prefect's
    worker would turn SIGTERM into a SIGINT that nothing hears and run on until killed.
    Call in the main thread, before Prefect's command starts its event loop.
    """
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``prefect worker start`` with ``argv`` beside a warm server."""
    args = list(sys.argv[1:] if argv is None else argv)
    restore_sigint_handler()
    # A short private folder: a Unix socket path has room for about 100 bytes.
    with tempfile.TemporaryDirectory(prefix="msi-warm-") as folder:
        path = Path(folder) / SOCKET_NAME
        server = start_server(path)
        os.environ[SOCKET_ENV] = str(path)
        try:
            sys.argv = ["prefect", "worker", "start", *args]
            from prefect.cli import app

            # Registers `--type msi-warm-process` (WORKER_TYPE) with Prefect's worker types.
            import msi_prefect.warm_start.process_worker  # noqa: F401

            app()
        finally:
            server.terminate()
            try:
                server.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


if __name__ == "__main__":
    main()
