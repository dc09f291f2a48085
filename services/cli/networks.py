"""Network verbs, virsh's names: net-create, net-list, net-info, net-delete, net-dhcp-leases,
port-list, domiflist."""

from __future__ import annotations

import argparse
import uuid
from typing import Any

from services.cli.client import Exit
from services.cli.domains import CliError, Session, resolve
from services.cli.main import positive_int
from services.cli.render import emit_json, fields, table


def list_networks(s: Session) -> list[dict[str, Any]]:
    body = s.api.request("GET", "/v1/networks")
    return list(body.get("networks", [])) if isinstance(body, dict) else []


def resolve_network(s: Session, ref: str) -> dict[str, Any]:
    """A network by uuid or by name (within what the token sees)."""
    try:
        uuid.UUID(ref)
    except ValueError:
        pass
    else:
        found: dict[str, Any] = s.api.request("GET", f"/v1/networks/{ref}")
        return found
    named = [n for n in list_networks(s) if n.get("name") == ref]
    if not named:
        raise CliError(f"network {ref!r} not found", Exit.NOT_FOUND)
    if len(named) > 1:
        ids = ", ".join(f"{n['network_id']} ({n.get('project', '?')})" for n in named)
        raise CliError(f"several networks are named {ref!r}: {ids}; give a uuid", Exit.NOT_FOUND)
    return named[0]


def list_ports(s: Session, **filters: str) -> list[dict[str, Any]]:
    params = {k: v for k, v in filters.items() if v}
    body = s.api.request("GET", "/v1/ports", params=params)
    return list(body.get("ports", [])) if isinstance(body, dict) else []


def cmd_net_create(s: Session, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name, "mode": args.mode, "dhcp": not args.no_dhcp}
    for key in ("subnet", "gateway", "mtu", "host_bridge"):
        value = getattr(args, key)
        if value is not None:
            body[key] = value
    if args.shared:
        body["shared"] = True
    network = s.api.request("POST", "/v1/networks", json=body)
    if s.json:
        emit_json(network)
    else:
        print(f"Network {network['name']} created ({network['network_id']})")
    return 0


def cmd_net_list(s: Session, _args: argparse.Namespace) -> int:
    items = list_networks(s)
    if s.json:
        emit_json(items)
        return 0
    rows = [
        (
            n.get("name"),
            n.get("mode"),
            n.get("subnet"),
            n.get("ports"),
            "yes" if n.get("shared") else "no",
            n.get("project"),
            n.get("network_id"),
        )
        for n in sorted(items, key=lambda n: (str(n.get("project")), str(n.get("name"))))
    ]
    print(table(("Name", "Mode", "Subnet", "Ports", "Shared", "Project", "Id"), rows))
    return 0


def cmd_net_info(s: Session, args: argparse.Namespace) -> int:
    n = resolve_network(s, args.network)
    if s.json:
        emit_json(n)
        return 0
    pairs: list[tuple[str, Any]] = [
        ("Name", n.get("name")),
        ("Id", n.get("network_id")),
        ("Project", n.get("project")),
        ("Mode", n.get("mode")),
        ("Subnet", n.get("subnet")),
        ("Gateway", n.get("gateway")),
        ("MTU", n.get("mtu")),
        ("VNI", n.get("vni")),
        ("DHCP", "yes" if n.get("dhcp") else "no"),
        ("Host bridge", n.get("host_bridge")),
        ("Shared", "yes" if n.get("shared") else "no"),
        ("Ports", n.get("ports")),
    ]
    print(fields(pairs))
    return 0


def cmd_net_delete(s: Session, args: argparse.Namespace) -> int:
    n = resolve_network(s, args.network)
    s.api.request("DELETE", f"/v1/networks/{n['network_id']}")
    if s.json:
        emit_json({"network_id": n["network_id"], "deleted": True})
    else:
        print(f"Network {n['name']} deleted")
    return 0


def cmd_net_dhcp_leases(s: Session, args: argparse.Namespace) -> int:
    n = resolve_network(s, args.network)
    body = s.api.request("GET", f"/v1/networks/{n['network_id']}/dhcp-leases")
    leases = list(body.get("leases", [])) if isinstance(body, dict) else []
    if s.json:
        emit_json(leases)
        return 0
    rows = [
        (x.get("mac"), x.get("ipv4"), x.get("domain_id"), x.get("host"), x.get("port_id"))
        for x in leases
    ]
    print(table(("MAC address", "IP address", "Domain", "Host", "Port"), rows))
    return 0


def cmd_port_list(s: Session, args: argparse.Namespace) -> int:
    network = resolve_network(s, args.network)["network_id"] if args.network else ""
    domain = resolve(s, args.domain)["id"] if args.domain else ""
    items = list_ports(s, network=network, domain=domain)
    if s.json:
        emit_json(items)
        return 0
    rows = [
        (
            p.get("port_id"),
            p.get("network"),
            p.get("mac"),
            p.get("ipv4"),
            p.get("domain_id"),
            p.get("nic"),
            p.get("host"),
            p.get("state"),
        )
        for p in items
    ]
    print(table(("Port", "Network", "MAC", "IPv4", "Domain", "NIC", "Host", "State"), rows))
    return 0


def cmd_domiflist(s: Session, args: argparse.Namespace) -> int:
    d = resolve(s, args.domain)
    items = list_ports(s, domain=d["id"])
    if s.json:
        emit_json(items)
        return 0
    rows = [
        (f"nic{p.get('nic')}", "network", p.get("network"), "virtio", p.get("mac"), p.get("ipv4"))
        for p in sorted(items, key=lambda p: int(p.get("nic", 0)))
    ]
    print(table(("Interface", "Type", "Source", "Model", "MAC", "IPv4"), rows))
    return 0


def add_verbs(verb: Any) -> None:
    """Register the network verbs with `services.cli.main`'s `verb(name, help, func)`."""
    p = verb("net-create", "create a network in your project", cmd_net_create)
    p.add_argument("name")
    p.add_argument("--mode", choices=["nat", "isolated", "bridge"], default="nat")
    p.add_argument("--subnet", help="e.g. 10.0.0.0/24 (nat, isolated)")
    p.add_argument("--gateway", help="default: the subnet's first address")
    p.add_argument("--mtu", type=positive_int, help="default: the underlay's less VXLAN's 50")
    p.add_argument("--host-bridge", help="bridge mode: the existing host bridge")
    p.add_argument("--no-dhcp", action="store_true", help="serve no DHCP (bridge mode: required)")
    p.add_argument("--shared", action="store_true", help="usable by every project (admin)")

    verb("net-list", "list networks (yours and the shared ones)", cmd_net_list)

    for name, help_text, func in (
        ("net-info", "show one network", cmd_net_info),
        ("net-delete", "delete a network (refused while it has ports)", cmd_net_delete),
        ("net-dhcp-leases", "a network's DHCP entries (MAC → address)", cmd_net_dhcp_leases),
    ):
        p = verb(name, help_text, func)
        p.add_argument("network", help="name or uuid")

    p = verb("port-list", "list ports", cmd_port_list)
    p.add_argument("--network", help="only this network's (name or uuid)")
    p.add_argument("--domain", help="only this domain's (name or uuid)")

    p = verb("domiflist", "a domain's network interfaces", cmd_domiflist)
    p.add_argument("domain", help="name or uuid")
