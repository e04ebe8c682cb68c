"""``qwenvl_cli.ports.free_port``: ports outside the kernel's ephemeral range and Ray's worker range, bindable on
every address, never the same twice; ``port_busy`` sees a listening server."""

from __future__ import annotations

import contextlib
import socket

import pytest

from qwenvl_cli import ports


def test_free_ports_avoid_the_ephemeral_and_ray_worker_ranges_and_never_repeat() -> None:
    low, high = ports.ephemeral_range()
    drawn = [ports.free_port() for _ in range(300)]
    assert len(set(drawn)) == len(drawn)
    for port in drawn:
        assert not low <= port <= high, (port, low, high)
        assert not ports.RAY_WORKER_PORTS[0] <= port <= ports.RAY_WORKER_PORTS[1], port
        assert port < 65536


def test_a_drawn_port_can_be_served_on_every_address() -> None:
    port = ports.free_port()
    with socket.socket() as server:
        server.bind(("0.0.0.0", port))
        server.listen()
        assert ports.port_busy(port)
    assert not ports.port_busy(port)


def test_a_port_in_use_is_not_drawn(monkeypatch: pytest.MonkeyPatch) -> None:
    spare = ports.free_port()
    with socket.socket() as held:
        with contextlib.suppress(OSError):  # something else holds it already: in use either way
            held.bind(("127.0.0.1", spare + 1))
        # Only the held port and one free port are candidates.
        monkeypatch.setattr(ports, "candidate_span", lambda: range(spare, spare + 2))
        monkeypatch.setattr(ports, "_handed_out", set())
        assert ports.free_port() == spare


def test_without_ports_outside_the_ephemeral_range_the_kernel_chooses(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path) -> None:
    whole = tmp_path / "ip_local_port_range"
    whole.write_text("1024\t65535\n")
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE_FILE", whole)
    assert ports.ephemeral_range() == (1024, 65535)
    assert not ports.candidate_span()
    port = ports.free_port()
    assert 1024 <= port <= 65535 and not ports.port_busy(port)
