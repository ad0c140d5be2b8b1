"""The faults, as functions of their size: the long runs and the fast subset share them."""

from __future__ import annotations

import os
import random
import signal
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from msi_prefect.stack.components import Component
from msi_prefect.stack.manager import StackManager
from tests.chaos.harness import (
    MIB,
    ChaosRecord,
    Processes,
    assert_clean,
    delivered_names,
    judge,
    make_workload,
    partly_received,
    progress_mark,
    query,
    reconstruct_command,
    record,
    registry_states,
    sha256_file,
    upload_command,
    wait_complete,
    wait_for,
    watch_command,
    write_file,
)

COMPLETE_TIMEOUT_S = 600.0
WINDOW_S = 1.0


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "median": round(statistics.median(values), 2),
        "max": round(max(values), 2),
    }


# ------------------------------------------------------------------ 1. kill -9 reassembler


def kill_reassembler(
    bootstrap: str,
    topic: str,
    tmp: Path,
    procs: Processes,
    sizes: dict[str, int],
    kills: int,
    seed: int,
) -> ChaosRecord:
    """Upload files while the reassembler is killed with SIGKILL ``kills`` times.

    Most kills land a random moment after the restarted reassembler made progress (so in
    the middle of files and batches); every fourth lands during start-up (group join).
    """
    rng = random.Random(seed)
    started = time.monotonic()
    src, dest = tmp / "src", tmp / "dest"
    expected = make_workload(src, sizes)
    uploader = procs.start("upload", upload_command(src, topic, bootstrap, tmp / "reg.sqlite"))
    group = f"chaos-{topic}"
    resume_s: list[float] = []
    done_kills = 0
    mid_transfer = 0
    mid_file = 0
    for attempt in range(kills * 3):  # bounded: a kill after completion does not count
        if done_kills >= kills:
            break
        before = progress_mark(dest)
        victim = procs.start(
            f"rebuild-{attempt:03d}", reconstruct_command(dest, topic, bootstrap, group)
        )
        if attempt % 4 == 3:
            time.sleep(rng.uniform(0.2, 2.5))  # during start-up or the group join
        else:
            try:
                resume_s.append(
                    wait_for(lambda b=before: progress_mark(dest) > b, "progress", 60, step_s=0.005)
                )
                # Then in the middle of a file, where possible.
                wait_for(lambda: partly_received(dest), "a file partly received", 5, 0.002)
                mid_file += 1
            except AssertionError:
                pass  # nothing left to do, or a slow join: kill it anyway
            time.sleep(rng.uniform(0.0, 0.3))
        complete = set(expected) <= delivered_names(dest)
        procs.kill9(victim)
        done_kills += 1
        if not complete:
            mid_transfer += 1
    survivor = procs.start("rebuild-final", reconstruct_command(dest, topic, bootstrap, group))
    catch_up_s = wait_complete(dest, expected, COMPLETE_TIMEOUT_S, lambda: survivor.poll() is None)
    procs.terminate(survivor)
    assert uploader.wait(timeout=COMPLETE_TIMEOUT_S) == 0, procs.errors("upload")
    verdict = judge(dest, expected, procs.output("rebuild"))
    entry = ChaosRecord(
        fault="kill -9 reassembler",
        injected=f"SIGKILL of `msi-prefect reconstruct`, {done_kills} times "
        f"({mid_transfer} with files still in flight)",
        runs=done_kills,
        files=len(expected),
        bytes=sum(sizes.values()),
        lost=len(verdict.lost),
        corrupted=len(verdict.corrupted),
        duplicated=len(verdict.extra),
        recover_s={
            "restart_to_progress": _summary(resume_s),  # type: ignore[dict-item]
            "final_catch_up": round(catch_up_s, 2),
        },
        seconds=round(time.monotonic() - started, 1),
        notes={
            "reported_more_than_once": verdict.reported_twice,
            "kills_mid_transfer": mid_transfer,
            "kills_mid_file": mid_file,
        },
    )
    record(entry)
    assert_clean(verdict)
    assert mid_transfer >= 1, "every kill came after the transfer had finished"
    return entry


# ---------------------------------------------------------------- 2. kill -9 watcher


