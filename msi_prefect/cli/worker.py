"""``msi-prefect worker --role ROLE``: the Prefect worker of one kind of host in a facility.

An instrument PC, the storage host and each compute host run one worker each, every one
against the facility's Prefect server (``PREFECT_API_URL``) and serving its role's work
pool (``msi_prefect.stack.roles``: ``$MSI_<ROLE>_POOL``, default ``msi-<role>``). The
command runs Prefect's own process worker (``prefect worker start --type process``; it
creates the pool if it is missing) in a working directory of the host's own, where the
host keeps its state:

* ``WORK_DIR/events``: the outbox of the events its runs emit (``MSI_EVENT_OUTBOX_DIR``):
  the downstream steps' on a compute host, ``prune-source``'s on an instrument PC. Neither
  runs ``reconstruct-files``, whose run delivers what that outbox holds on a storage host,
  so their worker delivers it itself while it runs;
* ``WORK_DIR/fetched``: local copies of the rebuilt files its runs read by URL
  (``MSI_FETCH_DIR``), each removed when its run ends.

A variable already set in the environment wins. SIGTERM or Ctrl-C stops the worker as
Prefect's does (its flow runs are left to finish their own way).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import FrameType

from msi_prefect.errors import MsiError

API_URL_ENV = "PREFECT_API_URL"
OUTBOX_DIR_ENV = "MSI_EVENT_OUTBOX_DIR"
FETCH_DIR_ENV = "MSI_FETCH_DIR"
OUTBOX_SUBDIR = "events"
FETCH_SUBDIR = "fetched"


def worker_env(work_dir: Path, environ: dict[str, str]) -> dict[str, str]:
    """The worker's environment: the host's state folders below ``work_dir`` unless set.

    Raises:
        MsiError: ``PREFECT_API_URL`` is not set (the worker would start a server of its own).
    """
    if not environ.get(API_URL_ENV, "").strip():
        raise MsiError(
            f"{API_URL_ENV} is not set: point this worker at the facility's Prefect server, "
            f"e.g. export {API_URL_ENV}=http://prefect-host:4200/api"
        )
    env = dict(environ)
    env.setdefault(OUTBOX_DIR_ENV, str(work_dir / OUTBOX_SUBDIR))
    env.setdefault(FETCH_DIR_ENV, str(work_dir / FETCH_SUBDIR))
    return env


def worker_argv(pool: str, name: str) -> list[str]:
    """Prefect's process worker for ``pool``."""
    return [
        sys.executable, "-m", "prefect", "worker", "start",
        "--pool", pool, "--type", "process", "--name", name,
    ]  # fmt: skip


def _run(args: argparse.Namespace) -> int:
    from msi_prefect.stack.roles import HostRole, pool_of

    role = HostRole(args.role)
    pool = args.pool or pool_of(role)
    work_dir = Path(args.work_dir).expanduser().absolute()
    work_dir.mkdir(parents=True, exist_ok=True)
    env = worker_env(work_dir, dict(os.environ))
    name = args.name or f"{role.value}-{socket.gethostname()}"
    print(f"{role.value} worker {name}: pool {pool}, working directory {work_dir}", flush=True)
    with contextlib.ExitStack() as running:
        if role is not HostRole.STORAGE:  # the storage host's reconstruct-files relays
            from msi_prefect.prefect_layer.event_outbox import (
                DownstreamEventRelay,
                downstream_outbox_path,
            )

            outbox = downstream_outbox_path(env[API_URL_ENV], env)
            running.enter_context(DownstreamEventRelay(outbox))
        child = subprocess.Popen(worker_argv(pool, name), env=env, cwd=work_dir)

        def forward(signum: int, _frame: FrameType | None) -> None:
            child.send_signal(signum)

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, forward)
        return child.wait()
    raise AssertionError("unreachable")  # pragma: no cover


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``worker``."""
    parser = subparsers.add_parser(
        "worker",
        help="run the Prefect worker of one kind of host (instrument, storage, compute)",
        description=(
            "Run Prefect's process worker for the work pool of one kind of host, against "
            "the Prefect server of $PREFECT_API_URL. instrument: watch-directory and "
            "upload-file; storage: reconstruct-files and audit-backups; compute: backup, "
            "metadata, analysis and rerun-crashed. The pool is $MSI_<ROLE>_POOL (default "
            "msi-<role>), as `prefect deploy --all` used it."
        ),
    )
    parser.add_argument("--role", required=True, choices=["instrument", "storage", "compute"])
    parser.add_argument("--pool", help="work pool (default: $MSI_<ROLE>_POOL or msi-<role>)")
    parser.add_argument("--name", help="worker name (default: <role>-<hostname>)")
    parser.add_argument(
        "--work-dir",
        default=".",
        help="the host's working directory: the worker runs there and keeps its event "
        "outbox (events/) and fetched files (fetched/) below it (default: the current one)",
    )
    parser.set_defaults(handler=_run)
