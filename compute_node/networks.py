"""Guest NICs on this host: the ports of defined domains plugged through `Plumber`, and the
other hosts' ports (l2population) pushed as VXLAN forwarding entries.

A domain's `PortBinding`s (from the scheduler's DefineDomain) are kept with its definition
in the node's store. From them and the node's own settings (uplink for `nat`, underlay for
VXLAN, the data-plane namespace) follow the `NetworkPlumbing` and `PortPlumbing` the host
must have: `begin_attach` makes the taps for the VMM and applies the networks and plugs the
taps while it starts (`attach`: all of it before returning), `detach`
unplugs them on undefine, and a network left without ports is removed once it has lingered
`NetSettings.linger_s` (a guest made on it meanwhile finds it ready). A restarted node calls
`reconcile` with every stored binding: `Plumber.reconcile` changes only what differs, so a
guest's traffic does not stop for a node restart.

l2population: the node consumes the port events of the networks it carries on a durable
queue of its own (`compute.<host>.ports`), so events published while it was down wait for it
(replay), and asks the network service for the ports bound before it carried a network
(compute_node/remote_ports.py); both are merged here by each port's `seq`. Every remote port
it knows is kept in `<state>/net/remotes.json` and pushed when its network is applied here.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, TypeVar

import structlog

from compute_node.driver import NicTap
from compute_node.net import (
    HostPlumbing,
    NetworkMode,
    NetworkPlumbing,
    Plumber,
    PlumbingError,
    PortPlumbing,
    RemoteVtep,
    Underlay,
    names,
)
from compute_node.net.dnsmasq import RUN_DIR, node_dir
from compute_node.net.links import Links
from protos.base import Message
from protos.bindings import PortBinding
from protos.codec import Envelope
from protos.network import PortBound, PortDeleted, PortEvent

log = structlog.get_logger("flotilla.compute.networks")
T = TypeVar("T")

# What the port queue was bound by before it was bound per network: unbound at start.
LEGACY_PORT_PATTERNS = ("port.bound.*", "port.deleted.*")
WARNINGS_TTL_S = 30.0
# Written at the first plug: from then on a restart reconciles even with no ports left (to
# remove what the last ones left); a node that never plumbed leaves the host's links alone.
PLUMBED = "plumbed"


# How long a guest's start waits for the other hosts' ports of a network new to this host.
ANSWER_WAIT_S = 5.0
# (network ids, their bound ports, the tick when asked) or None: not answered in time.
Answer = tuple[frozenset[str], list[PortBound], int]
AnswerWait = Callable[[float], Answer | None]


def _no_answer(_timeout: float) -> Answer | None:
    return None


def _log_failure(done: Future[None]) -> None:
    exc = done.exception()
    if exc is not None:
        log.error("remote ports not pushed", error=str(exc))


class NetworkRefused(Exception):
    """A port this host cannot plug (unknown mode here, no uplink for nat, ...)."""


def ports_queue(host: str) -> str:
    """The durable queue this host's port events wait in."""
    return f"compute.{host}.ports"


@dataclass(frozen=True)
class NetSettings:
    """The node's own part of every network: where the data plane lives, what `nat`
    masquerades to, and the VXLAN underlay (None: networks stay on this host)."""

    netns: str | None = None
    uplink: str | None = None
    underlay: IPv4Address | None = None
    underlay_device: str | None = None
    # Where the node's dnsmasq run dir is made (compute_node/net/dnsmasq.py: node_dir).
    dnsmasq_dir: Path = RUN_DIR
    # How long a network stays plumbed here after its last port went (0: removed at once).
    linger_s: float = 0.0


@dataclass(frozen=True)
class _Remote:
    seq: int
    host: str | None
    vtep: RemoteVtep | None  # None: deleted (kept so an older `bound` is not replayed)
    tick: int = 0  # `HostNetworks.tick` when recorded (0: loaded from disk)


