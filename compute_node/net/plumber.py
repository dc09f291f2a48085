"""`Plumber`: makes one host's bridges, taps, VXLAN links, nftables tables and dnsmasqs
match the desired state, in the host's namespace or a given one.

The plumber keeps the desired state it was given (`apply`, `plug`, `fdb_add`, ...); each
call changes the host for that piece and rewrites our nftables tables as a whole from the
state. A new plumber (a restarted node) knows nothing: call `reconcile(desired)` first; it
reads what the host has and changes only what differs, so links that already match -- and
the guests' traffic through them -- are left alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import structlog
from pyroute2.netlink.exceptions import NetlinkError

from compute_node.net import names, netns, rules, tap
from compute_node.net.dnsmasq import Dnsmasq
from compute_node.net.libnft import Nftables, NftError
from compute_node.net.links import ZERO_MAC, Fdb, Link, Links
from compute_node.net.models import (
    VXLAN_OVERHEAD,
    HostPlumbing,
    NetworkMode,
    NetworkPlumbing,
    PortPlumbing,
    RemoteVtep,
    check_port_address,
)
from compute_node.net.rtnl import Rtnl

log = structlog.get_logger(__name__)
IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"


class PlumbingError(RuntimeError):
    """The desired state cannot be made here (unknown network, missing uplink, ...)."""


@dataclass(frozen=True)
class Underlay:
    """This host's VXLAN endpoint: its address and the link that carries it."""

    address: IPv4Address
    device: str


@dataclass
class Report:
    """What a reconcile changed, one line per change (empty: the host already matched)."""

    changes: list[str] = field(default_factory=list)
    conflicts: list[rules.ForwardConflict] = field(default_factory=list)


