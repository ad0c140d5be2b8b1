"""`msi-prefect up | down | status | env`: manage the embedded local stack."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from msi_prefect.errors import MsiError
from msi_prefect.prefect_layer.dispatch.mode import DownstreamDispatch
from msi_prefect.stack.config import (
    BrokerStorage,
    Component,
    PrefectDatabase,
    ServerLayout,
    StackConfig,
    StateDir,
    parse_port_overrides,
)

# The stack manager and the deployment (process handling, health checks, KafkaCrypto
# provisioning) are imported on use: keeps `msi-prefect upload` start-up short.
if TYPE_CHECKING:
    from msi_prefect.stack.manager import StackManager
    from msi_prefect.stack.transfer_status import TransferStatus

EXIT_OK = 0
EXIT_UNHEALTHY = 1
#: What `up` says when the stack's last deploy is current (`msi_prefect.stack.deploy_record`).
DEPLOY_CURRENT = "flows unchanged since this stack's last deploy: not deployed again"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the stack subcommands to the CLI."""
    up = subparsers.add_parser(
        "up", help="start the embedded stack (broker, S3 store, Prefect server, worker)"
    )
    up.add_argument(
        "--port",
        action="append",
        default=[],
        metavar="NAME=PORT",
        help="override one port, e.g. --port broker=19092 (repeatable); "
        "kept for later runs of this state dir",
    )
    up.add_argument(
        "--storage",
        choices=[s.value for s in BrokerStorage],
        default=None,
        help="where the broker keeps topics: s3 (durable, default) or memory",
    )
    up.add_argument(
        "--database",
        choices=[d.value for d in PrefectDatabase],
        default=None,
        help="the Prefect server's database: sqlite (a file in the state dir, default) or "
        "postgresql (a PostgreSQL server of the stack's own, on 127.0.0.1, needs Debian's "
        "postgresql-15); kept for later runs, changed only while the stack is down",
    )
    up.add_argument(
        "--server-layout",
        choices=[layout.value for layout in ServerLayout],
        default=None,
        help="the Prefect server as one process (default) or split: its API in one "
        "process, its services (event persister, triggers...) in another, with a Redis "
        "server of the stack's own (127.0.0.1, needs Debian's redis-server) between them; "
        "kept for later runs, changed only while the stack is down",
    )
    up.add_argument(
        "--only",
        action="append",
        choices=[c.value for c in Component],
        default=None,
        help="start only these components (repeatable)",
    )
    up.add_argument(
        "--watch-dir",
        type=Path,
        help="folder the watch-directory deployment sends from (default: inbox/ beside "
        "the state dir)",
    )
    up.add_argument(
        "--destination-dir",
        type=Path,
        help="folder rebuilt files go to (default: received/ beside the state dir)",
    )
    up.add_argument(
        "--dispatch",
        choices=[d.value for d in DownstreamDispatch],
        default=None,
        help="how rebuilt files start their downstream runs: adaptive (default: a run per "
        "file while the runs keep up, batches sized by the backlog when files come faster), "
        "per-file (always a run per file) or batch (always one run per batch of files)",
    )
    up.add_argument(
        "--encrypted",
        action="store_true",
        help="encrypt the deployed transfers end to end with KafkaCrypto (provisions a "
        "producer and a consumer node under STATE_DIR/crypto); kept for later runs",
    )
    up.add_argument(
        "--no-deploy",
        action="store_true",
        help="start the servers only; do not deploy the flows or start the transfers",
    )
    notify = up.add_mutually_exclusive_group()
    notify.add_argument(
        "--notify-url",
        type=_notify_url,
        metavar="URL",
        help="send notices (file rejected, downstream run failed, backup missing, transfer "
        "stopped) as JSON POSTs to this webhook (Slack, Teams, Mattermost, plain HTTP); "
        "saved as the block custom-webhook/msi-notify (docs/operations.md)",
    )
    notify.add_argument(
        "--notify-block",
        type=_notify_block,
        metavar="TYPE/NAME",
        help="send the notices through a notification block saved already, e.g. "
        "slack-webhook/lab-channel",
    )
    up.set_defaults(handler=_up)

    down = subparsers.add_parser("down", help="stop every process of the embedded stack")
    down.set_defaults(handler=_down)

    status = subparsers.add_parser("status", help="show each part, its address and health")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=_status)

    env = subparsers.add_parser(
        "env", help="print shell exports that point Prefect, S3 and Kafka clients at the stack"
    )
    env.set_defaults(handler=_env)


