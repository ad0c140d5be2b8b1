"""Free the instrument's disk by hand: ``msi-prefect prune-source [--dry-run]``.

The same decision and deletion as the scheduled ``prune-source`` deployment
(:mod:`msi_prefect.prefect_layer.prune`), run here, on the machine whose watched folder it
is: every file is listed with what happens to it and why. ``--dry-run`` deletes nothing;
``--retention-days`` tries a rule before it is set on the transfer settings block.
Without ``--directory`` it prunes the watched folder of the stack next to it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from msi_prefect.cli.rerun import prefect_api_and_ui
from msi_prefect.errors import MsiError

if TYPE_CHECKING:
    from msi_prefect.prefect_layer.prune import PruneReport

EXIT_OK = 0
DEFAULT_BLOCK = "embedded"


def _stack_watch_dir(args: argparse.Namespace) -> Path:
    from msi_prefect.stack.config import StateDir

    try:
        config = StateDir.from_env(args.state_dir).load_config()
    except (OSError, ValueError) as exc:
        raise MsiError(f"cannot read the stack's settings: {exc}") from exc
    if config is None or config.watch_dir is None:
        raise MsiError(
            "no watched folder: give --directory, or run this next to a stack started with "
            "msi-prefect up (or give --state-dir)"
        )
    return Path(config.watch_dir)


def _print_text(report: PruneReport, incomplete: str | None) -> None:
    if report.retention_days is None:
        print(
            "retention is off (retention_days is empty on the transfer settings block): "
            "nothing is deleted; give --retention-days with --dry-run to see what a rule "
            "would delete"
        )
        return
    verb = "would delete" if report.dry_run else "deleted"
    for row in report.rows:
        print(f"{row['action']:<13} {row['path']}  ({row['reason']}: {row['detail']})")
    counts = report.as_dict()
    deletable = counts["verified"] if report.dry_run else report.deleted
    kept = ", ".join(
        f"{count} {reason}"
        for reason, count in counts.items()
        if count and reason not in ("verified", "deleted", "freed_bytes")
    )
    print(
        f"{report.directory} (retention {report.retention_days:g} days): {verb} {deletable} "
        f"file(s); kept: {kept or 'none'}"
    )
    if incomplete:
        print(incomplete)


def _prune(args: argparse.Namespace) -> int:
    if args.retention_days is not None and args.retention_days < 0:
        raise MsiError(f"--retention-days must be 0 or more, not {args.retention_days}")
    directory = (args.directory or _stack_watch_dir(args)).absolute()
    if not directory.is_dir():
        raise MsiError(f"no folder {directory}")
    api, _ = prefect_api_and_ui(args)
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW,
        temporary_settings,
    )

    from msi_prefect.prefect_layer.backup.storage import BackupStorage
    from msi_prefect.prefect_layer.flow_inputs import load_block
    from msi_prefect.prefect_layer.prune import (
        PruneIncompleteError,
        PruneReport,
        prune_source,
    )
    from msi_prefect.prefect_layer.transfers.settings import TransferSettings
    from msi_prefect.transfer import registry_beside

    incomplete: str | None = None
    # The prune runs as a task run of its own, outside a flow run: its logs stay here.
    quiet = {PREFECT_API_URL: api, PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW: "ignore"}
    with temporary_settings(updates=quiet):
        settings = load_block(TransferSettings, args.transfer_block)
        days = args.retention_days if args.retention_days is not None else settings.retention_days
        if days is None:
            report = PruneReport(str(directory), args.dry_run, None)
        else:
            try:
                report = prune_source(
                    directory,
                    args.registry or registry_beside(directory),
                    settings.topic,
                    days,
                    load_block(BackupStorage, args.backup_block),
                    args.dry_run,
                )
            except PruneIncompleteError as exc:
                report, incomplete = exc.report, str(exc)
    if args.json:
        print(
            json.dumps(
                {
                    "directory": report.directory,
                    "dry_run": report.dry_run,
                    "retention_days": report.retention_days,
                    "counts": report.as_dict(),
                    "files": report.rows,
                    "incomplete": incomplete,
                },
                indent=2,
            )
        )
    else:
        _print_text(report, incomplete)
    if incomplete:
        raise MsiError(incomplete)
    return EXIT_OK


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``prune-source`` to the CLI."""
    parser = subparsers.add_parser(
        "prune-source",
        help="delete sent files from the watched folder once their backup is verified "
        "(what the scheduled prune-source deployment does); --dry-run lists only",
        description="Delete every file of the watched folder that was sent, is unchanged "
        "since, and whose newest generation's backup exists with the same SHA-256 and is "
        "older than the retention period; list every file with what happens to it and why.",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="list what would be deleted; delete nothing"
    )
    parser.add_argument(
        "--retention-days",
        type=float,
        help="days after its backup a file may be deleted (default: retention_days of the "
        "transfer settings block; when that is empty, retention is off)",
    )
    parser.add_argument(
        "--directory",
        type=Path,
        help="the watched folder (default: the one of the stack's watch-directory deployment)",
    )
    parser.add_argument(
        "--registry",
        type=Path,
        help="its producer registry (default: beside the folder, where watch-directory keeps it)",
    )
    parser.add_argument(
        "--transfer-block",
        default=DEFAULT_BLOCK,
        help=f"MSI Transfer Settings block: topic, retention (default {DEFAULT_BLOCK})",
    )
    parser.add_argument(
        "--backup-block",
        default=DEFAULT_BLOCK,
        help=f"MSI Backup Storage block the backups are in (default {DEFAULT_BLOCK})",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--api-url",
        help="Prefect API (default: the stack of --state-dir, else $PREFECT_API_URL, else "
        "the stack of $MSI_STATE_DIR or ./.msi)",
    )
    parser.set_defaults(handler=_prune)
