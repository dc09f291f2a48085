"""Desired state of one host's network plumbing: frozen models the compute node is given.

The network service (services/network) owns networks, addresses and ports; a compute node
receives what its host must have -- the networks its guests use, their ports, and where the
other hosts' ports live -- and `Plumber` makes the host match.
"""

from __future__ import annotations

import enum
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from compute_node.net import names

VXLAN_OVERHEAD = 50  # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8
VXLAN_PORT = 4789  # IANA
MIN_MTU = 576
MAX_MTU = 65535
MAC_PATTERN = r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$"


def overlay_mtu(underlay_mtu: int, *, vxlan: bool) -> int:
    """The MTU guests get: the underlay's, less VXLAN's encapsulation when the network
    spans hosts."""
    mtu = underlay_mtu - (VXLAN_OVERHEAD if vxlan else 0)
    if mtu < MIN_MTU:
        raise ValueError(f"underlay MTU {underlay_mtu} leaves {mtu} for guests (< {MIN_MTU})")
    return mtu


def _unicast_mac(value: str) -> str:
    value = value.lower()
    if int(value[:2], 16) & 1:
        raise ValueError(f"{value} is a multicast MAC address")
    if value == "00:00:00:00:00:00":
        raise ValueError("the zero MAC address is not a port's")
    return value


def _ifname(value: str) -> str:
    if not names.valid_ifname(value):
        raise ValueError(f"{value!r} is not a valid interface name (1-15 characters)")
    return value


Mac = Annotated[str, Field(pattern=MAC_PATTERN), AfterValidator(_unicast_mac)]
IfName = Annotated[str, AfterValidator(_ifname)]
Id = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]


class NetworkMode(enum.StrEnum):
    NAT = "nat"  # own bridge, gateway address, masquerade to the uplink
    ISOLATED = "isolated"  # own bridge, gateway address, nothing forwarded
    BRIDGE = "bridge"  # an existing host bridge; no address, NAT or DHCP of ours


class NetworkPlumbing(BaseModel):
    """One network as this host must carry it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    network_id: Id
    mode: NetworkMode
    mtu: int = Field(default=1500, ge=MIN_MTU, le=MAX_MTU)
    # nat / isolated: the bridge's address, e.g. 10.0.0.1/24 (the subnet follows from it).
    gateway: IPv4Interface | None = None
    # Serve DHCP (static entries only: one per port) from a dnsmasq on this host.
    dhcp: bool = True
    # nat: the host link masqueraded to.
    uplink: IfName | None = None
    # bridge mode: the existing bridge to attach taps to.
    host_bridge: IfName | None = None
    # VXLAN network id when the network spans hosts (None: this host only).
    vni: int | None = Field(default=None, ge=1, le=(1 << 24) - 1)

    @model_validator(mode="after")
    def _consistent(self) -> NetworkPlumbing:
        if self.mode is NetworkMode.BRIDGE:
            if self.host_bridge is None:
                raise ValueError("a bridge-mode network names its host_bridge")
            if self.gateway is not None or self.uplink is not None or self.vni is not None:
                raise ValueError("a bridge-mode network has no gateway, uplink or vni")
            if self.dhcp:
                raise ValueError("a bridge-mode network's DHCP is the host LAN's (dhcp=false)")
            return self
        if self.host_bridge is not None:
            raise ValueError(f"host_bridge is for bridge mode, not {self.mode}")
        if self.gateway is None:
            raise ValueError(f"a {self.mode} network needs a gateway address (e.g. 10.0.0.1/24)")
        if self.gateway.network.prefixlen > 30:
            raise ValueError("the gateway's subnet must hold at least two hosts (/30 or wider)")
        if self.gateway.ip in {
            self.gateway.network.network_address,
            self.gateway.network.broadcast_address,
        }:
            raise ValueError(f"{self.gateway} is the subnet's network or broadcast address")
        if (self.mode is NetworkMode.NAT) != (self.uplink is not None):
            raise ValueError("an uplink is required for nat and only for nat")
        return self

    @property
    def short_id(self) -> str:
        return names.short_id(self.network_id)

    @property
    def bridge(self) -> str:
        if self.host_bridge is not None:
            return self.host_bridge
        return names.bridge_name(self.network_id)

    @property
    def vxlan(self) -> str | None:
        return None if self.vni is None else names.vxlan_name(self.network_id)

    @property
    def subnet(self) -> IPv4Network | None:
        return None if self.gateway is None else self.gateway.network

    @property
    def owns_bridge(self) -> bool:
        return self.mode is not NetworkMode.BRIDGE


class PortPlumbing(BaseModel):
    """One guest NIC: a tap on its network's bridge, allowed to speak only as (mac, ipv4)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    port_id: Id
    network_id: Id
    mac: Mac
    ipv4: IPv4Address

    @property
    def tap(self) -> str:
        return names.tap_name(self.port_id)


def check_port_address(network: NetworkPlumbing, port: PortPlumbing) -> None:
    """ValueError unless the port's address is a host address of its network's subnet other
    than the gateway (bridge-mode networks have no subnet of ours to check)."""
    if network.gateway is None:
        return
    subnet = network.gateway.network
    if port.ipv4 not in subnet or port.ipv4 in {
        subnet.network_address,
        subnet.broadcast_address,
        network.gateway.ip,
    }:
        raise ValueError(f"port {port.port_id}: {port.ipv4} is not a guest address of {subnet}")


class RemoteVtep(BaseModel):
    """A port on another host: its MAC and IP, and that host's underlay address
    (l2population: a forwarding entry and a proxy-ARP neighbour on the VXLAN link)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    network_id: Id
    mac: Mac
    ipv4: IPv4Address
    remote: IPv4Address


class HostPlumbing(BaseModel):
    """Everything one host must carry; `Plumber.reconcile` makes the host match it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    networks: tuple[NetworkPlumbing, ...] = ()
    ports: tuple[PortPlumbing, ...] = ()
    remotes: tuple[RemoteVtep, ...] = ()

    @model_validator(mode="after")
    def _references(self) -> HostPlumbing:
        ids = [n.network_id for n in self.networks]
        if len(set(ids)) != len(ids):
            raise ValueError("a network appears twice")
        by_id = {n.network_id: n for n in self.networks}
        taps = [p.tap for p in self.ports]
        if len(set(taps)) != len(taps):
            raise ValueError("a port appears twice")
        for port in self.ports:
            net = by_id.get(port.network_id)
            if net is None:
                raise ValueError(f"port {port.port_id}: unknown network {port.network_id}")
            check_port_address(net, port)
        for remote in self.remotes:
            net = by_id.get(remote.network_id)
            if net is None or net.vni is None:
                raise ValueError(f"remote {remote.mac}: network {remote.network_id} has no VXLAN")
        return self
