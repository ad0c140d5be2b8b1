"""``python -m msi_prefect.warm_start.launch``: a flow run's process, started warm.

The process worker runs this as the flow run's command. It imports only the standard
library (it starts in tens of milliseconds), hands its environment, working directory and
standard streams to the warm server, and then stands in for the forked child: the signals it
gets (the worker's cancellation) go to the child, and it exits with the child's exit code.
A child that dies without reporting one (killed) makes the launcher exit with
:data:`LOST_CHILD_EXIT`, so the worker marks the run Crashed.

With no warm server (``MSI_WARM_START_SOCKET`` unset, or nothing answers there), it becomes
``python -m prefect.engine`` itself, so a pool configured with it works everywhere.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from typing import NoReturn

from msi_prefect.warm_start import SOCKET_ENV
from msi_prefect.warm_start.protocol import (
    STANDARD_FDS,
    LaunchRequest,
    Verb,
    parse_message,
)

#: Exit code when the child ended without saying how (it was killed): 128 + SIGKILL, as a
#: shell reports a killed process.
LOST_CHILD_EXIT = 128 + signal.SIGKILL
#: What a worker or a user sends to stop a run.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
#: What the stack's worker sends when a user suspended the run
#: (:mod:`msi_prefect.warm_start.suspensions`). Ignored until the run's process handles it,
#: so a stray one never ends a run (its default action would), nor an engine this launcher
#: becomes (an ignored signal stays ignored across ``exec``).
SUSPENSION_SIGNAL = signal.SIGUSR1
#: The signals passed on to the child.
FORWARDED_SIGNALS = (*STOP_SIGNALS, SUSPENSION_SIGNAL)
CONNECT_TIMEOUT_S = 2.0
PACKET_BYTES = 64


def _become_engine() -> NoReturn:
    """Run the flow the ordinary way: replace this process with ``python -m prefect.engine``."""
    os.execv(sys.executable, [sys.executable, "-m", "prefect.engine", *sys.argv[1:]])


def _connect(path: str) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.settimeout(CONNECT_TIMEOUT_S)
    try:
        conn.connect(path)
    except OSError:
        conn.close()
        return None
    conn.settimeout(None)
    return conn


def main() -> NoReturn:
    """Start the flow run in a forked warm child and wait for it (see the module docstring)."""
    signal.signal(SUSPENSION_SIGNAL, signal.SIG_IGN)
    path = os.environ.get(SOCKET_ENV)
    conn = _connect(path) if path else None
    if conn is None:
        _become_engine()
    request = LaunchRequest(argv=sys.argv[1:], env=dict(os.environ), cwd=os.getcwd())
    try:
        socket.send_fds(conn, [request.encode()], list(STANDARD_FDS))
        first = parse_message(conn.recv(PACKET_BYTES))
    except OSError:
        first = None
    if first is None or first.verb is not Verb.PID:
        # The server refused or went away before forking: nothing has run yet.
        conn.close()
        _become_engine()
    child = first.value

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)
    while True:
        packet = conn.recv(PACKET_BYTES)
        if not packet:  # the child is gone without a word: it was killed
            sys.stderr.write(
                f"msi-prefect warm start: flow-run process {child} ended without an exit "
                "code (killed)\n"
            )
            os._exit(LOST_CHILD_EXIT)
        message = parse_message(packet)
        if message is not None and message.verb is Verb.EXIT:
            os._exit(message.value)


if __name__ == "__main__":
    main()
