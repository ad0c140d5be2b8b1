"""Which TCP sockets a set of processes listens on, read from /proc (Linux only)."""

from __future__ import annotations

import contextlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

TCP_LISTEN = "0A"


@dataclass(frozen=True)
class ListeningSocket:
    """A LISTEN socket and the process that holds it."""

    pid: int
    command: str
    address: str
    port: int


def descendants(pids: set[int]) -> set[int]:
    """`pids` and every live process below them (by parent PID)."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(entry.path, "stat").read_text()
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found = {pid for pid in pids if pid in parents}
    grew = True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in found} - found
        found |= children
        grew = bool(children)
    return found


def _decode(hex_address: str) -> tuple[str, int]:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        address = ipaddress.IPv4Address(raw[::-1])
    else:  # four little-endian 32-bit words
        address = ipaddress.IPv6Address(b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return str(address.ipv4_mapped), int(port, 16)
    return str(address), int(port, 16)


def _listen_inodes() -> dict[int, tuple[str, int]]:
    inodes: dict[int, tuple[str, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == TCP_LISTEN:
                    inodes[int(fields[9])] = _decode(fields[1])
    return inodes


def listening_sockets(pids: set[int]) -> list[ListeningSocket]:
    """Every TCP LISTEN socket held by one of `pids` (and their descendants)."""
    inodes = _listen_inodes()
    found = []
    for pid in sorted(descendants(pids)):
        with contextlib.suppress(OSError):
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            for fd in os.scandir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(fd.path)
                    if target.startswith("socket:["):
                        inode = int(target[len("socket:[") : -1])
                        if inode in inodes:
                            address, port = inodes[inode]
                            found.append(ListeningSocket(pid, command[:120], address, port))
    return found


def not_on_loopback(pids: set[int]) -> list[ListeningSocket]:
    """The LISTEN sockets of `pids` bound anywhere but 127.0.0.1."""
    return [s for s in listening_sockets(pids) if s.address != "127.0.0.1"]
