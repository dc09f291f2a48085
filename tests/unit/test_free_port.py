"""free_port(): a port a server can listen on next, outside the range outgoing connections
take their local ports from."""

from __future__ import annotations

import socket
from pathlib import Path

from services.broker import free_port


def test_a_free_port_is_below_the_ephemeral_range_and_can_be_bound() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {free_port() for _ in range(20)}
    assert len(ports) > 1  # picked at random, not one fixed port
    for port in ports:
        assert 1024 <= port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
