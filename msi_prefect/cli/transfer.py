"""`msi-prefect upload | watch | reconstruct`: the Prefect-free fast path, usable in scripts."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import resource
import sys
import time
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from msi_prefect.cli.crypto import add_crypto_options, codec_from_args
from msi_prefect.errors import MsiError
from msi_prefect.stack.config import StateDir
from msi_prefect.transfer import (
    DEFAULT_CHUNK_SIZE,
    GOOD_OUTCOMES,
    REGISTRY_FILE,
    STATE_DIR_NAME,
    Compression,
    DecodeLimits,
    FileProducer,
    KafkaConnection,
    ProducerSettings,
    Registry,
    StopConditions,
    StopOnSignal,
    UploadOutcome,
    UploadResult,
    UploadTally,
    WireFormat,
    ensure_topic,
    iter_upload_files,
    user_state_dir,
)

# What only `watch` (watchdog) and `reconstruct` (fsspec, the reassembler) use is imported
# on use: keeps `msi-prefect upload` start-up short.
if TYPE_CHECKING:
    from msi_prefect.transfer import FileEvent

logger = logging.getLogger(__name__)

BOOTSTRAP_ENV = "MSI_BOOTSTRAP_SERVERS"
FALLBACK_BOOTSTRAP = "127.0.0.1:9092"
EXIT_OK = 0
EXIT_SOME_FILES_FAILED = 1


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the transfer subcommands to the CLI."""
    upload = subparsers.add_parser("upload", help="send files or folders to a topic, then exit")
    upload.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or folders")
    upload.add_argument(
        "--root",
        type=Path,
        help="send paths relative to this folder (default: a file by its name, a folder "
        "as itself with its contents)",
    )
    _add_connection_options(upload)
    _add_producer_options(upload)
    add_crypto_options(upload, producer=True)
    upload.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_summary_option(upload)
    upload.set_defaults(handler=_upload)

    watch = subparsers.add_parser(
        "watch", help="send every file that appears (and settles) in a folder"
    )
    watch.add_argument("directory", type=Path, metavar="DIR")
    _add_connection_options(watch)
    _add_producer_options(watch)
    add_crypto_options(watch, producer=True)
    watch.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="only files matching (repeatable; a name pattern unless it has '/')",
    )
    watch.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="skip files matching (repeatable)",
    )
    watch.add_argument(
        "--stability-window",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="a file is ready when unchanged this long (default 2)",
    )
    watch.add_argument(
        "--poll-interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="full rescan period, for network shares (default 1)",
    )
    watch.add_argument(
        "--upload-existing", action="store_true", help="also send files already present at start"
    )
    _add_stop_options(watch)
    _add_summary_option(watch)
    watch.set_defaults(handler=_watch)

    rebuild = subparsers.add_parser(
        "reconstruct", help="rebuild files from a topic into a folder or an s3:// URL"
    )
    rebuild.add_argument("destination", metavar="DEST", help="folder, or s3://bucket/prefix")
    _add_connection_options(rebuild)
    rebuild.add_argument("--group", default="msi-reassembler", help="consumer group id")
    rebuild.add_argument(
        "--work-dir",
        type=Path,
        help=f"staging and progress state (default: DEST/{STATE_DIR_NAME}; required for a "
        "remote DEST)",
    )
    rebuild.add_argument(
        "--max-file-size",
        type=_positive_int,
        default=None,
        metavar="BYTES",
        help="reject files that claim to be larger (default 1 TiB)",
    )
    _add_format_option(rebuild)
    rebuild.add_argument(
        "--session-timeout-ms", type=_positive_int, default=10000, help=argparse.SUPPRESS
    )
    add_crypto_options(rebuild, producer=False)
    _add_stop_options(rebuild)
    _add_summary_option(rebuild)
    rebuild.set_defaults(handler=_reconstruct)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {value}")
    return value


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--topic", required=True, help="Kafka topic")
    parser.add_argument(
        "--bootstrap",
        metavar="HOST:PORT",
        help=f"brokers (default: ${BOOTSTRAP_ENV}, else the local stack's broker)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE.toml",
        help="TOML file with a [kafka] table (bootstrap_servers, security_protocol, "
        "sasl_*, ssl_*, extra) for a real cluster",
    )