def _notify_url(value: str) -> str:
    from msi_prefect.stack.notifications import validate_notify_url

    try:
        return validate_notify_url(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _notify_block(value: str) -> str:
    from msi_prefect.stack.notifications import validate_block_reference

    try:
        return validate_block_reference(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _manager(args: argparse.Namespace) -> StackManager:
    from msi_prefect.stack.manager import StackManager

    return StackManager.open(StateDir.from_env(args.state_dir))


def _up(args: argparse.Namespace) -> int:
    from msi_prefect.stack.deploy import deploy_flows, project_dir
    from msi_prefect.stack.manager import StackManager

    if not args.no_deploy:
        project_dir()  # a folder whose prefect.yaml is not ours fails before anything starts
    state = StateDir.from_env(args.state_dir)
    state.ensure_writable()
    manager = StackManager.open(state)
    overrides = parse_port_overrides(args.port)
    changes: dict[str, object] = {}
    if overrides:
        changes["ports"] = {**manager.config.ports, **overrides}
    if args.storage:
        changes["broker_storage"] = BrokerStorage(args.storage)
    if args.dispatch:
        changes["downstream_dispatch"] = DownstreamDispatch(args.dispatch)
    if args.database:
        changes["database"] = PrefectDatabase(args.database)
    if args.server_layout:
        changes["server_layout"] = ServerLayout(args.server_layout)
    folders = {
        "watch_dir": args.watch_dir or manager.config.watch_dir or state.root.parent / "inbox",
        "destination_dir": args.destination_dir
        or manager.config.destination_dir
        or state.root.parent / "received",
    }
    changes.update({key: str(Path(value).absolute()) for key, value in folders.items()})
    if args.encrypted:
        changes["encrypted"] = True
    try:
        candidate = StackConfig.model_validate({**manager.config.model_dump(), **changes})
    except ValidationError as exc:
        raise MsiError(f"invalid stack settings: {exc}") from exc
    if candidate != manager.config and manager.running_components():
        raise MsiError(
            "the stack is running; ports, storage, database, folders and dispatch can only change "
            "while it is down. Run 'msi-prefect down' first."
        )
    manager.config = candidate
    components = manager.wanted_components([Component(c) for c in args.only] if args.only else None)
    if (args.notify_url or args.notify_block) and Component.PREFECT not in components:
        raise MsiError(
            "--notify-url and --notify-block need the Prefect server: add --only prefect"
        )
    started = manager.up(components)
    already = [c.value for c in components if c not in started]
    if already:
        print(f"already running: {', '.join(already)}")
    if started:
        print(f"started: {', '.join(c.value for c in started)}")
    if not args.no_deploy and set(components) == set(manager.config.components):
        outcome = deploy_flows(manager, worker_just_started=Component.WORKER in started)
        print(
            ("flows deployed" if outcome.deployed else DEPLOY_CURRENT)
            + (f"; started: {', '.join(outcome.started)}" if outcome.started else "")
        )
    _set_up_notifications(manager, args, components)
    _print_status(manager, as_json=False)
    return EXIT_OK  # `up` raised already if a part it started did not become healthy


def _set_up_notifications(
    manager: StackManager, args: argparse.Namespace, components: list[Component]
) -> None:
    """Apply the notification automations of ``deployments/automations``.

    With ``--notify-url`` or ``--notify-block``; without, again with the block an earlier
    `up` of this state dir used (so changed specs take effect), if any.
    """
    from msi_prefect.stack.deploy import project_dir
    from msi_prefect.stack.notifications import (
        NotificationTarget,
        remembered_target,
        set_up_notifications,
    )
    from msi_prefect.stack.project import automations_project

    asked = bool(args.notify_url or args.notify_block)
    if asked:
        target: NotificationTarget | None = NotificationTarget(
            webhook_url=args.notify_url, block=args.notify_block
        )
    else:
        target = remembered_target(manager.state.root)
        if target is None or args.no_deploy or set(components) != set(manager.config.components):
            return
    if Component.PREFECT not in components:
        raise MsiError("notifications need the Prefect server (not --only without prefect)")
    project = automations_project(project_dir())
    assert target is not None
    applied = set_up_notifications(
        manager.config.prefect_api_url, project, target, manager.state.root
    )
    where = target.block or "the webhook (block custom-webhook/msi-notify)"
    print(f"notifications: {len(applied)} automations send to {where}")


def _down(args: argparse.Namespace) -> int:
    manager = _manager(args)
    stopped = manager.down()
    print(f"stopped: {', '.join(c.value for c in stopped)}" if stopped else "nothing was running")
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    return _print_status(_manager(args), as_json=args.json, with_transfers=True)


def _print_status(manager: StackManager, as_json: bool, with_transfers: bool = False) -> int:
    """Print the parts of the stack and, with ``with_transfers``, how the transfer does."""
    from dataclasses import asdict

    from msi_prefect.stack.manager import Health
    from msi_prefect.stack.transfer_status import transfer_status

    status = manager.status()
    transfers: list[TransferStatus] = []
    if with_transfers and (manager.config.watch_dir or manager.config.destination_dir):
        stopped = frozenset(
            Component(row.name) for row in status.components if row.health is Health.STOPPED
        )
        transfers.append(transfer_status(manager.config, stopped=stopped))
    if as_json:
        data = status.to_json_dict()
        if with_transfers:
            data["transfers"] = [asdict(transfer) for transfer in transfers]
        print(json.dumps(data, indent=2))
    else:
        print(f"state dir     {status.state_dir}")
        print(f"prefect UI    {status.prefect_ui_url}")
        print(f"broker        {status.bootstrap_servers} (storage: {status.broker_storage})")
        print(f"s3 endpoint   {status.s3_endpoint} (backup bucket: {status.backup_bucket})")
        print(f"database      {status.database} (the Prefect server's)")
        print(f"server layout {status.server_layout}")
        if status.watch_dir:
            print(f"watched dir   {status.watch_dir}")
        if status.destination_dir:
            print(f"destination   {status.destination_dir}")
            print(f"dispatch      {status.downstream_dispatch}")
        print()
        print(f"{'component':<16} {'health':<10} {'pid':>8}  address")
        for row in status.components:
            pid = str(row.pid) if row.pid else "-"
            print(f"{row.name:<16} {row.health.value:<10} {pid:>8}  {row.address}")
        unhealthy = [r for r in status.components if r.health is not Health.HEALTHY]
        for row in unhealthy:
            print(f"  {row.name}: {row.health.value}; see {row.log_file}")
        for transfer in transfers:
            _print_transfer(transfer)
    return EXIT_OK if status.all_healthy else EXIT_UNHEALTHY


def _count(value: int | None) -> str:
    return "?" if value is None else str(value)


def _print_transfer(transfer: TransferStatus) -> None:
    """The transfer's lines of `status` (a ``?`` where a source did not answer)."""
    producer, consumer, downstream = transfer.producer, transfer.consumer, transfer.downstream
    print()
    print(f"transfer      {transfer.watch_dir} -> topic {transfer.topic} -> "
          f"{transfer.destination_dir}")  # fmt: skip
    print(
        f"last hour     sent {_count(producer.sent_last_hour)}, rebuilt "
        f"{_count(consumer.rebuilt_last_hour)}, rejected {_count(consumer.rejected_last_hour)}"
    )
    for label, last in (("last sent", producer.last_sent), ("last rebuilt", consumer.last_rebuilt)):
        if last is not None:
            print(f"{label:<13} {last.path} (generation {last.generation}) at {last.at}")
    cut = "+" if producer.folder_scan_cut else ""
    print(
        f"waiting       {_count(producer.waiting_in_folder)}{cut} files in the watched folder, "
        f"{_count(transfer.messages_on_topic)} messages on the topic, "
        f"{_count(consumer.receiving)} files being received, "
        f"{_count(downstream.files_waiting_for_batch)} files waiting for their batch"
    )
    print(
        f"downstream    runs: {_count(downstream.runs_scheduled)} scheduled, "
        f"{_count(downstream.runs_pending)} pending, {_count(downstream.runs_running)} running"
    )
    if producer.skipped:
        print(f"skipped       {producer.skipped} files (msi-prefect files shows why)")
    for note in transfer.notes:
        print(f"  note: {note}")


def _env(args: argparse.Namespace) -> int:
    for key, value in sorted(_manager(args).client_env().items()):
        print(f"export {key}={shlex.quote(value)}")
    return EXIT_OK