class HostNetworks:
    """The plumbing of one host's guest NICs; thread-safe (one lock around the plumber)."""

    def __init__(self, host: str, state_dir: Path, settings: NetSettings) -> None:
        self.host = host
        self.settings = settings
        self._dir = state_dir / "net"
        self.dnsmasq_dir = node_dir(settings.dnsmasq_dir, host, state_dir)
        # Every plumber call runs on this one thread: its netlink and libnftables sockets
        # are not thread-safe, and its calls must not interleave. It also orders port
        # events with plugs.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="plumbing")
        self._plumber: Plumber | None = None
        self._remotes: dict[str, _Remote] = self._load_remotes()
        self._warnings: tuple[float, list[str]] = (0.0, [])
        self._tick = 0
        # Networks without ports here, kept until their time (monotonic) is up (`_detach`).
        self._lingering: dict[str, float] = {}
        self._closed = False
        # Told the networks this host carries whenever they change (on the plumbing
        # thread; compute_node/remote_ports.py binds the port queue by them and asks the
        # network service about new ones). Returns a wait for that answer.
        self.carried_changed: Callable[[frozenset[str]], AnswerWait] = lambda _ids: _no_answer

    # ---- translation -------------------------------------------------------------------------

    def plumbing(self, binding: PortBinding) -> tuple[NetworkPlumbing, PortPlumbing]:
        """The network and port as this host carries them; NetworkRefused if it cannot."""
        net = binding.network
        mode = NetworkMode(net.mode)
        if binding.ipv4 is None:
            raise NetworkRefused(f"port {binding.port_id} has no IPv4 address to allow")
        if mode is NetworkMode.NAT and self.settings.uplink is None:
            raise NetworkRefused(f"network {net.name} is nat but this host has no net_uplink")
        # Without an underlay the network stays on this host (no VXLAN link).
        vni = net.vni if self.settings.underlay is not None else None
        try:
            network = NetworkPlumbing(
                network_id=str(net.network_id),
                mode=mode,
                mtu=net.mtu,
                gateway=net.gateway,
                dhcp=net.dhcp,
                uplink=self.settings.uplink if mode is NetworkMode.NAT else None,
                host_bridge=net.host_bridge,
                vni=None if mode is NetworkMode.BRIDGE else vni,
            )
            port = PortPlumbing(
                port_id=str(binding.port_id),
                network_id=network.network_id,
                mac=binding.mac,
                ipv4=binding.ipv4,
            )
        except ValueError as exc:
            raise NetworkRefused(f"port {binding.port_id}: {exc}") from None
        return network, port

    @staticmethod
    def tap_name(binding: PortBinding) -> str:
        return names.tap_name(str(binding.port_id))

    def check(self, ports: Sequence[PortBinding]) -> None:
        """NetworkRefused unless every port can be plugged here (nothing is changed)."""
        for binding in ports:
            self.plumbing(binding)

    # ---- domains -----------------------------------------------------------------------------

    def attach(self, ports: Sequence[PortBinding]) -> list[NicTap]:
        """Apply the ports' networks (if not applied as they are), plug their taps, push the
        remote ports known for those networks; returns what the VMM opens, in order.
        NetworkRefused / PlumbingError when the host cannot."""
        if not ports:
            return []
        return self._on_thread(self._attach, ports)

    def begin_attach(self, ports: Sequence[PortBinding]) -> tuple[list[NicTap], Future[object]]:
        """`attach` in two parts, so the VMM can start while the host is plumbed: the taps
        are made now (down and on no bridge, so a guest's frames go nowhere yet) and
        returned with the rest under way on the plumbing thread (networks applied, each
        tap's anti-spoofing rules before it joins its bridge and comes up, DHCP). The
        caller waits for the Future (NetworkRefused / PlumbingError) before it reports the
        guest started."""
        if not ports:
            done: Future[object] = Future()
            done.set_result(None)
            return [], done
        taps = self._on_thread(self._create_taps, ports)
        return taps, self._thread.submit(self._attach, ports)

    def _create_taps(self, ports: Sequence[PortBinding]) -> list[NicTap]:
        plumber = self._open()
        taps = []
        for binding in ports:
            _network, port = self.plumbing(binding)
            plumber.create_tap(port)
            taps.append(NicTap(port.tap, port.mac, self.settings.netns))
        return taps

    def _attach(self, ports: Sequence[PortBinding]) -> list[NicTap]:
        taps = []
        plumber = self._open()
        (self._dir / PLUMBED).touch()
        plumbing = [self.plumbing(binding) for binding in ports]
        before = self._carried()
        new = {network.network_id for network, _ in plumbing} - before
        # Other hosts' ports of a network new here are asked for now, while it is applied.
        answer = self.carried_changed(before | new) if new else _no_answer
        took = {"apply": 0.0, "plug": 0.0, "answer": 0.0}
        for network, port in plumbing:
            self._lingering.pop(network.network_id, None)  # in use again
            desired = plumber.desired
            start = time.perf_counter()
            if network not in desired.networks:
                plumber.apply(network)
                self._push_remotes(plumber, network)
            applied = time.perf_counter()
            if port not in desired.ports:
                plumber.plug(port)
            took["apply"] += applied - start
            took["plug"] += time.perf_counter() - applied
            taps.append(NicTap(port.tap, port.mac, self.settings.netns))
        if new:
            # Their forwarding entries before the guest runs, unless the network service is
            # slow to answer: then they follow (compute_node/remote_ports.py).
            start = time.perf_counter()
            answered = answer(ANSWER_WAIT_S)
            took["answer"] = time.perf_counter() - start
            if answered is None:
                log.warning("remote ports not known yet", networks=sorted(new))
            else:
                self._learn(*answered)
        log.info(
            "ports plumbed",
            ports=len(ports),
            **{f"{k}_ms": round(v * 1e3, 2) for k, v in took.items()},
        )
        return taps

    def detach(self, ports: Sequence[PortBinding]) -> None:
        """Unplug the ports; a network left without ports on this host is removed, at once
        or once its linger is over (`NetSettings.linger_s`)."""
        if ports:
            self._on_thread(self._detach, ports)

    def _detach(self, ports: Sequence[PortBinding]) -> None:
        plumber = self._open()
        for binding in ports:
            plumber.unplug(str(binding.port_id))
            plumber.discard_tap(self.tap_name(binding))  # made, then the plumbing failed
        if self.settings.linger_s <= 0:
            self._remove_unused()
            return
        # Kept for a while: a guest created on it again meanwhile (delete and create, a
        # restart elsewhere and back) finds it applied, its remote ports known and their
        # queue bound, instead of building it all again; and no port is ever plugged into
        # a bridge being torn down (linuxbridge agents race there).
        used = {p.network_id for p in plumber.desired.ports}
        until = time.monotonic() + self.settings.linger_s
        for network in plumber.desired.networks:
            if network.network_id not in used and network.network_id not in self._lingering:
                self._lingering[network.network_id] = until
                log.info("network lingers", network=network.network_id, s=self.settings.linger_s)
                timer = threading.Timer(self.settings.linger_s, self._linger_over)
                timer.daemon = True
                timer.start()

    def end_lingering(self) -> None:
        """Remove now the networks lingering without ports (a node stopping: its linger is a
        cache for guests made here while it runs, and nothing of a network without ports
        is to be kept for a restart, unlike the plumbing of guests that run on)."""
        if self._lingering and not self._closed:
            self._on_thread(self._remove_unused)

    def _linger_over(self) -> None:
        if self._closed:
            return
        try:
            self._thread.submit(self._remove_unused, time.monotonic())
        except RuntimeError:  # shut down meanwhile
            pass

    def _remove_unused(self, now: float | None = None) -> None:
        """Remove the networks without ports here: all of them (`now` None), or those whose
        linger is over by `now`."""
        if self._closed:
            return
        plumber = self._open()
        desired = plumber.desired
        used = {p.network_id for p in desired.ports}
        removed = False
        for network in desired.networks:
            network_id = network.network_id
            if network_id in used:
                continue
            if now is not None and self._lingering.get(network_id, now) > now:
                continue
            self._lingering.pop(network_id, None)
            plumber.remove(network_id)
            log.info("network removed", network=network_id)
            removed = True
        if removed:
            self.carried_changed(self._carried())

    def reconcile(self, ports: Iterable[PortBinding]) -> list[str]:
        """Make the host match every stored port (and the remote ports of their networks),
        changing only what differs; returns the changes. A node that never plumbed anything
        and has no ports touches nothing."""
        bindings = list(ports)
        if not bindings and not (self._dir / PLUMBED).exists():
            return []
        networks: dict[str, NetworkPlumbing] = {}
        plumbed: list[PortPlumbing] = []
        for binding in bindings:
            try:
                network, port = self.plumbing(binding)
            except NetworkRefused as exc:
                log.warning("port not reconciled", port=str(binding.port_id), error=str(exc))
                continue
            networks[network.network_id] = network
            plumbed.append(port)
        return self._on_thread(self._reconcile, networks, plumbed)

    def _reconcile(
        self, networks: dict[str, NetworkPlumbing], plumbed: list[PortPlumbing]
    ) -> list[str]:
        remotes = [
            r.vtep
            for r in self._remotes.values()
            if r.vtep is not None
            and r.vtep.network_id in networks
            and networks[r.vtep.network_id].vni is not None
        ]
        desired = HostPlumbing(
            networks=tuple(networks.values()), ports=tuple(plumbed), remotes=tuple(remotes)
        )
        report = self._open().reconcile(desired)
        self.carried_changed(self._carried())
        return report.changes

    def carried(self) -> frozenset[str]:
        """The ids of the networks applied on this host."""
        return self._on_thread(self._carried)

    def _carried(self) -> frozenset[str]:
        if self._plumber is None:
            return frozenset()
        return frozenset(n.network_id for n in self._plumber.desired.networks)

    # ---- l2population ------------------------------------------------------------------------

    def on_port_event(self, _envelope: Envelope, event: Message) -> None:
        """A port bound or deleted on a network this host carries: keep it, and push or
        remove its forwarding entries (ports of this host are skipped)."""
        if isinstance(event, PortBound | PortDeleted):
            self._on_thread(self._port_events, [event])

    @property
    def tick(self) -> int:
        """Grows with each remote port recorded: `learn` forgets only ports recorded before
        the question it answers was asked."""
        return self._tick

    def learn(
        self, network_ids: Iterable[str], bound: Sequence[PortBound], asked: int
    ) -> Future[None]:
        """The network service's answer (ListBoundPorts, asked at tick `asked`): the ports
        bound on `network_ids`. Newer than what is known by `seq` is taken; a known port
        of those networks missing from it and recorded before the question was released
        meanwhile, so its entries go. Done on the plumbing thread; returns at once."""
        done = self._thread.submit(self._learn, frozenset(network_ids), list(bound), asked)
        done.add_done_callback(_log_failure)
        return done

    def _learn(self, network_ids: frozenset[str], bound: list[PortBound], asked: int) -> None:
        answered = {str(event.port_id) for event in bound}
        gone = [
            key
            for key, known in self._remotes.items()
            if known.vtep is not None
            and known.vtep.network_id in network_ids
            and key not in answered
            and known.tick <= asked
        ]
        changed = self._port_events(bound, save=False)
        for key in gone:
            known = self._remotes[key]
            self._remotes[key] = _Remote(known.seq, known.host, None, self._next_tick())
            assert known.vtep is not None
            if known.vtep.network_id in self._carried():
                self._fdb_del(known.vtep)
            log.info("remote port gone", mac=known.vtep.mac, vtep=str(known.vtep.remote))
        if changed or gone:
            self._save_remotes()

    def _port_events(self, events: Sequence[PortBound | PortDeleted], save: bool = True) -> bool:
        """Record and push each event newer than what is known of its port; whether any."""
        changed = False
        carried = (
            {n.network_id: n for n in self._plumber.desired.networks}
            if self._plumber is not None
            else {}
        )
        for event in events:
            key = str(event.port_id)
            known = self._remotes.get(key)
            if known is not None and known.seq >= event.seq:
                continue  # a replay or an older event
            remote = self._remote_of(event)
            self._remotes[key] = _Remote(
                event.seq, getattr(event, "host", None), remote, self._next_tick()
            )
            changed = True
            if self._plumber is None:
                continue  # nothing plumbed yet: the entry is pushed when its network is
            old = known.vtep if known is not None else None
            if old is not None and old != remote and old.network_id in carried:
                self._fdb_del(old)
            network = carried.get(remote.network_id) if remote is not None else None
            if remote is not None and network is not None and network.vni is not None:
                self._plumber.fdb_add(remote)
                log.info("remote port", mac=remote.mac, vtep=str(remote.remote))
        if changed and save:
            self._save_remotes()  # after the entries are pushed: they are what is waited for
        return changed

    def _fdb_del(self, vtep: RemoteVtep) -> None:
        """Remove a remote port's forwarding entry and neighbour unless a known port still
        needs them: one deleted while this host did not hear it may share its MAC and
        address with the port that took its place."""
        if self._plumber is None or any(r.vtep == vtep for r in self._remotes.values()):
            return
        self._plumber.fdb_del(vtep)
        for r in self._remotes.values():  # an address or MAC another port holds now
            if (
                r.vtep is not None
                and r.vtep.network_id == vtep.network_id
                and (r.vtep.ipv4 == vtep.ipv4 or r.vtep.mac == vtep.mac)
            ):
                self._plumber.fdb_add(r.vtep)

    def _next_tick(self) -> int:
        self._tick += 1
        return self._tick

    def _remote_of(self, event: PortEvent) -> RemoteVtep | None:
        if not isinstance(event, PortBound):
            return None
        if event.host == self.host or event.vtep is None or event.ipv4 is None:
            return None
        return RemoteVtep(
            network_id=str(event.network_id), mac=event.mac, ipv4=event.ipv4, remote=event.vtep
        )

    def _push_remotes(self, plumber: Plumber, network: NetworkPlumbing) -> None:
        if network.vni is None:
            return
        for known in self._remotes.values():
            if known.vtep is not None and known.vtep.network_id == network.network_id:
                plumber.fdb_add(known.vtep)

    def _load_remotes(self) -> dict[str, _Remote]:
        try:
            raw = json.loads((self._dir / "remotes.json").read_text())
        except (OSError, ValueError):
            return {}
        remotes = {}
        for key, item in raw.items():
            vtep = item.get("vtep")
            remotes[key] = _Remote(
                int(item["seq"]),
                item.get("host"),
                None if vtep is None else RemoteVtep.model_validate(vtep),
            )
        return remotes

    def _save_remotes(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        data = {
            key: {
                "seq": r.seq,
                "host": r.host,
                "vtep": None if r.vtep is None else r.vtep.model_dump(mode="json"),
            }
            for key, r in self._remotes.items()
        }
        tmp = self._dir / "remotes.json.tmp"
        with tmp.open("w") as f:
            f.write(json.dumps(data))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self._dir / "remotes.json")

    # ---- host info ---------------------------------------------------------------------------

    def warnings(self) -> list[str]:
        """What would break guest networking here (another firewall manager's forward drop
        policy in front of NAT), read at most every WARNINGS_TTL_S: a fresh reading is
        returned at once, without the hop to the plumbing thread (a heartbeat sent when a
        guest shuts off asks, on the way of that guest's event)."""
        fresh = self._fresh_warnings()
        return self._on_thread(self._read_warnings) if fresh is None else fresh

    def _fresh_warnings(self) -> list[str] | None:
        at, cached = self._warnings
        return cached if at and time.monotonic() - at < WARNINGS_TTL_S else None

    def _read_warnings(self) -> list[str]:
        fresh = self._fresh_warnings()  # another caller's reading came first
        if fresh is not None:
            return fresh
        now = time.monotonic()
        try:
            found = [
                f"{c}: NAT'd guest traffic is dropped there"
                for c in self._open().forward_conflicts()
            ]
        except Exception as exc:  # no libnftables, no namespace: say so, do not fail
            found = [f"network plumbing unavailable: {exc}"]
        self._warnings = (now, found)
        return found

    # ---- internals ---------------------------------------------------------------------------

    def _open(self) -> Plumber:
        if self._plumber is None:
            underlay = None
            if self.settings.underlay is not None:
                device = self.settings.underlay_device or self._underlay_device()
                underlay = Underlay(self.settings.underlay, device)
            self._dir.mkdir(parents=True, exist_ok=True)
            # dnsmasq comes up while the guest starts (it asks for a lease only once booted).
            self._plumber = Plumber(
                self._dir,
                netns=self.settings.netns,
                underlay=underlay,
                dhcp_background=True,
                dnsmasq_dir=self.dnsmasq_dir,
            )
        return self._plumber

    def _underlay_device(self) -> str:
        """The link that holds the underlay address."""
        assert self.settings.underlay is not None
        links = Links(self.settings.netns)
        try:
            for name, link in links.all().items():
                if any(a.ip == self.settings.underlay for a in links.addresses(link.index)):
                    return name
        finally:
            links.close()
        raise PlumbingError(f"no link holds the underlay address {self.settings.underlay}")

    def _on_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return self._thread.submit(fn, *args).result()

    def close(self) -> None:
        if self._closed:
            return
        self.end_lingering()
        self._closed = True  # a linger timer that fires now removes nothing

        def close() -> None:
            if self._plumber is not None:
                self._plumber.close()
                self._plumber = None

        self._on_thread(close)
        self._thread.shutdown()


def interface_of(binding: PortBinding) -> dict[str, object]:
    """The fields of `protos.replies.Interface` for a port."""
    return {
        "port_id": binding.port_id,
        "network": binding.network.name,
        "mac": binding.mac,
        "ipv4": binding.ipv4,
        "tap": HostNetworks.tap_name(binding),
    }