def _add_format_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format",
        dest="wire_format",
        choices=[f.value for f in WireFormat],
        default=WireFormat.NATIVE.value,
        help="wire format: msi_prefect's own (native, default) or OpenMSIStream 1.8's "
        "(openmsistream; rebuilding it allows one consumer per group)",
    )


def _add_producer_options(parser: argparse.ArgumentParser) -> None:
    _add_format_option(parser)
    parser.add_argument(
        "--chunk-size",
        type=_positive_int,
        default=DEFAULT_CHUNK_SIZE,
        metavar="BYTES",
        help=f"bytes per message (default {DEFAULT_CHUNK_SIZE})",
    )
    parser.add_argument("--compression", choices=[c.value for c in Compression], default="none")
    parser.add_argument(
        "--registry",
        type=Path,
        help="producer registry file (default: STATE_DIR/" + REGISTRY_FILE + "; STATE_DIR is "
        "--state-dir, $MSI_STATE_DIR, the .msi of the stack whose project folder you are "
        "in, else $XDG_STATE_HOME/msi-prefect or ~/.local/state/msi-prefect)",
    )


def _add_summary_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--summary-json",
        type=Path,
        metavar="FILE",
        help="write counts, bytes, timings and peak memory of this run as JSON (for scripts)",
    )


def write_summary(path: Path | None, summary: dict[str, Any]) -> None:
    """Write a run summary (with the process's peak RSS) as JSON, if asked to."""
    if path is None:
        return
    # ru_maxrss is in KiB on Linux.
    summary["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    path.write_text(json.dumps(summary, indent=2))


def _add_stop_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stop-after-files",
        type=_positive_int,
        metavar="N",
        help="exit after N files finished, sent or rebuilt or rejected (for scripts); "
        "rejected messages that name no file are not files and do not count",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        metavar="SECONDS",
        help="exit after this long with nothing to do (for scripts)",
    )


# ------------------------------------------------------------------------- connection


def connection_from_args(args: argparse.Namespace) -> KafkaConnection:
    """The Kafka connection from --config, --bootstrap, $MSI_BOOTSTRAP_SERVERS or the stack."""
    settings: dict[str, Any] = {}
    if args.config is not None:
        try:
            settings = dict(tomllib.loads(args.config.read_text()).get("kafka", {}))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise MsiError(f"cannot read the config file {args.config}: {exc}") from exc
    if args.bootstrap:
        settings["bootstrap_servers"] = args.bootstrap
    if "bootstrap_servers" not in settings:
        settings["bootstrap_servers"] = os.environ.get(BOOTSTRAP_ENV) or _stack_bootstrap(args)
    try:
        return KafkaConnection.model_validate(settings)
    except ValidationError as exc:
        raise MsiError(f"invalid Kafka settings: {exc}") from exc


def _stack_bootstrap(args: argparse.Namespace) -> str:
    config = StateDir.for_transfers(args.state_dir).load_config()
    return config.bootstrap_servers if config else FALLBACK_BOOTSTRAP


def _registry_path(args: argparse.Namespace) -> Path:
    """The producer registry: --registry, else in the transfer state dir.

    The state dir is never the current folder by default (``StateDir.for_transfers``): a
    data folder the command runs in must not gain a ``.msi`` of ours.
    """
    if args.registry is not None:
        return Path(args.registry)
    state = StateDir.for_transfers(args.state_dir)
    # A stack's state dir gets the stack's layout; the user's state dir only the registry.
    state.ensure_writable(stack_layout=state.root != StateDir(user_state_dir()).root)
    return state.root / REGISTRY_FILE


