"""`msi-prefect crypto provision`, and the `--crypto-config` options of the transfer commands.

Provisioning is non-interactive: the two deployment passwords come from environment
variables (or a prompt when run on a terminal), never from the command line, so they do
not end up in shell histories or process listings.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import SecretStr

from msi_prefect.errors import MsiError
from msi_prefect.transfer import (
    DEFAULT_KEY_WAIT_S,
    PROVISIONING_PASSWORD_ENV,
    ROT_PASSWORD_ENV,
    KafkaConnection,
    NodeRole,
)

# The KafkaCrypto layer is imported on use (provisioning, or a transfer given
# --crypto-config): keeps `msi-prefect upload` start-up short.
if TYPE_CHECKING:
    from msi_prefect.transfer import CryptoCodec, ProvisioningSecrets

EXIT_OK = 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `crypto` command group."""
    crypto = subparsers.add_parser("crypto", help="KafkaCrypto end-to-end encryption")
    actions = crypto.add_subparsers(dest="crypto_command", metavar="ACTION", required=True)
    provision = actions.add_parser(
        "provision",
        help="provision a KafkaCrypto producer or consumer node (non-interactive)",
        description=f"Passwords come from ${ROT_PASSWORD_ENV} (12+ characters) and "
        f"${PROVISIONING_PASSWORD_ENV} (6+), or are asked for on a terminal. Every node of "
        "one deployment must use the same two passwords.",
    )
    provision.add_argument("--config-dir", type=Path, required=True, metavar="DIR")
    provision.add_argument("--node", required=True, metavar="NAME", help="node id")
    provision.add_argument(
        "--role",
        choices=[role.value for role in NodeRole],
        required=True,
        help="producer (sends), consumer (receives) or prodcon (both)",
    )
    provision.add_argument(
        "--topic",
        action="append",
        default=[],
        metavar="TOPIC",
        help="limit the node to this topic (repeatable; default: every topic)",
    )
    provision.set_defaults(handler=_provision)


def secrets_from_env(interactive: bool | None = None) -> ProvisioningSecrets:
    """The deployment passwords from the environment, or a prompt on a terminal.

    Raises:
        MsiError: a password is missing (and there is no terminal) or too short.
    """
    from msi_prefect.transfer import ProvisioningSecrets

    if interactive is None:
        interactive = sys.stdin.isatty()
    values = []
    for env, label in (
        (ROT_PASSWORD_ENV, "Root-of-trust password"),
        (PROVISIONING_PASSWORD_ENV, "Provisioning password"),
    ):
        value = os.environ.get(env)
        if not value and interactive:
            value = getpass.getpass(f"{label}: ")
        if not value:
            raise MsiError(f"set ${env} (or run on a terminal to be asked for it)")
        values.append(SecretStr(value))
    return ProvisioningSecrets(rot_password=values[0], provisioning_password=values[1])


def _provision(args: argparse.Namespace) -> int:
    from msi_prefect.transfer import NodeFiles, provision_node

    files = NodeFiles(args.config_dir, args.node)
    provision_node(files, NodeRole(args.role), secrets_from_env(), topics=args.topic or None)
    print(f"provisioned {args.role} node {args.node}: {files.config}")
    return EXIT_OK


# --- options shared by upload / watch / reconstruct -----------------------------------------


def add_crypto_options(parser: argparse.ArgumentParser, producer: bool) -> None:
    """Add `--crypto-config` (and `--key-wait` or `--key-linger`) to a transfer command."""
    parser.add_argument(
        "--crypto-config",
        type=Path,
        metavar="DIR/NODE",
        help="encrypt end to end with this provisioned KafkaCrypto node "
        "(DIR/NODE or DIR/NODE.config)",
    )
    if producer:
        parser.add_argument(
            "--key-linger",
            type=float,
            default=0.0,
            metavar="SECONDS",
            help="with --crypto-config: stay this long after sending to answer consumers' "
            "key requests (default 0)",
        )
    else:
        parser.add_argument(
            "--key-wait",
            type=float,
            default=DEFAULT_KEY_WAIT_S,
            metavar="SECONDS",
            help="with --crypto-config: how long to wait for a missing key before the "
            f"message is rejected as key-missing (default {DEFAULT_KEY_WAIT_S:g})",
        )


@contextlib.contextmanager
def codec_from_args(
    args: argparse.Namespace, connection: KafkaConnection, topics: Sequence[str]
) -> Iterator[CryptoCodec | None]:
    """Open the node named by `--crypto-config` for the command's lifetime (None without)."""
    config: Path | None = getattr(args, "crypto_config", None)
    if config is None:
        yield None
        return
    from msi_prefect.transfer import CryptoCodec

    codec = CryptoCodec.open(
        config,
        connection,
        key_wait_s=getattr(args, "key_wait", DEFAULT_KEY_WAIT_S),
        topics=topics,
    )
    try:
        yield codec
        linger = getattr(args, "key_linger", 0.0)
        if linger > 0:
            print(f"answering key requests for {linger:g} s", flush=True)
            time.sleep(linger)
    finally:
        codec.close()
