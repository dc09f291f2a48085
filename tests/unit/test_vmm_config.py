"""vmm.json's NICs: each names an inherited descriptor and a MAC; anything else is refused
with the reason before a machine is made."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from compute_node.vmm.config import (
    ConfigInvalid,
    DiskConfig,
    IncomingConfig,
    LaunchConfig,
    RestoreConfig,
    load_config,
)

BASE = {"domain_id": "d1", "name": "d1", "kernel": "/proc/self/fd/3", "memory_mib": 64}


def write(tmp_path: Path, **extra: Any) -> str:
    path = tmp_path / "vmm.json"
    path.write_text(json.dumps({**BASE, **extra}))
    return str(path)


def test_nics_are_read_in_order(tmp_path: Path) -> None:
    nics = [{"fd": 7, "mac": "52:54:00:00:00:01"}, {"fd": 8, "mac": "52:54:00:00:00:02"}]
    config = load_config(write(tmp_path, nics=nics))
    assert config.nics == ((7, "52:54:00:00:00:01"), (8, "52:54:00:00:00:02"))
    assert load_config(write(tmp_path)).nics == ()


@pytest.mark.parametrize(
    "nics",
    [
        "eth0",
        ["eth0"],
        [{"mac": "52:54:00:00:00:01"}],
        [{"fd": "7", "mac": "52:54:00:00:00:01"}],
        [{"fd": True, "mac": "52:54:00:00:00:01"}],
        [{"fd": 1, "mac": "52:54:00:00:00:01"}],  # stdout is no tap
        [{"fd": 7}],
    ],
)
def test_a_malformed_nic_is_refused_with_the_reason(tmp_path: Path, nics: Any) -> None:
    with pytest.raises(ConfigInvalid, match=r"nics|NIC"):
        load_config(write(tmp_path, nics=nics))


def test_the_writer_and_the_vmm_share_one_launch_config(tmp_path: Path) -> None:
    written = LaunchConfig(
        domain_id="d1",
        name="web",
        kernel="/proc/self/fd/3",
        initrd=None,
        cmdline="ready",
        disks=[DiskConfig("/proc/self/fd/4", True, "vol-1")],
        memory_mib=64,
        vcpus=2,
        on_poweroff="destroy",
        on_reboot="restart",
        on_crash="preserve",
        console_ring_bytes=65536,
        console_log=True,
        start_paused=True,
        cgroup={"cpu_max": "200000 100000"},
        nics=((7, "52:54:00:00:00:01"),),
        restore=RestoreConfig("/srv/state/d1", True, "from_snapshot"),
    )
    written.write(str(tmp_path))
    assert load_config(str(tmp_path / "vmm.json")) == written
    assert not (tmp_path / "vmm.json.tmp").exists()


@pytest.mark.parametrize(
    "restore",
    [
        "/srv/state",
        {"directory": "", "paused": False, "detail": "restored"},
        {"directory": "/s", "paused": "no", "detail": "restored"},
        {"directory": "/s", "paused": False, "detail": "booted"},
    ],
)
def test_a_malformed_restore_is_refused(tmp_path: Path, restore: Any) -> None:
    with pytest.raises(ConfigInvalid, match="restore"):
        load_config(write(tmp_path, restore=restore))


def test_an_incoming_migration_config_round_trips_and_is_private(tmp_path: Path) -> None:
    incoming = IncomingConfig("127.0.0.1", 0, "ab" * 32, True, 3600.0, (0, 2))
    written = LaunchConfig(
        domain_id="d1",
        name="web",
        kernel="/proc/self/fd/3",
        initrd=None,
        cmdline="",
        disks=[],
        memory_mib=64,
        vcpus=1,
        on_poweroff="destroy",
        on_reboot="restart",
        on_crash="destroy",
        console_ring_bytes=65536,
        console_log=True,
        start_paused=False,
        cgroup=None,
        incoming=incoming,
    )
    written.write(str(tmp_path))
    assert load_config(str(tmp_path / "vmm.json")) == written
    # The token is a secret: the file is the owner's alone.
    assert (tmp_path / "vmm.json").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize(
    "incoming",
    [
        "127.0.0.1:0",
        {"address": "127.0.0.1", "port": -1, "token": "ab" * 32, "paused": False, "timeout_s": 1},
        {"address": "127.0.0.1", "port": True, "token": "ab" * 32, "paused": False, "timeout_s": 1},
        {"address": "127.0.0.1", "port": 0, "token": "ab", "paused": False, "timeout_s": 1},
        {"address": "127.0.0.1", "port": 0, "token": "zz" * 32, "paused": False, "timeout_s": 1},
        {"address": "127.0.0.1", "port": 0, "token": "ab" * 32, "paused": 0, "timeout_s": 1},
        {"address": "127.0.0.1", "port": 0, "token": "ab" * 32, "paused": False, "timeout_s": 0},
        {"address": None, "port": 0, "token": "ab" * 32, "paused": False, "timeout_s": 1},
        *(
            {
                "address": "::",
                "port": 0,
                "token": "ab" * 32,
                "paused": False,
                "timeout_s": 1,
                "copy_disks": bad,
            }
            for bad in ([-1], ["0"], [True], 0, [64])
        ),
    ],
)
def test_a_malformed_incoming_is_refused(tmp_path: Path, incoming: Any) -> None:
    with pytest.raises(ConfigInvalid, match="incoming"):
        load_config(write(tmp_path, incoming=incoming))
