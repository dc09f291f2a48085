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
| warm_vmms | FLOTILLA_WARM_VMMS | 1 (spare VMM processes kept ready; 0: every VMM starts cold) |
| console_listen | FLOTILLA_CONSOLE_LISTEN | 127.0.0.1 (where the console relay listens) |
| console_advertise | FLOTILLA_CONSOLE_ADVERTISE | the bound address (FQDN for 0.0.0.0) |
| migration_listen | FLOTILLA_MIGRATION_LISTEN | the console address (migrations stream in) |
| max_concurrent_migrations | FLOTILLA_MAX_CONCURRENT_MIGRATIONS | 1 (0: no limit) |
| allowed_boot_dirs | FLOTILLA_ALLOWED_BOOT_DIRS (a:b:c) | test guest and image cache dirs |
| pools | FLOTILLA_POOLS (JSON list) | one `dir` pool `default` at <state_dir>/pools/default |
| net_netns | FLOTILLA_NET_NETNS | none: guests' networks live in the host's own namespace |
| net_uplink | FLOTILLA_NET_UPLINK | none (a `nat` network needs it: the link masqueraded to) |
| net_underlay | FLOTILLA_NET_UNDERLAY | none: this host's VXLAN address (its `vtep`) |
| net_underlay_device | FLOTILLA_NET_UNDERLAY_DEVICE | the link that holds net_underlay |
| net_dnsmasq_dir | FLOTILLA_NET_DNSMASQ_DIR | /run/flotilla/dnsmasq (files in <host>-<hash>/) |
| net_linger_s | FLOTILLA_NET_LINGER_S | 60 (s a network stays after its last port here) |
"""

from __future__ import annotations

import json
import socket
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from protos.domain import NAME_PATTERN
from services.bus import BrokerUrls
from services.settings import load_layered


def default_boot_dirs() -> list[Path]:
    """Where members may boot from unless the operator says otherwise: the packaged test
    guest's build directory and the Linux image cache (native.images)."""
    from native.images import cache_root  # noqa: PLC0415  (only when no list is configured)
    from native.testguest import OUTPUT  # noqa: PLC0415

    return [OUTPUT.parent, cache_root()]


