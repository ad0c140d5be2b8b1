"""Rebuilders that scale: 1, 2 and 3 ``msi-prefect reconstruct`` processes in one group.

The sink is the limit, not the CPU (the machine is shared and its load swings): the
rebuilders reach the S3 store (SeaweedFS, the embedded stack's) through a proxy that
holds every piece of data it forwards for ``--delay-ms`` before passing it on, in each
direction, so each request to the store waits for a round trip of twice that, as for a
store across a campus network. The broker stays on loopback, undelayed. Files are named
so that each of the topic's partitions holds the same number (librdkafka's default
partitioner: CRC-32 of the key, the file id), so the rebuilders get equal shares.

Why a proxy and not ``tc qdisc netem`` in a network namespace: this machine's kernel has
no ``sch_netem`` (``tc`` answers "Specified qdisc kind is unknown", and there is no
``modprobe``); of the qdiscs it has, ``tbf`` and ``htb`` limit bandwidth, which all
rebuilders would share, and a shared limit cannot show scaling. The proxy's delay is per
connection, as a network's latency is. Everything stays on 127.0.0.1.

Each round creates a 6-partition topic, starts N rebuilders in one consumer group (their
own work folders, one S3 destination), lets the group settle, then sends the files and
times until every file is rebuilt and verified in the store. Rounds run 1, 2, 3, 1, 2, 3,
...; the report gives the median files/s of each count and its ratio to one rebuilder.
The run starts and stops (by PID) its own store and broker, and its proxy.

Usage::

    .venv/bin/python -m bench.rebuilder_scaling --rounds 3 --files 96 --delay-ms 50
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

from bench.common import KAFKA_SESSION_TIMEOUT_MS, create_topic, delete_topic

PARTITIONS = 6
REBUILDER_COUNTS = (1, 2, 3)
#: After the rebuilders start, before the files are sent: a group join takes about half
#: the session timeout on Tansu, and a join of several members more than one round.
SETTLE_S = 2.5 * KAFKA_SESSION_TIMEOUT_MS / 1000
GROUP_TIMEOUT_S = 120.0
GROUP_POLL_S = 0.5
# What a rebuilder with a remote destination creates in its work folder at start.
PROGRESS_STORE = "progress.sqlite"
ROUND_TIMEOUT_S = 600.0
POLL_S = 0.05
STOP_TIMEOUT_S = 30.0
RECONSTRUCTED_LINE = re.compile(r"^reconstructed (.+) \(\d+ bytes\) -> ", re.MULTILINE)
PROXY_READ_SIZE = 64 * 1024
KIB = 1024


@dataclasses.dataclass(frozen=True)
class RoundResult:
    """One round: ``rebuilders`` processes rebuilt ``files`` files in ``seconds``."""

    rebuilders: int
    files: int
    bytes: int
    seconds: float
    files_per_process: list[int]

    @property
    def files_per_s(self) -> float:
        """Throughput of the round, from the first file sent to the last one stored."""
        return self.files / self.seconds


class DelayProxy:
    """A TCP proxy on loopback that delays every forwarded piece of data by ``delay_s``.

    Each direction of each connection is a queue: data read at time t is written at
    t + ``delay_s``, in order, so latency is added without a limit on throughput. It runs
    an asyncio loop in a thread of its own.

    Args:
        upstream_port: The loopback port it forwards to.
        delay_s: Delay each way, in seconds.
    """

    def __init__(self, upstream_port: int, delay_s: float) -> None:
        from msi_prefect.stack.processes import LOOPBACK, find_free_ports

        self.host = LOOPBACK
        self.port = find_free_ports(1)[0]
        self.upstream_port = upstream_port
        self.delay_s = delay_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def __enter__(self) -> DelayProxy:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        self._server = started.result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _start(self) -> asyncio.Server:
        return await asyncio.start_server(self._connect, self.host, self.port)

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.upstream_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                if not data:
                    return
                writer.write(data)
                await writer.drain()

        delivering = asyncio.ensure_future(deliver())
        try:
            while True:
                data = await reader.read(PROXY_READ_SIZE)
                queue.put_nowait((loop.time() + self.delay_s, data))
                if not data:
                    break
            await delivering
        finally:
            delivering.cancel()
            writer.close()


@contextlib.contextmanager
def services(work: Path) -> Iterator[tuple[str, dict[str, str], int]]:
    """The embedded stack's S3 store and broker (memory storage) on free loopback ports.

    Yields:
        The bootstrap address, the S3 environment and the store's port.
    """
    from msi_prefect.stack.components import Component, s3_env
    from msi_prefect.stack.config import BrokerStorage, StackConfig, StateDir, free_port_map
    from msi_prefect.stack.manager import StackManager

    config = StackConfig(ports=free_port_map(), broker_storage=BrokerStorage.MEMORY)
    manager = StackManager(StateDir(work / "stack"), config)
    try:
        manager.up([Component.S3, Component.BROKER])
        yield (
            config.bootstrap_servers,
            s3_env(config, manager.state.credentials()),
            config.ports["s3"],
        )
    finally:
        manager.down()


def balanced_names(files: int, partitions: int) -> list[str]:
    """File names whose file ids spread evenly over the partitions (CRC-32 of the key)."""
    from msi_prefect.transfer.wire import file_id_for

    per_partition = files // partitions
    counts = [0] * partitions
    names: list[str] = []
    candidate = 0
    while len(names) < per_partition * partitions:
        name = f"scan/frame-{candidate:05d}.bin"
        candidate += 1
        partition = zlib.crc32(file_id_for(name).encode()) % partitions
        if counts[partition] < per_partition:
            counts[partition] += 1
            names.append(name)
    return names


def write_files(root: Path, names: list[str], size: int) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))


def send(bootstrap: str, topic: str, root: Path, names: list[str], registry: Path) -> None:
    from msi_prefect.transfer import FileProducer, KafkaConnection, ProducerSettings, Registry

    with Registry(registry) as reg:
        producer = FileProducer(
            KafkaConnection(bootstrap_servers=bootstrap), ProducerSettings(topic=topic), reg
        )
        producer.upload_all([(root / name, name) for name in names])


def wait_for_group(work_dirs: list[Path]) -> None:
    """Wait until every rebuilder has opened its work folder, then for the group to settle.

    Tansu describes a group as stable with no members, so the join cannot be watched;
    :data:`SETTLE_S` covers it (a start under load takes seconds of its own, hence the
    wait for the work folders first).
    """
    deadline = time.monotonic() + GROUP_TIMEOUT_S
    while not all((folder / PROGRESS_STORE).exists() for folder in work_dirs):
        if time.monotonic() > deadline:
            raise RuntimeError("the rebuilders did not start in time")
        time.sleep(GROUP_POLL_S)
    time.sleep(SETTLE_S)


def one_round(
    rebuilders: int, bootstrap: str, s3: dict[str, str], src: Path, names: list[str],
    size: int, work: Path,
) -> RoundResult:  # fmt: skip
    """Start ``rebuilders`` rebuilders in one group, send the files, time until all are in."""
    from msi_prefect.stack.config import BACKUP_BUCKET

    tag = uuid.uuid4().hex[:8]
    topic = f"bench-scale-{tag}"
    create_topic(bootstrap, topic, PARTITIONS)
    folder = work / f"round-{tag}"
    folder.mkdir()
    destination = f"s3://{BACKUP_BUCKET}/scale-{tag}"
    env = {**os.environ, **s3}
    outputs = [folder / f"rebuilder-{i}.out" for i in range(rebuilders)]
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for i, output in enumerate(outputs):
            argv = [
                sys.executable, "-m", "msi_prefect.cli", "reconstruct", destination,
                "--topic", topic, "--bootstrap", bootstrap, "--group", f"scale-{tag}",
                "--work-dir", str(folder / f"work-{i}"),
                "--session-timeout-ms", str(KAFKA_SESSION_TIMEOUT_MS),
            ]  # fmt: skip
            with output.open("wb") as out, (folder / f"rebuilder-{i}.err").open("wb") as err:
                processes.append(subprocess.Popen(argv, env=env, stdout=out, stderr=err))
        wait_for_group([folder / f"work-{i}" for i in range(rebuilders)])
        started = time.monotonic()
        send(bootstrap, topic, src, names, folder / "registry.sqlite")
        deadline = started + ROUND_TIMEOUT_S
        counts = [0] * rebuilders
        while sum(counts) < len(names):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{rebuilders} rebuilders: only {sum(counts)} files in time")
            for process in processes:
                if process.poll() is not None:
                    raise RuntimeError(f"a rebuilder exited with {process.returncode}")
            counts = [len(RECONSTRUCTED_LINE.findall(o.read_text())) for o in outputs]
            time.sleep(POLL_S)
        seconds = time.monotonic() - started
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        delete_topic(bootstrap, topic)
    return RoundResult(rebuilders, len(names), len(names) * size, seconds, counts)


def report(results: list[RoundResult], args: argparse.Namespace) -> str:
    """A markdown table: per count of rebuilders, each round, the median, the ratio."""
    medians = {
        n: statistics.median(r.files_per_s for r in results if r.rebuilders == n)
        for n in REBUILDER_COUNTS
    }
    lines = [
        "| rebuilders | files/s, each round | median | ratio to one | files per rebuilder |",
        "| --- | --- | --- | --- | --- |",
    ]
    for n in REBUILDER_COUNTS:
        rounds = [r for r in results if r.rebuilders == n]
        shown = ", ".join(f"{r.files_per_s:.2f}" for r in rounds)
        lines.append(
            f"| {n} | {shown} | {medians[n]:.2f} | {medians[n] / medians[1]:.2f} | "
            f"{rounds[-1].files_per_process} |"
        )
    lines.append("")
    lines.append(
        f"{args.files} files of {args.size_kib} KiB per round, {PARTITIONS} partitions, "
        f"the store reached through a proxy adding {args.delay_ms:g} ms each way (round "
        f"trip {2 * args.delay_ms:g} ms); from the first file sent to the last one stored."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of 1, 2 and 3 rebuilders")
    parser.add_argument("--files", type=int, default=96, help="files per round (a multiple of 6)")
    parser.add_argument("--size-kib", type=int, default=256, help="size of each file")
    parser.add_argument("--delay-ms", type=float, default=50.0, help="store delay each way")
    parser.add_argument("--json", type=Path, help="also write the rounds as JSON here")
    args = parser.parse_args(argv)
    if args.files % PARTITIONS or args.files <= 0:
        parser.error(f"--files must be a positive multiple of {PARTITIONS}")
    work = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    size = args.size_kib * KIB
    names = balanced_names(args.files, PARTITIONS)
    src = work / "src"
    write_files(src, names, size)
    results: list[RoundResult] = []
    try:
        with (
            services(work) as (bootstrap, s3, s3_port),
            DelayProxy(s3_port, args.delay_ms / 1000) as proxy,
        ):
            endpoint = f"http://{proxy.host}:{proxy.port}"
            delayed = {**s3, "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT": endpoint}
            for round_number in range(args.rounds):
                for n in REBUILDER_COUNTS:
                    result = one_round(n, bootstrap, delayed, src, names, size, work)
                    results.append(result)
                    print(
                        f"round {round_number + 1}: {n} rebuilder(s): {result.files_per_s:.2f} "
                        f"files/s ({result.seconds:.1f} s, per rebuilder "
                        f"{result.files_per_process})",
                        flush=True,
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(report(results, args))
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
