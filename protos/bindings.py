"""What the storage and network services resolved for a domain, as the compute node gets it.

A tenant names volumes, images and networks; the services turn those names into bindings:
a disk is a volume in a pool (the node opens the pool's file for the volume id, so no path
ever travels), an image is a sha256 in a pool's image store, a NIC is a port with its MAC,
address and its network's plumbing. The API (disks, images) and the scheduler (ports) put
them on `ScheduleDomain` / `DefineDomain`; the compute node keeps them with the definition.
"""

from __future__ import annotations

import uuid
from ipaddress import IPv4Address, IPv4Interface
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from protos.domain import NAME_PATTERN

SHA256_PATTERN = r"^[0-9a-f]{64}$"
MAC_WIRE_PATTERN = r"^[0-9a-f][02468ace](:[0-9a-f]{2}){5}$"


class _Binding(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DiskBinding(_Binding):
    """Disk `target` is volume `volume_id` in pool `pool`; `host` is the pool's host for a
    host-local (`dir`) pool -- the domain must run there -- and None for a `shared` pool."""

    target: str = Field(pattern=r"^vd[a-z]$")
    volume_id: uuid.UUID
    pool: str = Field(pattern=NAME_PATTERN)
    host: str | None = Field(default=None, pattern=NAME_PATTERN)
    readonly: bool = False


class ImageRef(_Binding):
    """An image file: `sha256` in the image store of pool `pool` (a `shared` pool, or a
    `dir` pool on `host`)."""

    sha256: str = Field(pattern=SHA256_PATTERN)
    pool: str = Field(pattern=NAME_PATTERN)
    host: str | None = Field(default=None, pattern=NAME_PATTERN)
    kind: Literal["disk", "kernel", "initrd"]


class StateRef(_Binding):
    """A saved machine state (save, managed save, a domain snapshot): directory `state_id`
    in the state area of pool `pool` -- a `shared` pool any host reaches, or a `dir` pool
    on `host` -- or, with `pool` None, in the state dir of compute node `host` itself (where
    managed saves live). The node derives the path; none travels (docs/snapshots.md)."""

    state_id: uuid.UUID
    pool: str | None = Field(default=None, pattern=NAME_PATTERN)
    host: str | None = Field(default=None, pattern=NAME_PATTERN)


NetworkModeName = Literal["nat", "isolated", "bridge"]


class NetworkBinding(_Binding):
    """A network as a host must carry it (the compute node adds its own uplink for `nat`)."""

    network_id: uuid.UUID
    name: str = Field(pattern=NAME_PATTERN)
    mode: NetworkModeName
    mtu: int = Field(ge=576, le=65535)
    gateway: IPv4Interface | None = None  # nat / isolated: the bridge's address, e.g. 10.0.0.1/24
    dhcp: bool = True
    host_bridge: str | None = Field(default=None, min_length=1, max_length=15)  # bridge mode
    vni: int | None = Field(default=None, ge=1, le=(1 << 24) - 1)


class PortBinding(_Binding):
    """A domain NIC: port `port_id` on `network`, speaking only as (`mac`, `ipv4`)."""

    port_id: uuid.UUID
    network: NetworkBinding
    mac: str = Field(pattern=MAC_WIRE_PATTERN)
    ipv4: IPv4Address | None = None  # None only on bridge-mode networks
