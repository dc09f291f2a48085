"""The pure parts of the network plumbing: names, models, rule generation, table diffing,
foreign-firewall detection and dnsmasq's command line (no namespaces, no kernel)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

import pytest
from pydantic import ValidationError

from compute_node.net import (
    HostPlumbing,
    NetworkMode,
    NetworkPlumbing,
    PortPlumbing,
    RemoteVtep,
    names,
    rules,
)
from compute_node.net.dnsmasq import Dnsmasq, DnsmasqError, argv, hosts_text, node_dir
from compute_node.net.models import overlay_mtu

NAT = NetworkPlumbing(
    network_id="3f1c0d9e-0000-4000-8000-000000000001",
    mode=NetworkMode.NAT,
    gateway=IPv4Interface("10.0.0.1/24"),
    uplink="eth0",
    vni=100,
    mtu=1450,
)
ISO = NetworkPlumbing(
    network_id="iso", mode=NetworkMode.ISOLATED, gateway=IPv4Interface("10.1.0.1/24")
)
PORT = PortPlumbing(
    port_id="port-1",
    network_id=NAT.network_id,
    mac="52:54:00:AA:00:01",
    ipv4=IPv4Address("10.0.0.5"),
)


def test_names_are_deterministic_distinct_and_fit_ifnamsiz() -> None:
    assert names.bridge_name("x") == names.bridge_name("x")
    assert names.bridge_name("x") != names.bridge_name("y")
    for name in (names.bridge_name("x" * 64), names.tap_name("p"), names.vxlan_name("n")):
        assert len(name) <= names.IFNAMSIZ
        assert names.is_owned(name)
    assert names.tap_name("x")[4:] == names.bridge_name("x")[4:]  # one short id per id
    assert not names.is_owned("eth0")
    assert not names.is_owned("flb-xyz")
    assert not names.valid_ifname("a" * 16)
    assert not names.valid_ifname("a/b")


def test_models_refuse_inconsistent_networks_and_ports() -> None:
    with pytest.raises(ValidationError, match="uplink is required"):
        NetworkPlumbing(network_id="n", mode=NetworkMode.NAT, gateway=IPv4Interface("10.0.0.1/24"))
    with pytest.raises(ValidationError, match="needs a gateway"):
        NetworkPlumbing(network_id="n", mode=NetworkMode.ISOLATED)
    with pytest.raises(ValidationError, match="network or broadcast"):
        NetworkPlumbing(
            network_id="n", mode=NetworkMode.ISOLATED, gateway=IPv4Interface("10.0.0.0/24")
        )
    with pytest.raises(ValidationError, match="host_bridge"):
        NetworkPlumbing(network_id="n", mode=NetworkMode.BRIDGE, dhcp=False)
    with pytest.raises(ValidationError, match="multicast"):
        PortPlumbing(
            port_id="p", network_id="n", mac="01:00:5e:00:00:01", ipv4=IPv4Address("10.0.0.2")
        )
    with pytest.raises(ValidationError, match="not a guest address"):
        HostPlumbing(
            networks=(NAT,), ports=(PORT.model_copy(update={"ipv4": IPv4Address("10.0.0.1")}),)
        )
    with pytest.raises(ValidationError, match="unknown network"):
        HostPlumbing(ports=(PORT,))
    with pytest.raises(ValidationError, match="has no VXLAN"):
        HostPlumbing(
            networks=(ISO,),
            remotes=(
                RemoteVtep(
                    network_id="iso",
                    mac="52:54:00:00:00:02",
                    ipv4=IPv4Address("10.1.0.9"),
                    remote=IPv4Address("192.0.2.1"),
                ),
            ),
        )
    assert PORT.mac == "52:54:00:aa:00:01"  # normalised: nftables lists MACs in lower case
    assert (
        NetworkPlumbing(
            network_id="b", mode=NetworkMode.BRIDGE, host_bridge="br0", dhcp=False
        ).bridge
        == "br0"
    )


def test_overlay_mtu_subtracts_vxlan_encapsulation() -> None:
    assert overlay_mtu(1500, vxlan=True) == 1450
    assert overlay_mtu(9000, vxlan=False) == 9000
    with pytest.raises(ValueError, match="leaves"):
        overlay_mtu(600, vxlan=True)


def test_anti_spoofing_chain_pins_mac_ip_and_blocks_servers() -> None:
    table = rules.bridge_table([PORT])
    chain = rules.port_chain(PORT)
    iifname = {"meta": {"key": "iifname"}}
    from_vxlan = {"match": {"op": "==", "left": iifname, "right": "flv-*"}}
    udp_dport = {"payload": {"protocol": "udp", "field": "dport"}}
    assert table.rules["prerouting"] == [
        # DHCP from another host (over VXLAN) is dropped: each host serves its own ports.
        [from_vxlan, {"match": {"op": "==", "left": udp_dport, "right": 67}}, {"drop": None}],
        [from_vxlan, {"match": {"op": "==", "left": udp_dport, "right": 68}}, {"drop": None}],
        [{"vmap": {"key": iifname, "data": "@ports"}}],
    ]
    assert table.vmaps == {"ports": {PORT.tap: chain}}
    text = str(table.rules[chain])
    assert "'52:54:00:aa:00:01'" in text
    assert "{'set': ['0.0.0.0', '10.0.0.5']}" in text  # ARP: its address, or a probe
    assert "'right': 67}}, {'drop': None}" in text  # no DHCP server replies
    assert "nd-router-advert" in text
    assert "8021q" in text


def test_inet_table_masquerades_nat_and_drops_isolated_forwarding() -> None:
    table = rules.inet_table([NAT, ISO])
    post = table.rules["postrouting"]
    assert len(post) == 1
    assert {"masquerade": None} in post[0]
    assert {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "eth0"}} in post[0]
    # forward and input: one lookup by bridge, to the network's own chains.
    assert table.rules["forward"] == rules.INET_DISPATCH["forward"]
    assert table.rules["input"] == rules.INET_DISPATCH["input"]
    for net in (NAT, ISO):
        short = net.short_id
        assert table.vmaps[rules.FROM_BRIDGE_MAP][net.bridge] == f"fwd-from-{short}"
        assert table.vmaps[rules.TO_BRIDGE_MAP][net.bridge] == f"fwd-to-{short}"
        assert table.vmaps[rules.INPUT_MAP][net.bridge] == f"in-{short}"
        for chain in (f"fwd-from-{short}", f"fwd-to-{short}", f"in-{short}"):
            assert table.rules[chain][-1] == [{"drop": None}]  # nothing else passes
    iso = str([table.rules[f"fwd-from-{ISO.short_id}"], table.rules[f"fwd-to-{ISO.short_id}"]])
    assert "eth0" not in iso  # an isolated bridge forwards only within itself
    nat_out = str(table.rules[f"fwd-from-{NAT.short_id}"])
    assert "eth0" in nat_out
    assert "10.0.0.0" in nat_out


def test_a_network_added_alone_makes_the_same_table() -> None:
    """`network_added` on the table of the other networks gives what `inet_table` gives for
    them all: its chains, rules and map entries, nothing of the others touched."""
    before = rules.inet_table([NAT])
    after = rules.inet_table([NAT, ISO])
    cmds = rules.network_added(ISO)
    added: dict[str, list[rules.Expr]] = {}
    elements: dict[str, dict[str, str]] = {}
    for cmd in cmds:
        ((verb, body),) = cmd.items()
        if verb == "add" and "rule" in body:
            added.setdefault(body["rule"]["chain"], []).append(body["rule"]["expr"])
        elif verb == "add" and "element" in body:
            ((key, verdict),) = body["element"]["elem"]
            elements.setdefault(body["element"]["name"], {})[key] = verdict["jump"]["target"]
    assert {**before.rules, **added} == after.rules
    assert {m: {**before.vmaps[m], **elements.get(m, {})} for m in before.vmaps} == after.vmaps
    # Chains and rules before the map entries that lead to them.
    kinds = ["element" if "element" in next(iter(c.values())) else "other" for c in cmds]
    assert kinds[-3:] == ["element"] * 3
    assert "element" not in kinds[:-3]


def test_replace_is_one_batch_that_keeps_base_chains_and_deletes_stale_ones() -> None:
    table = rules.bridge_table([PORT])
    cmds = rules.replace(table, ["prerouting", "port-deadbeef", rules.port_chain(PORT)])
    kinds = [next(iter(c)) for c in cmds]
    assert kinds[:5] == ["add", "add", "add", "flush", "flush"]  # table, chain, map; flush both
    assert cmds[-1]["add"]["element"]["elem"] == [
        [PORT.tap, {"jump": {"target": rules.port_chain(PORT)}}]
    ]
    deleted = [c["delete"]["chain"]["name"] for c in cmds if "delete" in c]
    assert deleted == ["port-deadbeef"]  # never a base chain (hook unregistration is slow)


def test_read_table_and_same_compare_what_the_kernel_lists() -> None:
    desired = rules.bridge_table([PORT])
    listing: list[dict[str, object]] = [
        {"table": {"family": "bridge", "name": "flotilla", "handle": 1}},
        {"chain": {"family": "bridge", "table": "flotilla", "name": "prerouting", "handle": 1,
                   "type": "filter", "hook": "prerouting", "prio": -200, "policy": "accept"}},
        {"chain": {"family": "bridge", "table": "flotilla", "name": rules.port_chain(PORT),
                   "handle": 2}},
        {"table": {"family": "bridge", "name": "other", "handle": 2}},
        {"map": {"family": "bridge", "name": "ports", "table": "flotilla", "type": "ifname",
                 "handle": 3, "map": "verdict",
                 "elem": [[PORT.tap, {"jump": {"target": rules.port_chain(PORT)}}]]}},
    ]  # fmt: skip
    for chain, exprs in desired.rules.items():
        listing += [
            {
                "rule": {
                    "family": "bridge",
                    "table": "flotilla",
                    "chain": chain,
                    "handle": 9,
                    "expr": e,
                }
            }
            for e in exprs
        ]
    actual = rules.read_table(listing, "bridge")
    assert rules.same(actual, desired)
    assert rules.read_table(listing, "inet") is None
    listing.pop()  # one rule missing
    assert not rules.same(rules.read_table(listing, "bridge"), desired)
    assert not rules.same(rules.read_table(listing[:4], "bridge"), desired)  # no map entry


def test_incremental_port_batches_build_the_chain_before_the_map_entry() -> None:
    added = rules.port_added(PORT)
    assert next(iter(added[0])) == "add"
    assert "chain" in added[0]["add"]
    assert "element" in added[-1]["add"]
    removed = rules.port_removed(PORT)
    assert [next(iter(c)) for c in removed] == ["delete", "flush", "delete"]
    assert removed[0]["delete"]["element"]["elem"] == [PORT.tap]


def test_foreign_forward_drop_policies_are_found() -> None:
    def chain(family: str, table: str, name: str, hook: str, policy: str) -> dict[str, object]:
        body = {"family": family, "table": table, "name": name, "hook": hook, "policy": policy}
        return {"chain": body}

    listing = [
        chain("ip", "filter", "FORWARD", "forward", "drop"),
        chain("ip", "filter", "INPUT", "input", "drop"),
        chain("inet", "flotilla", "forward", "forward", "drop"),
        chain("inet", "fw", "fwd", "forward", "accept"),
    ]
    assert rules.forward_conflicts(listing) == [rules.ForwardConflict("ip", "filter", "FORWARD")]


def test_dnsmasq_serves_static_entries_with_mtu_and_no_forwarding(tmp_path: Path) -> None:
    files = {k: tmp_path / f"n.{k}" for k in ("hosts", "pid", "argv", "log")}
    cmd = argv(NAT, files)
    assert f"--interface={NAT.bridge}" in cmd
    assert "--bind-interfaces" in cmd
    assert "--dhcp-range=10.0.0.0,static,255.255.255.0,1h" in cmd
    assert "--dhcp-option-force=option:mtu,1450" in cmd
    assert "--dhcp-option=option:router,10.0.0.1" in cmd
    assert "--no-resolv" in cmd
    assert "--dhcp-option=option:router" in argv(ISO, files)  # isolated: no default route
    assert hosts_text([PORT]) == "52:54:00:aa:00:01,10.0.0.5\n"


def test_each_node_has_its_own_dnsmasq_run_dir(tmp_path: Path) -> None:
    base = Path("/run/flotilla/dnsmasq")
    mine = node_dir(base, "h1", tmp_path / "a")
    assert mine.parent == base
    assert mine.name.startswith("h1-")
    assert node_dir(base, "h1", tmp_path / "x" / ".." / "a") == mine  # the resolved state dir
    assert node_dir(base, "h1", tmp_path / "b") != mine  # two nodes of one machine


def test_a_run_dir_dnsmasq_cannot_use_is_refused_before_dnsmasq_starts(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(DnsmasqError, match=r"cannot make dnsmasq's run dir .*net_dnsmasq_dir"):
        Dnsmasq(tmp_path / "state", run_dir=blocker / "dnsmasq").ensure(ISO, [PORT])
    private = tmp_path / "private"
    private.mkdir()
    private.chmod(0o700)
    with pytest.raises(DnsmasqError, match="is not searchable by others"):
        Dnsmasq(tmp_path / "state", run_dir=private / "dnsmasq").ensure(ISO, [PORT])
    assert not list(tmp_path.rglob("*.hosts"))


def test_a_network_removed_alone_takes_its_chains_and_entries_only() -> None:
    cmds = rules.network_removed(ISO)
    deleted_elements = [c["delete"]["element"] for c in cmds if "element" in c.get("delete", {})]
    assert {e["name"]: e["elem"] for e in deleted_elements} == {
        rules.FROM_BRIDGE_MAP: [ISO.bridge],
        rules.TO_BRIDGE_MAP: [ISO.bridge],
        rules.INPUT_MAP: [ISO.bridge],
    }
    deleted_chains = [c["delete"]["chain"]["name"] for c in cmds if "chain" in c.get("delete", {})]
    assert deleted_chains == list(rules.network_chains(ISO))
    # The entries that lead to the chains go first.
    first_chain = next(i for i, c in enumerate(cmds) if "chain" in next(iter(c.values())))
    assert all("element" in next(iter(c.values())) for c in cmds[:first_chain])