class PoolConfig(BaseModel):
    """A storage pool the node's storage agent serves: `dir` (a directory of this host) or
    `shared` (a directory every host mounts, NFS in production; it must exist when the node
    starts, while a missing `dir` pool's directory is made)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    path: Path
    kind: Literal["dir", "shared"] = "dir"

    @field_validator("path")
    @classmethod
    def _absolute_path(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError(f"pool path {value} is not an absolute path")
        return value


class ComputeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(
        default_factory=lambda: socket.gethostname().split(".")[0], pattern=NAME_PATTERN
    )
    state_dir: Path = Path("/var/lib/flotilla/compute")
    # One broker URL, or one per node of a cluster, comma-separated (tried in order).
    amqp_url: BrokerUrls = "amqp://guest:guest@127.0.0.1:5672/%2F"
    driver: str = Field(default="kvm", pattern=r"^(kvm|fake)$")
    cpu_allocation_ratio: float = Field(default=4.0, gt=0)
    ram_allocation_ratio: float = Field(default=1.0, gt=0)
    reserved_host_memory_mib: int = Field(default=512, ge=0)
    heartbeat_interval_s: float = Field(default=2.0, gt=0)
    # A VMM process that has not answered its control socket by then is killed and the spawn
    # refused; emulated hosts (the hwvirt tier's nested L1) need far longer than hardware.
    vmm_spawn_timeout_s: float = Field(default=10.0, gt=0)
    # Spare VMM processes the KVM driver keeps started, imports done, so a start or a restore
    # skips Python's start (compute_node/warm_vmms.py); each costs one idle VMM's memory.
    warm_vmms: int = Field(default=1, ge=0, le=8)
    # Where the console relay listens (the API connects here for interactive consoles), and
    # the address tickets name (default: the bound address, or the FQDN for a wildcard).
    console_listen: str = "127.0.0.1"
    console_advertise: str = ""
    # Where this node listens for incoming live-migration streams (an IPv4 address other
    # compute nodes reach; each stream gets a port of its own and a one-time token).
    migration_listen: IPv4Address | None = None
    # Migrations leaving this host at once (Nova's max_concurrent_live_migrations); more
    # wait queued on this host (compute_node/migration_queue.py). 0: no limit.
    max_concurrent_migrations: int = Field(default=1, ge=0)
    # Members may name host files as boot sources only under these (boot_sources.py);
    # admins may name any absolute path.
    allowed_boot_dirs: list[Path] = Field(default_factory=default_boot_dirs)
    # The fake driver's pretend host (ignored by the KVM driver, which measures the real one).
    fake_vcpus: int = Field(default=16, ge=1)
    fake_memory_mib: int = Field(default=65536, ge=64)
    # Storage pools (storage_agent.py); empty: one `dir` pool `default` under the state dir.
    pools: list[PoolConfig] = Field(default_factory=list)
    # Guest networking (compute_node/networks.py, docs/network.md): the namespace the data
    # plane lives in (None: the host's own; tests give each "host" one), the uplink `nat`
    # networks masquerade to, and the underlay VXLAN runs over (address and its link).
    net_netns: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,64}$")
    net_uplink: str | None = Field(default=None, pattern=r"^[^/:\s]{1,15}$")
    net_underlay: IPv4Address | None = None
    net_underlay_device: str | None = Field(default=None, pattern=r"^[^/:\s]{1,15}$")
    # The files dnsmasq reads after dropping to nobody, out of the state dir (whose parents
    # may be private): this node's are in <net_dnsmasq_dir>/<host>-<hash of state_dir>/.
    net_dnsmasq_dir: Path = Path("/run/flotilla/dnsmasq")
    # A network's plumbing here outlives its last port by this long (a guest made on it
    # again meanwhile finds it ready); 0: removed with its last port.
    net_linger_s: float = Field(default=60.0, ge=0.0, le=86400.0)

    @field_validator("migration_listen")
    @classmethod
    def _reachable_migration_address(cls, value: IPv4Address | None) -> IPv4Address | None:
        # Sources connect to it (IncomingEndpoint names it): a wildcard names no host.
        if value is not None and value.is_unspecified:
            raise ValueError(
                "migration_listen must be an address other compute nodes reach, not 0.0.0.0"
            )
        return value

    @field_validator("pools", mode="before")
    @classmethod
    def _pool_list(cls, value: object) -> object:
        # From the environment: a JSON list of {name, path, kind}.
        return json.loads(value) if isinstance(value, str) else value

    @field_validator("pools")
    @classmethod
    def _unique_pools(cls, value: list[PoolConfig]) -> list[PoolConfig]:
        names = [p.name for p in value]
        if len(set(names)) != len(names):
            raise ValueError(f"pools: names must be unique, got {names}")
        return value

    def migration_address(self) -> str:
        """`migration_listen`, or the address the node already advertises to the API."""
        if self.migration_listen is not None:
            return str(self.migration_listen)
        for candidate in (self.console_advertise, self.console_listen):
            try:
                address = IPv4Address(candidate)
            except ValueError:
                continue
            if not address.is_unspecified:
                return str(address)
        return "127.0.0.1"

    def storage_pools(self) -> list[PoolConfig]:
        """The configured pools, or the default one under the state dir."""
        return self.pools or [
            PoolConfig(name="default", path=self.state_dir.resolve() / "pools" / "default")
        ]

    @field_validator("allowed_boot_dirs", mode="before")
    @classmethod
    def _dir_list(cls, value: object) -> object:
        # From the environment: colon-separated, like PATH.
        return [p for p in value.split(":") if p] if isinstance(value, str) else value

    @field_validator("net_dnsmasq_dir")
    @classmethod
    def _absolute_dnsmasq_dir(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError(f"net_dnsmasq_dir: {value} is not an absolute path")
        return value

    @field_validator("allowed_boot_dirs")
    @classmethod
    def _absolute(cls, value: list[Path]) -> list[Path]:
        for path in value:
            if not path.is_absolute():
                raise ValueError(f"allowed_boot_dirs: {path} is not an absolute path")
        return value

    @classmethod
    def load(cls, path: Path | None = None, **overrides: Any) -> ComputeConfig:
        """File (if given), then FLOTILLA_<FIELD> variables, then `overrides` (None values are
        ignored)."""
        return load_layered(cls, path, table="compute", env=cls.environment(), overrides=overrides)

    @classmethod
    def environment(cls) -> dict[str, str]:
        """Field → the environment variable that sets it."""
        return {name: f"FLOTILLA_{name.upper()}" for name in cls.model_fields}