def own_state_excludes(root: Path, registry: Path, state_dir: Path | None) -> tuple[str, ...]:
    """Exclude regexes for our own state files that lie below a watched folder.

    The watcher must never send the files that record what it sent: the registry, with
    SQLite's ``-wal``, ``-shm`` and ``-journal`` files beside it, and the whole state dir
    (a stack's ``.msi`` holds its logs, databases and S3 data too).

    Args:
        root: The watched folder.
        registry: The producer registry file.
        state_dir: The state dir in use, or None when ``--registry`` named the registry.

    Returns:
        Regexes matching the whole relative path (``FileFilter.exclude_regex``).
    """
    base = root.resolve()
    excludes: list[str] = []
    if state_dir is not None:
        with contextlib.suppress(ValueError):
            state_rel = state_dir.resolve().relative_to(base).as_posix()
            # "." would be the watched folder itself: then only the files below are ours.
            if state_rel != ".":
                excludes.append(re.escape(state_rel) + "/.*")
    with contextlib.suppress(ValueError):
        registry_rel = (registry.parent.resolve() / registry.name).relative_to(base).as_posix()
        excludes.append(re.escape(registry_rel) + "(?:-wal|-shm|-journal)?")
    return tuple(excludes)


def _transfer_state_dir(args: argparse.Namespace) -> Path | None:
    """The state dir holding the registry; None when --registry names the registry."""
    return None if args.registry is not None else StateDir.for_transfers(args.state_dir).root


def _producer_settings(args: argparse.Namespace) -> ProducerSettings:
    return ProducerSettings(
        topic=args.topic,
        chunk_size=args.chunk_size,
        compression=Compression(args.compression),
        wire_format=WireFormat(args.wire_format),
    )


# ----------------------------------------------------------------------------- upload


class _ProgressBar:
    """A one-line progress bar on a terminal for files larger than a few chunks."""

    MIN_BYTES = 8 * 1024 * 1024

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._last = 0.0

    def __call__(self, relpath: str, done: int, size: int) -> None:
        if not self.enabled or size < self.MIN_BYTES:
            return
        now = time.monotonic()
        if done < size and now - self._last < 0.2:
            return
        self._last = now
        width = 30
        filled = int(width * done / size)
        sys.stderr.write(
            f"\r{relpath[-40:]:<40} [{'#' * filled}{'.' * (width - filled)}] "
            f"{done / 2**20:8.1f}/{size / 2**20:.1f} MiB"
        )
        if done >= size:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _upload(args: argparse.Namespace) -> int:
    started = time.time()
    connection = connection_from_args(args)
    with (
        Registry(_registry_path(args)) as registry,
        codec_from_args(args, connection, [args.topic]) as codec,
    ):
        producer = FileProducer(connection, _producer_settings(args), registry, codec=codec)
        files = list(iter_upload_files(args.paths, args.root))
        ensure_topic(connection, args.topic)
        results = producer.upload_all(files, _ProgressBar(not args.no_progress))
    tally = UploadTally()
    for result in results:
        tally.add(result)
    status = _summarise(results, tally)
    write_summary(args.summary_json, _upload_summary(tally, started))
    return status


def _upload_summary(tally: UploadTally, started: float) -> dict[str, Any]:
    return {
        "outcomes": {outcome.value: n for outcome, n in tally.outcomes.items()},
        "bytes_sent": tally.bytes_sent,
        "started_at": started,
        "finished_at": time.time(),
    }


def _summarise(results: list[UploadResult], tally: UploadTally) -> int:
    counts = tally.outcomes
    for result in results:
        if result.outcome not in GOOD_OUTCOMES:
            print(f"{result.outcome.value}: {result.relpath}: {result.reason}", file=sys.stderr)
    print(", ".join(f"{n} {outcome.value}" for outcome, n in sorted(counts.items())) or "no files")
    return EXIT_OK if set(counts) <= GOOD_OUTCOMES else EXIT_SOME_FILES_FAILED


# ------------------------------------------------------------------------------ watch


def _watch(args: argparse.Namespace) -> int:
    from msi_prefect.transfer import FileFilter, WatchSettings, watch_and_send

    root: Path = args.directory
    if not root.is_dir():
        raise MsiError(f"not a folder: {root}")
    registry_path = _registry_path(args)
    try:
        file_filter = FileFilter(
            include=tuple(args.include),
            exclude=tuple(args.exclude),
            exclude_regex=own_state_excludes(root, registry_path, _transfer_state_dir(args)),
        )
        watch_settings = WatchSettings(
            root=root,
            filter=file_filter,
            stability_window_s=args.stability_window,
            poll_interval_s=args.poll_interval,
            include_existing=args.upload_existing,
        )
    except ValueError as exc:
        raise MsiError(str(exc)) from exc
    connection = connection_from_args(args)
    ensure_topic(connection, args.topic)
    started = time.time()
    conditions = StopConditions(args.stop_after_files, args.idle_timeout)
    with (
        Registry(registry_path) as registry,
        codec_from_args(args, connection, [args.topic]) as codec,
        StopOnSignal() as stop,
    ):
        tally = watch_and_send(
            connection,
            _producer_settings(args),
            watch_settings,
            registry,
            stop,
            conditions,
            on_result=_print_result,
            codec=codec,
        )
    write_summary(args.summary_json, _upload_summary(tally, started))
    return EXIT_OK