@dataclass
class _Writer:
    """Keeps writing files into the watched folder until stopped; remembers their digests."""

    folder: Path
    rng: random.Random
    large: list[int]
    gap_s: tuple[float, float]
    max_files: int

    def __post_init__(self) -> None:
        self.expected: dict[str, str] = {}
        self.bytes = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="chaos-writer", daemon=True)

    def _run(self) -> None:
        try:
            i = 0
            while not self.stop.is_set() and i < self.max_files:
                rel = f"in/d{i % 5}/f-{i:04d}.dat"
                size = (
                    self.large[i // 10 % len(self.large)]
                    if i % 10 == 9
                    else int(2 ** self.rng.uniform(10, 19))
                )
                path = self.folder / rel
                if i % 10 == 4:
                    # Written in pieces with short pauses: still being written when found.
                    path.parent.mkdir(parents=True, exist_ok=True)
                    with path.open("wb") as handle:
                        for _ in range(4):
                            handle.write(os.urandom(size // 4 + 1))
                            handle.flush()
                            time.sleep(0.1)
                    self.expected[rel] = sha256_file(path)
                    self.bytes += path.stat().st_size
                else:
                    self.expected[rel] = write_file(path, size)
                    self.bytes += size
                i += 1
                self.stop.wait(self.rng.uniform(*self.gap_s))
        except BaseException as exc:  # reported by the test
            self.error = exc


def kill_watcher(
    bootstrap: str,
    topic: str,
    tmp: Path,
    procs: Processes,
    kills: int,
    large: list[int],
    seed: int,
    gap_s: tuple[float, float] = (0.02, 0.3),
    max_files: int = 10_000,
) -> ChaosRecord:
    """Files keep arriving while ``msi-prefect watch`` is killed with SIGKILL ``kills`` times.

    Every other kill waits until a file is being sent (registry state ``sending``), so it
    lands in the middle of a file; the others land at a random moment.
    """
    rng = random.Random(seed)
    started = time.monotonic()
    folder, dest, registry = tmp / "instrument", tmp / "dest", tmp / "reg.sqlite"
    folder.mkdir()
    consumer = procs.start("rebuild", reconstruct_command(dest, topic, bootstrap, f"w-{topic}"))
    watch = watch_command(folder, topic, bootstrap, registry, WINDOW_S)
    first = procs.start("watch-000", watch)
    wait_for(lambda: bool(registry_states(registry)) or _watched(registry), "watch start", 60)
    writer = _Writer(folder, rng, large, gap_s, max_files)
    writer.thread.start()
    mid_file = 0
    resume_s: list[float] = []
    current = first
    for kill in range(kills):
        if kill % 2 == 0:
            try:
                wait_for(
                    lambda: "sending" in registry_states(registry).values(), "a send", 30, 0.002
                )
                mid_file += 1
            except AssertionError:
                pass
        else:
            time.sleep(rng.uniform(0.2, 2.5))
        procs.kill9(current)
        sent_before = _sent(registry)
        restart = time.monotonic()
        current = procs.start(f"watch-{kill + 1:03d}", watch)
        try:
            wait_for(lambda b=sent_before: _sent(registry) > b, "a file sent after restart", 30)
            resume_s.append(time.monotonic() - restart)
        except AssertionError:
            pass
    writer.stop.set()
    writer.thread.join(timeout=60)
    assert writer.error is None, writer.error
    expected = writer.expected
    writing_done = time.monotonic()
    wait_for(
        lambda: all(registry_states(registry).get(rel) == "sent" for rel in expected),
        "every file sent",
        COMPLETE_TIMEOUT_S,
        step_s=0.2,
    )
    wait_complete(dest, expected, COMPLETE_TIMEOUT_S, lambda: consumer.poll() is None)
    catch_up_s = time.monotonic() - writing_done  # from the last file written
    assert current.poll() is None, procs.errors("watch")
    assert procs.terminate(current) == 0
    assert procs.terminate(consumer) == 0
    verdict = judge(dest, expected, procs.output("rebuild"))
    entry = ChaosRecord(
        fault="kill -9 watcher/producer",
        injected=f"SIGKILL of `msi-prefect watch`, {kills} times ({mid_file} while a file was "
        "being sent) while files kept arriving",
        runs=kills,
        files=len(expected),
        bytes=writer.bytes,
        lost=len(verdict.lost),
        corrupted=len(verdict.corrupted),
        duplicated=len(verdict.extra),
        recover_s={
            "restart_to_next_file_sent": _summary(resume_s),  # type: ignore[dict-item]
            "final_catch_up": round(catch_up_s, 2),
        },
        seconds=round(time.monotonic() - started, 1),
        notes={"reported_more_than_once": verdict.reported_twice, "kills_mid_file": mid_file},
    )
    record(entry)
    assert_clean(verdict)
    return entry


def _watched(registry: Path) -> bool:
    return query(registry, "SELECT COUNT(*) FROM watched_folders") == [(1,)]


def _sent(registry: Path) -> int:
    return sum(1 for state in registry_states(registry).values() if state == "sent")


# ------------------------------------------------------------------------- 3. broker


def _broker_pid(manager: StackManager) -> int:
    pid_record = manager.process(Component.BROKER).read_pid()
    assert pid_record is not None
    return pid_record.pid


def broker_faults(
    manager: StackManager,
    topic: str,
    tmp: Path,
    procs: Processes,
    sizes: dict[str, int],
    restarts: int,
    pause_s: float,
    gap_s: float,
) -> list[ChaosRecord]:
    """Restart the broker (S3-backed storage) ``restarts`` times mid-transfer, then pause it.

    Files trickle into a watched folder (one every ``gap_s``), so data is flowing when each
    fault hits. The watcher and the reassembler keep running through every fault: they must
    ride it out on their own (librdkafka reconnects; the idempotent producer retries).
    """
    started = time.monotonic()
    bootstrap = manager.config.bootstrap_servers
    folder, dest, registry = tmp / "instrument", tmp / "dest", tmp / "reg.sqlite"
    folder.mkdir()
    consumer = procs.start("rebuild", reconstruct_command(dest, topic, bootstrap, f"b-{topic}"))
    watcher = procs.start("watch", watch_command(folder, topic, bootstrap, registry, WINDOW_S))
    wait_for(lambda: _watched(registry), "watch start", 60)
    expected: dict[str, str] = {}
    errors: list[BaseException] = []
    names = list(sizes)
    phases = restarts + 2  # before the faults, one per restart, one for the pause
    per_phase = max(1, len(names) // phases)

    def trickle(phase: int, back: threading.Event | None = None) -> threading.Thread:
        """Write one phase's files; with ``back``, a third before the fault, the rest after."""
        last = len(names) if phase == phases - 1 else (phase + 1) * per_phase
        batch = names[phase * per_phase : last]

        def run() -> None:
            try:
                for i, rel in enumerate(batch):
                    if back is not None and i == max(1, len(batch) // 3):
                        back.wait(timeout=600)
                    expected[rel] = write_file(folder / rel, sizes[rel])
                    time.sleep(gap_s)
            except BaseException as exc:  # reported by the test
                errors.append(exc)

        thread = threading.Thread(target=run, name=f"chaos-trickle-{phase}", daemon=True)
        thread.start()
        return thread

    def next_delivery(before: set[str]) -> float:
        """Seconds until a file not delivered before the fault arrives."""
        return wait_for(lambda: bool(delivered_names(dest) - before), "a delivery", 300, 0.02)

    trickle(0).join()
    down_s: list[float] = []
    resume_s: list[float] = []
    for n in range(restarts):
        back = threading.Event()
        writer = trickle(n + 1, back)  # files keep arriving through the restart
        time.sleep(3 * gap_s)
        stop_at = time.monotonic()
        manager.process(Component.BROKER).stop()
        manager.up([Component.BROKER])
        down_s.append(time.monotonic() - stop_at)
        before = delivered_names(dest)  # recovery: the first delivery after the broker is back
        back.set()
        resume_s.append(next_delivery(before))
        writer.join()
    back = threading.Event()
    writer = trickle(phases - 1, back)
    time.sleep(3 * gap_s)
    pid = _broker_pid(manager)
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(pause_s)
    finally:
        before = delivered_names(dest)
        os.kill(pid, signal.SIGCONT)
        back.set()
    resumed = time.monotonic()
    pause_resume_s = next_delivery(before)
    writer.join()
    assert not errors, errors
    wait_complete(
        dest, dict.fromkeys(sizes, ""), COMPLETE_TIMEOUT_S, lambda: consumer.poll() is None
    )
    after_pause_s = time.monotonic() - resumed
    assert watcher.poll() is None, "the watcher died:\n" + procs.errors("watch")
    assert procs.terminate(watcher) == 0
    assert procs.terminate(consumer) == 0
    out = procs.output("watch")
    verdict = judge(dest, expected, procs.output("rebuild"))
    common = {
        "files": len(expected),
        "bytes": sum(sizes.values()),
        "lost": len(verdict.lost),
        "corrupted": len(verdict.corrupted),
        "duplicated": len(verdict.extra),
        "seconds": round(time.monotonic() - started, 1),
    }
    notes = {
        "reported_more_than_once": verdict.reported_twice,
        "watch_failed_reports": out.count("failed: "),
        "watch_sent_reports": out.count("sent "),
    }
    restart_entry = ChaosRecord(
        fault="broker restart (S3-backed storage)",
        injected=f"`StackManager` stop (SIGTERM) + start of Tansu, {restarts} times while "
        f"files arrived (one every {gap_s} s)",
        runs=restarts,
        recover_s={
            "broker_down": _summary(down_s),  # type: ignore[dict-item]
            "back_to_next_delivery": _summary(resume_s),  # type: ignore[dict-item]
        },
        notes=notes,
        **common,  # type: ignore[arg-type]
    )
    pause_entry = ChaosRecord(
        fault="broker paused",
        injected=f"SIGSTOP of Tansu for {pause_s:.0f} s, then SIGCONT",
        runs=1,
        recover_s={
            "resume_to_next_delivery": round(pause_resume_s, 2),
            "resume_to_all_delivered": round(after_pause_s, 2),
        },
        notes=notes,
        **common,  # type: ignore[arg-type]
    )
    record(restart_entry)
    record(pause_entry)
    assert_clean(verdict)
    return [restart_entry, pause_entry]


# ---------------------------------------------------------------------- 6. disk full


def _disk_full_logged(text: str) -> bool:
    """The reassembler's log says the disk is full (the OS's words, or SQLite's)."""
    return "No space left on device" in text or "database or disk is full" in text


def disk_full(
    bootstrap: str,
    topic: str,
    tmp: Path,
    procs: Processes,
    mount: Path,
    sizes: dict[str, int],
    filler_bytes: int,
    full_wait_s: float,
) -> ChaosRecord:
    """Rebuild into a nearly full file system; free the space; everything arrives.

    While the disk is full: the reassembler keeps running, says so on stderr, and the
    destination holds only whole, correct files.
    """
    started = time.monotonic()
    src = tmp / "src"
    dest = mount / "dest"
    filler = mount / "filler.bin"
    expected = make_workload(src, sizes)
    with filler.open("wb") as handle:
        handle.write(b"\0" * filler_bytes)
    uploader = procs.start("upload", upload_command(src, topic, bootstrap, tmp / "reg.sqlite"))
    assert uploader.wait(timeout=300) == 0, procs.errors("upload")
    consumer = procs.start("rebuild", reconstruct_command(dest, topic, bootstrap, f"df-{topic}"))
    wait_for(
        lambda: _disk_full_logged(procs.errors("rebuild")) or consumer.poll() is not None,
        "the disk-full error",
        120,
        0.1,
    )
    full_at = time.monotonic()
    # While full: still running, and no partial or wrong file in the destination.
    time.sleep(full_wait_s)
    assert consumer.poll() is None, "the reassembler died on a full disk:\n" + procs.errors(
        "rebuild"
    )
    partial = judge(dest, expected, procs.output("rebuild"))
    assert not partial.extra and not partial.corrupted, partial
    assert partial.lost, "everything fitted: the disk never filled up"
    delivered_while_full = len(expected) - len(partial.lost)
    error_text = next(
        line for line in procs.errors("rebuild").splitlines() if _disk_full_logged(line)
    )
    filler.unlink()
    recover_s = wait_complete(dest, expected, COMPLETE_TIMEOUT_S, lambda: consumer.poll() is None)
    assert procs.terminate(consumer) == 0
    verdict = judge(dest, expected, procs.output("rebuild"))
    entry = ChaosRecord(
        fault="destination disk full",
        injected=f"tmpfs destination, {filler_bytes // MIB} MiB filler file; filler deleted "
        f"after {time.monotonic() - full_at - recover_s:.0f} s full",
        runs=1,
        files=len(expected),
        bytes=sum(sizes.values()),
        lost=len(verdict.lost),
        corrupted=len(verdict.corrupted),
        duplicated=len(verdict.extra),
        recover_s={"space_freed_to_all_delivered": round(recover_s, 2)},
        seconds=round(time.monotonic() - started, 1),
        notes={
            "error_logged": error_text.strip()[:200],
            "delivered_while_full": delivered_while_full,
            "reported_more_than_once": verdict.reported_twice,
        },
    )
    record(entry)
    assert_clean(verdict)
    return entry


# ------------------------------------------------------------------- 7. source faults


def _unprivileged(command: list[str]) -> list[str]:
    """Run as root without the capabilities that bypass file permissions (so chmod 000 bites)."""
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", *command]


def source_faults(
    bootstrap: str,
    topic: str,
    tmp: Path,
    procs: Processes,
    big_bytes: int,
    rewrites: int,
    window_s: float = WINDOW_S,
) -> ChaosRecord:
    """Files rewritten while sent, growing logs, deleted files, unreadable files, a FIFO.

    The watcher runs without CAP_DAC_OVERRIDE, so a ``chmod 000`` file is unreadable even
    though the tests run as root.
    """
    started = time.monotonic()
    folder, dest, registry = tmp / "instrument", tmp / "dest", tmp / "reg.sqlite"
    folder.mkdir()
    consumer = procs.start("rebuild", reconstruct_command(dest, topic, bootstrap, f"s-{topic}"))
    watcher = procs.start(
        "watch", _unprivileged(watch_command(folder, topic, bootstrap, registry, window_s))
    )
    wait_for(lambda: _watched(registry), "watch start", 60)
    expected: dict[str, str] = {}
    rng = random.Random(7)

    # Rewritten while being sent: overwrite the start once the producer is reading it.
    caught_mid_send = 0
    for n in range(rewrites):
        rel = f"big-{n}.bin"
        write_file(folder / rel, big_bytes)
        try:
            wait_for(
                lambda r=rel: registry_states(registry).get(r) == "sending", "the send", 30, 0.001
            )
            caught_mid_send += 1
        except AssertionError:
            pass
        with (folder / rel).open("r+b") as handle:
            handle.seek(rng.randrange(big_bytes))
            handle.write(os.urandom(4096))
        expected[rel] = sha256_file(folder / rel)

    # A growing log: lines every 0.2 s (less than the window), a long pause, more lines.
    log = folder / "logs" / "instrument.log"
    log.parent.mkdir()
    with log.open("a") as handle:
        for burst in (12, 6):
            for i in range(burst):
                handle.write(f"{time.time():.3f} line {i}\n")
                handle.flush()
                time.sleep(0.2)
            time.sleep(window_s * 3)
    expected["logs/instrument.log"] = sha256_file(log)

    # Deleted before it was sent (inside the stability window).
    gone = folder / "gone.tmp"
    gone.write_bytes(os.urandom(5000))
    time.sleep(window_s / 3)
    gone.unlink()

    # Not a file: a FIFO (never opened, so it cannot block the watcher).
    os.mkfifo(folder / "pipe.fifo")

    # Permission denied, then readable again.
    secret = folder / "secret.dat"
    expected["secret.dat"] = write_file(secret, 10_000)
    secret.chmod(0)
    wait_for(lambda: "Cannot read secret.dat" in procs.errors("watch"), "the unreadable report", 60)
    expected["after.txt"] = write_file(folder / "after.txt", 123)
    wait_for(lambda: registry_states(registry).get("after.txt") == "sent", "a later file", 60)
    time.sleep(window_s * 3)  # several scans with the file still unreadable
    unreadable_reports = procs.errors("watch").count("Cannot read secret.dat")
    secret.chmod(0o644)

    recover_s = wait_complete(dest, expected, COMPLETE_TIMEOUT_S, lambda: consumer.poll() is None)
    assert watcher.poll() is None, "the watcher died:\n" + procs.errors("watch")
    assert procs.terminate(watcher) == 0
    assert procs.terminate(consumer) == 0
    out = procs.output("watch")
    verdict = judge(dest, expected, procs.output("rebuild"))
    entry = ChaosRecord(
        fault="source faults",
        injected=f"{rewrites} file(s) of {big_bytes // MIB} MiB rewritten while sent, a growing "
        "log, a file deleted before its send, a FIFO, a chmod 000 file (watcher without "
        "CAP_DAC_OVERRIDE)",
        runs=1,
        files=len(expected),
        bytes=sum((folder / rel).stat().st_size for rel in expected),
        lost=len(verdict.lost),
        corrupted=len(verdict.corrupted),
        duplicated=len(verdict.extra),
        recover_s={"chmod_back_to_delivered": round(recover_s, 2)},
        seconds=round(time.monotonic() - started, 1),
        notes={
            "rewrites_caught_mid_send": caught_mid_send,
            "changed_while_reading_reports": out.count("changed-while-reading: big-"),
            "log_generations_sent": out.count("sent logs/instrument.log"),
            "unreadable_reports_before_chmod": unreadable_reports,
            "unreadable_report": next(
                line for line in procs.errors("watch").splitlines() if "secret.dat" in line
            )[24:220],
            "gone_reported": [line for line in out.splitlines() if "gone.tmp" in line],
        },
    )
    record(entry)
    assert_clean(verdict)
    assert unreadable_reports == 1, out  # reported once, not in a loop
    assert "pipe.fifo" not in out and "gone.tmp" not in delivered_names(dest)
    assert out.count("sent logs/instrument.log") >= 1
    return entry