class Plumber:
    """One host's plumbing. Not thread-safe: the compute node calls it from one thread (or
    serialises calls), as every call reads and rewrites shared kernel state."""

    def __init__(
        self,
        state_dir: Path,
        *,
        netns: str | None = None,
        underlay: Underlay | None = None,
        tap_uid: int | None = None,
        tap_gid: int | None = None,
        dhcp_background: bool = False,
        dnsmasq_dir: Path | None = None,
    ) -> None:
        """`state_dir` keeps dnsmasq's logs; `dnsmasq_dir` the files dnsmasq reads (default:
        `dnsmasq.default_node_dir(state_dir)`, see compute_node/net/dnsmasq.py)."""
        self._netns = netns
        self._underlay = underlay
        self._uid = os.geteuid() if tap_uid is None else tap_uid
        self._gid = os.getegid() if tap_gid is None else tap_gid
        self._links = Links(netns)
        self._rtnl = Rtnl(netns)  # the plug's one request, without pyroute2's round trip
        self._nft = Nftables(netns)
        self._dnsmasq = Dnsmasq(state_dir, netns, run_dir=dnsmasq_dir, background=dhcp_background)
        self._networks: dict[str, NetworkPlumbing] = {}
        self._ports: dict[str, PortPlumbing] = {}
        self._remotes: set[RemoteVtep] = set()
        self._chains: dict[str, list[str]] = {"inet": [], "bridge": []}
        # ifindex of each network's bridge as last seen, so plug needs no lookup
        self._bridge_index: dict[str, int] = {}
        # ifindex of each tap `create_tap` made that `plug` has not taken up yet
        self._made_taps: dict[str, int] = {}
        # The tables ("bridge", "inet") the kernel holds as this state last wrote them whole
        # (or reconcile found them), so a port or a network can be added or removed with a
        # small batch instead of a rewrite.
        self._synced: set[str] = set()

    def close(self) -> None:
        self._dnsmasq.settle()
        self._links.close()
        self._rtnl.close()
        self._nft.close()

    def __enter__(self) -> Plumber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def desired(self) -> HostPlumbing:
        return HostPlumbing(
            networks=tuple(self._networks.values()),
            ports=tuple(self._ports.values()),
            remotes=tuple(sorted(self._remotes, key=lambda r: (r.network_id, r.mac))),
        )

    # networks
    def apply(self, network: NetworkPlumbing) -> list[str]:
        """Create or update one network's bridge, VXLAN link, gateway, rules and dnsmasq."""
        old = self._networks.get(network.network_id)
        self._networks[network.network_id] = network
        changes = self._network_links(network, old)
        if old is None and "inet" in self._synced and rules.stepwise(network):
            # Its own chains and map entries, one small batch whatever the number of
            # networks here (a rewrite costs ~0.2 ms a network).
            self._nft_step(rules.network_added(network), "inet")
        else:
            self._write_table("inet")
        changes.append("nft inet flotilla")
        changes.extend(self._dhcp(network))
        if network.mode is NetworkMode.NAT:
            changes.extend(self._forwarding())
            for conflict in self.forward_conflicts():
                log.warning("net.forward_conflict", network=network.network_id, chain=str(conflict))
        return changes

    def remove(self, network_id: str) -> None:
        """Remove a network with its ports, links, rules and dnsmasq (nothing if unknown)."""
        network = self._networks.pop(network_id, None)
        if network is None:
            return
        ports = [p for p in self._ports.values() if p.network_id == network_id]
        for port in ports:
            self._delete_tap(port.tap)
            del self._ports[port.port_id]
        self._remotes = {r for r in self._remotes if r.network_id != network_id}
        self._dnsmasq.stop(network.short_id)
        self._bridge_index.pop(network.bridge, None)
        if network.vxlan is not None:
            self._delete_link(network.vxlan)
        if network.owns_bridge:
            self._delete_link(network.bridge)
        if ports or "bridge" not in self._synced:
            self._write_table("bridge")
        if "inet" in self._synced and rules.stepwise(network):
            self._nft_step(rules.network_removed(network), "inet")
        else:
            self._write_table("inet")

    # ports
    def plug(self, port: PortPlumbing) -> str:
        """Create the port's tap (persistent, owned by the VMM user, on the bridge, MTU set,
        up), allow it to speak as (mac, ipv4) only, and serve its address by DHCP.
        Returns the tap's name. PlumbingError for an unknown network or a foreign address."""
        network = self._network(port.network_id)
        try:
            check_port_address(network, port)
        except ValueError as exc:
            raise PlumbingError(str(exc)) from exc
        previous = self._ports.get(port.port_id)
        self._ports[port.port_id] = port
        # The hot path: the tap ioctls (idempotent; skipped for a tap `create_tap` just made,
        # which a VMM may hold open already: a second open of it would fail), its rules,
        # then one netlink request.
        index = self._made_taps.pop(port.tap, None)
        if index is None:
            index = self.create_tap(port)
            self._made_taps.pop(port.tap, None)
        # The tap's chain and map entry before it joins the bridge and comes up: a guest
        # already running on it (started while this runs) never bypasses them.
        if previous is None and "bridge" in self._synced:
            self._nft_step(rules.port_added(port))
        elif previous != port:
            self._write_table("bridge")
        bridge = self._bridge_index.get(network.bridge)
        if bridge is not None:
            try:
                self._rtnl.enslave_up(index, bridge, network.mtu)
            except NetlinkError:  # a stale bridge index: look it up again
                bridge = None
        if bridge is None:
            bridge = self._must(network.bridge).index
            self._bridge_index[network.bridge] = bridge
            self._rtnl.enslave_up(index, bridge, network.mtu)
        if network.dhcp:
            self._dhcp(network)
        return port.tap

    def create_tap(self, port: PortPlumbing) -> int:
        """The port's tap (persistent, owned by the VMM user; idempotent), down and on no
        bridge until `plug`: what a VMM can be given before the rest is done. Its ifindex."""
        try:
            index = tap.create(port.tap, uid=self._uid, gid=self._gid, netns_name=self._netns)
        except OSError:  # the name is taken by a link that is not a tap
            self._delete_link(port.tap)
            index = tap.create(port.tap, uid=self._uid, gid=self._gid, netns_name=self._netns)
        self._made_taps[port.tap] = index
        return index

    def discard_tap(self, name: str) -> None:
        """Remove a tap `create_tap` made that was never plugged (its plumbing failed before
        `plug`); nothing for any other link."""
        if name in self._made_taps:
            self._delete_tap(name)

    def unplug(self, port_id: str) -> None:
        """Remove the port's tap, rules and DHCP entry (nothing if unknown)."""
        port = self._ports.pop(port_id, None)
        if port is None:
            return
        self._delete_tap(port.tap)
        if "bridge" in self._synced:
            self._nft_step(rules.port_removed(port))
        else:
            self._write_table("bridge")
        network = self._networks.get(port.network_id)
        if network is not None and network.dhcp:
            self._dhcp(network)

    # VXLAN forwarding entries (l2population)
    def fdb_add(self, remote: RemoteVtep) -> None:
        """Send frames for remote.mac to remote.remote, answer ARP for remote.ipv4 locally,
        and flood broadcast to that host too."""
        vx = self._vxlan_link(remote.network_id)
        self._links.fdb_append(vx.index, Fdb(remote.mac, str(remote.remote)))
        self._links.fdb_append(vx.index, Fdb(ZERO_MAC, str(remote.remote)))
        self._links.neigh_replace(vx.index, remote.ipv4, remote.mac)
        self._remotes.add(remote)

    def fdb_del(self, remote: RemoteVtep) -> None:
        vx = self._vxlan_link(remote.network_id)
        self._remotes.discard(remote)
        self._links.fdb_del(vx.index, Fdb(remote.mac, str(remote.remote)))
        self._links.neigh_del(vx.index, remote.ipv4)
        if not any(
            r.remote == remote.remote and r.network_id == remote.network_id for r in self._remotes
        ):
            self._links.fdb_del(vx.index, Fdb(ZERO_MAC, str(remote.remote)))

    # restart
    def reconcile(self, desired: HostPlumbing) -> Report:
        """Make the host match `desired`, changing only what differs; returns the changes."""
        report = Report()
        self._networks = {n.network_id: n for n in desired.networks}
        self._ports = {p.port_id: p for p in desired.ports}
        self._remotes = set(desired.remotes)
        actual = self._links.all()
        for network in desired.networks:
            report.changes += self._network_links(network, None, actual)
        actual = self._links.all()
        for port in desired.ports:
            network = self._networks[port.network_id]
            report.changes += self._port_link(port, network, actual.get(port.tap))
        wanted = self._wanted_links()
        for name, link in actual.items():
            if names.is_owned(name) and name not in wanted:
                self._links.delete(link.index)
                report.changes.append(f"deleted {name}")
        report.changes += self._reconcile_fdb(desired, self._links.all())
        ruleset = self._nft.ruleset()
        for family in ("bridge", "inet"):
            current = rules.read_table(ruleset, family)
            self._chains[family] = [] if current is None else current.chains()
            if not rules.same(current, self._table(family)):
                self._write_table(family)
                report.changes.append(f"nft {family} flotilla")
            else:
                self._synced.add(family)
        for network in desired.networks:
            report.changes += self._dhcp(network)
        if self._nat_networks():
            report.changes += self._forwarding()
        serving = {n.short_id for n in desired.networks if n.dhcp}
        for short in self._dnsmasq.running() - serving:
            self._dnsmasq.stop(short)
            report.changes.append(f"dnsmasq {short} stopped")
        report.conflicts = self.forward_conflicts() if self._nat_networks() else []
        for line in report.changes:
            log.info("net.reconciled", change=line)
        return report

    def forward_conflicts(self) -> list[rules.ForwardConflict]:
        """Other firewall managers' forward chains whose drop policy would break NAT."""
        return rules.forward_conflicts(self._nft.ruleset())

    # internals
    def _network(self, network_id: str) -> NetworkPlumbing:
        network = self._networks.get(network_id)
        if network is None:
            raise PlumbingError(f"network {network_id} is not applied on this host")
        return network

    def _nat_networks(self) -> list[NetworkPlumbing]:
        return [n for n in self._networks.values() if n.mode is NetworkMode.NAT]

    def _wanted_links(self) -> set[str]:
        wanted = {p.tap for p in self._ports.values()}
        for n in self._networks.values():
            if n.owns_bridge:
                wanted.add(n.bridge)
            if n.vxlan is not None:
                wanted.add(n.vxlan)
        return wanted

    def _network_links(
        self,
        network: NetworkPlumbing,
        old: NetworkPlumbing | None,
        actual: dict[str, Link] | None = None,
    ) -> list[str]:
        changes: list[str] = []

        def get(name: str) -> Link | None:
            return actual.get(name) if actual is not None else self._links.get(name)

        bridge = get(network.bridge)
        if network.owns_bridge:
            if bridge is not None and bridge.kind != "bridge":
                self._links.delete(bridge.index)
                bridge = None
            created = bridge is None
            if bridge is None:
                self._links.add_bridge(network.bridge, network.mtu)  # up, with its MTU
                bridge = self._must(network.bridge)
                changes.append(f"created {network.bridge}")
            changes += self._set(bridge, None, network.mtu)
            assert network.gateway is not None
            # A bridge just made has no address yet: no need to ask.
            have = set() if created else self._links.addresses(bridge.index)
            for extra in have - {network.gateway}:
                self._links.del_address(bridge.index, extra)
                changes.append(f"removed {extra} from {network.bridge}")
            if network.gateway not in have:
                self._links.add_address(bridge.index, network.gateway)
                changes.append(f"added {network.gateway} to {network.bridge}")
        elif bridge is None:
            raise PlumbingError(f"host bridge {network.bridge} does not exist")
        self._bridge_index[network.bridge] = bridge.index
        if old is not None and old.vxlan is not None and old.vni != network.vni:
            self._delete_link(old.vxlan)
        if network.vxlan is not None and network.vni is not None:
            changes += self._vxlan(network, bridge, get(network.vxlan))
        return changes

    def _vxlan(self, network: NetworkPlumbing, bridge: Link, vx: Link | None) -> list[str]:
        assert network.vxlan is not None
        assert network.vni is not None
        if self._underlay is None:
            raise PlumbingError(f"network {network.network_id} has a VNI but no underlay is set")
        underlay = self._links.get(self._underlay.device)
        if underlay is None:
            raise PlumbingError(f"underlay link {self._underlay.device} does not exist")
        if network.mtu > underlay.mtu - VXLAN_OVERHEAD:
            raise PlumbingError(
                f"network {network.network_id}: MTU {network.mtu} does not fit VXLAN over "
                f"{self._underlay.device} (MTU {underlay.mtu}): at most "
                f"{underlay.mtu - VXLAN_OVERHEAD} (models.overlay_mtu)"
            )
        changes = []
        if vx is not None and (
            vx.kind != "vxlan"
            or vx.vni != network.vni
            or vx.vxlan_local != str(self._underlay.address)
            or vx.vxlan_learning
            or vx.vxlan_link != underlay.index
        ):
            self._links.delete(vx.index)
            changes.append(f"deleted {network.vxlan} (settings differ)")
            vx = None
        if vx is None:
            # On the bridge, with its MTU and up, in the one request that makes it.
            self._links.add_vxlan(
                network.vxlan,
                network.vni,
                self._underlay.address,
                underlay.index,
                master=bridge.index,
                mtu=network.mtu,
            )
            return [*changes, f"created {network.vxlan}"]
        return changes + self._set(vx, bridge.index, network.mtu)

    def _port_link(
        self, port: PortPlumbing, network: NetworkPlumbing, link: Link | None
    ) -> list[str]:
        changes = []
        if link is not None and link.kind != "tun":
            self._links.delete(link.index)
            link = None
        if link is None:
            tap.create(port.tap, uid=self._uid, gid=self._gid, netns_name=self._netns)
            link = self._must(port.tap)
            changes.append(f"created {port.tap}")
        bridge = self._must(network.bridge)
        return changes + self._set(link, bridge.index, network.mtu)

    def _set(self, link: Link, master: int | None, mtu: int) -> list[str]:
        """One netlink request for whatever of master, MTU and up differs."""
        changes: dict[str, Any] = {}
        if master is not None and link.master != master:
            changes["master"] = master
        if link.mtu != mtu:
            changes["mtu"] = mtu
        if not link.up:
            changes["up"] = True
        if not changes:
            return []
        self._links.set(link.index, **changes)
        return [f"set {link.name} " + " ".join(sorted(changes))]

    def _must(self, name: str) -> Link:
        link = self._links.get(name)
        if link is None:
            raise PlumbingError(f"{name} vanished while being configured")
        return link

    def _delete_link(self, name: str) -> None:
        link = self._links.get(name)
        if link is not None:
            self._links.delete(link.index)

    def _delete_tap(self, name: str) -> None:
        self._made_taps.pop(name, None)
        self._delete_link(name)

    def _vxlan_link(self, network_id: str) -> Link:
        network = self._network(network_id)
        if network.vxlan is None:
            raise PlumbingError(f"network {network_id} has no VXLAN")
        return self._must(network.vxlan)

    def _reconcile_fdb(self, desired: HostPlumbing, links: dict[str, Link]) -> list[str]:
        changes = []
        for network in desired.networks:
            if network.vxlan is None:
                continue
            vx = links[network.vxlan]
            remotes = [r for r in desired.remotes if r.network_id == network.network_id]
            want = {Fdb(r.mac, str(r.remote)) for r in remotes}
            want |= {Fdb(ZERO_MAC, str(r.remote)) for r in remotes}
            have = self._links.fdb(vx.index)
            for entry in have - want:
                self._links.fdb_del(vx.index, entry)
                changes.append(f"fdb del {entry.mac} {entry.dst}")
            for entry in want - have:
                self._links.fdb_append(vx.index, entry)
                changes.append(f"fdb add {entry.mac} {entry.dst}")
            want_neigh = {r.ipv4: r.mac for r in remotes}
            have_neigh = self._links.neighbours(vx.index)
            for ip in have_neigh.keys() - want_neigh.keys():
                self._links.neigh_del(vx.index, ip)
                changes.append(f"neigh del {ip}")
            for ip, mac in want_neigh.items():
                if have_neigh.get(ip) != mac:
                    self._links.neigh_replace(vx.index, ip, mac)
                    changes.append(f"neigh {ip} {mac}")
        return changes

    def _table(self, family: str) -> rules.Table:
        if family == "bridge":
            return rules.bridge_table(self._ports.values())
        return rules.inet_table(self._networks.values())

    def _write_table(self, family: str) -> None:
        table = self._table(family)
        self._nft.batch(rules.replace(table, self._chains[family]))
        self._chains[family] = table.chains()
        self._synced.add(family)

    def _nft_step(self, batch: list[rules.Command], family: str = "bridge") -> None:
        """An incremental change to a table known to match the state; if the kernel refuses
        it (the table drifted), the whole table is rewritten instead."""
        try:
            self._nft.batch(batch)
        except NftError as exc:
            log.warning("net.nft_resync", family=family, reason=str(exc))
            self._write_table(family)
        else:
            self._chains[family] = self._table(family).chains()

    def _forwarding(self) -> list[str]:
        """NAT needs the host to route IPv4 (net.ipv4.ip_forward, per namespace)."""
        with netns.inside(self._netns):
            fd = os.open(IP_FORWARD, os.O_RDWR)
        try:
            if os.read(fd, 8).strip() == b"1":
                return []
            os.pwrite(fd, b"1", 0)
        finally:
            os.close(fd)
        return ["net.ipv4.ip_forward=1"]

    def _dhcp(self, network: NetworkPlumbing) -> list[str]:
        if not network.dhcp:
            stopped = self._dnsmasq.stop(network.short_id)
            return [f"dnsmasq stopped for {network.bridge}"] if stopped else []
        ports = [p for p in self._ports.values() if p.network_id == network.network_id]
        change = self._dnsmasq.ensure(network, ports)
        return [] if change is None else [f"{change} for {network.bridge}"]