def _print_result(result: UploadResult) -> None:
    if result.outcome is UploadOutcome.SENT:
        print(
            f"sent {result.relpath} ({result.size} bytes, generation {result.generation})",
            flush=True,
        )
    elif result.outcome is not UploadOutcome.ALREADY_SENT:
        print(f"{result.outcome.value}: {result.relpath}: {result.reason}", flush=True)


# ------------------------------------------------------------------------ reconstruct


def storage_options_from_env(destination: str) -> dict[str, Any]:
    """fsspec options for an s3:// destination: the endpoint from $AWS_ENDPOINT_URL."""
    if not destination.startswith("s3://"):
        return {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}


def _reconstruct(args: argparse.Namespace) -> int:
    from msi_prefect.transfer import FileEventKind, Reassembler, ReassemblerSettings

    connection = connection_from_args(args)
    ensure_topic(connection, args.topic)
    limits = (
        DecodeLimits(max_file_size=args.max_file_size) if args.max_file_size else DecodeLimits()
    )
    settings = ReassemblerSettings(
        topic=args.topic,
        destination=args.destination,
        group_id=args.group,
        work_dir=args.work_dir,
        storage_options=storage_options_from_env(args.destination),
        limits=limits,
        session_timeout_ms=args.session_timeout_ms,
        wire_format=WireFormat(args.wire_format),
    )
    started = time.time()
    # First and last delivery only: a long run must not keep a record per file.
    completion_times: dict[str, float] = {}

    def on_event(event: FileEvent) -> None:
        if event.kind is FileEventKind.RECONSTRUCTED:
            completion_times.setdefault("first", time.time())
            completion_times["last"] = time.time()
        try:
            _print_event(event)
        except BrokenPipeError as exc:
            # Not a full disk (an OSError the reassembler would retry forever): stop, with
            # the batch uncommitted, as a program whose output is gone does.
            raise MsiError("the standard output was closed; stopping") from exc

    conditions = StopConditions(
        stop_after_files=args.stop_after_files, idle_timeout_s=args.idle_timeout
    )
    with codec_from_args(args, connection, [args.topic]) as codec:
        try:
            reassembler = Reassembler(connection, settings, on_event=on_event, codec=codec)
        except OSError as exc:
            raise MsiError(f"cannot use the destination {args.destination}: {exc}") from exc
        with StopOnSignal() as stop:
            stats = reassembler.run(stop, conditions)
    print(
        f"{stats.files_reconstructed} reconstructed, {stats.files_rejected} rejected, "
        f"{stats.messages_rejected} rejected messages, {stats.bytes_written} bytes written",
        flush=True,
    )
    write_summary(
        args.summary_json,
        {
            "reconstructed": stats.files_reconstructed,
            "rejected": stats.files_rejected,
            # Messages that name no file (garbage, other applications): not files.
            "rejected_messages": stats.messages_rejected,
            "rejected_by_reason": dict(stats.rejected_by_reason),
            "bytes_written": stats.bytes_written,
            "started_at": started,
            "first_file_at": completion_times.get("first"),
            "last_file_at": completion_times.get("last"),
        },
    )
    return EXIT_OK


def _print_event(event: FileEvent) -> None:
    """One line per file outcome.

    A rejected message that names no file is not printed: the reassembler's log line
    already reports it once, with its partition and offset.
    """
    from msi_prefect.transfer import FileEventKind

    if event.kind is FileEventKind.RECONSTRUCTED:
        print(f"reconstructed {event.relpath} ({event.size} bytes) -> {event.url}", flush=True)
    elif event.names_file:
        print(f"rejected {event.where()}: {event.reason}", flush=True)
