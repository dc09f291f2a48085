"""Compute node configuration: a TOML file, then FLOTILLA_* environment variables, then flags.

| setting | env | default |
|---|---|---|
| host | FLOTILLA_HOST | the machine's short host name |
| state_dir | FLOTILLA_STATE_DIR | /var/lib/flotilla/compute |
| amqp_url | FLOTILLA_AMQP_URL | amqp://guest:guest@127.0.0.1:5672/%2F |
| driver | FLOTILLA_DRIVER | kvm (or fake) |
| cpu_allocation_ratio | FLOTILLA_CPU_ALLOCATION_RATIO | 4.0 |
| ram_allocation_ratio | FLOTILLA_RAM_ALLOCATION_RATIO | 1.0 |
| reserved_host_memory_mib | FLOTILLA_RESERVED_HOST_MEMORY_MIB | 512 |
| heartbeat_interval_s | FLOTILLA_HEARTBEAT_INTERVAL_S | 2.0 |
| vmm_spawn_timeout_s | FLOTILLA_VMM_SPAWN_TIMEOUT_S | 10.0 (seconds a new VMM may take to answer) |
| console_listen | FLOTILLA_CONSOLE_LISTEN | 127.0.0.1 (where the console relay listens) |
| console_advertise | FLOTILLA_CONSOLE_ADVERTISE | the bound address (FQDN for 0.0.0.0) |
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from protos.domain import NAME_PATTERN
from services.settings import load_layered


class ComputeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(
        default_factory=lambda: socket.gethostname().split(".")[0], pattern=NAME_PATTERN
    )
    state_dir: Path = Path("/var/lib/flotilla/compute")
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    driver: str = Field(default="kvm", pattern=r"^(kvm|fake)$")
    cpu_allocation_ratio: float = Field(default=4.0, gt=0)
    ram_allocation_ratio: float = Field(default=1.0, gt=0)
    reserved_host_memory_mib: int = Field(default=512, ge=0)
    heartbeat_interval_s: float = Field(default=2.0, gt=0)
    # A VMM process that has not answered its control socket by then is killed and the spawn
    # refused; emulated hosts (the hwvirt tier's nested L1) need far longer than hardware.
    vmm_spawn_timeout_s: float = Field(default=10.0, gt=0)
    # Where the console relay listens (the API connects here for interactive consoles), and
    # the address tickets name (default: the bound address, or the FQDN for a wildcard).
    console_listen: str = "127.0.0.1"
    console_advertise: str = ""
    # The fake driver's pretend host (ignored by the KVM driver, which measures the real one).
    fake_vcpus: int = Field(default=16, ge=1)
    fake_memory_mib: int = Field(default=65536, ge=64)

    @classmethod
    def load(cls, path: Path | None = None, **overrides: Any) -> ComputeConfig:
        """File (if given), then FLOTILLA_<FIELD> variables, then `overrides` (None values are
        ignored)."""
        env = {name: f"FLOTILLA_{name.upper()}" for name in cls.model_fields}
        return load_layered(cls, path, table="compute", env=env, overrides=overrides)
