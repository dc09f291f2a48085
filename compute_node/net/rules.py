"""nftables rules for the plumbing, as libnftables JSON: pure functions of the desired state.

Two tables, both Flotilla's alone:
- `inet flotilla`: per nat network, masquerade from its subnet to the uplink and forward
  accept for that traffic; every network's bridge otherwise routes nothing (isolated
  networks nothing at all) while traffic bridged within it passes, and the host accepts
  from guests only DHCP, DNS, ping and replies.
- `bridge flotilla`: anti-spoofing per tap, in a chain of its own reached from the
  bridge's prerouting hook through the verdict map `ports` (tap name -> jump to its
  chain): the port's MAC as source, ARP only for its address, IPv4 only from its address
  (0.0.0.0 only for a DHCP request), no DHCP or DHCPv6 server replies, no router
  advertisements or redirects, no VLAN tags, no ethertype but IPv4, ARP and IPv6; and
  no DHCP between hosts (from a VXLAN link).

Expressions are written in the canonical form libnftables lists them in, so the rules read
back from the kernel compare equal to these when nothing differs (`Plumber.reconcile`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from compute_node.net.models import NetworkMode, NetworkPlumbing, PortPlumbing
from compute_node.net.names import VXLAN_PREFIX

TABLE = "flotilla"
Expr = list[dict[str, Any]]
Command = dict[str, Any]

DROP: dict[str, Any] = {"drop": None}
ACCEPT: dict[str, Any] = {"accept": None}


@dataclass(frozen=True)
class BaseChain:
    name: str
    type: str
    hook: str
    prio: int
    policy: str = "accept"


@dataclass(frozen=True)
class Table:
    """A whole table: its base chains, regular chains, each chain's rules in order, and its
    verdict maps (name -> {key: chain jumped to})."""

    family: str
    base: tuple[BaseChain, ...]
    rules: dict[str, list[Expr]] = field(default_factory=dict)
    vmaps: dict[str, dict[str, str]] = field(default_factory=dict)

    def chains(self) -> list[str]:
        return list(self.rules)


BRIDGE_BASE = (BaseChain("prerouting", "filter", "prerouting", -200),)
INET_BASE = (
    BaseChain("postrouting", "nat", "postrouting", 100),
    BaseChain("forward", "filter", "forward", 0),
    BaseChain("input", "filter", "input", 0),
)


def _match(left: dict[str, Any], right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _payload(protocol: str, name: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": name}}


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _prefix(network: NetworkPlumbing) -> dict[str, Any]:
    subnet = network.subnet
    assert subnet is not None  # nat networks have a gateway (models.NetworkPlumbing)
    return {"prefix": {"addr": str(subnet.network_address), "len": subnet.prefixlen}}


def port_chain(port: PortPlumbing) -> str:
    """The anti-spoofing chain of one port."""
    return "port-" + port.tap.removeprefix("flt-")


def anti_spoofing(port: PortPlumbing) -> list[Expr]:
    """What a frame from the port's tap must pass, in order; a frame that passes returns to
    prerouting and is bridged as usual."""
    mac, ip = port.mac, str(port.ipv4)
    dhcp_client_ips = sorted(["0.0.0.0", ip], key=lambda a: tuple(int(x) for x in a.split(".")))
    return [
        [_match(_payload("ether", "saddr"), mac, "!="), DROP],
        [_match(_payload("ether", "type"), "8021q"), DROP],
        [_match(_payload("arp", "saddr ether"), mac, "!="), DROP],
        [_match(_payload("arp", "saddr ip"), {"set": dhcp_client_ips}, "!="), DROP],
        [_match(_payload("udp", "sport"), 67), DROP],
        [_match(_payload("udp", "sport"), 547), DROP],
        [
            _match(_payload("ip", "saddr"), "0.0.0.0"),
            _match(_payload("udp", "sport"), 68),
            _match(_payload("udp", "dport"), 67),
            ACCEPT,
        ],
        [_match(_payload("ip", "saddr"), ip, "!="), DROP],
        [_match(_payload("icmpv6", "type"), {"set": ["nd-router-advert", "nd-redirect"]}), DROP],
        [_match(_payload("ether", "type"), {"set": ["ip", "arp", "ip6"]}, "!="), DROP],
    ]


PORTS_MAP = "ports"
PREROUTING_DISPATCH: Expr = [{"vmap": {"key": _meta("iifname"), "data": "@" + PORTS_MAP}}]
# DHCP stays on its host: every host's dnsmasq on a network has the same address (the
# gateway), so one that does not know a port would answer another host's guest's REQUEST,
# flooded over VXLAN, with a NAK (authoritative) that can beat the local ACK.
VXLAN_LINKS = VXLAN_PREFIX + "*"
LOCAL_DHCP: list[Expr] = [
    [_match(_meta("iifname"), VXLAN_LINKS), _match(_payload("udp", "dport"), port), DROP]
    for port in (67, 68)
]


def bridge_table(ports: Iterable[PortPlumbing]) -> Table:
    """The `bridge flotilla` table for these ports."""
    ordered = sorted(ports, key=lambda p: p.tap)
    rules: dict[str, list[Expr]] = {"prerouting": [*LOCAL_DHCP, PREROUTING_DISPATCH]}
    for port in ordered:
        rules[port_chain(port)] = anti_spoofing(port)
    return Table("bridge", BRIDGE_BASE, rules, {PORTS_MAP: {p.tap: port_chain(p) for p in ordered}})


def _element(family: str, vmap: str, key: str, chain: str | None) -> dict[str, Any]:
    """`key`'s entry in verdict map `vmap` (jumping to `chain`; None: the key alone, to
    delete it)."""
    elem: list[Any] = [[key, {"jump": {"target": chain}}]] if chain is not None else [key]
    return {"family": family, "table": TABLE, "name": vmap, "elem": elem}


def _chain_added(family: str, chain: str, exprs: list[Expr]) -> list[Command]:
    ref = {"family": family, "table": TABLE, "name": chain}
    return [
        {"add": {"chain": ref}},
        {"flush": {"chain": ref}},
        *(
            {"add": {"rule": {"family": family, "table": TABLE, "chain": chain, "expr": e}}}
            for e in exprs
        ),
    ]


def _chain_removed(family: str, chain: str) -> list[Command]:
    ref = {"family": family, "table": TABLE, "name": chain}
    return [{"flush": {"chain": ref}}, {"delete": {"chain": ref}}]


def port_added(port: PortPlumbing) -> list[Command]:
    """One batch adding a port to an up-to-date bridge table: its chain and rules, then the
    map entry that sends its frames there (so no frame meets a half-built chain)."""
    chain = port_chain(port)
    return [
        *_chain_added("bridge", chain, anti_spoofing(port)),
        {"add": {"element": _element("bridge", PORTS_MAP, port.tap, chain)}},
    ]


def port_removed(port: PortPlumbing) -> list[Command]:
    """One batch removing a port from an up-to-date bridge table."""
    return [
        {"delete": {"element": _element("bridge", PORTS_MAP, port.tap, None)}},
        *_chain_removed("bridge", port_chain(port)),
    ]


# The inet table's dispatch: each network's bridge -> its own chains, through verdict maps
# (one lookup a packet, and a network added or removed by one small batch, whatever the
# number of networks on the host).
FROM_BRIDGE_MAP = "from-bridge"  # forward, by iifname
TO_BRIDGE_MAP = "to-bridge"  # forward, by oifname
INPUT_MAP = "input-bridge"  # input, by iifname
INET_DISPATCH: dict[str, list[Expr]] = {
    "forward": [
        [{"vmap": {"key": _meta("iifname"), "data": "@" + FROM_BRIDGE_MAP}}],
        [{"vmap": {"key": _meta("oifname"), "data": "@" + TO_BRIDGE_MAP}}],
    ],
    "input": [[{"vmap": {"key": _meta("iifname"), "data": "@" + INPUT_MAP}}]],
}
ESTABLISHED = _match({"ct": {"key": "state"}}, ["established", "related"], "in")


def network_chains(net: NetworkPlumbing) -> dict[str, list[Expr]]:
    """A network's own chains in the inet table (one that owns its bridge): what its bridge
    may forward (out of it, into it) and what the host accepts from it."""
    out_of: list[Expr] = [
        # With br_netfilter (bridge-nf-call-iptables), frames bridged between two ports of
        # one bridge pass this hook too, as iif = oif = the bridge: they are not routed.
        [_match(_meta("oifname"), net.bridge), ACCEPT],
    ]
    into: list[Expr] = []
    if net.mode is NetworkMode.NAT:
        assert net.uplink is not None
        out_of.append(
            [
                _match(_meta("oifname"), net.uplink),
                _match(_payload("ip", "saddr"), _prefix(net)),
                ACCEPT,
            ]
        )
        into.append([_match(_meta("iifname"), net.uplink), ESTABLISHED, ACCEPT])
    out_of.append([DROP])
    into.append([DROP])
    host: list[Expr] = [
        [_match(_payload("udp", "dport"), 67), ACCEPT],
        [
            _match(_meta("l4proto"), {"set": ["tcp", "udp"]}),
            _match(_payload("th", "dport"), 53),
            ACCEPT,
        ],
        [_match(_payload("icmp", "type"), "echo-request"), ACCEPT],
        [ESTABLISHED, ACCEPT],
        [DROP],
    ]
    chain = _dispatch(net)
    return {chain[FROM_BRIDGE_MAP]: out_of, chain[TO_BRIDGE_MAP]: into, chain[INPUT_MAP]: host}


def _masquerade(net: NetworkPlumbing) -> Expr:
    assert net.uplink is not None
    subnet = _prefix(net)
    return [
        _match(_payload("ip", "saddr"), subnet),
        _match(_payload("ip", "daddr"), subnet, "!="),
        _match(_meta("oifname"), net.uplink),
        {"masquerade": None},
    ]


def _dispatch(net: NetworkPlumbing) -> dict[str, str]:
    """Verdict map -> the network's chain its bridge's entry there jumps to."""
    short = net.short_id
    return {
        FROM_BRIDGE_MAP: f"fwd-from-{short}",
        TO_BRIDGE_MAP: f"fwd-to-{short}",
        INPUT_MAP: f"in-{short}",
    }


def stepwise(net: NetworkPlumbing) -> bool:
    """Whether all the network has in the inet table is its own chains and map entries (one
    that owns its bridge and is not nat: no postrouting rule), so `network_added` and
    `network_removed` can change it alone."""
    return net.owns_bridge and net.mode is not NetworkMode.NAT


def inet_table(networks: Iterable[NetworkPlumbing]) -> Table:
    """The `inet flotilla` table for these networks (bridge-mode ones have no rules here:
    their bridge and its routing are the host's): masquerade per nat network in
    postrouting; forward and input dispatched by bridge to each network's chains
    (`network_chains`), where a bridge forwards within itself and, for nat, to and (replies)
    from the uplink, and the host accepts from it DHCP, DNS, ping and replies only."""
    own = sorted((n for n in networks if n.owns_bridge), key=lambda n: n.bridge)
    rules: dict[str, list[Expr]] = {
        "postrouting": [_masquerade(n) for n in own if n.mode is NetworkMode.NAT],
        **{chain: list(exprs) for chain, exprs in INET_DISPATCH.items()},
    }
    vmaps: dict[str, dict[str, str]] = {m: {} for m in (FROM_BRIDGE_MAP, TO_BRIDGE_MAP, INPUT_MAP)}
    for net in own:
        rules.update(network_chains(net))
        for vmap, chain in _dispatch(net).items():
            vmaps[vmap][net.bridge] = chain
    return Table("inet", INET_BASE, rules, vmaps)


def network_added(net: NetworkPlumbing) -> list[Command]:
    """One batch adding a `stepwise` network to an up-to-date inet table: its chains and
    rules, then the map entries that send its bridge's packets there (so no packet meets a
    half-built chain)."""
    assert stepwise(net)
    cmds = [
        c
        for chain, exprs in network_chains(net).items()
        for c in _chain_added("inet", chain, exprs)
    ]
    return cmds + [
        {"add": {"element": _element("inet", vmap, net.bridge, chain)}}
        for vmap, chain in _dispatch(net).items()
    ]


def network_removed(net: NetworkPlumbing) -> list[Command]:
    """One batch removing a `stepwise` network from an up-to-date inet table: its map
    entries first, then its chains."""
    assert stepwise(net)
    cmds: list[Command] = [
        {"delete": {"element": _element("inet", vmap, net.bridge, None)}} for vmap in _dispatch(net)
    ]
    return cmds + [c for chain in network_chains(net) for c in _chain_removed("inet", chain)]


def replace(table: Table, existing_chains: Sequence[str]) -> list[Command]:
    """One atomic batch that makes the kernel's table exactly `table`.

    Base chains are never deleted (unregistering a hook waits for an RCU grace period,
    milliseconds): the batch adds what is missing, flushes every rule of the table, deletes
    the regular chains no longer wanted and adds the rules. The kernel applies it as one
    transaction, so packets see either the old rule set or the new one, never a mix."""
    fam = table.family
    base_names = {b.name for b in table.base}
    cmds: list[Command] = [{"add": {"table": {"family": fam, "name": TABLE}}}]
    cmds += [
        {
            "add": {
                "chain": {
                    "family": fam,
                    "table": TABLE,
                    "name": b.name,
                    "type": b.type,
                    "hook": b.hook,
                    "prio": b.prio,
                    "policy": b.policy,
                }
            }
        }
        for b in table.base
    ]
    cmds += [
        {
            "add": {
                "map": {
                    "family": fam,
                    "table": TABLE,
                    "name": m,
                    "type": "ifname",
                    "map": "verdict",
                }
            }
        }
        for m in table.vmaps
    ]
    cmds.append({"flush": {"table": {"family": fam, "name": TABLE}}})
    cmds += [{"flush": {"map": {"family": fam, "table": TABLE, "name": m}}} for m in table.vmaps]
    wanted = set(table.rules)
    cmds += [
        {"delete": {"chain": {"family": fam, "table": TABLE, "name": name}}}
        for name in existing_chains
        if name not in wanted and name not in base_names
    ]
    cmds += [
        {"add": {"chain": {"family": fam, "table": TABLE, "name": name}}}
        for name in table.rules
        if name not in base_names
    ]
    cmds += [
        {"add": {"rule": {"family": fam, "table": TABLE, "chain": name, "expr": expr}}}
        for name, exprs in table.rules.items()
        for expr in exprs
    ]
    cmds += [
        {
            "add": {
                "element": {
                    "family": fam,
                    "table": TABLE,
                    "name": m,
                    "elem": [[key, {"jump": {"target": chain}}] for key, chain in elements.items()],
                }
            }
        }
        for m, elements in table.vmaps.items()
        if elements
    ]
    return cmds


def read_table(ruleset: Iterable[dict[str, Any]], family: str) -> Table | None:
    """Our table as the kernel holds it, from `list ruleset` JSON (None: there is none)."""
    found = False
    base: list[BaseChain] = []
    rules: dict[str, list[Expr]] = {}
    vmaps: dict[str, dict[str, str]] = {}
    for obj in ruleset:
        kind, body = next(iter(obj.items()))
        if body.get("family") != family:
            continue
        if kind == "table" and body.get("name") == TABLE:
            found = True
        elif body.get("table") != TABLE:
            continue
        elif kind == "chain":
            rules.setdefault(body["name"], [])
            if "hook" in body:
                base.append(
                    BaseChain(
                        body["name"], body["type"], body["hook"], body["prio"], body["policy"]
                    )
                )
        elif kind == "rule":
            rules.setdefault(body["chain"], []).append(body["expr"])
        elif kind == "map" and body.get("map") == "verdict":
            vmaps[body["name"]] = {
                key: verdict.get("jump", {}).get("target", "")
                for key, verdict in body.get("elem", [])
            }
    if not found:
        return None
    return Table(family, tuple(base), rules, vmaps)


def same(actual: Table | None, desired: Table) -> bool:
    """Whether the kernel's table already is the desired one (base chains, chains, rules)."""
    if actual is None:
        return False
    return (
        set(actual.base) == set(desired.base)
        and actual.rules == desired.rules
        and actual.vmaps == desired.vmaps
    )


@dataclass(frozen=True)
class ForwardConflict:
    """A base chain of another firewall manager that drops forwarded packets by policy:
    packets our table accepts are still dropped there (e.g. Docker's `ip filter FORWARD`)."""

    family: str
    table: str
    chain: str

    def __str__(self) -> str:
        return f"{self.family} {self.table} {self.chain}: forward hook with policy drop"


def forward_conflicts(ruleset: Iterable[dict[str, Any]]) -> list[ForwardConflict]:
    """Foreign forward-hook chains with policy drop for IPv4 (ip or inet family)."""
    found = []
    for obj in ruleset:
        chain = obj.get("chain")
        if chain is None or (chain.get("table") == TABLE and chain.get("family") == "inet"):
            continue
        if (
            chain.get("hook") == "forward"
            and chain.get("policy") == "drop"
            and chain.get("family") in {"ip", "inet"}
        ):
            found.append(ForwardConflict(chain["family"], chain["table"], chain["name"]))
    return found
