"""The few messages between the launcher and a forked flow-run child (stdlib only).

The launcher connects to the warm server and sends one request: a JSON object with its
``argv``, ``env`` and ``cwd``, together with its standard input, output and error as file
descriptors (``SCM_RIGHTS``). The server forks and answers ``pid <n>``, the child's process
id (the launcher forwards the signals it gets to that process); from then on the child
holds the connection and the server has no part in the run. The child sends ``exit <code>`` just
before it exits. The socket is ``SOCK_SEQPACKET``, so each message is one packet of ASCII.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from enum import StrEnum

#: A request (JSON with the environment) is at most this large.
MAX_REQUEST_BYTES = 1 << 20
#: The launcher's stdin, stdout and stderr.
STANDARD_FDS = (0, 1, 2)


class Verb(StrEnum):
    """The first word of a message from the child."""

    PID = "pid"
    EXIT = "exit"


@dataclass(frozen=True)
class Message:
    """One message from the child: its process id, or its exit code."""

    verb: Verb
    value: int


@dataclass(frozen=True)
class LaunchRequest:
    """What the child needs to become the launcher's flow-run process."""

    argv: list[str]
    env: dict[str, str]
    cwd: str

    def encode(self) -> bytes:
        """The request as it goes over the socket."""
        return json.dumps({"argv": self.argv, "env": self.env, "cwd": self.cwd}).encode()

    @classmethod
    def decode(cls, raw: bytes) -> LaunchRequest:
        """Parse a request.

        Raises:
            ValueError: It is not a JSON object with a list of strings ``argv``, a string
                mapping ``env`` and a string ``cwd``.
        """
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("a launch request must be a JSON object")
        argv, env, cwd = data.get("argv"), data.get("env"), data.get("cwd")
        if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
            raise ValueError("argv must be a list of strings")
        if not (
            isinstance(env, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
        ):
            raise ValueError("env must map strings to strings")
        if not isinstance(cwd, str):
            raise ValueError("cwd must be a string")
        return cls(argv=argv, env=env, cwd=cwd)


def send_message(conn: socket.socket, verb: Verb, value: int) -> None:
    """Send one ``<verb> <value>`` message."""
    conn.send(f"{verb.value} {value}".encode())


def parse_message(packet: bytes) -> Message | None:
    """The message in one packet, or None for a packet that is not one."""
    parts = packet.decode("ascii", errors="replace").split()
    if len(parts) != 2 or parts[0] not in {verb.value for verb in Verb}:
        return None
    try:
        return Message(Verb(parts[0]), int(parts[1]))
    except ValueError:
        return None
