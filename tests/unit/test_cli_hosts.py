"""`flotilla hosts` prints each host's VXLAN address, pools and network warnings under its
table."""

from __future__ import annotations

import argparse
from typing import Any, cast

import pytest

from services.cli.client import Api
from services.cli.domains import Session
from services.cli.hosts import cmd_hosts

HOST = {
    "name": "h1",
    "state": "up",
    "enabled": True,
    "kvm": "pvm",
    "capacity": {"vcpus": 2, "memory_mib": 4096},
    "usage": {"vcpus": 1, "memory_mib": 64},
    "cpu_allocation_ratio": 4.0,
    "ram_allocation_ratio": 1.0,
    "domains_by_state": {"running": 1},
    "seconds_since_heartbeat": 0.5,
    "vtep": "192.0.2.7",
    "network_warnings": ["ip filter FORWARD: policy drop"],
    "pools": ["default", "fast"],
}


class FakeApi:
    def list_hosts(self) -> list[dict[str, Any]]:
        return [HOST, {**HOST, "name": "h2", "vtep": None, "network_warnings": [], "pools": None}]


def test_vtep_pools_and_warnings_are_printed_under_the_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    session = Session(api=cast(Api, FakeApi()), json=False, wait=False, timeout=1.0)
    assert cmd_hosts(session, argparse.Namespace(action=None)) == 0
    out = capsys.readouterr().out.splitlines()
    assert "h1: VXLAN underlay (vtep) 192.0.2.7" in out
    assert "h1: warning: ip filter FORWARD: policy drop" in out
    assert "h1: pools default, fast" in out
    assert not any(line.startswith("h2:") for line in out)
