"""The `msi-prefect` command line: the parser, the subcommand groups, the exit status.

Each group of subcommands is a module of this package (:mod:`~msi_prefect.cli.stack`,
:mod:`~msi_prefect.cli.transfer`, :mod:`~msi_prefect.cli.crypto`, :mod:`~msi_prefect.cli.rerun`,
:mod:`~msi_prefect.cli.inspect_files`, :mod:`~msi_prefect.cli.files`,
:mod:`~msi_prefect.cli.prune`, :mod:`~msi_prefect.cli.init`, :mod:`~msi_prefect.cli.worker`)
and registers itself here through a `register(subparsers)` function, so adding a command
never touches the others.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from msi_prefect import __version__
from msi_prefect.cli import crypto as crypto_commands
from msi_prefect.cli import files, init, inspect_files, prune, rerun, worker
from msi_prefect.cli import stack as stack_commands
from msi_prefect.cli import transfer as transfer_commands
from msi_prefect.errors import MsiError

# Exit status for an error the user can fix (argparse itself uses 2 for bad usage).
EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130

Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]
COMMAND_GROUPS: tuple[Registrar, ...] = (
    stack_commands.register,
    transfer_commands.register,
    crypto_commands.register,
    rerun.register,
    inspect_files.register,
    files.register,
    prune.register,
    init.register,
    worker.register,
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="msi-prefect",
        description="Move laboratory data files through Kafka and act on each file as it "
        "arrives, with Prefect.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where the embedded stack keeps state, logs and PID files (default: "
        "$MSI_STATE_DIR, else ./.msi for up/down/status/env; upload/watch/reconstruct use "
        "the .msi of the stack whose project folder they run in, else "
        "$XDG_STATE_HOME/msi-prefect)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in COMMAND_GROUPS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Every health probe is an HTTP request; their INFO lines are noise for users.
    for noisy in ("httpx", "watchdog"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        status: int = args.handler(args)
    except MsiError as exc:
        print(f"msi-prefect: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return status


if __name__ == "__main__":
    sys.exit(main())
