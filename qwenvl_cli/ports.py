"""Local TCP ports for the servers a stack (or a test) starts: ``free_port`` and ``port_busy``.

A port found free is bound later by another process (Ray, MLflow, uvicorn, PostgreSQL), and until then anything
may take it. The usual way to find one, binding port 0, draws from the kernel's ephemeral range, where every
outgoing connection on the machine also gets its local port, so the gap races with all the connections a starting
cluster opens (seen in CI: a Ray worker node whose port was taken exited after Ray's 30 s registration timeout).
``free_port`` therefore draws between the range Ray keeps for its worker processes and the ephemeral range,
checks the port can be bound on every address, and never hands out the same port twice in a process.
"""

from __future__ import annotations

import secrets
import socket
from pathlib import Path

RAY_WORKER_PORTS = (10002, 19999)  # ``ray start``'s default --min-worker-port / --max-worker-port
LOWEST = RAY_WORKER_PORTS[1] + 1
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")

_handed_out: set[int] = set()


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for ports it picks itself (bind to 0, outgoing connections); Linux's default elsewhere."""
    try:
        low, high = (int(part) for part in EPHEMERAL_RANGE_FILE.read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def candidate_span() -> range:
    """Ports above Ray's worker range and below the ephemeral range (empty if that starts too low). Not above it:
    Ray draws its own unnamed ports at random between a kernel-chosen port and 65535 (``Node._get_unused_port``)."""
    return range(LOWEST, min(ephemeral_range()[0], 65536))


def free_port() -> int:
    """A port no socket uses now, outside the ranges the kernel and Ray pick from, new to this process."""
    span = candidate_span()
    for _ in range(200 if span else 0):
        port = span[secrets.randbelow(len(span))]
        if port not in _handed_out and _bindable(port):
            _handed_out.add(port)
            return port
    while True:  # nothing below the ephemeral range is free (or it starts too low): let the kernel choose
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))  # servers bind every address
        except OSError:
            return False
    return True


def port_busy(port: int) -> bool:
    """Whether a server (or any socket) holds ``port`` on 127.0.0.1."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
