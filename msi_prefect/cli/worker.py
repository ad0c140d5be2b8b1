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

A storage host also runs one rebuilder in the topic's consumer group, so adding a storage
host is this one command: its worker registers the host's own deployment
``reconstruct-files/<host>`` (``--host-name``, default the machine's name) on a work queue
of its own, with ``WORK_DIR/rebuild`` as its work folder, and starts its run unless one
is running (``msi_prefect.stack.storage_host``). The worker polls the pool's ``default``
queue (``audit-backups``) and the host's queue.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from msi_prefect.errors import MsiError
from msi_prefect.stack.storage_host import TEMPLATE_DEPLOYMENT

API_URL_ENV = "PREFECT_API_URL"
OUTBOX_DIR_ENV = "MSI_EVENT_OUTBOX_DIR"
FETCH_DIR_ENV = "MSI_FETCH_DIR"
OUTBOX_SUBDIR = "events"
FETCH_SUBDIR = "fetched"
#: The pool's queue the deployments of prefect.yaml are in (audit-backups on a storage host).
DEFAULT_QUEUE = "default"
#: How often a storage worker looks for the deployment its rebuilder is copied from.
TEMPLATE_POLL_S = 5.0
#: How long it waits for audit-backups once reconstruct-files is there (a deploy under way).
AUDIT_TEMPLATE_WAIT_S = 60.0


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


def worker_argv(pool: str, name: str, queues: tuple[str, ...] = ()) -> list[str]:
    """Prefect's process worker for ``pool`` (every queue of it, or only ``queues``)."""
    argv = [
        sys.executable, "-m", "prefect", "worker", "start",
        "--pool", pool, "--type", "process", "--name", name,
    ]  # fmt: skip
    for queue in queues:
        argv += ["--work-queue", queue]
    return argv


def default_host_name() -> str:
    """This machine's name without its domain (``storage-2.lab.example`` -> ``storage-2``)."""
    return socket.gethostname().split(".")[0]


def _run(args: argparse.Namespace) -> int:
    from msi_prefect.stack.roles import HostRole, pool_of

    role = HostRole(args.role)
    pool = args.pool or pool_of(role)
    work_dir = Path(args.work_dir).expanduser().absolute()
    host_name = args.host_name or default_host_name()
    if role is HostRole.STORAGE:
        from msi_prefect.stack.storage_host import check_host_name

        check_host_name(host_name, args.template)
    env = worker_env(work_dir, dict(os.environ))
    work_dir.mkdir(parents=True, exist_ok=True)
    name = args.name or f"{role.value}-{host_name}"
    print(f"{role.value} worker {name}: pool {pool}, working directory {work_dir}", flush=True)
    queues: tuple[str, ...] = ()
    if role is HostRole.STORAGE:
        queues = _start_host_rebuilder(args, env[API_URL_ENV], host_name, pool, work_dir)
    with contextlib.ExitStack() as running:
        if role is not HostRole.STORAGE:  # the storage host's reconstruct-files relays
            from msi_prefect.prefect_layer.event_outbox import (
                DownstreamEventRelay,
                downstream_outbox_path,
            )

            outbox = downstream_outbox_path(env[API_URL_ENV], env)
            running.enter_context(DownstreamEventRelay(outbox))
        from msi_prefect.warm_start.worker import restore_sigint_handler

        restore_sigint_handler()  # before the child starts: it inherits an ignored SIGINT
        child = subprocess.Popen(worker_argv(pool, name, queues), env=env, cwd=work_dir)

        def forward(signum: int, _frame: FrameType | None) -> None:
            child.send_signal(signum)

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, forward)
        return child.wait()
    raise AssertionError("unreachable")  # pragma: no cover


def _start_host_rebuilder(
    args: argparse.Namespace, api_url: str, host_name: str, pool: str, work_dir: Path
) -> tuple[str, ...]:
    """Register and start the storage host's rebuilder; return the queues to poll.

    A storage host may start before the operator deploys the flows (a machine that boots
    first): it waits for the deployment its rebuilder is copied from, saying so once.
    """
    from msi_prefect.stack.prefect_api import UP_RETRY
    from msi_prefect.stack.storage_host import (
        StorageHost,
        TemplateMissingError,
        ensure_host_rebuilder,
    )

    host = StorageHost(api_url, host_name, pool, work_dir, args.destination, args.template)
    said: set[str] = set()
    audit_wait_until: float | None = None  # set once the rebuilder's template is there
    while True:
        audit_required = audit_wait_until is None or time.monotonic() < audit_wait_until
        try:
            setup = ensure_host_rebuilder(host, UP_RETRY, audit_required)
            break
        except TemplateMissingError as missing:
            if missing.template not in said:
                print(f"{missing}; waiting for it", flush=True)
                said.add(missing.template)
            if missing.template != host.template and audit_wait_until is None:
                # `prefect deploy --all` may be half-way; a project without the audit
                # gets none.
                audit_wait_until = time.monotonic() + AUDIT_TEMPLATE_WAIT_S
            time.sleep(TEMPLATE_POLL_S)
    for run in setup.crashed_runs:
        print(f"run {run} of {host.deployment} had no process: marked crashed", flush=True)
    started = setup.started_run
    state = f"started run {started}" if started else "a run is already scheduled or running"
    print(f"rebuilder {host.deployment} (work folder {host.rebuild_dir}): {state}", flush=True)
    if setup.audit is not None:
        print(f"audit {host.audit_deployment}: this host's files, on its queue", flush=True)
    else:
        print("no audit-backups deployed: this host's files are not audited", flush=True)
    return (DEFAULT_QUEUE, host_name)


def _destination(value: str) -> str:
    """An absolute folder or a URL (``s3://bucket/prefix``), for ``--destination``."""
    if "://" in value or Path(value).is_absolute():
        return value
    raise argparse.ArgumentTypeError(
        f"{value!r} is neither an absolute folder nor a URL such as s3://bucket/prefix"
    )


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
            "msi-<role>), as `prefect deploy --all` used it. A storage worker also registers "
            "and starts its host's own rebuilder, reconstruct-files/<host name>, a copy of "
            "reconstruct-files with the work folder WORK_DIR/rebuild: one command per "
            "storage host added."
        ),
    )
    parser.add_argument("--role", required=True, choices=["instrument", "storage", "compute"])
    parser.add_argument("--pool", help="work pool (default: $MSI_<ROLE>_POOL or msi-<role>)")
    parser.add_argument("--name", help="worker name (default: <role>-<host name>)")
    parser.add_argument(
        "--host-name",
        help="this host's name (default: the machine's, without its domain); a storage "
        "host's rebuilder is the deployment reconstruct-files/<host name>, on a work queue "
        "of that name",
    )
    parser.add_argument(
        "--destination",
        type=_destination,
        help="storage: where this host rebuilds to, a folder or s3://bucket/prefix "
        "(default: the destination reconstruct-files was deployed with)",
    )
    parser.add_argument(
        "--template",
        default=TEMPLATE_DEPLOYMENT,
        help=f"storage: the deployment the host's rebuilder is copied from (default: "
        f"{TEMPLATE_DEPLOYMENT})",
    )
    parser.add_argument(
        "--work-dir",
        default=".",
        help="the host's working directory: the worker runs there and keeps its event "
        "outbox (events/) and fetched files (fetched/) below it (default: the current one)",
    )
    parser.set_defaults(handler=_run)
